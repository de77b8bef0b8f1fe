"""``visionzip`` (VisionZip, Yang et al. 2024): keep the tokens the vision tower finds salient, merge the rest.

Before the language model, the *dominant* tokens are those the vision
tower's [CLS] attends to most in the layer whose output LLaVA uses (a tower
without [CLS], such as SigLIP's, is scored by the attention each token
receives on average); the rest are merged into a few *contextual* tokens:
evenly spaced targets, each the mean of the remaining tokens whose keys are
most similar to it.

Merging happens on the projected features at the language model's input,
not inside the vision tower: LLaVA scatters the tower's output into a fixed
number of placeholder positions, and the tower's cost is a small part of the
whole here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["tower_scores", "merge"]


def tower_scores(module, hidden: torch.Tensor, has_cls: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scores (B, n), keys (B, n, d))`` of the patch tokens, from a tower attention ``module``'s input ``hidden``.

    The score is the attention [CLS] pays each patch (or, without [CLS], the
    attention each token receives on average), averaged over heads.
    """
    b, t, _ = hidden.shape
    q = module.q_proj(hidden).view(b, t, module.num_heads, module.head_dim).transpose(1, 2)
    k = module.k_proj(hidden).view(b, t, module.num_heads, module.head_dim).transpose(1, 2)
    attn = torch.softmax((q @ k.transpose(-1, -2)).float() * module.scale, dim=-1).mean(1)  # (b, t, t)
    keys = k.transpose(1, 2).reshape(b, t, -1).float()
    if has_cls:
        return attn[:, 0, 1:], keys[:, 1:]
    return attn.mean(1), keys


def merge(emb: torch.Tensor, vis_pos: torch.Tensor, k: int, scores: torch.Tensor, keys: torch.Tensor,
          contextual: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(keep (B, k), embeddings, merged_into (B, n))``: ``k`` tokens, a share ``contextual`` of them merged.

    ``emb`` is the language model's input (B, L, d) and ``vis_pos`` (B, n) the
    positions of the vision tokens in it; the contextual targets' rows of the
    returned embeddings hold their groups' means. ``merged_into`` names, for
    every vision token, the kept token it went to (-1: dropped).
    """
    b, n = vis_pos.shape
    n_ctx = min(int(round(k * contextual)), k - 1) if k > 1 else 0
    n_dom = k - n_ctx
    dom = scores.topk(n_dom, dim=1).indices
    emb = emb.clone()
    merged_into = torch.full((b, n), -1, dtype=torch.long)
    keep_rows = []
    for r in range(b):
        is_dom = torch.zeros(n, dtype=torch.bool)
        is_dom[dom[r]] = True
        rest = torch.nonzero(~is_dom).flatten()
        merged_into[r, dom[r]] = dom[r]
        targets = rest[:0]
        if n_ctx and len(rest):
            step = max(1, len(rest) // n_ctx)
            targets = rest[::step][:n_ctx]
            unit = F.normalize(keys[r], dim=-1)
            sim = unit[rest] @ unit[targets].T
            group = sim.argmax(1)
            group[torch.isin(rest, targets)] = torch.arange(len(targets))  # a target joins itself
            feats = emb[r, vis_pos[r, rest]].float()
            sums = torch.zeros(len(targets), feats.shape[1]).index_add_(0, group, feats)
            sizes = torch.bincount(group, minlength=len(targets)).clamp_min(1)
            emb[r, vis_pos[r, targets]] = (sums / sizes[:, None]).to(emb.dtype)
            merged_into[r, rest] = targets[group]
        keep_rows.append(torch.cat([dom[r], targets]).sort().values)
    return torch.stack(keep_rows), emb, merged_into
