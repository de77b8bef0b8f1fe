"""The integer engine: a Llama forward in integer arithmetic, identical on every machine.

A float forward gives slightly different logits under another BLAS, thread
count, SIMD width or device, and a coder whose decoder sees other
probabilities than its encoder loses the file. This forward computes every
number that decides a probability exactly, so that cannot happen:

* linear layers: int8 weights (one scale per output row) and int8
  activations (one scale per token, from its largest value), multiplied in
  float32. The products and their sums are integers below 2**24
  (127 * 127 * K for K <= 1040 inputs), which float32 holds exactly, so any
  summation order (any BLAS, thread count or GPU) gives the same integers:
  int32 accumulation, with the fastest GEMM each machine has;
* requantization: integer multipliers and rounding shifts (:mod:`toolkit.text.fixed`);
  the residual stream is int64 in Q16;
* RMSNorm: an exact integer square root; the norm's gain is folded into the
  next layer's weights and the 1/rms factor into its output scale;
* rotary embeddings, softmax and SiLU: tables built with integer and
  :mod:`decimal` arithmetic, the same everywhere;
* attention: int8 queries and keys (a scale per head and token); the
  attention-weighted sum of int8 values runs in float64 on integers below
  2**53, exact again;
* the output head keeps 24 fractional bits (it is the layer the adapter
  trains): a float64 product of integers below 2**53.

``step`` returns the next-token probabilities as integers (Q30); the
compiled loops are in :mod:`toolkit.text.intkernels`. Weights come from :func:`quantize` (float weights to
the integer arrays this engine reads), stored as safetensors.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from toolkit.errors import ConfigError
from toolkit.text import intkernels as ik
from toolkit.text.fixed import exp_table, rope_table, rshr, sigmoid_table
from toolkit.text.llama import rope_theta

__all__ = ["IntLlama", "IntHead", "quantize", "normalize_q30", "FRAC", "HEAD_FRAC", "MAX_WINDOW"]

#: fractional bits of activations (the residual stream and every layer's output)
FRAC = 16
#: fractional bits of the output head's weights
HEAD_FRAC = 24
#: fractional bits of the per-row weight multipliers
_COL_BITS = 34
#: activations are clamped to +-2**(FRAC + _CLAMP_BITS) so that no product below can overflow int64
_CLAMP_BITS = 10
#: RoPE cos and sin precision
_ROPE_BITS = 14
#: the largest K whose int8 dot products stay below 2**24 (exact in float32)
MAX_INPUTS = (1 << 24) // (127 * 127)
#: the longest attention window whose weighted sums of values stay inside int64
MAX_WINDOW = 4096


def folded_linears(cfg: Any, weights: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Each linear layer's float64 weights as the engine multiplies them: q, k and v stacked, gate and up
    stacked, and the RMSNorm gains folded into the weights that read the norm's output."""

    def f(name: str) -> np.ndarray:
        return np.asarray(weights[name], dtype=np.float64)

    out = {}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        ln1, ln2 = f(p + "input_layernorm.weight"), f(p + "post_attention_layernorm.weight")
        out[f"{i}.qkv"] = np.concatenate([f(p + f"self_attn.{n}_proj.weight") for n in "qkv"]) * ln1[None, :]
        out[f"{i}.o"] = f(p + "self_attn.o_proj.weight")
        out[f"{i}.gu"] = np.concatenate([f(p + "mlp.gate_proj.weight"), f(p + "mlp.up_proj.weight")]) * ln2[None, :]
        out[f"{i}.down"] = f(p + "mlp.down_proj.weight")
    return out


