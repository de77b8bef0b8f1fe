"""Multimodal-LLM efficiency: vision-token dropping on LLaVA-class models.

``drop_vision_tokens(model, TokenDropConfig(method, keep))`` attaches a
training-free method (``fastv``, ``visionzip``, ``multistage``, ``random``)
with hooks; :mod:`toolkit.vision.measure` counts what it saves;
:mod:`toolkit.vision.vlm` holds the small LLaVA model trained here on drawn
scenes (:mod:`toolkit.data.scenes`).
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["TokenDropConfig", "TokenDropHandle", "drop_vision_tokens", "METHODS", "load_vlm", "build_vlm",
           "VLMProcessor", "answer_questions", "evaluate_vqa", "prefill_flops", "kv_cache_bytes",
           "prefill_latency", "decode_step_latency", "count_flops"]

_WHERE = {"TokenDropConfig": "tokens", "TokenDropHandle": "tokens", "drop_vision_tokens": "tokens",
          "METHODS": "tokens", "load_vlm": "vlm", "build_vlm": "vlm", "VLMProcessor": "vlm",
          "answer_questions": "vlm", "evaluate_vqa": "vlm", "prefill_flops": "measure",
          "kv_cache_bytes": "measure", "prefill_latency": "measure", "decode_step_latency": "measure",
          "count_flops": "measure"}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(f"toolkit.vision.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'toolkit.vision' has no attribute {name!r}")
