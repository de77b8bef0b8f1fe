"""Online adaptation of the output head to the file being coded (dynamic evaluation)."""

from __future__ import annotations

import torch

from toolkit.text.engines import Top

__all__ = ["HeadAdapter"]


class HeadAdapter:
    """Online adaptation (dynamic evaluation) of the output head to the file being coded.

    A model trained on other text is refitted, as it codes, to the text it
    has just coded: once ``adapt_tokens`` coded tokens are recorded, one SGD
    step (rate ``adapt``) on their cross-entropy, taken by an untied copy of
    the output head. The head's gradient needs no autograd: for logits
    ``h W^T`` the cross-entropy's gradient is ``(p - onehot(y))^T h / n``,
    where ``p`` is the model's softmax, which the coding step computes
    anyway, and ``h`` is the head's input, kept from the coding forward. So
    an update costs one matmul over the recorded tokens.

    The encoder and the decoder code with the same weights, take the same
    steps on the same tokens, and so hold the same weights at every step.
    One adapter lives for one file (one coding session), like the n-gram
    table. The head is an fp32 master; a bf16 engine codes with a bf16 cast
    of it, made after each update (SGD steps are far below bf16's
    resolution: bf16 masters lost 1.8% on held-out prose).

    Tuning (stage-3 model, 256 KiB of held-out prose and the licences, bits
    per byte): rate 0.03 with a step every 128 tokens from every stream gave
    1.557 and 1.072, against 1.594 and 1.100 for the earlier setting (rate
    0.1, every 256 tokens of every other stream, training the last MLP and
    the final norm as well); 0.045 gave 1.567 and 1.078. Training the last
    MLP and the norm too gained 0.6% and 0.2% at this rate, for a backward
    that cost about a fifth of the coding time. ``adapt_rows`` n > 1 trains
    on every n-th stream only (rotating by step).
    """

    def __init__(self, base: Top, lr: float, tokens: int, rows: int, dtype: torch.dtype):
        self.base, self.lr, self.dtype = base, lr, dtype
        self.master = base.head.detach().float().clone()
        self.head = self.master.to(dtype)
        self.tokens, self.rows = tokens, rows
        self.seen = self.pending = 0
        self._hidden: torch.Tensor | None = None
        self._grads: list[torch.Tensor] = []
        self._inputs: list[torch.Tensor] = []

    def logits(self, r: torch.Tensor) -> torch.Tensor:
        """The coding step's logits: the model's last MLP and norm, then the adapted head."""
        self._hidden = self.base.hidden(r)
        return self._hidden @ self.head.T

    def observe(self, probs: torch.Tensor, targets: list[int], active: list[bool]) -> None:
        """Record the step's coded tokens (active streams) with the model's ``probs``; train when due."""
        # with ``rows`` n > 1, every n-th active stream, starting one further at each step
        keep = [j for j, a in enumerate(active) if a][self.seen % self.rows :: self.rows]
        self.seen += 1
        if self._hidden is None or not keep:
            return
        idx = torch.tensor(keep, dtype=torch.long)
        g = probs[idx].clone()
        g[torch.arange(len(keep)), torch.tensor([targets[j] for j in keep], dtype=torch.long)] -= 1.0
        self._grads.append(g)
        self._inputs.append(self._hidden[idx])
        self._hidden = None
        self.pending += len(keep)
        if self.pending >= self.tokens:
            self.flush()

    def flush(self) -> None:
        if not self._grads:
            return
        g, h = torch.cat(self._grads), torch.cat(self._inputs)
        n = self.pending
        self._grads, self._inputs, self.pending = [], [], 0
        grad = g.to(h.dtype).T @ h
        if not torch.isfinite(grad.sum()):  # one pass: a NaN or inf anywhere makes the sum one
            return  # keep the weights (both sides see the same numbers)
        # the coder's alphabet may stop short of the head (a BOS row that is never coded)
        self.master[: grad.shape[0]].add_(grad, alpha=-self.lr / n)
        self.head = self.master.to(self.dtype)
