"""One configuration per quantization method.

A config says how to code each weight; :func:`toolkit.llm.quantize_` says
which weights. Values are checked when the config is made, so a bad config
fails before any model is touched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from toolkit.config import Config, check
from toolkit.errors import ConfigError

__all__ = ["QuantConfig", "RTNConfig", "GPTQConfig", "OutlierConfig", "BITS"]

BITS = (2, 3, 4, 8)
_SCALE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass(frozen=True)
class QuantConfig(Config):
    """Shared fields: code width, group size (None or -1 for one group per output channel), grid.

    ``to_dict`` gives ``{"method": ..., **fields}``, the form a checkpoint's
    ``quantization_config`` and the benchmark results hold; :meth:`from_dict`
    reads it back into the method's config.
    """

    versioned = False

    bits: int = 4
    group_size: int | None = 128
    symmetric: bool = True
    scale_dtype: str = "float16"

    method = "base"
    needs_data = False

    def __post_init__(self) -> None:
        check(self.bits in BITS, f"bits must be one of {BITS}, got {self.bits!r}")
        gs = self.group_size
        check(gs is None or gs == -1 or gs >= 1,
              f"group_size must be a positive integer, -1 or None (per channel), got {gs!r}")
        check(self.scale_dtype in _SCALE_DTYPES,
              f"scale_dtype must be one of {sorted(_SCALE_DTYPES)}, got {self.scale_dtype!r}")

    @property
    def group(self) -> int | None:
        return None if self.group_size in (None, -1) else self.group_size

    @property
    def torch_scale_dtype(self) -> torch.dtype:
        return _SCALE_DTYPES[self.scale_dtype]

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, **super().to_dict()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantConfig:
        """The config :meth:`to_dict` wrote: the class its ``method`` names (which must be ``cls`` or below it)."""
        if not isinstance(data, dict):
            raise ConfigError(f"a quantization config is a mapping, got {type(data).__name__}")
        data = dict(data)
        method = data.pop("method", None)
        kinds = {c.method: c for c in (RTNConfig, GPTQConfig, OutlierConfig)}
        kind = kinds.get(method)  # type: ignore[arg-type]
        if kind is None or not issubclass(kind, cls):
            raise ConfigError(f"unknown quantization method {method!r} for {cls.__name__}")
        if kind is not cls:
            return kind.from_dict({"method": method, **data})
        return super().from_dict(data)


@dataclass(frozen=True)
class RTNConfig(QuantConfig):
    """Round to nearest on a min-max grid; needs no data."""

    method = "rtn"


@dataclass(frozen=True)
class GPTQConfig(QuantConfig):
    """GPTQ. ``act_order`` sweeps columns by decreasing Hessian diagonal;
    ``static_groups`` fixes the groups on the original order first, so act
    order needs no group index. ``damp`` is the share of the mean Hessian
    diagonal added to it; ``block_size`` the columns per lazy update."""

    act_order: bool = True
    static_groups: bool = True
    damp: float = 0.01
    block_size: int = 128

    method = "gptq"
    needs_data = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check(0 < self.damp < 1, f"damp must be in (0, 1), got {self.damp!r}")
        check(self.block_size >= 1,
              f"block_size must be a positive integer, got {self.block_size!r}")


@dataclass(frozen=True)
class OutlierConfig(GPTQConfig):
    """GPTQ with outliers (SpQR-style): small groups, at most ``outlier_fraction``
    of the weights kept in float16, and each group's scale and zero coded on a
    ``stat_bits`` grid shared by runs of ``stat_group`` output rows. The grid is
    asymmetric and its groups follow the sweep (``static_groups`` is unused)."""

    bits: int = 3
    group_size: int | None = 16
    symmetric: bool = False
    act_order: bool = False
    outlier_fraction: float = 0.01
    stat_bits: int = 3
    stat_group: int = 16

    method = "outlier"

    def __post_init__(self) -> None:
        super().__post_init__()
        check(0 < self.outlier_fraction <= 0.1,
              f"outlier_fraction must be in (0, 0.1], got {self.outlier_fraction!r}")
        check(2 <= self.stat_bits <= 8, f"stat_bits must be 2..8, got {self.stat_bits!r}")
        check(self.stat_group >= 1,
              f"stat_group must be a positive integer, got {self.stat_group!r}")
        check(self.group is not None, "OutlierConfig needs a group size: its statistics are coded per group")
