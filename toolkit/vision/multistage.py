"""``multistage`` (in the spirit of MustDrop, Liu et al. 2024): merge, then drop by the question, then cut caches.

Three stages:

1. before the language model, 2 x 2 windows of the patch grid whose tokens
   are near-duplicates (every key within cosine ``merge_threshold`` of the
   window's mean) merge into one token, the most uniform windows first, down
   to at most twice the final budget (:func:`spatial_merge`);
2. at layer K, text-guided filtering keeps the budget by a dual score: the
   mean and the maximum attention over the question's tokens (FastV's
   attention, :func:`toolkit.vision.fastv.question_scores`), each scaled to
   [0, 1] (:func:`dual_score`);
3. after prefill, the caches of the layers before K are cut to the same
   tokens, so decoding holds the budget in every layer (:func:`cut_caches`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["spatial_merge", "dual_score", "cut_caches"]


def spatial_merge(emb: torch.Tensor, vis_pos: torch.Tensor, target: int, scores: torch.Tensor, keys: torch.Tensor,
                  threshold: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stage 1: fold near-duplicate 2 x 2 windows into one token each.

    Returns ``(keep (B, k), embeddings, merged_into (B, n))`` as
    :func:`toolkit.vision.visionzip.merge` does; ``scores`` are the vision
    tower's, used to trim rows that merged more windows than others.
    """
    b, n = vis_pos.shape
    side = int(math.isqrt(n))
    merged_into = torch.arange(n).expand(b, n).clone()
    if side * side != n or side < 2 or target >= n:
        return torch.arange(n).expand(b, n), emb, merged_into
    emb = emb.clone()
    w = side // 2
    grid = torch.arange(n).view(side, side)[: 2 * w, : 2 * w]
    windows = grid.view(w, 2, w, 2).permute(0, 2, 1, 3).reshape(w * w, 4)  # token indices per window
    unit = F.normalize(keys, dim=-1)[:, windows]  # (b, W, 4, d)
    centre = F.normalize(unit.mean(2, keepdim=True), dim=-1)
    uniformity = (unit * centre).sum(-1).min(-1).values  # (b, W): the least similar member
    need = n - target  # tokens to remove; each merged window removes 3
    n_merge = min((need + 2) // 3, windows.shape[0])
    keep_rows = []
    for r in range(b):
        order = uniformity[r].argsort(descending=True)[:n_merge]
        order = order[uniformity[r, order] >= threshold]
        drop = torch.zeros(n, dtype=torch.bool)
        for wi in order.tolist():
            members = windows[wi]
            emb[r, vis_pos[r, members[0]]] = emb[r, vis_pos[r, members]].float().mean(0).to(emb.dtype)
            drop[members[1:]] = True
            merged_into[r, members] = members[0]
        keep_rows.append(torch.nonzero(~drop).flatten())
    # rows may merge different numbers of windows; batches stay rectangular by trimming every row to
    # the shortest, dropping each longer row's least-attended surplus tokens
    k1 = min(len(x) for x in keep_rows)
    out = []
    for r, kr in enumerate(keep_rows):
        if len(kr) > k1:
            kr = kr[scores[r, kr].topk(k1).indices].sort().values
        out.append(kr)
    return torch.stack(out), emb, merged_into


def _unit(x: torch.Tensor) -> torch.Tensor:
    lo, hi = x.amin(1, keepdim=True), x.amax(1, keepdim=True)
    return (x - lo) / (hi - lo).clamp_min(1e-12)


def dual_score(mean: torch.Tensor, peak: torch.Tensor) -> torch.Tensor:
    """Stage 2's ranking: the mean and the peak question attention (B, n), each scaled to [0, 1] per row, summed."""
    return _unit(mean) + _unit(peak)


def cut_caches(cache, keep: torch.Tensor, length: int, layers: int) -> None:
    """Stage 3: keep columns ``keep`` (B, k) in the caches of the first ``layers`` layers that hold ``length``."""
    idx = keep[:, None, :, None]
    for i in range(layers):
        layer = cache.layers[i]
        if layer.keys is None or layer.keys.shape[-2] != length:
            continue
        layer.keys = torch.gather(layer.keys, 2, idx.expand(-1, layer.keys.shape[1], -1, layer.keys.shape[-1]))
        layer.values = torch.gather(layer.values, 2,
                                    idx.expand(-1, layer.values.shape[1], -1, layer.values.shape[-1]))
