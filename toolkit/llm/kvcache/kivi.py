"""KIVI: a bit-packed KV cache for Hugging Face generation (keys per channel, values per token).

KIVI (Liu et al., 2024) observed that keys have a few channels with large
magnitudes across all tokens, while values have no such channel structure
but matter per token through the attention output. So keys are quantized per
channel over groups of tokens, values per token over groups of channels, and
the newest tokens, whose keys are still forming groups, stay in float16.

:class:`KIVILayer` is a transformers ``CacheLayerMixin``: ``update`` stores
the new states, moves every full group that has left the residual window into
packed ``uint8`` codes with float16 statistics, and returns the whole cache in
the model's dtype for the attention. :meth:`KIVILayer.decode_attention` is
the other way to read it: attention of one decode step's queries straight over
the packed codes (:mod:`toolkit.kernels.kv_attention`, a Triton kernel on CUDA),
merged with the float16 window.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from toolkit.errors import ConfigError
from toolkit.kernels.kv_attention import merge_attention, packed_attention
from toolkit.kernels.kv_quant import kv_dequantize, kv_quantize
from toolkit.llm.kvcache.config import KIVIConfig

__all__ = ["KIVICache", "KIVILayer", "cache_nbytes", "check_against_model"]


def _empty(b: int, h: int, last: int, dtype: torch.dtype, device) -> torch.Tensor:
    return torch.empty(b, h, 0, last, dtype=dtype, device=device)


class KIVILayer(CacheLayerMixin):
    """One decoder layer's KIVI cache: packed codes for old tokens, float16 for recent ones."""

    is_compileable = False
    is_sliding = False
    is_croppable = False

    def __init__(self, config: KIVIConfig) -> None:
        super().__init__()
        self.config = config
        self.cumulative_length = 0

    # --- transformers' layer interface -----------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, h, _, d = key_states.shape
        bits = self.config.bits
        if d % (8 // bits):
            raise ConfigError(f"head_dim {d} is not a whole number of bytes at {bits} bits")
        self.k_group = self.config.group_size
        self.v_group = min(self.config.group_size, d)
        if d % self.v_group:
            raise ConfigError(f"head_dim {d} is not a multiple of the value group {self.v_group}")
        self.dtype, self.device, self.head_dim = key_states.dtype, key_states.device, d
        dev = self.device
        nb = d * bits // 8
        self.k_codes = _empty(b, h, nb, torch.uint8, dev)
        self.v_codes = _empty(b, h, nb, torch.uint8, dev)
        self.k_scale = _empty(b, h, d, torch.float16, dev)
        self.k_low = _empty(b, h, d, torch.float16, dev)
        self.v_scale = _empty(b, h, d // self.v_group, torch.float16, dev)
        self.v_low = _empty(b, h, d // self.v_group, torch.float16, dev)
        # The float16 window (transformers' ``keys``/``values``).
        self.keys = _empty(b, h, d, torch.float16, dev)
        self.values = _empty(b, h, d, torch.float16, dev)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        past_k, past_v = self.dequantized()
        keys = torch.cat([past_k, self.keys.to(key_states.dtype), key_states], dim=-2)
        values = torch.cat([past_v, self.values.to(value_states.dtype), value_states], dim=-2)
        self.keys = torch.cat([self.keys, key_states.to(torch.float16)], dim=-2)
        self.values = torch.cat([self.values, value_states.to(torch.float16)], dim=-2)
        self.cumulative_length += key_states.shape[-2]
        self._flush()
        return keys, values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.is_initialized = False
        self.keys = self.values = None
        self.cumulative_length = 0

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if not self.is_initialized:
            return
        for name in self._tensor_names():
            t = getattr(self, name)
            setattr(self, name, t.index_select(0, beam_idx.to(t.device)))

    def offload(self) -> None:
        self._move("cpu")

    def prefetch(self) -> None:
        self._move(self.device)

    # --- storage -----------------------------------------------------------
    def _tensor_names(self) -> tuple[str, ...]:
        return ("k_codes", "k_scale", "k_low", "v_codes", "v_scale", "v_low", "keys", "values")

    def _move(self, device) -> None:
        if self.is_initialized:
            for name in self._tensor_names():
                setattr(self, name, getattr(self, name).to(device, non_blocking=True))

    @property
    def quantized_length(self) -> int:
        return self.k_codes.shape[2] if self.is_initialized else 0

    def _flush_count(self) -> int:
        """Tokens to move out of the window now: whole groups beyond ``residual_length``."""
        over = self.keys.shape[2] - self.config.residual_length
        return (over // self.k_group) * self.k_group if over >= self.k_group else 0

    def _flush(self) -> None:
        n = self._flush_count()
        if n == 0:
            return
        k, v = self.keys[:, :, :n], self.values[:, :, :n]
        self._store(k, v)
        self.keys = self.keys[:, :, n:].contiguous()
        self.values = self.values[:, :, n:].contiguous()

    def _quantize(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
        b, h, n, d = k.shape
        bits = self.config.bits
        kc, ks, kl = kv_quantize(k.reshape(b * h * n, d), bits, self.k_group, "channel")
        vc, vs, vl = kv_quantize(v.reshape(b * h * n, d), bits, self.v_group, "token")
        return (kc.reshape(b, h, n, -1), ks.reshape(b, h, n // self.k_group, d),
                kl.reshape(b, h, n // self.k_group, d), vc.reshape(b, h, n, -1),
                vs.reshape(b, h, n, -1), vl.reshape(b, h, n, -1))

    def _store(self, k: torch.Tensor, v: torch.Tensor) -> None:
        kc, ks, kl, vc, vs, vl = self._quantize(k, v)
        self.k_codes = torch.cat([self.k_codes, kc], dim=2)
        self.k_scale = torch.cat([self.k_scale, ks], dim=2)
        self.k_low = torch.cat([self.k_low, kl], dim=2)
        self.v_codes = torch.cat([self.v_codes, vc], dim=2)
        self.v_scale = torch.cat([self.v_scale, vs], dim=2)
        self.v_low = torch.cat([self.v_low, vl], dim=2)

    def _dequantize_codes(self) -> tuple[torch.Tensor, torch.Tensor]:
        b, h, n, nb = self.k_codes.shape
        d, bits = self.head_dim, self.config.bits
        if n == 0:
            empty = torch.empty(b, h, 0, d, dtype=self.dtype, device=self.device)
            return empty, empty
        k = kv_dequantize(self.k_codes.reshape(b * h * n, nb), self.k_scale.reshape(-1, d),
                          self.k_low.reshape(-1, d), bits, self.k_group, "channel", self.dtype)
        v = kv_dequantize(self.v_codes.reshape(b * h * n, nb), self.v_scale.reshape(b * h * n, -1),
                          self.v_low.reshape(b * h * n, -1), bits, self.v_group, "token", self.dtype)
        return k.reshape(b, h, n, d), v.reshape(b, h, n, d)

    def dequantized(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The quantized part of the cache in the model's dtype (the window is not included)."""
        return self._dequantize_codes()

    def nbytes(self) -> int:
        """Bytes held: packed codes, float16 statistics and the float16 window."""
        if not self.is_initialized:
            return 0
        return sum(getattr(self, n).numel() * getattr(self, n).element_size() for n in self._tensor_names())

    # --- attention over the packed codes -----------------------------------
    def decode_attention(self, query: torch.Tensor, scaling: float | None = None) -> torch.Tensor:
        """Softmax attention of ``query[B, Hq, Q, D]`` over this layer's cache, reading the packed codes.

        The quantized part goes through :func:`~toolkit.kernels.kv_attention.packed_attention`
        (Triton on CUDA); the float16 window is attended in torch; the two are
        merged by their log-sum-exp. No causal mask: every cached token is visible
        to a decode step. Returns ``[B, Hq, Q, D]`` float32.
        """
        if not self.is_initialized:
            raise ConfigError("decode_attention on an empty cache")
        b, hq, nq, d = query.shape
        h = self.k_codes.shape[1]
        if hq % h:
            raise ConfigError(f"{hq} query heads do not group over {h} KV heads")
        rep = hq // h
        scale = d ** -0.5 if scaling is None else scaling
        q = query.float().reshape(b, h, rep * nq, d)
        n = self.k_codes.shape[2]
        out_q, lse_q = packed_attention(
            q.reshape(b * h, rep * nq, d), self.k_codes.reshape(b * h, n, -1),
            self.k_scale.reshape(b * h, -1, d), self.k_low.reshape(b * h, -1, d),
            self.v_codes.reshape(b * h, n, -1), self.v_scale.reshape(b * h, n, -1),
            self.v_low.reshape(b * h, n, -1), self.config.bits, self.k_group, self.v_group, scale)
        out_q, lse_q = out_q.reshape(b, h, rep * nq, d), lse_q.reshape(b, h, rep * nq)
        kw, vw = self.keys.float(), self.values.float()
        s = torch.einsum("bhqd,bhtd->bhqt", q, kw) * scale
        lse_w = torch.logsumexp(s, dim=-1)
        out_w = torch.einsum("bhqt,bhtd->bhqd", torch.exp(s - lse_w[..., None]), vw)
        out = merge_attention(out_q, lse_q, out_w, lse_w)
        return out.reshape(b, hq, nq, d)


def check_against_model(config: KIVIConfig, model_config) -> None:
    """Refuse settings the model cannot use: a window longer than the model's context."""
    max_pos = getattr(model_config, "max_position_embeddings", None)
    if max_pos is not None and config.residual_length > max_pos:
        raise ConfigError(f"residual_length {config.residual_length} is longer than the model's "
                          f"context of {max_pos} tokens: nothing would ever be quantized")
    head_dim = getattr(model_config, "head_dim", None) or (
        model_config.hidden_size // model_config.num_attention_heads)
    if head_dim % (8 // config.bits):
        raise ConfigError(f"head_dim {head_dim} is not a whole number of bytes at {config.bits} bits")


def _num_layers(model_config) -> int:
    text = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    return int(text.num_hidden_layers)


class KIVICache(Cache):
    """A transformers ``Cache`` of :class:`KIVILayer`, one per decoder layer.

    ``model.generate(ids, past_key_values=KIVICache(KIVIConfig(bits=2), model.config))``.
    """

    layer_class = KIVILayer

    def __init__(self, config: KIVIConfig | None = None, model_config=None, num_layers: int | None = None):
        config = config or KIVIConfig()
        if model_config is not None:
            check_against_model(config, model_config)
            num_layers = _num_layers(model_config)
        if num_layers is None:
            raise ConfigError("KIVICache needs the model's config (or num_layers)")
        self.config = config
        super().__init__(layers=[self.layer_class(config) for _ in range(num_layers)])

    def nbytes(self) -> int:
        """Bytes held by every layer (codes, statistics, corrections, float16 windows)."""
        return sum(layer.nbytes() for layer in self.layers)


def cache_nbytes(cache: Cache) -> int:
    """Bytes a cache holds: its own count for the caches here, else keys and values as stored."""
    if hasattr(cache, "nbytes"):
        return int(cache.nbytes())
    total = 0
    for layer in cache.layers:
        for t in (layer.keys, layer.values):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total
