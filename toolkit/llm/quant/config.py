"""One configuration per quantization method.

A config says how to code each weight; :func:`toolkit.llm.quantize_` says
which weights. Values are checked when the config is made, so a bad config
fails before any model is touched.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from toolkit.errors import ConfigError

__all__ = ["QuantConfig", "RTNConfig", "GPTQConfig", "OutlierConfig", "BITS"]

BITS = (2, 3, 4, 8)
_SCALE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass(frozen=True)
class QuantConfig:
    """Shared fields: code width, group size (None or -1 for one group per output channel), grid."""

    bits: int = 4
    group_size: int | None = 128
    symmetric: bool = True
    scale_dtype: str = "float16"

    method = "base"
    needs_data = False

    def __post_init__(self) -> None:
        if self.bits not in BITS:
            raise ConfigError(f"bits must be one of {BITS}, got {self.bits!r}")
        gs = self.group_size
        if gs is not None and gs != -1 and (not isinstance(gs, int) or isinstance(gs, bool) or gs < 1):
            raise ConfigError(f"group_size must be a positive integer, -1 or None (per channel), got {gs!r}")
        if self.scale_dtype not in _SCALE_DTYPES:
            raise ConfigError(f"scale_dtype must be one of {sorted(_SCALE_DTYPES)}, got {self.scale_dtype!r}")

    @property
    def group(self) -> int | None:
        return None if self.group_size in (None, -1) else self.group_size

    @property
    def torch_scale_dtype(self) -> torch.dtype:
        return _SCALE_DTYPES[self.scale_dtype]

    def to_dict(self) -> dict:
        return {"method": self.method, **asdict(self)}


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
        if not (0 < self.damp < 1):
            raise ConfigError(f"damp must be in (0, 1), got {self.damp!r}")
        if not isinstance(self.block_size, int) or self.block_size < 1:
            raise ConfigError(f"block_size must be a positive integer, got {self.block_size!r}")


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
        if not (0 < self.outlier_fraction <= 0.1):
            raise ConfigError(f"outlier_fraction must be in (0, 0.1], got {self.outlier_fraction!r}")
        if self.stat_bits not in range(2, 9):
            raise ConfigError(f"stat_bits must be 2..8, got {self.stat_bits!r}")
        if not isinstance(self.stat_group, int) or self.stat_group < 1:
            raise ConfigError(f"stat_group must be a positive integer, got {self.stat_group!r}")
        if self.group is None:
            raise ConfigError("OutlierConfig needs a group size: its statistics are coded per group")


def config_from_dict(d: dict) -> QuantConfig:
    d = dict(d)
    method = d.pop("method", None)
    kinds = {c.method: c for c in (RTNConfig, GPTQConfig, OutlierConfig)}
    if method not in kinds:
        raise ConfigError(f"unknown quantization method {method!r}")
    try:
        return kinds[method](**d)
    except TypeError as exc:
        raise ConfigError(f"bad {method} config: {exc}") from None
