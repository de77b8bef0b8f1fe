"""Weight quantization: RTN, GPTQ and outlier-aware GPTQ into packed ``QuantizedLinear`` layers."""

from toolkit._lazy import attach

__getattr__, __dir__, __all__ = attach(
    __name__,
    submodules=["apply", "checkpoint", "config", "gptq", "grid", "linear"],
    submod_attrs={
        "apply": ["quantize_", "QuantizeHandle", "find_targets"],
        "checkpoint": ["save_quantized", "load_quantized"],
        "config": ["QuantConfig", "RTNConfig", "GPTQConfig", "OutlierConfig"],
        "linear": ["QuantizedLinear"],
    },
)
