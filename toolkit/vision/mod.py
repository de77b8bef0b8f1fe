"""Mixture-of-Depths for the vision tokens of a LLaVA-class model (p-MoD, Zhang et al. 2024).

Each converted decoder layer has a router, a linear map from the hidden
state to one logit per token. In the prefill, the layer's top ``k`` vision
tokens by that logit pass through its attention and MLP; the other vision
tokens skip the layer on the residual stream, and text tokens always pass.
Only the selected tokens are computed: they are gathered, run through the
layer's own modules, and scattered back, so a skipped token costs neither
FLOPs nor a slot in that layer's KV cache.

Two details follow the paper and keep training stable from a dense
checkpoint:

*TanhNorm* -- the routing weight of a vision token is ``w = 1 + a * tanh(r)``
for the router's logit ``r`` (``a = tanh_scale``, 0.2 in the paper), so it
stays near 1. The router starts at zero, so a fresh conversion weighs every
token by exactly 1.

*STRing* (symmetric token reweighting) -- the weight scales both kinds of
vision token: a selected token leaves the layer as ``h + w * mlp(norm(h))``
(``h`` = input plus attention), a skipped one as ``w * x``. The router thus
learns from the skipped tokens as well as the selected ones.

*Progressive ratio decay* -- deeper layers keep fewer vision tokens. The
default schedule is p-MoD's shifted cosine, ``mean + cos(pi * l / (L - 1)) / 2``
for layer ``l`` of ``L``: a layer whose value exceeds ``max_keep`` stays
dense, and no layer keeps less than ``min_keep``. The first layer always
stays dense; ``keep`` (a list, or a function of the layer index) overrides
the schedule.

Decoding: new tokens are text, so they run through every layer; each MoD
layer's cache holds its prefill's kept tokens only, and the attention mask
each layer receives is cut to the same columns.

>>> handle = convert_(model, MoDConfig())   # in place; the model stays a LlavaForConditionalGeneration
>>> model.save_pretrained(d)                 # routers in the weights, the schedule in config.json
>>> model, processor = load_vlm(model_dir=d)   # converted again on load
>>> handle.remove()                          # the dense model again
"""

from __future__ import annotations

import math
import numbers
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from toolkit.config import Config, check
from toolkit.errors import ConfigError, ModelMismatchError, UnsupportedInputError
from toolkit.vision.llava import DROP_MARKER, MOD_MARKER, gather_rows, language_core, prompt_vision

__all__ = ["MoDConfig", "MoDHandle", "convert_", "from_pretrained", "is_converted", "mod_config_of",
           "load_routers", "kept_tokens", "router_parameters", "CONFIG_KEY"]

CONFIG_KEY = "toolkit_mod"
SCHEDULES = ("shifted_cos", "shifted_linear")