def quantize(cfg: Any, weights: Mapping[str, np.ndarray], clip: Mapping[str, np.ndarray] | None = None
             ) -> dict[str, np.ndarray]:
    """The integer engine's arrays from a Llama state dict (float arrays, names as in ``transformers``).

    RMSNorm gains are folded into the weights that read the norm's output;
    each output row of a linear layer becomes int8 with the scale of its
    largest weight, or of ``clip[name][row]`` where calibration chose a
    smaller one (values beyond are clamped). The embedding is stored in Q16,
    the (norm-folded) output head in Q24.
    """
    clip = clip or {}

    def f(name: str) -> np.ndarray:
        return np.asarray(weights[name], dtype=np.float64)

    out: dict[str, np.ndarray] = {}

    def linear(key: str, w: np.ndarray) -> None:
        if w.shape[1] > MAX_INPUTS:
            raise ValueError(f"{key}: {w.shape[1]} inputs; the exact int8 product allows at most {MAX_INPUTS}")
        amax = np.abs(w).max(axis=1)
        if key in clip:
            amax = np.minimum(amax, clip[key])
        amax = np.maximum(amax, 1e-12)
        out[key + ".q"] = np.clip(np.rint(w * (127.0 / amax[:, None])), -127, 127).astype(np.int8)
        out[key + ".m"] = np.rint(amax * (2.0**_COL_BITS / (127 * 127))).astype(np.int64)

    out["embed"] = np.rint(f("model.embed_tokens.weight") * 2.0**FRAC).astype(np.int64)
    for key, w in folded_linears(cfg, weights).items():
        linear(key, w)
    tied = "lm_head.weight" not in weights and getattr(cfg, "tie_word_embeddings", False)
    head = f("model.embed_tokens.weight" if tied else "lm_head.weight") * f("model.norm.weight")[None, :]
    out["head"] = np.rint(head * 2.0**HEAD_FRAC).astype(np.int64)
    # the adapter trains the float head (before the folded gain): its steps on the folded head are the
    # float steps times gain**2, per column (Q16)
    out["head_rate"] = np.rint(f("model.norm.weight") ** 2 * 2.0**16).astype(np.int64)
    return out


class _Linear:
    """One int8 linear layer: int8 weights ``[O, K]``, one multiplier per output row."""

    def __init__(self, q: np.ndarray, m: np.ndarray, device: str | None = None):
        self.q = np.ascontiguousarray(q, dtype=np.int8)
        self.m = np.ascontiguousarray(m, dtype=np.int64)
        self.device = device
        self._wt: np.ndarray | None = None
        self._dev: tuple | None = None

    @property
    def wt(self) -> np.ndarray:
        """The weights transposed, as float32 (int8 values): what BLAS multiplies."""
        if self._wt is None:
            self._wt = np.ascontiguousarray(self.q.T, dtype=np.float32)
        return self._wt

    def __call__(self, x8: np.ndarray, r: np.ndarray) -> np.ndarray:
        """Rows ``x8`` (int8 ``[R, K]``) standing for ``x8[i] * r[i] / (127 * 2**FRAC)``, times ``W^T``, in Q16.

        A few rows take the compiled int8 loop; more take float32 BLAS, whose products and sums of int8
        values stay below 2**24 and so are exact: the same integers either way. With a torch
        ``device``, the layer runs there (:func:`toolkit.kernels.int_linear.int_linear`: Triton on CUDA),
        and again gives the same integers.
        """
        if self.device is not None:
            return self._on_device(x8, r)
        out = np.empty((x8.shape[0], self.q.shape[0]), dtype=np.int64)
        if x8.shape[0] < ik.SMALL_ROWS:
            ik.linear_small(x8, r, self.q, self.m, out)
        else:
            ik.requant(x8.astype(np.float32) @ self.wt, r, self.m, out)
        return out


    def weights_changed(self) -> None:
        """``q``, ``m`` and ``wt`` were rewritten in place: drop the device copy of the old ones."""
        self._dev = None

    def _on_device(self, x8: np.ndarray, r: np.ndarray) -> np.ndarray:
        import torch

        from toolkit.kernels.int_linear import int_linear

        if self._dev is None:
            self._dev = (torch.from_numpy(self.q).to(self.device), torch.from_numpy(self.m).to(self.device))
        w, m = self._dev
        y = int_linear(torch.from_numpy(x8).to(self.device), torch.from_numpy(r).to(self.device), w, m)
        return y.cpu().numpy()


