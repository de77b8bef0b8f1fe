"""Settings of the compressed KV caches, as frozen dataclasses that serialize to JSON."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from toolkit.errors import ConfigError

__all__ = ["BitstreamConfig", "GEARConfig", "KIVIConfig", "MiniCacheConfig"]

KV_BITS = (2, 4, 8)


def _check_bits(bits: int, what: str = "bits") -> None:
    if bits not in KV_BITS:
        raise ConfigError(f"KV-cache {what} must be one of {KV_BITS}, got {bits!r}")


@dataclass(frozen=True)
class KIVIConfig:
    """KIVI: keys per channel, values per token, asymmetric, with a full-precision recent window.

    ``group_size`` tokens share a key statistic per channel, and ``group_size``
    channels (at most the head dimension) share a value statistic per token.
    The newest ``residual_length`` to ``residual_length + group_size - 1``
    tokens stay in float16; older ones are quantized a group at a time.
    """

    bits: int = 2
    group_size: int = 32
    residual_length: int = 128

    def __post_init__(self) -> None:
        _check_bits(self.bits)
        if not isinstance(self.group_size, int) or self.group_size < 1 or self.group_size & (self.group_size - 1):
            raise ConfigError(f"group_size must be a power of 2 (32 to 128 is usual), got {self.group_size!r}")
        if not isinstance(self.residual_length, int) or self.residual_length < 0:
            raise ConfigError(f"residual_length must be a non-negative integer, got {self.residual_length!r}")
        if self.residual_length % self.group_size:
            raise ConfigError(f"residual_length {self.residual_length} must be a multiple of "
                              f"group_size {self.group_size}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class GEARConfig(KIVIConfig):
    """GEAR on top of KIVI: each quantized block also keeps its largest errors and a low-rank residual.

    Per head and block of ``block_size`` tokens: the ``outlier_fraction`` of
    entries farthest from their quantization group's mean are kept exactly
    (float16 value, int16 position) and left out of the min-max fit; the
    quantization error of the rest is approximated by a rank-``rank``
    product ``A @ B`` (float16).
    """

    rank: int = 4
    outlier_fraction: float = 0.01
    block_size: int = 128

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.rank, int) or self.rank < 0:
            raise ConfigError(f"rank must be a non-negative integer, got {self.rank!r}")
        if not 0.0 <= self.outlier_fraction <= 0.1:
            raise ConfigError(f"outlier_fraction must be in [0, 0.1], got {self.outlier_fraction!r}")
        if self.block_size % self.group_size or self.block_size < self.group_size:
            raise ConfigError(f"block_size {self.block_size} must be a multiple of group_size {self.group_size}")


@dataclass(frozen=True)
class MiniCacheConfig:
    """MiniCache: merge the KV states of adjacent layers from ``start_layer`` to the last.

    Layers ``(start_layer, start_layer + 1)``, ``(start_layer + 2, ...)`` pair up;
    a pair stores one direction per token (SLERP of the two unit vectors at
    ``t``) and each layer's norm. Tokens whose two vectors are more than
    ``retain_angle`` apart (angular distance in units of pi, 0..1) are kept
    exactly (the first layer's direction, the second layer's vector).
    """

    start_layer: int | None = None
    t: float = 0.5
    retain_angle: float = 0.2

    def __post_init__(self) -> None:
        if self.start_layer is not None and (not isinstance(self.start_layer, int) or self.start_layer < 0):
            raise ConfigError(f"start_layer must be a non-negative layer index, got {self.start_layer!r}")
        if not 0.0 <= self.t <= 1.0:
            raise ConfigError(f"t must be in [0, 1], got {self.t!r}")
        if not 0.0 <= self.retain_angle <= 1.0:
            raise ConfigError(f"retain_angle must be in [0, 1], got {self.retain_angle!r}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class BitstreamConfig:
    """CacheGen-style bitstream: per-channel uniform quantization, then entropy coding.

    Each head of a layer's keys or values is quantized uniformly around every
    channel's mean, with one step for the head: ``key_step`` / ``value_step``
    times the RMS over its channels of their standard deviations over the
    prompt. The codes are entropy-coded, so the step sets quality and the
    size follows from the entropy. Keys take a finer step: their errors are
    multiplied by the queries and pass through the softmax. Keys are quantized
    before their rotary embedding (``pre_rope``), where their channels keep
    a fixed offset instead of rotating with position. The first
    ``sink_tokens`` tokens, and every token with a channel more than
    ``outlier_sd`` standard deviations from its mean (0: none), are stored in
    float16: attention sinks have outlying states. Codes are clipped to ``2**(code_bits-1) - 1`` steps from the
    mean. ``anchor_every`` tokens form a group whose first token is coded as
    is and the others as deltas from it, where that measures smaller.
    ``coder`` is ``"zstd"`` (a static Huffman code per block through zstd:
    about 2% above the entropy, decoding some 50x faster) or ``"rans"`` (one
    static table per stream, within 0.1% of the entropy).
    """

    key_step: float = 0.7
    value_step: float = 1.0
    pre_rope: bool = True
    sink_tokens: int = 1
    outlier_sd: float = 8.0
    code_bits: int = 6
    anchor_every: int = 16
    coder: str = "zstd"

    def __post_init__(self) -> None:
        for name in ("key_step", "value_step"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not 0.01 <= v <= 16:
                raise ConfigError(f"{name} must be a number from 0.01 to 16 (standard deviations), got {v!r}")
        if not isinstance(self.sink_tokens, int) or not 0 <= self.sink_tokens <= 64:
            raise ConfigError(f"sink_tokens must be an integer from 0 to 64, got {self.sink_tokens!r}")
        if not isinstance(self.outlier_sd, (int, float)) or not (self.outlier_sd == 0 or 2 <= self.outlier_sd <= 64):
            raise ConfigError(f"outlier_sd must be 0 (off) or from 2 to 64, got {self.outlier_sd!r}")
        if not isinstance(self.code_bits, int) or not 2 <= self.code_bits <= 8:
            raise ConfigError(f"code_bits must be an integer from 2 to 8, got {self.code_bits!r}")
        if self.coder not in ("zstd", "rans"):
            raise ConfigError(f"coder must be 'zstd' or 'rans', got {self.coder!r}")
        if not isinstance(self.anchor_every, int) or not 1 <= self.anchor_every <= 1024:
            raise ConfigError(f"anchor_every must be an integer from 1 to 1024, got {self.anchor_every!r}")

    def to_dict(self) -> dict:
        return asdict(self)
