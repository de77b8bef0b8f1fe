"""LLM compression: weight quantization (``toolkit.llm.quant``) and its evaluation (``toolkit.llm.eval``).

Names resolve on first use so that ``import toolkit.llm`` stays cheap.
"""

from toolkit._lazy import attach

__getattr__, __dir__, __all__ = attach(
    __name__,
    submodules=["eval", "kvcache", "quant"],
    submod_attrs={
        "quant": ["quantize_", "find_targets", "QuantConfig", "RTNConfig", "GPTQConfig", "OutlierConfig",
            "QuantizedLinear"],
        "quant.checkpoint": ["save_quantized", "load_quantized"],
    },
)
