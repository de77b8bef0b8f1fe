"""What a Llama-family config says to the lm engines: whether they compute it exactly, and its RoPE base.

Kept apart from the engines so that reading a config imports neither torch nor numpy.
"""

from __future__ import annotations

from typing import Any

__all__ = ["supports", "rope_theta", "has_rope_scaling"]


def supports(cfg: Any) -> bool:
    """True for configs the lean and integer engines compute exactly (Llama without biases, scaling or other
    activations)."""
    return (getattr(cfg, "model_type", None) in ("llama",) and not getattr(cfg, "attention_bias", False)
            and not getattr(cfg, "mlp_bias", False) and getattr(cfg, "hidden_act", None) == "silu"
            and rope_theta(cfg) is not None and not has_rope_scaling(cfg))


def rope_theta(cfg: Any) -> float | None:
    theta = getattr(cfg, "rope_theta", None)
    if theta is None:
        params = getattr(cfg, "rope_parameters", None) or {}
        theta = params.get("rope_theta") if isinstance(params, dict) else None
    return float(theta) if theta is not None else None


def has_rope_scaling(cfg: Any) -> bool:
    scaling = getattr(cfg, "rope_scaling", None)
    if isinstance(scaling, dict):
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        return kind not in (None, "default")
    params = getattr(cfg, "rope_parameters", None)
    if isinstance(params, dict):
        return params.get("rope_type", "default") not in (None, "default")
    return scaling is not None