def _quant_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    q = np.empty(x.shape, dtype=np.int8)
    m = np.empty(x.shape[0], dtype=np.int64)
    ik.quant_rows(x, q, m)
    return q, m


class IntLlama:
    """Lockstep forward of a Llama-family model in integer arithmetic, with an int8 KV cache.

    The same cache policy as :class:`~toolkit.text.engines.LeanLlama`:
    ``keep > 0`` restarts the window from the last ``keep`` tokens,
    ``keep == 0`` is a ring buffer.
    """

    def __init__(self, cfg: Any, q: Mapping[str, np.ndarray], window: int, keep: int, device: str | None = None):
        """``device``: a torch device for the linear layers (the default: numpy and compiled loops on the CPU)."""
        if window > MAX_WINDOW:
            raise ConfigError(f"the integer engine attends to at most {MAX_WINDOW} tokens; window={window}")
        self.h = cfg.num_attention_heads
        self.kv = getattr(cfg, "num_key_value_heads", None) or self.h
        self.d = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.h
        self.hidden = cfg.hidden_size
        self.window, self.keep = window, keep
        self.theta = rope_theta(cfg)
        self.cos, self.sin = rope_table(self.theta, self.d, range(window), _ROPE_BITS)
        self.eps = max(1, round(cfg.rms_norm_eps * 2.0 ** (2 * FRAC)))
        # scores: q.k * rq * rk / (127**2 * sqrt(d)) in Q16, with 1/sqrt(d) from an exact integer square root
        self.score_scale = math.isqrt((1 << 32) // self.d) * (1 << 24) // (127 * 127 * 4)
        self.embed = np.asarray(q["embed"], dtype=np.int64)
        self.device = device
        self.layers = [tuple(_Linear(q[f"{i}.{n}.q"], q[f"{i}.{n}.m"], device) for n in ("qkv", "o", "gu", "down"))
                       for i in range(cfg.num_hidden_layers)]
        self.inter = self.layers[0][2].m.shape[0] // 2 if self.layers else 0
        self.head = np.asarray(q["head"], dtype=np.int64)
        self.head_rate = np.asarray(q["head_rate"], dtype=np.int64)
        self.att_exp = exp_table(256, 16, 15)
        self.sig = sigmoid_table(64, 16, 15)
        self.exp30 = exp_table(1024, 20, 30)

    def new_head(self, lr: float, tokens: int, rows: int) -> IntHead:
        """A fresh copy of the output head that adapts to one file (rate ``lr``; 0 keeps it fixed)."""
        return IntHead(self.head, self.head_rate, lr, tokens, rows, self.device)

    def reset(self, streams: int) -> None:
        shape = (streams, self.kv, self.window, self.d)
        self.k8 = [np.zeros(shape, dtype=np.int8) for _ in self.layers]
        self.v8 = [np.zeros(shape, dtype=np.int8) for _ in self.layers]
        self.rk = [np.ones(shape[:3], dtype=np.int64) for _ in self.layers]
        self.rv = [np.ones(shape[:3], dtype=np.int64) for _ in self.layers]
        self.pos = 0
        self.history: list[np.ndarray] = []

    def select(self, rows: np.ndarray) -> None:
        """Keep only these streams (rows of the batch), in this order."""
        for cache in (self.k8, self.v8, self.rk, self.rv):
            cache[:] = [c[rows] for c in cache]
        self.history = [h[rows] for h in self.history]

    def step(self, tokens: np.ndarray, head: IntHead, alphabet: int, pool: Any = None, parts: int = 1
             ) -> np.ndarray:
        """Probabilities (Q30, peak 2**30, int64 ``[S, alphabet]``) of the next token of every stream.

        With a thread pool, the streams are cut into ``parts`` row ranges that run at once: streams
        are independent until the head, the compiled loops and BLAS release the GIL, and the integers
        do not depend on the cut.
        """
        ring = self.keep == 0
        batch = tokens[:, None]
        if not ring:
            self.history.append(tokens)
            if self.pos >= self.window:
                self.history = self.history[-self.keep :]
                self.pos = 0
                batch = np.stack(self.history, axis=1)
        s = len(tokens)

        def run(rows: slice) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            x8, r = self._forward(batch[rows], ring, rows)
            probs = np.empty((x8.shape[0], alphabet), dtype=np.int64)
            ik.probs_q30(np.ascontiguousarray(head.logits_of(x8, r)[:, :alphabet]), self.exp30, probs)
            return x8, r, probs

        parts = max(1, min(parts, s // 8))
        if pool is None or parts == 1:
            done = [run(slice(0, s))]
        else:
            edges = [s * i // parts for i in range(parts + 1)]
            done = list(pool.map(run, [slice(a, b) for a, b in zip(edges[:-1], edges[1:], strict=True)]))
        self.pos += batch.shape[1]
        if len(done) == 1:
            head.remember(*done[0][:2])
            return done[0][2]
        head.remember(np.concatenate([d[0] for d in done]), np.concatenate([d[1] for d in done]))
        return np.concatenate([d[2] for d in done])

    def _norm_quant(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        q = np.empty(x.shape, dtype=np.int8)
        r = np.empty(x.shape[0], dtype=np.int64)
        ik.norm_quant(x, self.eps, q, r)
        return q, r

    def _forward(self, tokens: np.ndarray, ring: bool, rows: slice) -> tuple[np.ndarray, np.ndarray]:
        """The head's input (int8 rows and their scales) for the streams ``rows``; their caches are updated."""
        s, n_new = tokens.shape
        pos0 = self.pos
        if pos0 + n_new <= self.window:
            cos, sin = self.cos[pos0 : pos0 + n_new], self.sin[pos0 : pos0 + n_new]
        else:
            cos, sin = rope_table(self.theta, self.d, range(pos0, pos0 + n_new), _ROPE_BITS)
        if ring:
            slot, n_keys = pos0 % self.window, min(pos0 + 1, self.window)
        else:
            slot, n_keys = -1, pos0 + n_new
            if n_new > 1 and pos0 != 0:
                raise RuntimeError("multi-token step must start at position 0")
        lim = 1 << (FRAC + _CLAMP_BITS)
        x = self.embed[tokens.reshape(-1)]  # [S * L, D] Q16
        att = np.empty((s, n_new, self.h * self.d), dtype=np.int64)
        for i, (wqkv, wo, wgu, wd) in enumerate(self.layers):
            qkv = wqkv(*self._norm_quant(x)).reshape(s, n_new, -1)
            ik.attend(qkv, self.h, self.kv, self.d, self.k8[i][rows], self.rk[i][rows], self.v8[i][rows],
                      self.rv[i][rows], cos, sin, pos0, slot, n_keys, self.att_exp, self.score_scale, att)
            ik.add_clamp(x, wo(*_quant_rows(att.reshape(s * n_new, -1))), lim)
            gu = wgu(*self._norm_quant(x))
            h8 = np.empty((gu.shape[0], self.inter), dtype=np.int8)
            r = np.empty(gu.shape[0], dtype=np.int64)
            ik.silu_mul_quant(gu, self.inter, self.sig, h8, r)
            ik.add_clamp(x, wd(h8, r), lim)
        return self._norm_quant(np.ascontiguousarray(x.reshape(s, n_new, -1)[:, -1]))


class IntHead:
    """The output head and its online adaptation in integer arithmetic.

    The master weights are Q24 integers (SGD steps are far below int8's
    resolution); the head that codes is their int8 copy, one scale per
    row, made again after each update, as the float engine codes with a
    bf16 copy of its fp32 master. :meth:`logits` keeps the head's input; :meth:`observe` records the coded
    tokens with the model's integer probabilities, and every ``tokens``
    recorded tokens one SGD step on their cross-entropy moves the head
    (the gradient ``(p - onehot)^T x``, as :class:`~toolkit.text.adapt.HeadAdapter`
    takes it, here with the learning rate in Q20 and exact integer products).
    """

    def __init__(self, head: np.ndarray, rate: np.ndarray, lr: float, tokens: int, rows: int,
                 device: str | None = None):
        self.w = np.asarray(head, dtype=np.float64).copy()  # integers below 2**53: exact
        self.device = device
        self._requant()
        self.lr = round(lr * (1 << 20))
        self.rate = rate  # per column, Q16
        self.tokens, self.rows = tokens, rows
        self.seen = self.pending = 0
        self._x: tuple[np.ndarray, np.ndarray] | None = None
        self.pool: Any = None  # a thread pool to split the update's rows over, while one is lent
        self._grads: list[np.ndarray] = []
        self._inputs: list[np.ndarray] = []

    def logits(self, x8: np.ndarray, r: np.ndarray) -> np.ndarray:
        """Logits in Q16 of rows ``x8 * r / (127 * 2**FRAC)``; the rows are kept for :meth:`observe`."""
        self.remember(x8, r)
        return self.logits_of(x8, r)

    def remember(self, x8: np.ndarray, r: np.ndarray) -> None:
        self._x = (x8, r)

    def logits_of(self, x8: np.ndarray, r: np.ndarray) -> np.ndarray:
        return self.coding(x8, r)

    def _requant(self) -> None:
        q = np.empty(self.w.shape, dtype=np.int8)
        m = np.empty(self.w.shape[0], dtype=np.int64)
        # the row scale in the multiplier format of _Linear: amax / 2**24 * 2**34 / 127**2
        ik.quant_head(self.w, q, m, HEAD_FRAC, _COL_BITS)
        self.coding = _Linear(q, m, self.device)

    def observe(self, p: np.ndarray, targets: list[int], active: list[bool]) -> None:
        """Record the step's coded tokens with their probabilities ``p`` (Q30); train when due."""
        if not self.lr:
            return
        keep = [j for j, a in enumerate(active) if a][self.seen % self.rows :: self.rows]
        self.seen += 1
        if self._x is None or not keep:
            return
        idx = np.array(keep, dtype=np.int64)
        g = rshr(p[idx, : self.w.shape[0]], 14)  # Q16
        g[np.arange(len(keep)), np.array([targets[j] for j in keep])] -= 1 << 16
        x8, r = self._x
        self._grads.append(g.astype(np.float64))
        self._inputs.append(x8[idx].astype(np.float64) * r[idx, None].astype(np.float64))  # below 2**27
        self._x = None
        self.pending += len(keep)
        if self.pending >= self.tokens:
            self.flush()

    def flush(self) -> None:
        if not self._grads:
            return
        g, x = np.concatenate(self._grads), np.concatenate(self._inputs)
        n = self.pending
        self._grads, self._inputs, self.pending = [], [], 0
        v = g.shape[1]  # the coder's alphabet may stop short of the head (a BOS row that is never coded)
        # lr / n * rate * grad / (2**16 * 127 * 2**FRAC) in Q24 is rshr(rate-scaled grad * lr127, 28):
        # grad >> 16 is below n * 2**27, with the rate below n * 2**29, with lr127 (below 2**31 / n) below 2**60
        lr127 = (self.lr << 16) // (n * 127)
        coding = self.coding

        def update(cols: slice) -> None:
            # 2**16 * 2**27 * 256 rows < 2**53: each block's float64 product is exact; their sum is int64
            grad = (g[:256, cols].T @ x[:256]).astype(np.int64)
            for a in range(256, len(g), 256):
                grad += (g[a : a + 256, cols].T @ x[a : a + 256]).astype(np.int64)
            ik.update_head(self.w, grad, cols.start, self.rate, lr127, coding.q, coding.m, coding.wt,
                           HEAD_FRAC, _COL_BITS)

        if self.pool is None:
            update(slice(0, v))
        else:
            list(self.pool.map(update, [slice(v * i // 2, v * (i + 1) // 2) for i in range(2)]))
        coding.weights_changed()


def normalize_q30(p: np.ndarray) -> np.ndarray:
    """Rows of ``probs_q30`` (peak exactly 2**30) rescaled to sum to about 2**30, through a Q32 reciprocal."""
    return (p * ((1 << 62) // p.sum(axis=-1))[:, None]) >> 32
