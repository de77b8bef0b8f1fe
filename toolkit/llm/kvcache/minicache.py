"""MiniCache: merge adjacent layers' KV states in depth, keeping the tokens that merge badly.

MiniCache (Liu et al., 2024) observed that from the middle of a network on,
the KV states of neighbouring layers point in nearly the same direction for
most tokens, while their norms differ. So a pair of layers stores, per token
and head, one unit direction (the SLERP of the two layers' unit vectors at
``t``) and each layer's norm; a layer's state is rebuilt as norm x direction.
Tokens whose two vectors are far apart (angular distance above
``retain_angle``) would be rebuilt badly, so they are kept exactly: the pair
stores the first layer's own direction for them and the second layer's vector
besides.

A pair merges each step's new tokens once both of its layers have run, so the
step's own attention always sees exact states and only later steps read the
merged ones. Layers before ``start_layer`` (default: the middle) and an
unpaired last layer keep ordinary float16 states.
"""

from __future__ import annotations

import math

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from toolkit.errors import ConfigError
from toolkit.llm.kvcache.config import MiniCacheConfig

__all__ = ["MiniCache", "slerp_merge"]


def slerp_merge(a: torch.Tensor, b: torch.Tensor, t: float = 0.5
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Merge ``a`` and ``b`` (``[..., D]``): ``(direction, |a|, |b|, angular distance in units of pi)``."""
    na = a.norm(dim=-1, keepdim=True)
    nb = b.norm(dim=-1, keepdim=True)
    ua = a / na.clamp_min(1e-12)
    ub = b / nb.clamp_min(1e-12)
    cos = (ua * ub).sum(-1, keepdim=True).clamp(-1.0, 1.0)
    omega = torch.arccos(cos)
    so = torch.sin(omega)
    # Nearly parallel vectors: SLERP tends to linear interpolation.
    lin = so.abs() < 1e-6
    wa = torch.where(lin, torch.full_like(so, 1 - t), torch.sin((1 - t) * omega) / so.where(~lin, 1.0))
    wb = torch.where(lin, torch.full_like(so, t), torch.sin(t * omega) / so.where(~lin, 1.0))
    e = wa * ua + wb * ub
    e = e / e.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    # A zero vector is rebuilt exactly by its zero norm, whatever the direction.
    dist = torch.where((na > 1e-12) & (nb > 1e-12), omega / math.pi, torch.zeros_like(omega))
    return e, na[..., 0], nb[..., 0], dist[..., 0]


class _Merged:
    """The merged storage of one layer pair, for keys or values."""

    def __init__(self) -> None:
        self.direction: torch.Tensor | None = None  # [B, H, T, D] float16
        self.norm_a: torch.Tensor | None = None  # [B, H, T] float16
        self.norm_b: torch.Tensor | None = None
        self.kept_index: list[torch.Tensor] = []  # (b * h, t) positions, int64
        self.kept_b: list[torch.Tensor] = []  # [k, D] float16: the second layer's originals
        self.length = 0

    def add(self, a: torch.Tensor, b: torch.Tensor, cfg: MiniCacheConfig) -> None:
        e, na, nb, dist = slerp_merge(a.float(), b.float(), cfg.t)
        bsz, h, n, d = a.shape
        keep = dist > cfg.retain_angle
        # A kept token's direction is the first layer's own, so norm x direction rebuilds it
        # and only the second layer's vector is stored besides.
        e = torch.where(keep[..., None], a.float() / na[..., None].clamp_min(1e-12), e)
        tpos = (torch.arange(n, device=a.device) + self.length).view(1, 1, n).expand(bsz, h, n)
        bh = torch.arange(bsz * h, device=a.device).reshape(bsz, h, 1).expand(bsz, h, n)
        if keep.any():
            self.kept_index.append(torch.stack([bh[keep], tpos[keep]], dim=1))
            self.kept_b.append(b[keep].to(torch.float16))
        e16, na16, nb16 = e.to(torch.float16), na.to(torch.float16), nb.to(torch.float16)
        if self.direction is None:
            self.direction, self.norm_a, self.norm_b = e16, na16, nb16
        else:
            self.direction = torch.cat([self.direction, e16], dim=2)
            self.norm_a = torch.cat([self.norm_a, na16], dim=2)
            self.norm_b = torch.cat([self.norm_b, nb16], dim=2)
        self.length += n

    def rebuild(self, which: str, dtype: torch.dtype) -> torch.Tensor | None:
        if self.direction is None:
            return None
        norm = self.norm_a if which == "a" else self.norm_b
        x = self.direction.float() * norm.float()[..., None]
        if self.kept_index and which == "b":
            idx = torch.cat(self.kept_index)
            orig = torch.cat(self.kept_b).float()
            bsz, h, t, d = x.shape
            x = x.reshape(bsz * h, t, d)
            x[idx[:, 0], idx[:, 1]] = orig
            x = x.reshape(bsz, h, t, d)
        return x.to(dtype)

    def kept(self) -> int:
        return int(sum(i.shape[0] for i in self.kept_index))

    def nbytes(self) -> int:
        if self.direction is None:
            return 0
        total = sum(t.numel() * t.element_size() for t in (self.direction, self.norm_a, self.norm_b))
        # A kept token costs the second layer's float16 vector and its position (a 4-byte token
        # index here; the head is implied by the order).
        total += sum(t.numel() * t.element_size() for t in self.kept_b)
        return total + 4 * self.kept()


class _FullLayer(CacheLayerMixin):
    """A layer outside the merged range: float16 keys and values, returned in the model's dtype."""

    is_compileable = False
    is_sliding = False
    is_croppable = False

    def __init__(self) -> None:
        super().__init__()
        self.length = 0

    def lazy_initialization(self, key_states, value_states) -> None:
        self.dtype = key_states.dtype
        self.device = key_states.device
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        k16, v16 = key_states.to(torch.float16), value_states.to(torch.float16)
        past_k, past_v = self.keys, self.values
        self.keys = k16 if past_k is None else torch.cat([past_k, k16], dim=2)
        self.values = v16 if past_v is None else torch.cat([past_v, v16], dim=2)
        self.length += key_states.shape[2]
        if past_k is None:
            return key_states, value_states
        return (torch.cat([past_k.to(key_states.dtype), key_states], dim=2),
                torch.cat([past_v.to(value_states.dtype), value_states], dim=2))

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return -1

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.keys, self.values) if t is not None)


