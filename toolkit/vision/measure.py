"""What token dropping saves: prefill FLOPs per module, KV-cache bytes, CPU latency.

FLOPs come from ``torch.utils.flop_counter.FlopCounterMode``, which counts
matrix products but has no formula for the CPU kernel of scaled dot-product
attention (``aten._scaled_dot_product_flash_attention_for_cpu``), so on the
CPU it reports attention as free. This module registers one: 4 * b * h *
q * k * d (the two products QK^T and PV), the same as torch's own formula
for the CUDA kernels, and without counting softmax or masking.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from torch.utils import flop_counter

__all__ = ["count_flops", "prefill_flops", "kv_cache_bytes", "prefill_latency", "decode_step_latency"]


def _sdpa_cpu_flops(query_shape, key_shape, value_shape) -> int:
    b, h, q, d = query_shape
    _, _, k, dv = value_shape
    return 2 * b * h * q * k * d + 2 * b * h * q * k * dv


def _register() -> None:
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is None or op in flop_counter.flop_registry:
        return

    @flop_counter.register_flop_formula(op)
    def _formula(query, key, value, *args, out_shape=None, **kwargs) -> int:
        return _sdpa_cpu_flops(query, key, value)


_register()


def count_flops(fn: Callable[[], object]) -> tuple[int, dict[str, int]]:
    """``(total, by_module)`` FLOPs of running ``fn()`` (a multiply-add counts as 2)."""
    with flop_counter.FlopCounterMode(display=False) as mode:
        fn()
    by_module = {name: sum(ops.values()) for name, ops in mode.get_flop_counts().items()}
    return mode.get_total_flops(), by_module


def prefill_flops(model, inputs: dict, **forward_kwargs) -> dict[str, int]:
    """Prefill FLOPs of a LLaVA-style model by part: vision tower, projector, language model, LM head.

    The scoring a token-dropping method adds runs inside these modules' hooks
    and is counted with them. ``forward_kwargs`` go to the forward call;
    ``logits_to_keep=1`` counts the LM head as ``generate``'s prefill runs it
    (on the last position only).
    """
    def run():
        with torch.no_grad():
            model(**inputs, use_cache=True, **forward_kwargs)
    total, by = count_flops(run)
    parts = {"vision_tower": 0, "multi_modal_projector": 0, "language_model": 0, "lm_head": 0}
    for name, flops in by.items():
        tail = name.rsplit(".", 1)[-1]
        if tail in parts and name.count(".") <= 2:
            parts[tail] = max(parts[tail], flops)
    parts["other"] = total - sum(parts.values())
    parts["total"] = total
    return parts


def kv_cache_bytes(cache) -> int:
    """Bytes of every key and value tensor a transformers cache holds."""
    total = 0
    for layer in getattr(cache, "layers", []):
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


def _median_time(fn: Callable[[], object], repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


@torch.no_grad()
def prefill_latency(model, inputs: dict, repeats: int = 5, warmup: int = 1) -> float:
    """Median seconds of one prefill forward (vision tower included)."""
    return _median_time(lambda: model(**inputs, use_cache=True), repeats, warmup)


@torch.no_grad()
def decode_step_latency(model, inputs: dict, repeats: int = 10, warmup: int = 2) -> float:
    """Median seconds of one decoding step after a prefill of ``inputs``.

    The step is the second token of ``generate`` (one new token over the
    cache), timed as the difference between generating two tokens and one.
    """
    def gen(n):
        return lambda: model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                      pad_token_id=model.config.text_config.pad_token_id or 0)
    one = _median_time(gen(1), repeats, warmup)
    five = _median_time(gen(5), repeats, warmup)
    return max(0.0, (five - one) / 4)
