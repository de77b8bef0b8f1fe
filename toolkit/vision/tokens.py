"""Vision-token dropping for LLaVA-class models, attached with hooks: ``drop_vision_tokens_``.

A LLaVA prompt spends most of its tokens on the image (here 256 of about
270), and most of those show background. Each method keeps a share ``keep``
of the vision tokens, so that the language model's prefill, its KV cache and
every decoding step shrink with them. The methods, each in its own module:

``random`` (:mod:`toolkit.vision.random_drop`)
    the baseline: a uniform random subset, before the language model.
``fastv`` (:mod:`toolkit.vision.fastv`)
    every token up to decoder layer K, then the top share by the attention
    the question pays them.
``visionzip`` (:mod:`toolkit.vision.visionzip`)
    before the language model: the tokens the vision tower's [CLS] attends
    to, plus a few contextual tokens merged from the rest.
``multistage`` (:mod:`toolkit.vision.multistage`)
    near-duplicate windows merged before the language model, a dual
    attention score at layer K, and the early layers' caches cut after
    prefill.

This module attaches them: it finds the image placeholders, lets the chosen
columns into the language model, cuts the later layers' inputs at layer K
and carries one generation's choices from prefill into its decoding steps.

Consistency: kept tokens keep their original position ids (so RoPE sees the
same relative distances), decoding continues from the original prompt
length, and the 2-D attention mask (left padding) and the 4-D masks of the
later layers lose exactly the dropped columns. Every layer runs through its
usual SDPA attention. The same count is kept in every row of a batch, so
batches stay rectangular.

>>> handle = drop_vision_tokens_(model, TokenDropConfig("fastv", keep=0.25))
>>> out = model.generate(**inputs, max_new_tokens=4)
>>> handle.remove()
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from toolkit.config import Config, check
from toolkit.errors import ConfigError, UnsupportedInputError
from toolkit.vision import fastv, multistage, random_drop, visionzip
from toolkit.vision.llava import (
    DROP_MARKER,
    MOD_MARKER,
    cache_of,
    gather_rows,
    language_core,
    prompt_vision,
    tower_attention_layer,
)

__all__ = ["TokenDropConfig", "TokenDropHandle", "drop_vision_tokens_", "vision_token_scores", "METHODS"]

METHODS = ("fastv", "visionzip", "multistage", "random")
_TOWER = ("visionzip", "multistage")   # score by the vision tower's attention, and merge
_LATE = ("fastv", "multistage")        # drop again at decoder layer K


@dataclass(frozen=True)
class TokenDropConfig(Config):
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
        check(self.method in METHODS, f"unknown token-dropping method {self.method!r}; expected one of {METHODS}")
        check(0.0 < self.keep <= 1.0, f"keep must be a share in (0, 1], got {self.keep!r}")
        check(self.layer >= 0, f"layer must be a non-negative integer, got {self.layer!r}")
        check(0.0 <= self.contextual < 1.0, f"contextual must be in [0, 1), got {self.contextual!r}")
        check(-1.0 <= self.merge_threshold <= 1.0,
              f"merge_threshold must be a cosine in [-1, 1], got {self.merge_threshold!r}")

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
    """Returned by :func:`drop_vision_tokens_`; ``remove()`` detaches every hook (a second call does nothing).

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
        if getattr(self.model, DROP_MARKER, None) is self:
            delattr(self.model, DROP_MARKER)

    def __enter__(self) -> TokenDropHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


# -- attach ---------------------------------------------------------------------------------------------------------

def drop_vision_tokens_(model, config: TokenDropConfig) -> TokenDropHandle:
    """Attach ``config``'s method to a LLaVA-style model, in place; returns the handle that removes it.

    Everything is checked before the first hook goes on, so a refused call
    leaves the model as it was.
    """
    if not isinstance(config, TokenDropConfig):
        raise ConfigError(f"config must be a TokenDropConfig, got {type(config).__name__}")
    if getattr(model, DROP_MARKER, None) is not None:
        raise UnsupportedInputError("token dropping is already attached to this model; remove() the first handle")
    if getattr(model, MOD_MARKER, None) is not None:
        raise UnsupportedInputError("the model is a Mixture-of-Depths model; token dropping attaches to dense "
                                    "models only")
    core = language_core(model)
    layers = core.language_model.layers
    if config.method in _LATE and config.layer >= len(layers):
        raise ConfigError(f"layer {config.layer} is beyond the language model's depth ({len(layers)} layers)")
    attn, has_cls = tower_attention_layer(core)
    handle = TokenDropHandle(model, core, config)
    h = handle._hooks
    h.append(core.register_forward_pre_hook(lambda m, a, kw: _on_model(handle, a, kw), with_kwargs=True))
    if config.method in _TOWER:
        h.append(attn.register_forward_pre_hook(lambda m, a, kw: _on_tower_attention(handle, m, a, kw, has_cls),
                                                with_kwargs=True))
    lm = core.language_model
    h.append(lm.register_forward_pre_hook(lambda m, a, kw: _on_lm(handle, a, kw), with_kwargs=True))
    if config.method in _LATE:
        for i in range(config.layer, len(layers)):
            h.append(layers[i].register_forward_pre_hook(
                lambda m, a, kw, i=i: _on_layer(handle, m, i, a, kw), with_kwargs=True))
    if config.proportional_attention and config.method in _TOWER:
        for i in range(len(layers)):  # after the dropping hooks, so it sees their masks
            h.append(layers[i].register_forward_pre_hook(
                lambda m, a, kw, i=i: _size_bias(handle, i, a, kw), with_kwargs=True))
    if config.method == "multistage":
        h.append(lm.register_forward_hook(lambda m, a, kw, out: _after_lm(handle, kw, out), with_kwargs=True))
    setattr(model, DROP_MARKER, handle)
    return handle


