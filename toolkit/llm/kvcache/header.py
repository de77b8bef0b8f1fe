"""What a stored KV cache's reader needs besides its payload: shape, dtype, settings and model.

:func:`toolkit.llm.kvcache.encode` returns a :class:`KVHeader` with the
payload; the ``kv`` codec writes it as its config in the .tkz header
(docs/FORMAT.md, "kv"), and a reader checks it here, before any byte of the
payload is read or anything is allocated: every count has a fixed ceiling,
and the cache it describes is capped as a whole.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from toolkit.config import Config, check
from toolkit.llm.kvcache.config import BitstreamConfig

__all__ = ["DTYPES", "KVHeader", "MAX_VALUES"]

DTYPES = ("float32", "float16", "bfloat16")
#: ceilings of the header's counts: far above any model the toolkit meets, far below what would
#: let a forged header make the reader allocate without end
_LIMITS = {"layers": 1024, "batch": 1 << 12, "heads": 1 << 12, "tokens": 1 << 20, "head_dim": 1 << 12}
#: the most values (keys and values of every layer) a stored cache may hold: 8 GiB in float16
MAX_VALUES = 1 << 32
_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class KVHeader(Config):
    """A stored cache: ``layers`` of keys and values ``[batch, heads, tokens, head_dim]`` in ``dtype``.

    ``model_sha256`` names the weights that made it (a cache is refused by
    other weights), ``bitstream`` the settings it was coded with, and
    ``deltas`` says, per tensor (layer by layer, keys before values), whether
    its codes are stored as anchors and deltas. The defaults describe no
    cache at all: the header of an empty payload. Its dict is the kv codec's header config: the fields
    alone (the codec's version is the header's).
    """

    versioned = False

    model_sha256: str = ""
    layers: int = 0
    batch: int = 0
    heads: int = 0
    tokens: int = 0
    head_dim: int = 0
    dtype: str = "float16"
    bitstream: BitstreamConfig = field(default_factory=BitstreamConfig)
    deltas: tuple[bool, ...] = ()

    def __post_init__(self) -> None:
        for name, top in _LIMITS.items():
            value = getattr(self, name)
            check(0 <= value <= top, f"{name} must be an integer from 0 to {top:,}, got {value!r}")
        counts = [getattr(self, name) for name in _LIMITS]
        empty = self.layers == 0
        check(all(c == 0 for c in counts) if empty else all(c >= 1 for c in counts),
              "layers, batch, heads, tokens and head_dim are all 0 (no cache) or all at least 1")
        check(2 * self.layers * self.batch * self.heads * self.tokens * self.head_dim <= MAX_VALUES,
              f"a cache of more than {MAX_VALUES:,} values is not one this reader rebuilds in memory")
        check(self.dtype in DTYPES, f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        check(self.model_sha256 == "" if empty else bool(_SHA256.fullmatch(self.model_sha256)),
              f"model_sha256 must be 64 lowercase hex digits, got {self.model_sha256!r}")
        check(len(self.deltas) == 2 * self.layers,
              f"deltas must hold one flag per tensor ({2 * self.layers}), not {len(self.deltas)}")

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """``(batch, heads, tokens, head_dim)`` of every layer's keys and values."""
        return self.batch, self.heads, self.tokens, self.head_dim
