"""The quantization behind a stored KV cache: what a cache becomes before it is coded, and back.

CacheGen (Liu et al., SIGCOMM 2024) stores a context's KV cache instead of its
text, because loading and decoding a compact cache can be faster than
recomputing it. Before any coding (:mod:`toolkit.llm.kvcache.bitstream`) a
cache becomes, per layer, kind (keys, values) and head:

* uniform codes around each channel's mean with one step for the head:
  ``key_step``/``value_step`` times the RMS of its channels' standard
  deviations (the entropy coder makes the step, not a bit width, the knob);
* keys taken back before their rotary embedding, where a channel keeps one
  offset for all tokens instead of rotating with position (KVQuant's
  observation), and rotated again after decoding;
* outlying tokens in float16: the first ``sink_tokens`` and any token with a
  channel more than ``outlier_sd`` standard deviations from its mean
  (attention sinks: a document's first token, some punctuation), whose
  states would stretch every statistic.

:func:`lossy` applies exactly this quantization to a cache, so a test can
check that a decoded bitstream continues generation with the same tokens as
the lossy cache. The cache must hold positions ``0..T-1`` (a prefill from the
start of a sequence).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from transformers.cache_utils import Cache, DynamicCache

from toolkit.errors import ConfigError
from toolkit.llm.kvcache.config import BitstreamConfig

__all__ = ["QuantizedTensor", "cache_shape", "cache_tensors", "dequantize", "k_max", "lossy", "quantize", "rebuild"]


@dataclass
class QuantizedTensor:
    """One layer's keys or values: float16 exception tokens, uniform codes of the others, per-channel statistics."""

    kept: np.ndarray  # int64 token indices stored in float16, ascending
    kept_values: torch.Tensor  # float16 [N, E, D]
    symbols: np.ndarray  # uint8 [N, T - E, D], in [0, 2K]
    mean: torch.Tensor  # float16 [N, D]
    step: torch.Tensor  # float16 [N, D]


def k_max(cfg: BitstreamConfig) -> int:
    """``K``: codes run from ``-K`` to ``K`` steps around the mean (symbols ``0..2K``)."""
    return (1 << (cfg.code_bits - 1)) - 1


