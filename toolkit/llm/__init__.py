"""LLM compression: weight quantization (``toolkit.llm.quant``), KV caches (``toolkit.llm.kvcache``) and evaluation.

Names resolve on first use so that ``import toolkit.llm`` stays cheap.
"""

from toolkit._lazy import attach

__getattr__, __dir__, __all__ = attach(
    __name__,
    submodules=["eval", "kvcache", "quant"],
    submod_attrs={
        "quant": ["quantize_", "QuantizeHandle", "find_targets", "QuantConfig", "RTNConfig", "GPTQConfig",
                  "OutlierConfig", "QuantizedLinear", "save_quantized", "load_quantized"],
    },
)
