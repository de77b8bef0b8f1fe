"""The LLaVA plumbing that token dropping and Mixture-of-Depths share.

Both attach to a Hugging Face ``LlavaForConditionalGeneration`` (or any
model of that shape: a ``vision_tower``, a ``language_model`` whose decoder
layers have ``q_proj``/``k_proj`` attention, and an ``image_token_id``) and
work on the same things: the image placeholders of a prompt, per-row gathers
of tensors whose rows keep different columns, and the cache a forward call
carries. Each marks the model it changed, so that the other refuses it.
"""

from __future__ import annotations

import torch

from toolkit.errors import UnsupportedInputError

__all__ = ["DROP_MARKER", "MOD_MARKER", "language_core", "tower_attention_layer", "cache_of", "prompt_vision",
           "gather_rows"]

DROP_MARKER = "_toolkit_token_drop"  # the model attribute holding an attached token-dropping handle
MOD_MARKER = "_toolkit_mod"          # the model attribute holding a Mixture-of-Depths conversion


def language_core(model):
    """The part of a LLaVA-style model that holds ``vision_tower`` and ``language_model``; refuses other models."""
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


def tower_attention_layer(core):
    """``(attention module, has [CLS])`` of the vision-tower layer whose output LLaVA feeds the language model."""
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


def cache_of(kw):
    """The KV cache of a forward call's keyword arguments (transformers has named it both ways)."""
    return kw.get("cache", kw.get("past_key_values"))


def prompt_vision(core, args, kw, who: str) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(input_ids, vision mask, cached length)`` of a LLaVA forward call; a prefill's rows must hold equal counts."""
    ids = kw.get("input_ids", args[0] if args else None)
    cache = cache_of(kw)
    past = cache.get_seq_length() if cache is not None else 0
    if ids is None:
        raise UnsupportedInputError(f"{who} needs input_ids (to find the image placeholders)")
    vision = ids == core.config.image_token_id
    if past == 0:
        counts = vision.sum(1)
        if int(counts.max()) != int(counts.min()):
            raise UnsupportedInputError("every row of a batch must hold the same number of vision tokens")
    return ids, vision, past


def gather_rows(x: torch.Tensor, idx: torch.Tensor, dim: int) -> torch.Tensor:
    """Per-row index_select along ``dim`` (batch is dim 0; ``idx`` is (B, k)); a batch of one is broadcast."""
    shape = [1] * x.dim()
    shape[0], shape[dim] = idx.shape[0], idx.shape[1]
    view = idx.view(shape)
    expand = list(x.shape)
    expand[dim] = idx.shape[1]
    if x.shape[0] == 1 and idx.shape[0] > 1:
        x = x.expand(idx.shape[0], *x.shape[1:])
    expand[0] = idx.shape[0]
    return torch.gather(x, dim, view.expand(expand))
