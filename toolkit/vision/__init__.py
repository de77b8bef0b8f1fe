"""Multimodal-LLM efficiency: vision-token dropping on LLaVA-class models.

``drop_vision_tokens(model, TokenDropConfig(method, keep))`` attaches a
training-free method (``fastv``, ``visionzip``, ``multistage``, ``random``)
with hooks; :mod:`toolkit.vision.mod` converts the decoder layers to
Mixture-of-Depths (p-MoD) for vision tokens, to fine-tune;
:mod:`toolkit.vision.measure` counts what each saves;
:mod:`toolkit.vision.vlm` holds the small LLaVA model trained here on drawn
scenes (:mod:`toolkit.data.scenes`).
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["TokenDropConfig", "TokenDropHandle", "drop_vision_tokens", "vision_token_scores", "METHODS",
           "load_vlm", "build_vlm", "VLMProcessor", "answer_questions", "evaluate_vqa", "prefill_flops",
           "kv_cache_bytes", "prefill_latency", "decode_step_latency", "count_flops", "MoDConfig"]

_WHERE = {name: "tokens" for name in ("TokenDropConfig", "TokenDropHandle", "drop_vision_tokens",
                                      "vision_token_scores", "METHODS")}
_WHERE.update({name: "vlm" for name in ("load_vlm", "build_vlm", "VLMProcessor", "answer_questions",
                                        "evaluate_vqa")})
_WHERE["MoDConfig"] = "mod"
_WHERE.update({name: "measure" for name in ("prefill_flops", "kv_cache_bytes", "prefill_latency",
                                            "decode_step_latency", "count_flops")})


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(f"toolkit.vision.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'toolkit.vision' has no attribute {name!r}")