# -- hooks ----------------------------------------------------------------------------------------------------------

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
    handle._tower = visionzip.tower_scores(module, kw.get("hidden_states", args[0] if args else None), has_cls)
    return None


def _vision_positions(st: _State) -> torch.Tensor:
    """(B, n) positions of the vision tokens in the original sequence."""
    b, length = st.vision_mask.shape
    pos = torch.arange(length).expand(b, length)
    return pos[st.vision_mask].view(b, st.n_vision)


def _before_lm(handle: TokenDropHandle, emb: torch.Tensor, vis_pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(vision indices that enter the LM (B, k'), embeddings)``: each method's choice before the LM."""
    st, cfg = handle.state, handle.config
    b, n = vis_pos.shape
    k = cfg.budget(n)
    if cfg.method == "random":
        st.kept = random_drop.choose(b, n, k, handle._gen)
        return st.kept, emb
    if cfg.method == "visionzip":
        keep, emb, st.merged_into = visionzip.merge(emb, vis_pos, k, st.cls_score, st.vision_keys, cfg.contextual)
        return keep, emb
    if cfg.method == "multistage":
        keep, emb, st.merged_into = multistage.spatial_merge(emb, vis_pos, min(n, 2 * k), st.cls_score,
                                                             st.vision_keys, cfg.merge_threshold)
        return keep, emb
    return torch.arange(n).expand(b, n), emb  # fastv: every vision token enters the LM


def _on_lm(handle: TokenDropHandle, args, kw):
    st, cfg = handle.state, handle.config
    emb = kw.get("inputs_embeds")
    if emb is None:
        return None
    b, seq, _ = emb.shape
    cache = cache_of(kw)
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
        elif cfg.method in _TOWER:
            raise UnsupportedInputError("no vision-tower attention was seen for this prompt (pass pixel_values)")
        keep, emb = _before_lm(handle, emb, vis_pos)
        # columns that enter the LM: all non-vision columns plus the kept vision ones
        keep_mask = ~st.vision_mask.clone()
        keep_mask.scatter_(1, gather_rows(vis_pos, keep, 1), True)
        cols = torch.arange(seq).expand(b, seq)[keep_mask].view(b, -1)
        st.lm_cols = cols
        st.lm_vision = keep  # vision indices (0..n-1) present at the LM input
        if cfg.proportional_attention and st.merged_into is not None:
            counts = torch.stack([torch.bincount(r[r >= 0], minlength=n) for r in st.merged_into])
            sizes = torch.ones((b, cols.shape[1]))
            vis_cols = gather_rows(st.vision_mask, cols, 1)
            sizes[vis_cols] = gather_rows(counts, keep, 1).clamp_min(1).float().flatten()
            if (sizes > 1).any():
                st.log_sizes = sizes.log()
        if st.kept is None:
            st.kept = keep
        pos = kw.get("position_ids")
        pos = torch.arange(seq)[None].expand(b, seq) if pos is None else pos.expand(b, seq)
        kw["inputs_embeds"] = gather_rows(emb, cols, 1)
        kw["position_ids"] = gather_rows(pos, cols, 1)
        if kw.get("attention_mask") is not None:
            kw["attention_mask"] = gather_rows(kw["attention_mask"], cols, 1)
        st.seen = seq
        st.pending_late = cfg.method in _LATE
        return args, kw
    # decoding (or a continued prefill): the new tokens keep their original positions
    if kw.get("position_ids") is None:
        kw["position_ids"] = (torch.arange(seq) + st.seen)[None].expand(b, seq)
    mask = kw.get("attention_mask")
    if mask is not None and mask.dim() == 2:
        new = torch.arange(st.full_len, mask.shape[1]).expand(b, -1)
        kw["attention_mask"] = gather_rows(mask, torch.cat([st.lm_cols, new], 1), 1)
    st.seen += seq
    return args, kw


def _choose_late(handle: TokenDropHandle, layer, hidden, kw) -> None:
    """At layer K: score the LM's vision tokens by the question's attention and keep the budget."""
    st, cfg = handle.state, handle.config
    b = hidden.shape[0]
    vis_lm = gather_rows(st.vision_mask, st.lm_cols, 1)        # (B, n_lm) bool
    query_lm = gather_rows(st.text_query, st.lm_cols, 1)
    valid = torch.ones_like(vis_lm) if kw.get("attention_mask") is None else _valid_from(kw, st)
    vis_cols, mean, peak = fastv.question_scores(layer, hidden, kw["position_embeddings"], vis_lm, query_lm, valid)
    score = multistage.dual_score(mean, peak) if cfg.method == "multistage" else mean
    k = min(cfg.budget(st.n_vision), vis_cols.shape[1])
    chosen = score.topk(k, dim=1).indices.sort(1).values       # indices among the LM's vision tokens
    keep = ~vis_lm.clone()
    keep.scatter_(1, gather_rows(vis_cols, chosen, 1), True)
    st.late_rel = torch.arange(vis_lm.shape[1]).expand(b, -1)[keep].view(b, -1)
    st.kept = gather_rows(st.lm_vision, chosen, 1)
    if st.merged_into is not None:
        mi = st.merged_into.clone()
        for r in range(b):
            mi[r, ~torch.isin(mi[r], st.kept[r])] = -1
        st.merged_into = mi


def _on_layer(handle: TokenDropHandle, layer, i: int, args, kw):
    st, cfg = handle.state, handle.config
    if not st.active:
        return None
    hidden = args[0] if args else kw["hidden_states"]
    b = hidden.shape[0]
    kw = dict(kw)
    if i == cfg.layer and st.pending_late:
        st.pending_late = False
        _choose_late(handle, layer, hidden, kw)
    if st.late_rel is None or st.late_rel.shape[1] == st.lm_cols.shape[1]:
        return None
    rel = st.late_rel
    n_lm = st.lm_cols.shape[1]
    # prefill: the position embeddings (computed once for all layers) span the LM's input
    prefill = kw["position_embeddings"][0].shape[1] == n_lm
    if prefill:
        if hidden.shape[1] == n_lm:  # layer K: later layers get its (shorter) output
            if args:
                args = (gather_rows(hidden, rel, 1),) + tuple(args[1:])
            else:
                kw["hidden_states"] = gather_rows(hidden, rel, 1)
        cos, sin = kw["position_embeddings"]
        kw["position_embeddings"] = (gather_rows(cos, rel, 1), gather_rows(sin, rel, 1))
        if kw.get("position_ids") is not None:
            kw["position_ids"] = gather_rows(kw["position_ids"].expand(b, -1), rel, 1)
        mask = kw.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 4:
            mask = gather_rows(mask.expand(b, *mask.shape[1:]), rel, 3)
            kw["attention_mask"] = gather_rows(mask.transpose(2, 3), rel, 3).transpose(2, 3)
    else:  # a decoding step: only the mask's key columns change
        mask = kw.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 4:
            total = mask.shape[-1]
            new = torch.arange(st.lm_cols.shape[1], total).expand(b, -1)
            kw["attention_mask"] = gather_rows(mask.expand(b, *mask.shape[1:]), torch.cat([rel, new], 1), 3)
    return args, kw


def _size_bias(handle: TokenDropHandle, i: int, args, kw):
    """Proportional attention: log(size) on the logits of merged keys, through the layer's SDPA mask."""
    st = handle.state
    if not st.active or st.log_sizes is None:
        return None
    late = (st.late_rel is not None and i >= handle.config.layer
            and st.late_rel.shape[1] != st.lm_cols.shape[1])
    ls = gather_rows(st.log_sizes, st.late_rel, 1) if late else st.log_sizes
    hidden = args[0] if args else kw["hidden_states"]
    b, q = hidden.shape[:2]
    cache = cache_of(kw)
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


def _after_lm(handle: TokenDropHandle, kw, out):
    """After the multi-stage prefill: the early layers' caches are cut to the late layers' tokens."""
    st = handle.state
    cache = cache_of(kw)
    if cache is None or st.late_rel is None or st.lm_cols is None:
        return None
    rel = st.late_rel
    if rel.shape[1] == st.lm_cols.shape[1] or not hasattr(cache, "layers"):
        return None
    multistage.cut_caches(cache, rel, st.lm_cols.shape[1], handle.config.layer)
    st.lm_cols = gather_rows(st.lm_cols, rel, 1)
    if st.log_sizes is not None:
        st.log_sizes = gather_rows(st.log_sizes, rel, 1)
    st.late_rel = torch.arange(rel.shape[1]).expand(rel.shape[0], -1)
    return None


@torch.no_grad()
def vision_token_scores(model, images: torch.Tensor) -> torch.Tensor:
    """(B, n) the attention VisionZip ranks by: [CLS]'s (or the mean received) in the tower's feature layer.

    ``images``: the processor's ``pixel_values`` for the batch."""
    core = language_core(model)
    attn, has_cls = tower_attention_layer(core)
    seen: list[torch.Tensor] = []
    hook = attn.register_forward_pre_hook(
        lambda m, a, kw: seen.append(visionzip.tower_scores(m, kw.get("hidden_states", a[0] if a else None),
                                                            has_cls)[0]), with_kwargs=True)
    try:
        core.vision_tower(images)
    finally:
        hook.remove()
    return seen[0]