def _is_number(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


@dataclass(frozen=True)
class MoDConfig(Config):
    """The share of vision tokens each decoder layer processes.

    ``mean`` shifts the schedule (p-MoD's average ratio); ``max_keep`` is the
    value above which a layer stays dense and ``min_keep`` the floor.
    ``keep`` replaces the schedule: a share per layer (1.0 = dense) or a
    function from the layer index to its share. ``tanh_scale`` is TanhNorm's
    ``a``. Its dict is the fields alone, as a converted model's ``config.json``
    holds it.
    """

    versioned = False

    mean: float = 0.4
    max_keep: float = 0.85
    min_keep: float = 0.15
    schedule: str = "shifted_cos"
    keep: Sequence[float] | Callable[[int], float] | None = field(default=None)
    tanh_scale: float = 0.2

    def __post_init__(self) -> None:
        check(self.schedule in SCHEDULES, f"unknown schedule {self.schedule!r}; expected one of {SCHEDULES}")
        for name in ("mean", "max_keep", "min_keep"):
            v = getattr(self, name)
            check(0.0 <= v <= 1.0, f"{name} must be a share in [0, 1], got {v!r}")
        check(self.min_keep <= self.max_keep, f"min_keep ({self.min_keep}) is above max_keep ({self.max_keep})")
        check(0.0 <= self.tanh_scale < 1.0,
              f"tanh_scale must be in [0, 1) so that routing weights stay positive, got {self.tanh_scale!r}")
        if self.keep is not None and not callable(self.keep):
            # numbers here (a string is a sequence too, of characters); keep_schedule checks each share
            # against the layer it falls on
            check(isinstance(self.keep, list | tuple) and all(_is_number(s) for s in self.keep),
                  f"keep must be a list of shares or a function of the layer index, got {self.keep!r}")
            object.__setattr__(self, "keep", tuple(float(s) for s in self.keep))

    def keep_schedule(self, n_layers: int) -> list[float]:
        """The share of vision tokens each of ``n_layers`` layers processes (1.0 = dense)."""
        check(n_layers >= 2, f"Mixture-of-Depths needs at least two decoder layers, the model has {n_layers}")
        if callable(self.keep):
            shares = [self.keep(i) for i in range(n_layers)]
        elif self.keep is not None:
            shares = list(self.keep)
            check(len(shares) == n_layers, f"keep lists {len(shares)} shares for a model of {n_layers} layers")
        else:
            shares = []
            for i in range(n_layers):
                t = i / (n_layers - 1)
                decay = math.cos(math.pi * t) / 2 if self.schedule == "shifted_cos" else 0.5 - t
                r = self.mean + decay
                shares.append(1.0 if (i == 0 or r > self.max_keep) else max(r, self.min_keep))
        for i, s in enumerate(shares):
            check(_is_number(s) and 0.0 <= s <= 1.0,
                  f"layer {i} would keep {s!r} of its vision tokens; a share must be in [0, 1]")
        check(shares[0] == 1.0, f"the first layer must stay dense (keep 1.0), the schedule gives {shares[0]}")
        return [float(s) for s in shares]

    def resolved(self, n_layers: int) -> MoDConfig:
        """The same config with ``keep`` fixed to the per-layer list (what is saved with the model)."""
        return self.replace(keep=tuple(self.keep_schedule(n_layers)))


@dataclass
class _State:
    """One prefill's vision layout, carried into its decoding steps."""

    vision: torch.Tensor | None = None   # (B, T) bool: vision positions of the prompt
    n_vision: int = 0
    length: int = 0                      # the prompt's length T
    cols: dict = field(default_factory=dict)   # layer -> (B, t) columns (of T) the layer computed
    kept: dict = field(default_factory=dict)   # layer -> (B, k) vision indices (0..n-1) it processed
    weights: dict = field(default_factory=dict)  # layer -> (B, n) routing weights


class MoDHandle:
    """Returned by :func:`convert_`; ``remove()`` turns the model back into the dense one (a second call does nothing).

    ``config`` is the conversion's config with ``keep`` resolved to one share
    per layer, ``shares`` that list. The routers are the model's own
    parameters (``layers[i].mod_router``), so they train and save with it;
    ``remove()`` drops them.
    """

    def __init__(self, model, core, config: MoDConfig, shares: list[float]) -> None:
        self.model, self.core, self.config, self.shares = model, core, config, shares
        self.state = _State()
        self._hooks: list = []
        self._layers: list = []

    @property
    def kept(self) -> dict[int, torch.Tensor]:
        """After a prefill: for each MoD layer, the (B, k) vision-token indices (row-major patches) it processed."""
        return dict(self.state.kept)

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        for layer in self._layers:
            for name in ("forward", "mod_router", "mod_keep", "_mod_index", "_mod"):
                delattr(layer, name)
        self._layers.clear()
        if getattr(self.model, MOD_MARKER, None) is self:
            delattr(self.model, MOD_MARKER)
            if hasattr(self.model.config, CONFIG_KEY):
                delattr(self.model.config, CONFIG_KEY)


def _layers(core):
    return core.language_model.layers


def _handle(model) -> MoDHandle | None:
    return getattr(model, MOD_MARKER, None)


def is_converted(model) -> bool:
    return _handle(model) is not None


def mod_config_of(model) -> MoDConfig | None:
    m = _handle(model)
    return None if m is None else m.config


def router_parameters(model) -> list[torch.nn.Parameter]:
    """The routers' parameters (for a learning rate of their own)."""
    m = _handle(model)
    if m is None:
        return []
    return [p for layer in _layers(m.core) if hasattr(layer, "mod_router") for p in layer.mod_router.parameters()]


def kept_tokens(model) -> dict[int, torch.Tensor]:
    """After a prefill: for each MoD layer, the (B, k) vision-token indices (row-major patches) it processed."""
    m = _handle(model)
    if m is None:
        raise UnsupportedInputError("the model is not a Mixture-of-Depths model; convert_() it first")
    return m.kept


def convert_(model, config: MoDConfig | None = None) -> MoDHandle:
    """Turn a LLaVA-class model's decoder layers into Mixture-of-Depths layers, in place; returns the handle.

    Everything is checked before the model changes, so a refused call leaves
    it as it was. ``handle.remove()`` makes it the dense model again.
    """
    config = MoDConfig() if config is None else config
    if not isinstance(config, MoDConfig):
        raise ConfigError(f"config must be a MoDConfig, got {type(config).__name__}")
    if is_converted(model):
        raise UnsupportedInputError("the model is already a Mixture-of-Depths model; convert it once")
    if getattr(model, DROP_MARKER, None) is not None:
        raise UnsupportedInputError("token dropping is attached to this model; remove() it before converting")
    core = language_core(model)  # refuses a model without a vision tower or image token
    layers = _layers(core)
    shares = config.keep_schedule(len(layers))
    resolved = config.resolved(len(layers))
    m = MoDHandle(model, core, resolved, shares)
    for i, (layer, share) in enumerate(zip(layers, shares, strict=True)):
        if share >= 1.0:
            continue
        ref = layer.self_attn.q_proj.weight
        router = torch.nn.Linear(ref.shape[1], 1, bias=True, dtype=ref.dtype, device=ref.device)
        torch.nn.init.zeros_(router.weight)  # TanhNorm then weighs every token by 1: the dense layer, at first
        torch.nn.init.zeros_(router.bias)
        layer.mod_router = router
        layer.mod_keep = share
        layer._mod_index = i
        layer._mod = m
        layer.forward = types.MethodType(_mod_forward, layer)
        m._layers.append(layer)
    m._hooks.append(core.register_forward_pre_hook(lambda mod, a, kw: _on_model(m, a, kw), with_kwargs=True))
    setattr(model.config, CONFIG_KEY, resolved.to_dict())  # saved in config.json: the schedule as a list
    setattr(model, MOD_MARKER, m)
    return m


def load_routers(model, directory: str | Path) -> None:
    """Load the routers of a converted model from the safetensors files ``save_pretrained`` wrote."""
    from safetensors import safe_open

    if not is_converted(model):
        raise UnsupportedInputError("convert_() the model before loading router weights into it")
    files = sorted(Path(directory).glob("*.safetensors"))
    if not files:
        raise ModelMismatchError(f"no safetensors weights in {directory}")
    found: dict[str, torch.Tensor] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as fh:
            for k in fh.keys():
                if ".mod_router." in k:
                    found[k] = fh.get_tensor(k)
    want = {n: p for n, p in model.named_parameters() if ".mod_router." in n}
    names = {_tail(n): n for n in want}
    have = {_tail(k): v for k, v in found.items()}
    if set(have) != set(names):
        raise ModelMismatchError(f"router weights for layers {sorted(have)} do not fit a model whose MoD layers "
                                 f"are {sorted(names)}")
    with torch.no_grad():
        for t, name in names.items():
            if have[t].shape != want[name].shape:
                raise ModelMismatchError(f"router {t} has shape {tuple(have[t].shape)}, the model's is "
                                         f"{tuple(want[name].shape)}")
            want[name].copy_(have[t].to(want[name].dtype))


def _tail(name: str) -> str:
    """``layers.3.mod_router.weight`` from any prefix."""
    i = name.find("layers.")
    return name[i:] if i >= 0 else name


# -- the forward passes --------------------------------------------------------------------------------------------

def _on_model(m: MoDHandle, args, kw):
    ids, vision, past = prompt_vision(m.core, args, kw, "a Mixture-of-Depths model")
    if past == 0:
        m.state = _State(vision=vision, n_vision=int(vision[0].sum()), length=ids.shape[1])
    elif bool(vision.any()):
        raise UnsupportedInputError("image placeholders after the prefill are not supported by Mixture-of-Depths")
    elif m.state.vision is None:
        raise UnsupportedInputError("a decoding step arrived without a prefill through the converted model")
    return None


def _dense(layer, hidden, attention_mask, position_ids, cache, use_cache, position_embeddings, kwargs):
    return type(layer).forward(layer, hidden, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                               use_cache=use_cache, position_embeddings=position_embeddings, **kwargs)


def _mod_forward(self, hidden_states, attention_mask=None, position_ids=None, cache=None, use_cache=False,
                 position_embeddings=None, past_key_values=None, **kwargs):
    m: MoDHandle = self._mod
    st, i = m.state, self._mod_index
    cache = cache if cache is not None else past_key_values
    past = cache.get_seq_length(self.self_attn.layer_idx) if cache is not None else 0
    b, t, d = hidden_states.shape
    if past > 0:
        return _decode(self, st, hidden_states, attention_mask, position_ids, cache, use_cache, position_embeddings,
                       kwargs)
    if st.vision is None or st.vision.shape[1] != t:
        raise UnsupportedInputError(f"layer {i} received {t} tokens but the model's input held "
                                    f"{0 if st.vision is None else st.vision.shape[1]}; call the converted model "
                                    "with input_ids")
    n = st.n_vision
    if n == 0:  # a text-only prompt: every layer is dense
        st.cols[i] = None
        return _dense(self, hidden_states, attention_mask, position_ids, cache, use_cache, position_embeddings,
                      kwargs)
    vis = st.vision.expand(b, t) if st.vision.shape[0] == 1 else st.vision
    k = min(n, int(self.mod_keep * n))
    vis_pos = torch.arange(t).expand(b, t)[vis].view(b, n)
    logits = self.mod_router(gather_rows(hidden_states, vis_pos, 1)).squeeze(-1).float()   # (B, n)
    w = 1.0 + m.config.tanh_scale * torch.tanh(logits)
    chosen = logits.topk(k, dim=1).indices.sort(1).values if k else vis_pos[:, :0]
    keep = ~vis.clone()
    keep.scatter_(1, gather_rows(vis_pos, chosen, 1), True)
    cols = torch.arange(t).expand(b, t)[keep].view(b, -1)
    st.cols[i], st.kept[i], st.weights[i] = cols, chosen, w.detach()

    x = gather_rows(hidden_states, cols, 1)
    cos, sin = position_embeddings
    pe = (gather_rows(cos, cols, 1), gather_rows(sin, cols, 1))
    pos = None if position_ids is None else gather_rows(position_ids.expand(b, -1), cols, 1)
    mask = attention_mask
    if isinstance(mask, torch.Tensor) and mask.dim() == 4:
        mask = gather_rows(mask.expand(b, *mask.shape[1:]), cols, 2)
        mask = gather_rows(mask, cols, 3)
    attn, _ = self.self_attn(hidden_states=self.input_layernorm(x), attention_mask=mask, position_ids=pos,
                             cache=cache, use_cache=use_cache, position_embeddings=pe, **kwargs)
    h = x + attn
    f = self.mlp(self.post_attention_layernorm(h))
    # per-token weights: TanhNorm's w on vision tokens, 1 on text
    weight = torch.ones((b, t), dtype=w.dtype).masked_scatter(vis, w)
    y = h + gather_rows(weight, cols, 1)[..., None].to(f.dtype) * f
    skipped = hidden_states * weight[..., None].to(hidden_states.dtype)   # STRing: w * x for every vision token
    return skipped.scatter(1, cols[..., None].expand(-1, -1, d), y.to(skipped.dtype))


def _decode(self, st: _State, hidden, attention_mask, position_ids, cache, use_cache, position_embeddings, kwargs):
    cols = st.cols.get(self._mod_index)
    mask = attention_mask
    if cols is not None and isinstance(mask, torch.Tensor) and mask.dim() == 4:
        b = hidden.shape[0]
        new = torch.arange(st.length, mask.shape[-1]).expand(b, -1)
        mask = gather_rows(mask.expand(b, *mask.shape[1:]), torch.cat([cols.expand(b, -1), new], 1), 3)
    return _dense(self, hidden, mask, position_ids, cache, use_cache, position_embeddings, kwargs)


def from_pretrained(directory: str | Path, **kwargs):
    """A ``LlavaForConditionalGeneration`` from ``directory``, converted again if it was saved converted.

    ``kwargs`` go to ``from_pretrained``. The routers are not part of the
    Hugging Face class, so they are loaded after conversion, strictly.
    """
    from transformers import LlavaForConditionalGeneration
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the router weights are "unexpected" to the plain class
    try:
        model = LlavaForConditionalGeneration.from_pretrained(directory, **kwargs)
    finally:
        hf_logging.set_verbosity(verbosity)
    entry = getattr(model.config, CONFIG_KEY, None)
    if entry is not None:
        _restore(model, entry)
        load_routers(model, directory)
    return model.eval()


def _restore(model, entry: dict) -> MoDHandle:
    """Convert ``model`` with the schedule saved in its config (``config.toolkit_mod``)."""
    try:
        cfg = MoDConfig.from_dict(entry)
    except ConfigError as e:
        raise ModelMismatchError(f"the saved Mixture-of-Depths entry does not fit this version: {e}") from None
    delattr(model.config, CONFIG_KEY)  # convert_() writes it back, resolved
    return convert_(model, cfg)
