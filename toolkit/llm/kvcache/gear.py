"""GEAR: KIVI quantization plus a sparse-outlier and low-rank correction of its error.

GEAR (Kang et al., 2024) notes that at 2 bits the quantization error of a
KV block is neither small nor random: a few entries far from their group
dominate it, and what remains is close to low rank across tokens. So per head
and block of tokens it keeps

* the ``outlier_fraction`` of entries farthest from their quantization
  group's mean, exactly (float16 value and int16 position), and quantizes the
  block without them, which tightens every group's min-max range;
* a rank-``r`` factorization ``A @ B`` of the remaining error, from an exact
  SVD of the small ``[block, head_dim]`` matrix (GEAR uses power iteration;
  at these sizes the SVD is cheaper than its bookkeeping).

Blocks are the tokens that leave the float16 window together: the prefill's
whole quantized part at once, then ``block_size`` tokens at a time.
"""

from __future__ import annotations

import math

import torch

from toolkit.llm.kvcache.config import GEARConfig
from toolkit.llm.kvcache.kivi import KIVICache, KIVILayer

__all__ = ["GEARCache", "GEARLayer"]


def _group_mean(x: torch.Tensor, group: int, axis: str) -> torch.Tensor:
    """Mean of each entry's quantization group, broadcast back to ``x[B, H, n, D]``."""
    b, h, n, d = x.shape
    if axis == "channel":
        m = x.reshape(b, h, n // group, group, d).mean(3, keepdim=True)
        return m.expand(b, h, n // group, group, d).reshape(b, h, n, d)
    m = x.reshape(b, h, n, d // group, group).mean(4, keepdim=True)
    return m.expand(b, h, n, d // group, group).reshape(b, h, n, d)


class GEARLayer(KIVILayer):
    """A KIVI layer whose quantized blocks carry sparse outliers and a low-rank error term."""

    def __init__(self, config: GEARConfig) -> None:
        super().__init__(config)
        #: (first token, token count, tensors) per quantized block
        self.blocks: list[tuple[int, int, dict[str, torch.Tensor]]] = []

    def reset(self) -> None:
        super().reset()
        self.blocks = []

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self.blocks = [(s, n, {k: t.index_select(0, beam_idx.to(t.device)) for k, t in blk.items()})
                       for s, n, blk in self.blocks]

    def _flush_count(self) -> int:
        over = self.keys.shape[2] - self.config.residual_length
        if self.quantized_length == 0:  # prefill: everything beyond the window, in whole groups
            return (over // self.k_group) * self.k_group if over >= self.k_group else 0
        bs = self.config.block_size
        return (over // bs) * bs if over >= bs else 0

    def _store(self, k: torch.Tensor, v: torch.Tensor) -> None:
        k32, v32 = k.float(), v.float()
        k_idx, k_in = self._outliers(k32, self.k_group, "channel")
        v_idx, v_in = self._outliers(v32, self.v_group, "token")
        start = self.quantized_length
        super()._store(k_in.to(k.dtype), v_in.to(v.dtype))
        kq, vq = self._dequantize_range(start, start + k.shape[2])
        block: dict[str, torch.Tensor] = {}
        for name, x, q, idx in (("k", k32, kq, k_idx), ("v", v32, vq, v_idx)):
            b, h, n, d = x.shape
            flat_q = q.reshape(b, h, n * d)
            val = x.reshape(b, h, n * d).gather(2, idx) - flat_q.gather(2, idx)
            err = x - q
            err = err.reshape(b, h, n * d).scatter(2, idx, 0.0).reshape(b, h, n, d)
            block[f"{name}_idx"] = idx.to(torch.int16 if n * d < 32768 else torch.int32)
            block[f"{name}_val"] = val.to(torch.float16)
            r = min(self.config.rank, n, d)
            if r > 0:
                u, s, vh = torch.linalg.svd(err, full_matrices=False)
                block[f"{name}_a"] = (u[..., :r] * s[..., None, :r]).to(torch.float16)
                block[f"{name}_b"] = vh[..., :r, :].to(torch.float16)
        self.blocks.append((start, k.shape[2], block))

    def _outliers(self, x: torch.Tensor, group: int, axis: str):
        """Positions of the entries farthest from their group mean, and ``x`` with them set to it."""
        b, h, n, d = x.shape
        count = math.ceil(self.config.outlier_fraction * n * d)
        mean = _group_mean(x, group, axis)
        if count == 0:
            return torch.zeros(b, h, 0, dtype=torch.long, device=x.device), x
        dev = (x - mean).abs().reshape(b, h, n * d)
        idx = dev.topk(count, dim=2).indices
        flat = x.reshape(b, h, n * d).clone()
        flat.scatter_(2, idx, mean.reshape(b, h, n * d).gather(2, idx))
        return idx, flat.reshape(b, h, n, d)

    def _dequantize_range(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self._dequantize_codes()
        return k[:, :, start:stop].float(), v[:, :, start:stop].float()

    def dequantized(self) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self._dequantize_codes()
        if not self.blocks:
            return k, v
        k, v = k.float(), v.float()
        for s, n, blk in self.blocks:
            for name, x in (("k", k), ("v", v)):
                part = x[:, :, s:s + n]
                b, h, _, d = part.shape
                if f"{name}_a" in blk:
                    part += blk[f"{name}_a"].float() @ blk[f"{name}_b"].float()
                flat = part.reshape(b, h, n * d)
                flat.scatter_add_(2, blk[f"{name}_idx"].long(), blk[f"{name}_val"].float())
                x[:, :, s:s + n] = flat.reshape(b, h, n, d)
        return k.to(self.dtype), v.to(self.dtype)

    def nbytes(self) -> int:
        extra = sum(t.numel() * t.element_size() for _, _, blk in self.blocks for t in blk.values())
        return super().nbytes() + extra

    def decode_attention(self, query: torch.Tensor, scaling: float | None = None) -> torch.Tensor:
        """Attention over the corrected cache (torch): the corrections are not in the packed codes."""
        b, hq, nq, d = query.shape
        k, v = self.dequantized()
        k = torch.cat([k.float(), self.keys.float()], dim=2)
        v = torch.cat([v.float(), self.values.float()], dim=2)
        rep = hq // k.shape[1]
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        scale = d ** -0.5 if scaling is None else scaling
        w = torch.softmax(torch.einsum("bhqd,bhtd->bhqt", query.float(), k) * scale, dim=-1)
        return torch.einsum("bhqt,bhtd->bhqd", w, v)


class GEARCache(KIVICache):
    """A transformers ``Cache`` of :class:`GEARLayer`: ``GEARCache(GEARConfig(bits=2), model.config)``."""

    layer_class = GEARLayer

    def __init__(self, config: GEARConfig | None = None, model_config=None, num_layers: int | None = None):
        super().__init__(config or GEARConfig(), model_config, num_layers)
