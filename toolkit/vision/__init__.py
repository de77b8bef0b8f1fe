"""Multimodal-LLM efficiency: vision-token dropping on LLaVA-class models.

``drop_vision_tokens(model, TokenDropConfig(method, keep))`` attaches a
training-free method (``fastv``, ``visionzip``, ``multistage``, ``random``)
with hooks; :mod:`toolkit.vision.mod` converts the decoder layers to
Mixture-of-Depths (p-MoD) for vision tokens, to fine-tune;
:mod:`toolkit.vision.measure` counts what each saves;
:mod:`toolkit.vision.vlm` holds the small LLaVA model trained here on drawn
scenes (:mod:`toolkit.data.scenes`).
"""

from toolkit._lazy import attach

__getattr__, __dir__, __all__ = attach(
    __name__,
    submodules=["measure", "mod", "sam", "tokens", "train_vlm", "vlm"],
    submod_attrs={
        "tokens": ["TokenDropConfig", "TokenDropHandle", "drop_vision_tokens", "vision_token_scores", "METHODS"],
        "vlm": ["load_vlm", "build_vlm", "VLMProcessor", "answer_questions", "evaluate_vqa"],
        "mod": ["MoDConfig"],
        "measure": ["prefill_flops", "kv_cache_bytes", "prefill_latency", "decode_step_latency", "count_flops"],
    },
)
