"""Settings of the compressed KV caches: frozen :class:`~toolkit.config.Config` dataclasses."""

from __future__ import annotations

from dataclasses import dataclass

from toolkit.config import Config, check

__all__ = ["BitstreamConfig", "GEARConfig", "KIVIConfig", "MiniCacheConfig"]

KV_BITS = (2, 4, 8)


@dataclass(frozen=True)
class KIVIConfig(Config):
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
        check(self.bits in KV_BITS, f"KV-cache bits must be one of {KV_BITS}, got {self.bits!r}")
        gs = self.group_size
        check(gs >= 1 and not gs & (gs - 1), f"group_size must be a power of 2 (32 to 128 is usual), got {gs!r}")
        check(self.residual_length >= 0,
              f"residual_length must be a non-negative integer, got {self.residual_length!r}")
        check(self.residual_length % gs == 0,
              f"residual_length {self.residual_length} must be a multiple of group_size {gs}")


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
        check(self.rank >= 0, f"rank must be a non-negative integer, got {self.rank!r}")
        check(0.0 <= self.outlier_fraction <= 0.1,
              f"outlier_fraction must be in [0, 0.1], got {self.outlier_fraction!r}")
        check(self.block_size >= self.group_size and self.block_size % self.group_size == 0,
              f"block_size {self.block_size!r} must be a multiple of group_size {self.group_size}")


@dataclass(frozen=True)
class MiniCacheConfig(Config):
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
        check(self.start_layer is None or self.start_layer >= 0,
              f"start_layer must be a non-negative layer index, got {self.start_layer!r}")
        check(0.0 <= self.t <= 1.0, f"t must be in [0, 1], got {self.t!r}")
        check(0.0 <= self.retain_angle <= 1.0,
              f"retain_angle must be in [0, 1], got {self.retain_angle!r}")


@dataclass(frozen=True)
class BitstreamConfig(Config):
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

    ``to_dict`` is the fields alone, as the stored caches' headers and the
    benchmark results hold them.
    """

    versioned = False

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
            check(0.01 <= v <= 16,
                  f"{name} must be a number from 0.01 to 16 (standard deviations), got {v!r}")
        check(0 <= self.sink_tokens <= 64,
              f"sink_tokens must be an integer from 0 to 64, got {self.sink_tokens!r}")
        check(self.outlier_sd == 0 or 2 <= self.outlier_sd <= 64,
              f"outlier_sd must be 0 (off) or from 2 to 64, got {self.outlier_sd!r}")
        check(2 <= self.code_bits <= 8,
              f"code_bits must be an integer from 2 to 8, got {self.code_bits!r}")
        check(self.coder in ("zstd", "rans"), f"coder must be 'zstd' or 'rans', got {self.coder!r}")
        check(1 <= self.anchor_every <= 1024,
              f"anchor_every must be an integer from 1 to 1024, got {self.anchor_every!r}")
