"""Weight quantization: RTN, GPTQ and outlier-aware GPTQ into packed ``QuantizedLinear`` layers."""

from toolkit.llm.quant.apply import find_targets, quantize_
from toolkit.llm.quant.config import GPTQConfig, OutlierConfig, QuantConfig, RTNConfig
from toolkit.llm.quant.linear import QuantizedLinear

__all__ = ["quantize_", "find_targets", "QuantConfig", "RTNConfig", "GPTQConfig", "OutlierConfig", "QuantizedLinear"]
