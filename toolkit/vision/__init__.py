"""Multimodal-LLM efficiency: vision-token dropping on LLaVA-class models.

``drop_vision_tokens_(model, TokenDropConfig(method, keep))`` attaches a
training-free method (``fastv``, ``visionzip``, ``multistage``, ``random``,
each in its own module) with hooks and returns the handle that removes it;
:mod:`toolkit.vision.mod` converts the decoder layers to Mixture-of-Depths
(p-MoD) for vision tokens, to fine-tune (``convert_``); both sit on the LLaVA
plumbing of :mod:`toolkit.vision.llava`. :mod:`toolkit.vision.measure` counts
what each saves; :mod:`toolkit.vision.vlm` holds the small LLaVA model trained
here on drawn scenes (:mod:`toolkit.data.scenes`, trained by
:mod:`toolkit.recipes.train_vlm`); :mod:`toolkit.vision.sam` compresses
Segment Anything.
"""

from toolkit._lazy import attach

__getattr__, __dir__, __all__ = attach(
    __name__,
    submodules=["fastv", "llava", "measure", "mod", "multistage", "random_drop", "sam", "tokens", "visionzip",
                "vlm"],
    submod_attrs={
        "tokens": ["TokenDropConfig", "TokenDropHandle", "drop_vision_tokens_", "vision_token_scores", "METHODS"],
        "vlm": ["load_vlm", "read_vlm", "save_vlm", "build_vlm", "VLMSpec", "VLMProcessor", "ProcessorConfig",
                "answer_questions", "evaluate_vqa"],
        "mod": ["MoDConfig", "MoDHandle", "convert_"],
        "measure": ["prefill_flops", "kv_cache_bytes", "prefill_latency", "decode_step_latency", "count_flops"],
    },
)
