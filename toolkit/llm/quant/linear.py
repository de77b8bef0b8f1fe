"""``QuantizedLinear``: a linear layer that keeps its weight packed.

State (buffers, named as compressed-tensors names them so a checkpoint is a
plain dump of the state dict):

- ``weight_packed`` int32 [out, ceil(in * bits / 32)]: the codes;
- ``weight_scale`` [out, groups] in a 16-bit dtype;
- ``weight_zero_point`` int8 [out, groups], asymmetric grids only;
- ``weight_g_idx`` int32 [in], only when activation order formed the groups;
- outlier-aware layers instead code their statistics: ``scale_codes`` (3-bit,
  with a float16 ``scale_step`` and ``scale_low`` per run of ``stat_group``
  rows) and ``zero_codes`` (3-bit on the fixed range of the codes), and keep outliers as a
  CSR matrix (``outlier_crow`` int32, ``outlier_col`` int16/int32,
  ``outlier_val`` float16) of residuals added to the dequantized weight.

The forward never materializes a float weight when a packed path exists:
Triton on CUDA (``toolkit.kernels.quant_matmul``); on CPU, for 4-bit codes and
bfloat16 activations, torch's ``_weight_int4pack_mm_for_cpu`` over a repacked
copy made on first use; otherwise the weight is dequantized per call.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from toolkit.kernels.pack import pack_int32, packed_words, unpack_int32
from toolkit.llm.quant import grid
from toolkit.llm.quant.gptq import STAT_SCALE_FLOOR, Solution, decode_stats, decode_zero

__all__ = ["QuantizedLinear"]

# Group sizes the CPU int4 kernel accepts.
_INT4_GROUPS = (32, 64, 128, 256)


class QuantizedLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int | None,
                 symmetric: bool = True, bias: bool = False, scale_dtype: torch.dtype = torch.float16,
                 act_groups: bool = False, coded_stats: bool = False, stat_bits: int = 3, stat_group: int = 16,
                 outlier_nnz: int = 0, dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits = bits
        self.group_size = group_size if group_size not in (None, -1) else None
        self.symmetric = symmetric
        self.coded_stats = coded_stats
        self.stat_bits, self.stat_group = stat_bits, stat_group
        gs = self.group_size or in_features
        groups = in_features // gs
        words = packed_words(in_features, bits)
        kw = {"device": device}
        self.register_buffer("weight_packed", torch.zeros(out_features, words, dtype=torch.int32, **kw))
        if coded_stats:
            blocks = -(-out_features // stat_group)
            self.register_buffer("scale_codes", torch.zeros(out_features, groups, dtype=torch.uint8, **kw))
            self.register_buffer("scale_step", torch.ones(groups, blocks, dtype=torch.float16, **kw))
            self.register_buffer("scale_low", torch.zeros(groups, blocks, dtype=torch.float16, **kw))
            self.register_buffer("zero_codes", torch.zeros(out_features, groups, dtype=torch.uint8, **kw))
            idx_dtype = torch.int16 if in_features <= 32767 else torch.int32
            self.register_buffer("outlier_crow", torch.zeros(out_features + 1, dtype=torch.int32, **kw))
            self.register_buffer("outlier_col", torch.zeros(outlier_nnz, dtype=idx_dtype, **kw))
            self.register_buffer("outlier_val", torch.zeros(outlier_nnz, dtype=torch.float16, **kw))
        else:
            self.register_buffer("weight_scale", torch.ones(out_features, groups, dtype=scale_dtype, **kw))
            if not symmetric:
                self.register_buffer("weight_zero_point", torch.zeros(out_features, groups, dtype=torch.int8, **kw))
        if act_groups:
            self.register_buffer("weight_g_idx", torch.zeros(in_features, dtype=torch.int32, **kw))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, **kw)) if bias else None
        self._dtype = dtype
        self._cache: dict = {}

    # ----------------------------------------------------------------- build
    @classmethod
    def from_solution(cls, linear: nn.Linear, sol: Solution, bits: int, group_size: int | None,
                      symmetric: bool, scale_dtype: torch.dtype) -> QuantizedLinear:
        w = linear.weight
        coded = sol.stats is not None
        nnz = int(sol.outliers._nnz()) if sol.outliers is not None else 0
        q = cls(linear.in_features, linear.out_features, bits, group_size, symmetric=symmetric or coded,
                bias=linear.bias is not None, scale_dtype=scale_dtype, act_groups=sol.g_idx is not None,
                coded_stats=coded, stat_bits=(sol.stats or {}).get("bits", 3),
                stat_group=(sol.stats or {}).get("group", 16), outlier_nnz=nnz,
                dtype=w.dtype, device=w.device)
        q.weight_packed.copy_(pack_int32(sol.codes, bits))
        if coded:
            parts = sol.stats["scale"]
            q.scale_codes.copy_(torch.stack([p["codes"] for p in parts], dim=1))
            q.scale_step.copy_(torch.stack([p["step"] for p in parts], dim=0))
            q.scale_low.copy_(torch.stack([p["low"] for p in parts], dim=0))
            q.zero_codes.copy_(torch.stack([p["codes"] for p in sol.stats["zero"]], dim=1))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # torch flags sparse CSR as beta
                csr = sol.outliers.coalesce().to_sparse_csr()
            q.outlier_crow.copy_(csr.crow_indices().to(torch.int32))
            q.outlier_col.copy_(csr.col_indices().to(q.outlier_col.dtype))
            q.outlier_val.copy_(csr.values().half())
        else:
            q.weight_scale.copy_(sol.scale.to(scale_dtype))
            if not symmetric:
                q.weight_zero_point.copy_(sol.zero.to(torch.int8))
        if sol.g_idx is not None:
            q.weight_g_idx.copy_(sol.g_idx)
        if linear.bias is not None:
            q.bias.data.copy_(linear.bias.data)
        return q

    # ------------------------------------------------------------ dequantize
    def codes(self) -> torch.Tensor:
        return unpack_int32(self.weight_packed, self.bits, self.in_features)

    def scales_and_zeros(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Float32 scale and zero [out, groups]; zero is None for a symmetric integer grid."""
        if self.coded_stats:
            s = decode_stats(self.scale_codes.t(), self.scale_step, self.scale_low, self.stat_group).t()
            return torch.clamp(s, min=STAT_SCALE_FLOOR), decode_zero(self.zero_codes, self.bits, self.stat_bits)
        z = None if self.symmetric else self.weight_zero_point.float()
        return self.weight_scale.float(), z

    def group_index(self) -> torch.Tensor:
        g_idx = getattr(self, "weight_g_idx", None)
        if g_idx is not None:
            return g_idx.long()
        gs = self.group_size or self.in_features
        return torch.arange(self.in_features, device=self.weight_packed.device) // gs

    def outliers(self) -> torch.Tensor | None:
        if not self.coded_stats or self.outlier_val.numel() == 0:
            return None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # torch flags sparse CSR as beta
            return torch.sparse_csr_tensor(self.outlier_crow.long(), self.outlier_col.long(),
                                           self.outlier_val.float(), size=(self.out_features, self.in_features))

    def dequantize(self, outliers: bool = True) -> torch.Tensor:
        """The float32 weight [out, in] this layer computes with (without the sparse outliers if ``outliers=False``)."""
        s, z = self.scales_and_zeros()
        z = torch.zeros_like(s) if z is None else z
        if getattr(self, "weight_g_idx", None) is None:
            # Contiguous groups: broadcast the statistics instead of gathering them per column.
            g = s.shape[1]
            q = self.codes().view(self.out_features, g, self.in_features // g)
            w = grid.dequantize(q, s.unsqueeze(-1), z.unsqueeze(-1)).view(self.out_features, self.in_features)
        else:
            groups = self.group_index()
            w = grid.dequantize(self.codes(), s[:, groups], z[:, groups])
        sparse = self.outliers() if outliers else None
        if sparse is not None:
            w = w + sparse.to_dense()
        return w

    @property
    def weight(self) -> torch.Tensor:
        # Code that inspects ``layer.weight`` (dtype, device, tied-weight
        # checks) sees the dequantized weight; the forward does not use it.
        return self.dequantize().to(self._dtype)

    # --------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:
            y = self._forward_cuda(x)
        else:
            y = self._forward_cpu(x)
        sparse = self.outliers()
        if sparse is not None:
            flat = x.reshape(-1, self.in_features).float()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                y = y + (sparse @ flat.t()).t().reshape(y.shape).to(y.dtype)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y

    def _forward_cuda(self, x: torch.Tensor) -> torch.Tensor:
        from toolkit.kernels import quant_matmul

        s, z = self.scales_and_zeros()
        if not self.coded_stats:
            s = self.weight_scale
            z = None if self.symmetric else self.weight_zero_point
        g_idx = getattr(self, "weight_g_idx", None)
        return quant_matmul(x, self.weight_packed, s, z, self.bits, self.group_size or self.in_features, g_idx)

    def _forward_cpu(self, x: torch.Tensor) -> torch.Tensor:
        if self.bits == 4 and x.dtype == torch.bfloat16:
            packed = self._int4_cpu()
            if packed is not None:
                weight, gs, sz, perm = packed
                flat = x.reshape(-1, self.in_features)
                if perm is not None:
                    flat = flat.index_select(1, perm)
                y = torch.ops.aten._weight_int4pack_mm_for_cpu(flat.contiguous(), weight, gs, sz)
                return y.reshape(*x.shape[:-1], self.out_features)
        # forward() adds the sparse outliers itself, as on the packed paths.
        return nn.functional.linear(x, self.dequantize(outliers=False).to(x.dtype))

    def _int4_cpu(self):
        """The layer repacked for torch's CPU int4 kernel, or None where its layout does not apply."""
        key = ("int4", self.weight_packed.data_ptr())
        if key in self._cache:
            return self._cache[key]
        self._cache.clear()
        result = None
        n, k = self.out_features, self.in_features
        s, z = self.scales_and_zeros()
        z = torch.zeros_like(s) if z is None else z
        codes = self.codes().to(torch.int32)
        perm = None
        g_idx = getattr(self, "weight_g_idx", None)
        if g_idx is not None:
            # The kernel wants contiguous groups: sort the columns by group and
            # permute the activations the same way.
            perm = torch.argsort(g_idx.long(), stable=True)
            codes = codes[:, perm]
        gs = self.group_size or k
        reps = 1
        if gs not in _INT4_GROUPS:
            # Per channel (or a wide group): repeat each scale over the largest
            # accepted group that divides it; the product is the same.
            sub = next((g for g in reversed(_INT4_GROUPS) if gs % g == 0), None)
            if sub is not None:
                reps, gs = gs // sub, sub
        if n % 16 == 0 and k % gs == 0 and gs in _INT4_GROUPS:
            try:
                weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu((codes + 8).contiguous(), 2)
                s_r = s.repeat_interleave(reps, dim=1)
                z_r = z.repeat_interleave(reps, dim=1)
                # The kernel computes (u - 8) * scale + offset on unsigned codes
                # u = q + 8, so the offset is -zero * scale.
                sz = torch.stack([s_r.t(), (-z_r * s_r).t()], dim=-1).to(torch.bfloat16).contiguous()
                result = (weight, gs, sz, perm)
            except RuntimeError:
                result = None
        self._cache[key] = result
        return result

    def _load_from_state_dict(self, *args, **kwargs):
        # Loading copies into the buffers in place (same data_ptr): drop the int4 repack keyed on it.
        self._cache.clear()
        super()._load_from_state_dict(*args, **kwargs)

    def _apply(self, fn, recurse=True):
        # Moves carry the buffers to the new device but never change their
        # dtypes: ``model.half()`` must not recode float16 scales as bfloat16
        # or outliers as anything else. The bias follows the model's dtype.
        self._cache.clear()
        buffers = self._buffers
        self._buffers = type(buffers)()
        try:
            super()._apply(fn, recurse)
        finally:
            probe = fn(torch.zeros(1, dtype=self._dtype, device=buffers["weight_packed"].device))
            for name, buf in buffers.items():
                buffers[name] = None if buf is None else buf.to(probe.device)
            self._buffers = buffers
        if probe.is_floating_point():
            self._dtype = probe.dtype
        return self

    def storage_bits(self) -> int:
        """Bits this layer stores for its weight: codes, statistics, group index and outliers."""
        total = 0
        for name, buf in self.named_buffers(recurse=False):
            if name == "weight_zero_point":
                # Checkpoints pack zero points at the code width.
                total += buf.numel() * self.bits
            elif name.endswith("_codes"):
                total += buf.numel() * self.stat_bits
            else:
                total += buf.numel() * buf.element_size() * 8
        return total

    def extra_repr(self) -> str:
        g = self.group_size or "channel"
        kind = "outlier" if self.coded_stats else ("sym" if self.symmetric else "asym")
        return f"in={self.in_features}, out={self.out_features}, bits={self.bits}, group={g}, {kind}"
