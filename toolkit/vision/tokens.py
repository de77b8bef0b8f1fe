"""Vision-token dropping for LLaVA-class models, attached with hooks.

A LLaVA prompt spends most of its tokens on the image (here 256 of about
270), and most of those show background. Each method below keeps a share
``keep`` of the vision tokens, so that the language model's prefill, its
KV cache and every decoding step shrink with them:

``random``
    the baseline: a uniform random subset, before the language model.
``fastv`` (FastV, Chen et al. 2024)
    the first ``layer`` decoder layers see every token; at layer K the
    vision tokens are scored by the attention the question's tokens pay
    them (recomputed from layer K's own query and key projections, RoPE
    included, and averaged over heads and question tokens), and only the
    top share goes on to layers K and later. The early layers' caches keep
    every token, as in the paper.
``visionzip`` (VisionZip, Yang et al. 2024)
    before the language model: the *dominant* tokens are those the vision
    tower's [CLS] attends to most in the layer whose output LLaVA uses (a
    tower without [CLS], such as SigLIP's, is scored by the attention each
    token receives on average); the rest are merged into a few *contextual*
    tokens: evenly spaced targets, each the mean of the remaining tokens
    whose keys are most similar to it.
``multistage`` (in the spirit of MustDrop, Liu et al. 2024)
    three stages: (1) before the language model, 2 x 2 windows of the patch
    grid whose tokens are near-duplicates (every key within cosine
    ``merge_threshold`` of the window's mean) merge into one token, the most
    uniform windows first, down to at most twice the final budget; (2) at
    layer K, text-guided filtering keeps the budget by a dual score: the
    mean and the maximum attention over the question's tokens, each scaled
    to [0, 1]; (3) after prefill, the caches of the layers before K are cut
    to the same tokens, so decoding holds the budget in every layer.

Merging happens on the projected features at the language model's input,
not inside the vision tower: LLaVA scatters the tower's output into a fixed
number of placeholder positions, and the tower's cost is a small part of
the whole here.

Consistency: kept tokens keep their original position ids (so RoPE sees the
same relative distances), decoding continues from the original prompt
length, and the 2-D attention mask (left padding) and the 4-D masks of the
later layers lose exactly the dropped columns. Every layer runs through its
usual SDPA attention; only the scoring computes attention weights, for the
few rows it needs. The same count is kept in every row of a batch, so
batches stay rectangular.

>>> handle = drop_vision_tokens(model, TokenDropConfig("fastv", keep=0.25))
>>> out = model.generate(**inputs, max_new_tokens=4)
>>> handle.remove()
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from toolkit.errors import ToolkitError, UnsupportedInputError

__all__ = ["TokenDropConfig", "TokenDropHandle", "drop_vision_tokens", "vision_token_scores", "METHODS"]

METHODS = ("fastv", "visionzip", "multistage", "random")
_ATTR = "_toolkit_token_drop"


@dataclass(frozen=True)
class TokenDropConfig:
    """What to drop.

    ``keep`` is the share of vision tokens the language model's later layers
    see, in (0, 1]; the count is ``max(1, round(keep * n))``. ``layer`` is K
    for ``fastv`` and ``multistage``. ``contextual`` is VisionZip's share of
    the kept tokens that are merged contextual tokens. ``proportional_attention``
    (ToMe's, Bolya et al. 2023) adds log(size) to the attention logits of a
    merged token in every layer, so that it draws the attention of the tokens
    it stands for; it changes nothing for methods that do not merge.
    """

    method: str
    keep: float = 0.25
    layer: int = 2
    contextual: float = 0.15
    merge_threshold: float = 0.9
    seed: int = 0
    proportional_attention: bool = False

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ToolkitError(f"unknown token-dropping method {self.method!r}; expected one of {METHODS}")
        if not (isinstance(self.keep, (int, float)) and 0.0 < self.keep <= 1.0):
            raise ToolkitError(f"keep must be a share in (0, 1], got {self.keep!r}")
        if not isinstance(self.layer, int) or self.layer < 0:
            raise ToolkitError(f"layer must be a non-negative integer, got {self.layer!r}")
        if not 0.0 <= self.contextual < 1.0:
            raise ToolkitError(f"contextual must be in [0, 1), got {self.contextual!r}")
        if not -1.0 <= self.merge_threshold <= 1.0:
            raise ToolkitError(f"merge_threshold must be a cosine in [-1, 1], got {self.merge_threshold!r}")

    def budget(self, n: int) -> int:
        return max(1, min(n, round(self.keep * n)))


@dataclass
class _State:
    """What one generation carries from prefill into its decoding steps."""

    active: bool = False
    n_vision: int = 0
    seen: int = 0                          # original positions consumed so far
    lm_cols: torch.Tensor | None = None    # (B, n_lm): original columns at the LM's input
    late_rel: torch.Tensor | None = None   # (B, n_late): late layers' columns, as indices into lm_cols
    vision_mask: torch.Tensor | None = None  # (B, L) original layout
    text_query: torch.Tensor | None = None   # (B, L) question tokens (after the image, not padding)
    cls_score: torch.Tensor | None = None    # (B, n) vision tower attention
    vision_keys: torch.Tensor | None = None  # (B, n, d)
    log_sizes: torch.Tensor | None = None    # (B, n_lm) log of how many tokens each LM-input column stands for
    lm_vision: torch.Tensor | None = None    # (B, n_lm_vision) vision indices present at the LM's input
    kept: torch.Tensor | None = None         # (B, k) vision-token indices (0..n-1) the late layers see
    merged_into: torch.Tensor | None = None  # (B, n) for merging methods: the kept token each one went to
    pending_late: bool = False
    full_len: int = 0


class TokenDropHandle:
    """Returned by :func:`drop_vision_tokens`; ``remove()`` detaches every hook.

    After a prefill, ``kept`` holds the vision-token indices (row-major over
    the patch grid) that the later layers saw, per batch row, and
    ``merged_into`` (merging methods) the kept index each token was folded
    into (-1: dropped).
    """

    def __init__(self, model, core, config: TokenDropConfig) -> None:
        self.model, self.core, self.config = model, core, config
        self._hooks: list = []
        self.state = _State()
        self._gen = torch.Generator().manual_seed(config.seed)
        self._tower: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def kept(self) -> torch.Tensor | None:
        return self.state.kept

    @property
    def merged_into(self) -> torch.Tensor | None:
        return self.state.merged_into

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        if getattr(self.model, _ATTR, None) is self:
            delattr(self.model, _ATTR)

    def __enter__(self) -> TokenDropHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


# -- resolving the model --------------------------------------------------------------------------------------------

def _core(model):
    core = model.model if hasattr(model, "model") and hasattr(model.model, "vision_tower") else model
    if not (hasattr(core, "vision_tower") and hasattr(core, "language_model")):
        raise UnsupportedInputError(f"{type(model).__name__} is not a LLaVA-style model (no vision_tower and "
                                    "language_model)")
    if getattr(core.config, "image_token_id", None) is None:
        raise UnsupportedInputError("the model's config has no image_token_id")
    layers = getattr(core.language_model, "layers", None)
    if layers is None or not all(hasattr(x, "self_attn") and hasattr(x.self_attn, "q_proj") for x in layers):
        raise UnsupportedInputError("the language model's decoder layers have no q_proj/k_proj attention")
    return core


def _tower_attention_layer(core):
    tower = core.vision_tower
    encoder = getattr(tower, "encoder", None) or getattr(getattr(tower, "vision_model", None), "encoder", None)
    if encoder is None:
        raise UnsupportedInputError(f"cannot find the encoder layers of {type(tower).__name__}")
    n = len(encoder.layers)
    vfl = core.config.vision_feature_layer
    if not isinstance(vfl, int):
        vfl = vfl[-1]
    idx = n + vfl if vfl < 0 else vfl - 1  # hidden_states[i] is the output of layer i - 1
    if not 0 <= idx < n:
        raise UnsupportedInputError(f"vision_feature_layer {vfl} selects no encoder layer")
    has_cls = core.config.vision_feature_select_strategy == "default"
    return encoder.layers[idx].self_attn, has_cls


# -- attach ---------------------------------------------------------------------------------------------------------

def drop_vision_tokens(model, config: TokenDropConfig) -> TokenDropHandle:
    """Attach ``config``'s method to a LLaVA-style model; returns the handle that removes it.

    Everything is checked before the first hook goes on, so a refused call
    leaves the model as it was.
    """
    if not isinstance(config, TokenDropConfig):
        raise ToolkitError(f"config must be a TokenDropConfig, got {type(config).__name__}")
    if getattr(model, _ATTR, None) is not None:
        raise ToolkitError("token dropping is already attached to this model; remove() the first handle")
    if getattr(model, "_toolkit_mod", None) is not None:  # toolkit.vision.mod's marker
        raise ToolkitError("the model is a Mixture-of-Depths model; token dropping attaches to dense models only")
    core = _core(model)
    layers = core.language_model.layers
    if config.method in ("fastv", "multistage") and config.layer >= len(layers):
        raise ToolkitError(f"layer {config.layer} is beyond the language model's depth ({len(layers)} layers)")
    attn, has_cls = _tower_attention_layer(core)
    handle = TokenDropHandle(model, core, config)
    h = handle._hooks
    h.append(core.register_forward_pre_hook(lambda m, a, kw: _on_model(handle, a, kw), with_kwargs=True))
    if config.method in ("visionzip", "multistage"):
        h.append(attn.register_forward_pre_hook(lambda m, a, kw: _on_tower_attention(handle, m, a, kw, has_cls),
                                                with_kwargs=True))
    lm = core.language_model
    h.append(lm.register_forward_pre_hook(lambda m, a, kw: _on_lm(handle, a, kw), with_kwargs=True))
    if config.method in ("fastv", "multistage"):
        for i in range(config.layer, len(layers)):
            h.append(layers[i].register_forward_pre_hook(
                lambda m, a, kw, i=i: _on_layer(handle, m, i, a, kw), with_kwargs=True))
    if config.proportional_attention and config.method in ("visionzip", "multistage"):
        for i in range(len(layers)):  # after the dropping hooks, so it sees their masks
            h.append(layers[i].register_forward_pre_hook(
                lambda m, a, kw, i=i: _size_bias(handle, i, a, kw), with_kwargs=True))
    if config.method == "multistage":
        h.append(lm.register_forward_hook(lambda m, a, kw, out: _after_lm(handle, kw, out), with_kwargs=True))
    setattr(model, _ATTR, handle)
    return handle


# -- hooks ----------------------------------------------------------------------------------------------------------

def _cache_of(kw):
    return kw.get("cache", kw.get("past_key_values"))


def prompt_vision(core, args, kw, who: str) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(input_ids, vision mask, cached length)`` of a LLaVA forward call; a prefill's rows must hold equal counts."""
    ids = kw.get("input_ids", args[0] if args else None)
    cache = _cache_of(kw)
    past = cache.get_seq_length() if cache is not None else 0
    if ids is None:
        raise UnsupportedInputError(f"{who} needs input_ids (to find the image placeholders)")
    vision = ids == core.config.image_token_id
    if past == 0:
        counts = vision.sum(1)
        if int(counts.max()) != int(counts.min()):
            raise UnsupportedInputError("every row of a batch must hold the same number of vision tokens")
    return ids, vision, past


def _on_model(handle: TokenDropHandle, args, kw):
    st = handle.state
    ids, vision, past = prompt_vision(handle.core, args, kw, "token dropping")
    if past == 0:
        counts = vision.sum(1)
        if int(counts.min()) == 0:
            raise UnsupportedInputError("the prompt has no vision tokens to drop (no image placeholder in a row)")
        mask = kw.get("attention_mask")
        valid = torch.ones_like(vision) if mask is None else mask.bool()
        last_vis = torch.where(vision, torch.arange(ids.shape[1]), -1).max(1).values
        query = (torch.arange(ids.shape[1])[None] > last_vis[:, None]) & valid
        handle.state = _State(active=True, n_vision=int(counts[0]), vision_mask=vision, text_query=query,
                              full_len=ids.shape[1])
    elif not st.active:
        raise UnsupportedInputError("a decoding step arrived without a prefill through the token-dropping hooks")
    return None


def _on_tower_attention(handle, module, args, kw, has_cls):
    # generate() may run the tower before the model's forward (to cache the
    # image features), so its scores wait on the handle until the LM's prefill.
    x = kw.get("hidden_states", args[0] if args else None)
    b, t, _ = x.shape
    q = module.q_proj(x).view(b, t, module.num_heads, module.head_dim).transpose(1, 2)
    k = module.k_proj(x).view(b, t, module.num_heads, module.head_dim).transpose(1, 2)
    attn = torch.softmax((q @ k.transpose(-1, -2)).float() * module.scale, dim=-1).mean(1)  # (b, t, t)
    keys = k.transpose(1, 2).reshape(b, t, -1).float()
    if has_cls:
        handle._tower = (attn[:, 0, 1:], keys[:, 1:])
    else:
        handle._tower = (attn.mean(1), keys)
    return None


def _vision_positions(st: _State) -> torch.Tensor:
    """(B, n) positions of the vision tokens in the original sequence."""
    b, length = st.vision_mask.shape
    pos = torch.arange(length).expand(b, length)
    return pos[st.vision_mask].view(b, st.n_vision)


def _gather_rows(x: torch.Tensor, idx: torch.Tensor, dim: int) -> torch.Tensor:
    """Per-row index_select along ``dim`` (batch is dim 0; ``idx`` is (B, k))."""
    shape = [1] * x.dim()
    shape[0], shape[dim] = idx.shape[0], idx.shape[1]
    view = idx.view(shape)
    expand = list(x.shape)
    expand[dim] = idx.shape[1]
    if x.shape[0] == 1 and idx.shape[0] > 1:
        x = x.expand(idx.shape[0], *x.shape[1:])
    expand[0] = idx.shape[0]
    return torch.gather(x, dim, view.expand(expand))


def _on_lm(handle: TokenDropHandle, args, kw):
    st, cfg = handle.state, handle.config
    emb = kw.get("inputs_embeds")
    if emb is None:
        return None
    b, seq, _ = emb.shape
    cache = _cache_of(kw)
    past = cache.get_seq_length() if cache is not None else 0
    kw = dict(kw)
    if past == 0 and st.lm_cols is None:
        n = st.n_vision
        vis_pos = _vision_positions(st)
        if handle._tower is not None:
            st.cls_score, st.vision_keys = handle._tower
            handle._tower = None
            if st.cls_score.shape != (b, n):
                raise UnsupportedInputError(f"the vision tower gave {tuple(st.cls_score.shape)} scores for "
                                            f"{b} rows of {n} vision tokens")
        elif cfg.method in ("visionzip", "multistage"):
            raise UnsupportedInputError("no vision-tower attention was seen for this prompt (pass pixel_values)")
        k = cfg.budget(n)
        if cfg.method == "random":
            scores = torch.rand((b, n), generator=handle._gen)
            keep = scores.topk(k, dim=1).indices.sort(1).values
            st.kept = keep
        elif cfg.method == "visionzip":
            keep, emb = _visionzip(st, emb, vis_pos, k, cfg)
        elif cfg.method == "multistage":
            keep, emb = _spatial_merge(st, emb, vis_pos, min(n, 2 * k), cfg)
        else:  # fastv: every vision token enters the LM
            keep = torch.arange(n).expand(b, n)
        # columns that enter the LM: all non-vision columns plus the kept vision ones
        keep_mask = ~st.vision_mask.clone()
        keep_mask.scatter_(1, _gather_rows(vis_pos, keep, 1), True)
        cols = torch.arange(seq).expand(b, seq)[keep_mask].view(b, -1)
        st.lm_cols = cols
        st.lm_vision = keep  # vision indices (0..n-1) present at the LM input
        if cfg.proportional_attention and st.merged_into is not None:
            counts = torch.stack([torch.bincount(r[r >= 0], minlength=n) for r in st.merged_into])
            sizes = torch.ones((b, cols.shape[1]))
            vis_cols = _gather_rows(st.vision_mask, cols, 1)
            sizes[vis_cols] = _gather_rows(counts, keep, 1).clamp_min(1).float().flatten()
            if (sizes > 1).any():
                st.log_sizes = sizes.log()
        if st.kept is None:
            st.kept = keep
        pos = kw.get("position_ids")
        pos = torch.arange(seq)[None].expand(b, seq) if pos is None else pos.expand(b, seq)
        kw["inputs_embeds"] = _gather_rows(emb, cols, 1)
        kw["position_ids"] = _gather_rows(pos, cols, 1)
        if kw.get("attention_mask") is not None:
            kw["attention_mask"] = _gather_rows(kw["attention_mask"], cols, 1)
        st.seen = seq
        st.pending_late = cfg.method in ("fastv", "multistage")
        return args, kw
    # decoding (or a continued prefill): the new tokens keep their original positions
    if kw.get("position_ids") is None:
        kw["position_ids"] = (torch.arange(seq) + st.seen)[None].expand(b, seq)
    mask = kw.get("attention_mask")
    if mask is not None and mask.dim() == 2:
        new = torch.arange(st.full_len, mask.shape[1]).expand(b, -1)
        kw["attention_mask"] = _gather_rows(mask, torch.cat([st.lm_cols, new], 1), 1)
    st.seen += seq
    return args, kw


def _visionzip(st: _State, emb, vis_pos, k: int, cfg: TokenDropConfig):
    b, n = vis_pos.shape
    n_ctx = min(int(round(k * cfg.contextual)), k - 1) if k > 1 else 0
    n_dom = k - n_ctx
    dom = st.cls_score.topk(n_dom, dim=1).indices
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
            keys = F.normalize(st.vision_keys[r], dim=-1)
            sim = keys[rest] @ keys[targets].T
            group = sim.argmax(1)
            group[torch.isin(rest, targets)] = torch.arange(len(targets))  # a target joins itself
            feats = emb[r, vis_pos[r, rest]].float()
            sums = torch.zeros(len(targets), feats.shape[1]).index_add_(0, group, feats)
            sizes = torch.bincount(group, minlength=len(targets)).clamp_min(1)
            emb[r, vis_pos[r, targets]] = (sums / sizes[:, None]).to(emb.dtype)
            merged_into[r, rest] = targets[group]
        keep_rows.append(torch.cat([dom[r], targets]).sort().values)
    st.merged_into = merged_into
    return torch.stack(keep_rows), emb


def _spatial_merge(st: _State, emb, vis_pos, target: int, cfg: TokenDropConfig):
    """Stage 1 of ``multistage``: fold near-duplicate 2 x 2 windows into one token each."""
    b, n = vis_pos.shape
    side = int(math.isqrt(n))
    merged_into = torch.arange(n).expand(b, n).clone()
    if side * side != n or side < 2 or target >= n:
        st.merged_into = merged_into
        return torch.arange(n).expand(b, n), emb
    emb = emb.clone()
    w = side // 2
    grid = torch.arange(n).view(side, side)[: 2 * w, : 2 * w]
    windows = grid.view(w, 2, w, 2).permute(0, 2, 1, 3).reshape(w * w, 4)  # token indices per window
    keys = F.normalize(st.vision_keys, dim=-1)[:, windows]  # (b, W, 4, d)
    centre = F.normalize(keys.mean(2, keepdim=True), dim=-1)
    uniformity = (keys * centre).sum(-1).min(-1).values  # (b, W): the least similar member
    need = n - target  # tokens to remove; each merged window removes 3
    n_merge = min((need + 2) // 3, windows.shape[0])
    keep_rows = []
    for r in range(b):
        order = uniformity[r].argsort(descending=True)[:n_merge]
        order = order[uniformity[r, order] >= cfg.merge_threshold]
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
            score = st.cls_score[r, kr]
            kr = kr[score.topk(k1).indices].sort().values
        out.append(kr)
    st.merged_into = merged_into
    return torch.stack(out), emb


def _question_attention(layer, hidden, pos_emb, mask2d_q: torch.Tensor, key_valid: torch.Tensor):
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


def _on_layer(handle: TokenDropHandle, layer, i: int, args, kw):
    st, cfg = handle.state, handle.config
    if not st.active:
        return None
    hidden = args[0] if args else kw["hidden_states"]
    b = hidden.shape[0]
    kw = dict(kw)
    if i == cfg.layer and st.pending_late:
        # score and choose, in the LM-input coordinates (columns st.lm_cols)
        st.pending_late = False
        vis_lm = _gather_rows(st.vision_mask, st.lm_cols, 1)        # (B, n_lm) bool
        query_lm = _gather_rows(st.text_query, st.lm_cols, 1)
        valid = torch.ones_like(vis_lm) if kw.get("attention_mask") is None else _valid_from(kw, st)
        qn = int(query_lm.sum(1).max())
        qmask = query_lm[:, -qn:]
        probs = _question_attention(layer, hidden, kw["position_embeddings"], qmask, valid)
        n_lm = int(vis_lm.sum(1)[0])
        vis_cols = torch.nonzero(vis_lm)[:, 1].view(b, n_lm)       # indices into the LM sequence
        p = _gather_rows(probs.mean(1).transpose(1, 2), vis_cols, 1)  # (B, n_lm, Q)
        w = qmask.float()[:, None, :]
        mean = (p * w).sum(-1) / w.sum(-1).clamp_min(1)
        if cfg.method == "multistage":
            peak = (p * w).amax(-1)
            score = _unit(mean) + _unit(peak)
        else:
            score = mean
        k = min(cfg.budget(st.n_vision), n_lm)
        chosen = score.topk(k, dim=1).indices.sort(1).values       # indices among the LM's vision tokens
        keep = ~vis_lm.clone()
        keep.scatter_(1, _gather_rows(vis_cols, chosen, 1), True)
        st.late_rel = torch.arange(vis_lm.shape[1]).expand(b, -1)[keep].view(b, -1)
        st.kept = _gather_rows(st.lm_vision, chosen, 1)
        if st.merged_into is not None:
            mi = st.merged_into.clone()
            for r in range(b):
                mi[r, ~torch.isin(mi[r], st.kept[r])] = -1
            st.merged_into = mi
    if st.late_rel is None or st.late_rel.shape[1] == st.lm_cols.shape[1]:
        return None
    rel = st.late_rel
    n_lm = st.lm_cols.shape[1]
    # prefill: the position embeddings (computed once for all layers) span the LM's input
    prefill = kw["position_embeddings"][0].shape[1] == n_lm
    if prefill:
        if hidden.shape[1] == n_lm:  # layer K: later layers get its (shorter) output
            if args:
                args = (_gather_rows(hidden, rel, 1),) + tuple(args[1:])
            else:
                kw["hidden_states"] = _gather_rows(hidden, rel, 1)
        cos, sin = kw["position_embeddings"]
        kw["position_embeddings"] = (_gather_rows(cos, rel, 1), _gather_rows(sin, rel, 1))
        if kw.get("position_ids") is not None:
            kw["position_ids"] = _gather_rows(kw["position_ids"].expand(b, -1), rel, 1)
        mask = kw.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 4:
            mask = _gather_rows(mask.expand(b, *mask.shape[1:]), rel, 3)
            kw["attention_mask"] = _gather_rows(mask.transpose(2, 3), rel, 3).transpose(2, 3)
    else:  # a decoding step: only the mask's key columns change
        mask = kw.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 4:
            total = mask.shape[-1]
            new = torch.arange(st.lm_cols.shape[1], total).expand(b, -1)
            kw["attention_mask"] = _gather_rows(mask.expand(b, *mask.shape[1:]), torch.cat([rel, new], 1), 3)
    return args, kw


def _size_bias(handle: TokenDropHandle, i: int, args, kw):
    """Proportional attention: log(size) on the logits of merged keys, through the layer's SDPA mask."""
    st = handle.state
    if not st.active or st.log_sizes is None:
        return None
    late = (st.late_rel is not None and i >= handle.config.layer
            and st.late_rel.shape[1] != st.lm_cols.shape[1])
    ls = _gather_rows(st.log_sizes, st.late_rel, 1) if late else st.log_sizes
    hidden = args[0] if args else kw["hidden_states"]
    b, q = hidden.shape[:2]
    cache = _cache_of(kw)
    past = 0
    if cache is not None and len(getattr(cache, "layers", [])) > i:
        keys = getattr(cache.layers[i], "keys", None)
        past = keys.shape[-2] if isinstance(keys, torch.Tensor) and keys.dim() == 4 else 0
    kl = past + q
    if kl < ls.shape[1]:
        return None
    bias = torch.cat([ls, torch.zeros((b, kl - ls.shape[1]))], 1)[:, None, None, :]
    mask = kw.get("attention_mask")
    if mask is None:
        mask = (torch.arange(kl)[None, :] <= torch.arange(past, kl)[:, None])[None, None]
    if mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=hidden.dtype).masked_fill(~mask, float("-inf"))
    kw = dict(kw)
    kw["attention_mask"] = mask + bias.to(mask.dtype)
    return args, kw


def _valid_from(kw, st: _State) -> torch.Tensor:
    """(B, n_lm) key validity from the 4-D mask's last row (padding columns are masked there)."""
    mask = kw["attention_mask"]
    if mask.dim() == 4:
        last = mask[:, 0, -1, :]
        return last if last.dtype == torch.bool else last > torch.finfo(last.dtype).min / 2
    return torch.ones(st.lm_cols.shape, dtype=torch.bool)


def _unit(x: torch.Tensor) -> torch.Tensor:
    lo, hi = x.amin(1, keepdim=True), x.amax(1, keepdim=True)
    return (x - lo) / (hi - lo).clamp_min(1e-12)


def _after_lm(handle: TokenDropHandle, kw, out):
    """Stage 3 of ``multistage``: cut the early layers' caches to the late layers' tokens."""
    st = handle.state
    cache = _cache_of(kw)
    if cache is None or st.late_rel is None or st.lm_cols is None:
        return None
    rel = st.late_rel
    if rel.shape[1] == st.lm_cols.shape[1] or not hasattr(cache, "layers"):
        return None
    for i in range(handle.config.layer):
        layer = cache.layers[i]
        if layer.keys is None or layer.keys.shape[-2] != st.lm_cols.shape[1]:
            continue
        idx = rel[:, None, :, None]
        layer.keys = torch.gather(layer.keys, 2, idx.expand(-1, layer.keys.shape[1], -1, layer.keys.shape[-1]))
        layer.values = torch.gather(layer.values, 2,
                                    idx.expand(-1, layer.values.shape[1], -1, layer.values.shape[-1]))
    st.lm_cols = _gather_rows(st.lm_cols, rel, 1)
    if st.log_sizes is not None:
        st.log_sizes = _gather_rows(st.log_sizes, rel, 1)
    st.late_rel = torch.arange(rel.shape[1]).expand(rel.shape[0], -1)
    return None


@torch.no_grad()
def vision_token_scores(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """(B, n) the attention VisionZip ranks by: [CLS]'s (or the mean received) in the tower's feature layer."""
    core = _core(model)
    attn, has_cls = _tower_attention_layer(core)
    box = TokenDropHandle(model, core, TokenDropConfig("visionzip"))
    hook = attn.register_forward_pre_hook(lambda m, a, kw: _on_tower_attention(box, m, a, kw, has_cls),
                                          with_kwargs=True)
    try:
        core.vision_tower(pixel_values)
    finally:
        hook.remove()
    return box._tower[0]