def _layers(cache: Cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    out = []
    for i, layer in enumerate(cache.layers):
        k, v = layer.keys, layer.values
        if not isinstance(k, torch.Tensor) or k.ndim != 4 or k.shape != v.shape:
            raise ConfigError(f"layer {i} of the cache holds no full-precision keys and values "
                              "(encode a DynamicCache from a prefill)")
        out.append((k, v))
    if not out:
        raise ConfigError("the cache is empty: run a prefill first")
    shape = out[0][0].shape
    for i, (k, _) in enumerate(out):
        if k.shape != shape:
            raise ConfigError(f"layer {i} has shape {tuple(k.shape)}, layer 0 {tuple(shape)}")
    return out


def _rotary(model: torch.nn.Module, t: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos, sin [1, T, D]`` of the model's rotary embedding at positions ``0..T-1``."""
    inner = getattr(model, "model", model)
    rope = getattr(inner, "rotary_emb", None)
    if rope is None:
        raise ConfigError("the model has no rotary_emb: encode with pre_rope=False")
    cos, sin = rope(like, torch.arange(t, device=like.device)[None])
    return cos.float(), sin.float()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat([-x[..., h:], x[..., :h]], dim=-1)


def quantize(x: torch.Tensor, ratio: float, cfg: BitstreamConfig) -> QuantizedTensor:
    """``x[N, T, D]`` float32: outlying tokens apart, the rest on a uniform grid of ``ratio`` x the head's RMS std.

    A token is kept in float16 when it is one of the first ``sink_tokens`` or
    when any of its channels, in any head, lies more than ``outlier_sd``
    standard deviations from the channel's mean (attention sinks: a document's
    first token, some punctuation). The statistics are then taken without them.
    """
    n, t, d = x.shape
    top = k_max(cfg)
    forced = torch.zeros(t, dtype=torch.bool)
    forced[:min(cfg.sink_tokens, t)] = True
    keep = forced.clone()
    if cfg.outlier_sd > 0 and t > 1:
        rest = x[:, ~keep]
        mu, sd = rest.mean(1, keepdim=True), rest.std(1, unbiased=False, keepdim=True).clamp_min(1e-12)
        z = ((x - mu) / sd).abs().amax(dim=(0, 2))
        keep |= z > cfg.outlier_sd
    body = x[:, ~keep]
    if body.shape[1]:
        mean = body.mean(1).to(torch.float16)
        # One step for all channels of a head: for a squared error summed over
        # channels, equal steps give the least error for the bits (high-rate
        # theory), where a step per channel would spend bits on quiet channels.
        sd = body.std(1, unbiased=False).pow(2).mean(1, keepdim=True).sqrt()
        step = (ratio * sd).expand(n, d).to(torch.float16)
    else:
        mean = torch.zeros(n, d, dtype=torch.float16)
        step = torch.ones(n, d, dtype=torch.float16)
    step = torch.where(step > 0, step, torch.ones_like(step))
    q = torch.round((body - mean.float()[:, None]) / step.float()[:, None]).clamp(-top, top)
    return QuantizedTensor(kept=torch.nonzero(keep)[:, 0].numpy(), kept_values=x[:, keep].to(torch.float16),
                           symbols=(q + top).to(torch.uint8).numpy(), mean=mean, step=step)


def dequantize(qz: QuantizedTensor, t: int, top: int) -> torch.Tensor:
    """The float32 ``[N, T, D]`` tensor ``qz`` stands for (``top``: :func:`k_max` of its config)."""
    n, _, d = qz.symbols.shape
    out = torch.empty(n, t, d, dtype=torch.float32)
    keep = torch.zeros(t, dtype=torch.bool)
    keep[torch.from_numpy(qz.kept)] = True
    out[:, ~keep] = ((torch.from_numpy(qz.symbols).to(torch.float32) - top) * qz.step.float()[:, None]
                     + qz.mean.float()[:, None])
    out[:, keep] = qz.kept_values.float()
    return out


def cache_tensors(cache: Cache, model: torch.nn.Module,
                  cfg: BitstreamConfig) -> Iterator[tuple[int, str, torch.Tensor, float]]:
    """(layer, kind, float32 tensor[N, T, D] as quantized, step ratio) over the cache, keys first."""
    layers = _layers(cache)
    b, h, t, d = layers[0][0].shape
    rope = _rotary(model, t, layers[0][0]) if cfg.pre_rope else None
    for i, (k, v) in enumerate(layers):
        kf = k.float()
        if rope is not None:  # undo k_rot = k cos + rotate_half(k) sin
            cos, sin = rope[0][:, None], rope[1][:, None]
            kf = kf * cos - _rotate_half(kf) * sin
        yield i, "k", kf.reshape(b * h, t, d), cfg.key_step
        yield i, "v", v.float().reshape(b * h, t, d), cfg.value_step


def cache_shape(cache: Cache) -> tuple[tuple[int, int, int, int], torch.dtype, int]:
    """``(batch, heads, tokens, head_dim)``, dtype and depth of a prefill's cache (refused unless uniform)."""
    layers = _layers(cache)
    return tuple(layers[0][0].shape), layers[0][0].dtype, len(layers)


def rebuild(parts: list[torch.Tensor], shape: tuple[int, int, int, int], dtype: torch.dtype,
            model: torch.nn.Module, cfg: BitstreamConfig) -> DynamicCache:
    """Decoded float32 ``[N, T, D]`` tensors (layer by layer, keys first) back into a cache."""
    b, h, t, d = shape
    rope = _rotary(model, t, parts[0]) if cfg.pre_rope else None
    out = DynamicCache()
    for i in range(len(parts) // 2):
        k = parts[2 * i].reshape(b, h, t, d)
        if rope is not None:
            cos, sin = rope[0][:, None], rope[1][:, None]
            k = k * cos + _rotate_half(k) * sin
        out.update(k.to(dtype), parts[2 * i + 1].reshape(b, h, t, d).to(dtype), i)
    return out


def lossy(cache: Cache, model: torch.nn.Module, config: BitstreamConfig | None = None) -> DynamicCache:
    """The cache that decoding a stored ``cache`` gives back, without making the bytes."""
    cfg = config or BitstreamConfig()
    shape, dtype, _ = cache_shape(cache)
    top, t = k_max(cfg), shape[2]
    parts = [dequantize(quantize(x, ratio, cfg), t, top) for _, _, x, ratio in cache_tensors(cache, model, cfg)]
    return rebuild(parts, shape, dtype, model, cfg)
