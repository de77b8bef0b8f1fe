"""Evaluation helpers for compressed LLMs: perplexity, bits per weight, time and memory.

Perplexity follows the usual protocol for causal LMs: the token stream is cut
into non-overlapping windows of the model's context, each window is scored on
its own, and the mean negative log-likelihood over every predicted token (all
but the first of each window) is exponentiated. The result carries the
protocol (window, tokenizer, text digest) so that two figures can be checked
for comparability.
"""

from __future__ import annotations

import gc
import hashlib
import math
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from toolkit.errors import ConfigError

__all__ = ["perplexity", "bits_per_weight", "measure", "tokenize"]


def tokenize(text: str, tokenizer) -> torch.Tensor:
    from toolkit.llm.quant.apply import _encode

    return torch.tensor(_encode(tokenizer, text), dtype=torch.long)


def _window_of(model: nn.Module) -> int:
    n = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if not n:
        raise ConfigError("the model's context length is unknown: pass window=")
    return int(n)


@torch.no_grad()
def perplexity(model: nn.Module, text: str | torch.Tensor, tokenizer=None, window: int | None = None,
               max_windows: int | None = None, batch_size: int = 4, device=None) -> dict[str, Any]:
    """Perplexity of ``model`` on ``text`` (a string with ``tokenizer``, or token ids)."""
    if isinstance(text, str):
        if tokenizer is None:
            raise ConfigError("perplexity of a text needs its tokenizer")
        ids = tokenize(text, tokenizer)
        digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
    else:
        ids = text.reshape(-1).long()
        digest = hashlib.sha256(ids.numpy().tobytes()).hexdigest()[:16]
    window = window or _window_of(model)
    n = ids.numel() // window
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise ConfigError(f"the text has {ids.numel()} tokens, fewer than one window of {window}")
    windows = ids[: n * window].reshape(n, window)
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for start in range(0, n, batch_size):
            batch = windows[start:start + batch_size].to(device)
            out = model(input_ids=batch, use_cache=False) if hasattr(model, "config") else model(batch)
            logits = out.logits if hasattr(out, "logits") else out
            nll = nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                              batch[:, 1:].reshape(-1), reduction="sum")
            total += float(nll)
            count += batch[:, 1:].numel()
    finally:
        model.train(was_training)
    mean = total / count
    return {
        "perplexity": math.exp(mean),
        "nll": mean,
        "bits_per_token": mean / math.log(2),
        "tokens": count,
        "protocol": {
            "window": window,
            "windows": n,
            "stride": window,
            "tokenizer": type(tokenizer).__name__ if tokenizer is not None else "ids",
            "text_sha256": digest,
        },
    }


def bits_per_weight(model: nn.Module) -> dict[str, Any]:
    """Effective bits per weight of the quantized linears: codes, scales, zeros, group index, outliers."""
    from toolkit.llm.quant.linear import QuantizedLinear

    stored, weights, layers = 0, 0, 0
    for mod in model.modules():
        if isinstance(mod, QuantizedLinear):
            stored += mod.storage_bits()
            weights += mod.in_features * mod.out_features
            layers += 1
    if weights == 0:
        raise ConfigError("the model has no quantized layers")
    quantized_ids = {id(m) for m in model.modules() if isinstance(m, QuantizedLinear)}
    float_params = sum(p.numel() for m in model.modules() if id(m) not in quantized_ids
                       for p in m.parameters(recurse=False))
    return {"bits_per_weight": stored / weights, "quantized_weights": weights, "layers": layers,
            "stored_bytes": stored / 8, "float_params": float_params}


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(fn: Callable[..., Any], *args, interval: float = 0.005, **kwargs) -> tuple[Any, dict[str, float]]:
    """Run ``fn`` and report its wall time and peak memory (resident set sampled; CUDA exact)."""
    # Garbage left by earlier work would otherwise be collected during ``fn`` and hide its growth.
    gc.collect()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start_rss = peak = _rss() if os.path.exists("/proc/self/statm") else 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.wait(interval):
            peak = max(peak, _rss())

    watcher = threading.Thread(target=sample, daemon=True) if start_rss else None
    if watcher:
        watcher.start()
    t0 = time.perf_counter()
    try:
        result = fn(*args, **kwargs)
        if cuda:
            torch.cuda.synchronize()
    finally:
        seconds = time.perf_counter() - t0
        stop.set()
        if watcher:
            watcher.join()
    if start_rss:
        peak = max(peak, _rss())
    report = {"seconds": seconds, "peak_rss_bytes": float(peak), "rss_growth_bytes": float(peak - start_rss)}
    if cuda:
        report["peak_cuda_bytes"] = float(torch.cuda.max_memory_allocated())
    return result, report