class _PairLayer(_FullLayer):
    """One layer of a merged pair: its past comes from the pair's merged storage."""

    def __init__(self, pair: _Pair, which: str) -> None:
        super().__init__()
        self.pair, self.which = pair, which

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        past_k = self.pair.keys.rebuild(self.which, key_states.dtype)
        past_v = self.pair.values.rebuild(self.which, value_states.dtype)
        self.length += key_states.shape[2]
        self.pair.arrive(self.which, key_states, value_states)
        if past_k is None:
            return key_states, value_states
        return torch.cat([past_k, key_states], dim=2), torch.cat([past_v, value_states], dim=2)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise ConfigError("MiniCache does not reorder merged layers: generate with num_beams=1")

    def nbytes(self) -> int:
        # The pair's storage is counted once, on its first layer.
        return self.pair.nbytes() if self.which == "a" else 0


class _Pair:
    def __init__(self, cfg: MiniCacheConfig) -> None:
        self.cfg = cfg
        self.keys, self.values = _Merged(), _Merged()
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None

    def arrive(self, which: str, k: torch.Tensor, v: torch.Tensor) -> None:
        if which == "a":
            self._pending = (k, v)
            return
        if self._pending is None:
            raise ConfigError("MiniCache: the second layer of a pair ran before the first")
        ka, va = self._pending
        self._pending = None
        self.keys.add(ka, k, self.cfg)
        self.values.add(va, v, self.cfg)

    def nbytes(self) -> int:
        return self.keys.nbytes() + self.values.nbytes()


class MiniCache(Cache):
    """A transformers ``Cache`` that merges layer pairs from ``start_layer`` to the last.

    ``model.generate(ids, past_key_values=MiniCache(MiniCacheConfig(), model.config))``.
    """

    def __init__(self, config: MiniCacheConfig | None = None, model_config=None, num_layers: int | None = None):
        config = config or MiniCacheConfig()
        if model_config is not None:
            text = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
            num_layers = int(text.num_hidden_layers)
        if num_layers is None:
            raise ConfigError("MiniCache needs the model's config (or num_layers)")
        start = num_layers // 2 if config.start_layer is None else config.start_layer
        if start > num_layers - 2:
            raise ConfigError(f"start_layer {start} leaves no pair of layers to merge in a "
                              f"{num_layers}-layer model (it must be at most {num_layers - 2})")
        self.config, self.start_layer = config, start
        layers: list[CacheLayerMixin] = [_FullLayer() for _ in range(start)]
        i = start
        while i + 1 < num_layers:
            pair = _Pair(config)
            layers += [_PairLayer(pair, "a"), _PairLayer(pair, "b")]
            i += 2
        layers += [_FullLayer() for _ in range(num_layers - len(layers))]
        self.pairs = [(start + 2 * j, start + 2 * j + 1) for j in range((num_layers - start) // 2)]
        super().__init__(layers=layers)

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)

    def retained_fraction(self) -> float:
        """Share of merged (token, head) vectors kept unmerged because the pair disagreed."""
        kept = total = 0
        for layer in self.layers:
            if isinstance(layer, _PairLayer) and layer.which == "a":
                for m in (layer.pair.keys, layer.pair.values):
                    kept += m.kept()
                    if m.direction is not None:
                        total += m.direction.shape[0] * m.direction.shape[1] * m.direction.shape[2]
        return kept / total if total else 0.0
