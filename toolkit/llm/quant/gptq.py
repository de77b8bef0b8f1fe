"""GPTQ: quantize one weight matrix column by column with error feedback.

Rounding each weight to the grid on its own (RTN) ignores that the layer's
inputs are correlated: the error of one column can be cancelled by nudging the
columns not yet quantized. GPTQ (Frantar et al., 2022) does that with the layer
Hessian ``H = 2 X^T X`` of the reconstruction loss ``||X W^T - X Q^T||^2``:
after column ``j`` is rounded, its error divided by ``[H^-1]_jj`` is spread over
the remaining columns along row ``j`` of the inverse. The inverse is taken once,
as the upper Cholesky factor of ``H^-1``, so the sweep costs one triangular
update per column, done lazily in blocks of ``block_size`` columns.

The same sweep serves the outlier-aware (SpQR-style, Dettmers et al., 2023)
variant: per group it picks the weights that cost the most, keeps them exact
in 16 bits, fits the group's scale and zero to the rest, and codes those
statistics themselves on a 3-bit grid.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from toolkit.errors import ToolkitError
from toolkit.llm.quant import grid

__all__ = ["Solution", "solve", "round_to_nearest", "hessian_inverse_factor", "decode_stats", "decode_zero",
           "STAT_SCALE_FLOOR"]

# Coded scales can round to zero or below; the decoder clamps them to this.
STAT_SCALE_FLOOR = 1e-8


@dataclass
class Solution:
    """A quantized weight, in the original column order.

    ``codes`` int8 [out, in]; ``scale`` and ``zero`` float32 [out, groups]
    (``zero`` integer-valued except for the outlier variant's coded statistics);
    ``g_idx`` int32 [in] or None when column ``k`` is in group ``k // group``;
    ``outliers`` a sparse COO float32 [out, in] of residuals added to the
    dequantized weight, or None; ``stats`` the coded statistics (outlier variant).
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    g_idx: torch.Tensor | None = None
    outliers: torch.Tensor | None = None
    stats: dict | None = None

    def dequantize(self) -> torch.Tensor:
        groups = self.group_index()
        w = grid.dequantize(self.codes, self.scale[:, groups], self.zero[:, groups])
        if self.outliers is not None:
            w = w + self.outliers.to_dense().float()
        return w

    def group_index(self) -> torch.Tensor:
        cols = self.codes.shape[1]
        if self.g_idx is not None:
            return self.g_idx.long()
        per = cols // self.scale.shape[1]
        return torch.arange(cols, device=self.codes.device) // per


def _group_width(group_size: int | None, cols: int) -> int:
    return cols if group_size in (None, -1) else group_size


def round_to_nearest(w: torch.Tensor, bits: int, group_size: int | None, symmetric: bool,
                     scale_dtype: torch.dtype) -> Solution:
    rows, cols = w.shape
    gs = _group_width(group_size, cols)
    wg = w.float().reshape(rows * (cols // gs), gs)
    scale, zero = grid.find_params(wg, bits, symmetric, scale_dtype)
    codes = grid.quantize(wg, scale, zero, bits).reshape(rows, cols)
    return Solution(codes.to(torch.int8), scale.reshape(rows, -1), zero.reshape(rows, -1))


def hessian_inverse_factor(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + damp * mean(diag H) * I)^-1``, retrying with more damping."""
    h = h.double()
    mean_diag = torch.mean(torch.diag(h)).item()
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    for attempt in range(6):
        lam = damp * (10**attempt) * max(mean_diag, 1e-12)
        try:
            low = torch.linalg.cholesky(h + lam * eye)
            inv = torch.cholesky_inverse(low)
            return torch.linalg.cholesky(inv, upper=True).float()
        except torch.linalg.LinAlgError:
            continue
    raise ToolkitError("the layer Hessian is not positive definite even with 10^5 times the damping; "
                       "give more or more varied calibration data")


def _code_stats(v: torch.Tensor, stat_bits: int, stat_group: int) -> tuple[torch.Tensor, dict]:
    """Code a vector of statistics (one per row) on an asymmetric ``stat_bits`` grid.

    Each run of ``stat_group`` consecutive rows shares a float16 scale and zero;
    returns the dequantized vector and what is stored.
    """
    n = v.numel()
    pad = (-n) % stat_group
    vp = torch.nn.functional.pad(v.float(), (0, pad), value=float(v[-1])).reshape(-1, stat_group)
    levels = (1 << stat_bits) - 1
    lo, hi = vp.amin(dim=1), vp.amax(dim=1)
    step = ((hi - lo) / levels).half().float()
    step = torch.where(step > 0, step, torch.ones_like(step))
    lo = lo.half().float()
    codes = torch.clamp(torch.round((vp - lo[:, None]) / step[:, None]), 0, levels)
    stored = {"codes": codes.reshape(-1)[:n].to(torch.uint8), "step": step.half(), "low": lo.half()}
    return decode_stats(stored["codes"], stored["step"], stored["low"], stat_group), stored


def decode_stats(codes: torch.Tensor, step: torch.Tensor, low: torch.Tensor, stat_group: int) -> torch.Tensor:
    """Statistics back from their codes; ``codes`` [..., n], ``step`` and ``low`` [..., ceil(n / stat_group)]."""
    n = codes.shape[-1]
    idx = torch.arange(n, device=codes.device) // stat_group
    return codes.float() * step.float()[..., idx] + low.float()[..., idx]


def solve(w: torch.Tensor, h: torch.Tensor, bits: int, group_size: int | None, symmetric: bool,
          act_order: bool = True, static_groups: bool = True, damp: float = 0.01, block_size: int = 128,
          scale_dtype: torch.dtype = torch.float16, outlier_fraction: float = 0.0,
          stat_bits: int = 3, stat_group: int = 16) -> Solution:
    """GPTQ on ``w`` [out, in] with Hessian ``h`` [in, in] (both float32, same device)."""
    rows, cols = w.shape
    gs = _group_width(group_size, cols)
    n_groups = cols // gs
    w = w.float().clone()
    h = h.float().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0

    coded = outlier_fraction > 0
    scale = torch.zeros(rows, n_groups, device=w.device)
    zero = torch.zeros(rows, n_groups, device=w.device)
    if static_groups and not coded:
        # Groups fixed on the original column order before any reordering, so
        # act_order changes only the order of the sweep and needs no g_idx.
        for g in range(n_groups):
            scale[:, g], zero[:, g] = grid.find_params(w[:, g * gs:(g + 1) * gs], bits, symmetric, scale_dtype)

    perm = torch.argsort(torch.diag(h), descending=True) if act_order else None
    if perm is not None:
        w, h = w[:, perm], h[perm][:, perm]
    hinv = hessian_inverse_factor(h, damp)
    col_group = (perm if perm is not None else torch.arange(cols, device=w.device)) // gs

    codes = torch.zeros(rows, cols, device=w.device)
    is_outlier = torch.zeros(rows, cols, dtype=torch.bool, device=w.device)
    stat_scale, stat_zero = [], []
    dynamic = not static_groups or coded
    cur_s = cur_z = None
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            j = i1 + i
            if dynamic and j % gs == 0:
                # The group's statistics come from the weights as the sweep has
                # left them, so they absorb the error pushed in from before.
                block = torch.cat([w1[:, i:], w[:, i2:]], dim=1)[:, :gs]
                if coded:
                    cur_s, cur_z, mask, st = _outlier_group(block, torch.diag(hinv)[j:j + gs], bits,
                                                            outlier_fraction, stat_bits, stat_group, scale_dtype)
                    is_outlier[:, j:j + gs] = mask
                    stat_scale.append(st[0])
                    stat_zero.append(st[1])
                else:
                    cur_s, cur_z = grid.find_params(block, bits, symmetric, scale_dtype)
                scale[:, j // gs], zero[:, j // gs] = cur_s, cur_z
            col = w1[:, i]
            if dynamic:
                s, z = cur_s, cur_z
            else:
                g = int(col_group[j])
                s, z = scale[:, g], zero[:, g]
            q = grid.quantize(col.unsqueeze(1), s, z, bits).squeeze(1)
            codes[:, j] = q
            deq = grid.dequantize(q.unsqueeze(1), s, z).squeeze(1)
            if coded:
                deq = torch.where(is_outlier[:, j], col, deq)
            e = (col - deq) / hinv1[i, i]
            w1[:, i:] -= e.unsqueeze(1) * hinv1[i, i:].unsqueeze(0)
            err1[:, i] = e
            if coded:
                w[:, j] = col  # the value an outlier keeps
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]

    g_idx = None
    if perm is not None:
        inv = torch.argsort(perm)
        codes, is_outlier, w = codes[:, inv], is_outlier[:, inv], w[:, inv]
        if dynamic:
            # Groups were formed in sweep order: record each column's group.
            g_idx = (inv // gs).to(torch.int32)
    sol = Solution(codes.to(torch.int8), scale, zero, g_idx=g_idx)
    if coded:
        groups = sol.group_index()
        deq = grid.dequantize(codes, scale[:, groups], zero[:, groups])
        resid = torch.where(is_outlier, (w - deq).half().float(), torch.zeros_like(w))
        sol.outliers = resid.to_sparse()
        sol.stats = {"scale": stat_scale, "zero": stat_zero, "bits": stat_bits, "group": stat_group}
    return sol


def _row_fit(block: torch.Tensor, keep: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric min-max scale and (real-valued) zero per row over the kept weights."""
    qmin, qmax = grid.qrange(bits)
    big = torch.finfo(block.dtype).max
    lo = torch.clamp(torch.where(keep, block, big).amin(dim=1), max=0.0)
    hi = torch.clamp(torch.where(keep, block, -big).amax(dim=1), min=0.0)
    s = (hi - lo) / (qmax - qmin)
    s = torch.where(s > 0, s, torch.full_like(s, STAT_SCALE_FLOOR))
    return s, qmin - lo / s


def _row_loss(block, keep, s, z, bits, weight) -> torch.Tensor:
    err = (block - grid.dequantize(grid.quantize(block, s, z, bits), s, z)) ** 2 * weight
    return torch.where(keep, err, torch.zeros_like(err)).sum(dim=1)


def _outlier_group(block: torch.Tensor, hdiag: torch.Tensor, bits: int, fraction: float, stat_bits: int,
                   stat_group: int, scale_dtype: torch.dtype, rounds: int = 4):
    """Statistics of one group with the weights that cost most set aside as outliers.

    As in SpQR, a weight is an outlier when leaving it out of the fit lowers
    the group's loss the most: the rounding error of every other weight,
    scaled by the inverse Hessian diagonal as GPTQ weighs it. Only a row's
    current minimum or maximum can change its min-max fit, so each round
    tries those two per row and keeps the best gains, a share of the budget
    (``fraction`` of the group) at a time.
    """
    rows, cols = block.shape
    weight = 1.0 / hdiag.unsqueeze(0) ** 2
    keep = torch.ones_like(block, dtype=torch.bool)
    budget = int(fraction * block.numel())
    ar = torch.arange(rows, device=block.device)
    big = torch.finfo(block.dtype).max
    for r in range(rounds):
        take = budget // rounds + (1 if r < budget % rounds else 0)
        if take == 0:
            continue
        s, z = _row_fit(block, keep, bits)
        base = _row_loss(block, keep, s, z, bits, weight)
        best_gain = torch.full((rows,), -big, device=block.device)
        best_col = torch.zeros(rows, dtype=torch.long, device=block.device)
        for col in (torch.where(keep, block, big).argmin(dim=1), torch.where(keep, block, -big).argmax(dim=1)):
            trial = keep.clone()
            trial[ar, col] = False
            s2, z2 = _row_fit(block, trial, bits)
            gain = base - _row_loss(block, trial, s2, z2, bits, weight)
            better = gain > best_gain
            best_gain = torch.where(better, gain, best_gain)
            best_col = torch.where(better, col, best_col)
        # Rows with a single weight left cannot give it up.
        best_gain = torch.where(keep.sum(dim=1) > 1, best_gain, torch.full_like(best_gain, -big))
        chosen = torch.topk(best_gain, min(take, rows)).indices
        chosen = chosen[best_gain[chosen] > 0]
        keep[chosen, best_col[chosen]] = False
    s, z = _row_fit(block, keep, bits)
    s_q, s_st = _code_stats(s, stat_bits, stat_group)
    s_q = torch.clamp(s_q, min=STAT_SCALE_FLOOR)
    z_codes = code_zero(z, bits, stat_bits)
    return s_q, decode_zero(z_codes, bits, stat_bits), ~keep, (s_st, {"codes": z_codes})


def code_zero(z: torch.Tensor, bits: int, stat_bits: int) -> torch.Tensor:
    """A zero point lies in the code range [qmin, qmax], so a fixed ``stat_bits`` grid over it needs no statistics."""
    qmin, qmax = grid.qrange(bits)
    levels = (1 << stat_bits) - 1
    return torch.clamp(torch.round((z - qmin) * levels / (qmax - qmin)), 0, levels).to(torch.uint8)


def decode_zero(codes: torch.Tensor, bits: int, stat_bits: int) -> torch.Tensor:
    qmin, qmax = grid.qrange(bits)
    return qmin + codes.float() * ((qmax - qmin) / ((1 << stat_bits) - 1))
