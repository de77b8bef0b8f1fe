"""Measuring a compressed KV cache against the full one: perplexity, next-token KL, recall, bytes, latency.

Protocol: a window is split into a prefix, prefilled into the cache in one
forward, and a continuation fed one token at a time, as generation does, so
every continuation token is predicted through the cache (the compressed
part included). The full cache goes through the identical loop; perplexity
and KL(full || compressed) are taken over the continuation's predictions.
Recall tasks prefill the context, feed the question through the cache, then
decode the answer greedily.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache, DynamicCache

from toolkit.llm.kvcache.kivi import cache_nbytes

__all__ = ["CacheScore", "continuation_logits", "decode_latency", "fp16_cache_bytes", "recall",
           "score_cache"]

CacheFactory = Callable[[], Cache]


@torch.no_grad()
def continuation_logits(model, prefix: torch.Tensor, continuation: torch.Tensor, cache: Cache,
                        after_prefill: Callable[[Cache], Cache] | None = None) -> torch.Tensor:
    """Logits ``[B, n, V]`` predicting ``continuation[:, 0..n)``: prefix prefilled, the rest one token a step.

    ``after_prefill`` replaces the cache once the prefix is in it (a stored and
    reloaded cache: :func:`toolkit.llm.kvcache.lossy`).
    """
    out = model(input_ids=prefix, past_key_values=cache, use_cache=True)
    if after_prefill is not None:
        cache = after_prefill(cache)
    logits = [out.logits[:, -1].float()]
    for i in range(continuation.shape[1] - 1):
        out = model(input_ids=continuation[:, i:i + 1], past_key_values=cache, use_cache=True)
        logits.append(out.logits[:, -1].float())
    return torch.stack(logits, dim=1)


@dataclass
class CacheScore:
    """Figures of one cache over a set of windows (KL is against the full cache, in nats)."""

    nll: float
    ref_nll: float
    kl: float
    tokens: int
    cache_bytes: float  # mean bytes the cache held at the end of a window
    cache_tokens: int

    @property
    def ppl(self) -> float:
        return math.exp(self.nll)

    @property
    def ref_ppl(self) -> float:
        return math.exp(self.ref_nll)

    @property
    def bytes_per_token(self) -> float:
        return self.cache_bytes / max(1, self.cache_tokens)

    def as_dict(self) -> dict:
        return {"ppl": self.ppl, "ref_ppl": self.ref_ppl, "ppl_change": self.ppl / self.ref_ppl - 1,
                "kl": self.kl, "tokens": self.tokens, "cache_bytes": self.cache_bytes,
                "bytes_per_token": self.bytes_per_token}


def _keep(cache: Cache, held: list[Cache], after_prefill: Callable[[Cache], Cache] | None) -> Cache:
    cache = after_prefill(cache) if after_prefill is not None else cache
    held.append(cache)
    return cache


def score_cache(model, windows: Sequence[torch.Tensor], prefix_len: int, make_cache: CacheFactory,
                reference: list[torch.Tensor] | None = None,
                after_prefill: Callable[[Cache], Cache] | None = None,
                ) -> tuple[CacheScore, list[torch.Tensor]]:
    """Score ``make_cache()`` on ``windows`` (each ``[1, L]``); returns the score and the full cache's logits.

    Pass the returned reference logits back in to score further caches without
    recomputing them.
    """
    nll = ref_nll = kl = 0.0
    count = 0
    total_bytes = 0.0
    refs = [] if reference is None else reference
    for j, w in enumerate(windows):
        prefix, cont = w[:, :prefix_len], w[:, prefix_len:]
        if reference is None:
            refs.append(continuation_logits(model, prefix, cont, DynamicCache()))
        ref = refs[j]
        holder: list[Cache] = []
        got = continuation_logits(model, prefix, cont, make_cache(),
                                  lambda c, held=holder: _keep(c, held, after_prefill))
        total_bytes += cache_nbytes(holder[0])
        lp, lq = F.log_softmax(ref, -1), F.log_softmax(got, -1)
        nll += F.nll_loss(lq.flatten(0, 1), cont.flatten(), reduction="sum").item()
        ref_nll += F.nll_loss(lp.flatten(0, 1), cont.flatten(), reduction="sum").item()
        kl += (lp.exp() * (lp - lq)).sum().item()
        count += cont.numel()
    score = CacheScore(nll=nll / count, ref_nll=ref_nll / count, kl=kl / count, tokens=count,
                       cache_bytes=total_bytes / len(windows),
                       cache_tokens=windows[0].shape[1] - 1)
    return score, refs


@torch.no_grad()
def recall(model, tasks, make_cache: CacheFactory,
           after_prefill: Callable[[Cache], Cache] | None = None) -> float:
    """Share of recall tasks (:class:`toolkit.data.recall.RecallTask`) answered exactly through the cache."""
    hits = 0
    for task in tasks:
        cache = make_cache()
        model(input_ids=torch.tensor([task.context]), past_key_values=cache, use_cache=True)
        if after_prefill is not None:
            cache = after_prefill(cache)
        out = model(input_ids=torch.tensor([task.query]), past_key_values=cache, use_cache=True)
        got = []
        for _ in range(len(task.answer)):
            nxt = int(out.logits[0, -1].argmax())
            got.append(nxt)
            out = model(input_ids=torch.tensor([[nxt]]), past_key_values=cache, use_cache=True)
        hits += int(got == list(task.answer))
    return hits / max(1, len(tasks))


@torch.no_grad()
def decode_latency(model, prefix: torch.Tensor, make_cache: CacheFactory, steps: int = 32) -> float:
    """Median seconds of one decode step after prefilling ``prefix`` into ``make_cache()``."""
    cache = make_cache()
    out = model(input_ids=prefix, past_key_values=cache, use_cache=True)
    nxt = out.logits[:, -1:].argmax(-1)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
        times.append(time.perf_counter() - t0)
        nxt = out.logits[:, -1:].argmax(-1)
    times.sort()
    return times[len(times) // 2]


def fp16_cache_bytes(model_config, tokens: int, batch: int = 1) -> int:
    """Bytes of a float16 cache of ``tokens`` tokens: the reference the ratios are taken against."""
    text = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return 2 * 2 * text.num_hidden_layers * heads * head_dim * tokens * batch
