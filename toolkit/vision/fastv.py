"""``fastv`` (FastV, Chen et al. 2024): drop the vision tokens the question ignores, at decoder layer K.

The first K decoder layers see every token. At layer K the vision tokens are
scored by the attention the question's tokens pay them, recomputed from layer
K's own query and key projections (RoPE included) and averaged over heads and
question tokens, and only the top share goes on to layers K and later. The
early layers' caches keep every token, as in the paper.

Only the scoring computes attention weights, and only for the question's
rows; every layer still runs its usual SDPA attention. The multi-stage
method (:mod:`toolkit.vision.multistage`) scores with the same attention.
"""

from __future__ import annotations

import torch

from toolkit.vision.llava import gather_rows

__all__ = ["question_attention", "question_scores"]


def question_attention(layer, hidden, pos_emb, mask2d_q: torch.Tensor, key_valid: torch.Tensor) -> torch.Tensor:
    """Attention (B, H, Q, L) paid by the last Q positions, from ``layer``'s own projections (RoPE applied)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv
    attn = layer.self_attn
    b, seq, _ = hidden.shape
    qn = mask2d_q.shape[1]
    h = layer.input_layernorm(hidden)
    hd = attn.head_dim
    q = attn.q_proj(h[:, -qn:]).view(b, qn, -1, hd).transpose(1, 2)
    k = attn.k_proj(h).view(b, seq, -1, hd).transpose(1, 2)
    cos, sin = pos_emb
    cos_q, sin_q = cos[:, -qn:], sin[:, -qn:]
    q, _ = apply_rotary_pos_emb(q, q, cos_q, sin_q)
    _, k = apply_rotary_pos_emb(k, k, cos, sin)
    k = repeat_kv(k, attn.num_key_value_groups)
    logits = (q.float() @ k.float().transpose(-1, -2)) * attn.scaling
    causal = torch.arange(seq)[None, :] <= torch.arange(seq - qn, seq)[:, None]  # (Q, L)
    allowed = causal[None, None] & key_valid[:, None, None, :]
    logits = logits.masked_fill(~allowed, float("-inf"))
    return torch.softmax(logits, dim=-1)


def question_scores(layer, hidden, pos_emb, vision: torch.Tensor, query: torch.Tensor,
                    key_valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(columns, mean, peak)`` for the vision tokens of ``hidden`` (the input of ``layer``).

    ``vision`` and ``query`` are (B, L) masks of the vision tokens and the
    question's tokens; every row holds the same number of vision tokens.
    ``columns`` (B, n) are the vision tokens' positions in ``hidden``;
    ``mean`` and ``peak`` (B, n) the mean and the maximum attention over the
    question's tokens, averaged over heads. FastV ranks by ``mean``.
    """
    b = hidden.shape[0]
    qn = int(query.sum(1).max())
    qmask = query[:, -qn:]
    probs = question_attention(layer, hidden, pos_emb, qmask, key_valid)
    n = int(vision.sum(1)[0])
    columns = torch.nonzero(vision)[:, 1].view(b, n)
    p = gather_rows(probs.mean(1).transpose(1, 2), columns, 1)  # (B, n, Q)
    w = qmask.float()[:, None, :]
    mean = (p * w).sum(-1) / w.sum(-1).clamp_min(1)
    return columns, mean, (p * w).amax(-1)
