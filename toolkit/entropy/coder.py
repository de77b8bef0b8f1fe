"""The range coder the lockstep loops share, and the table format it reads (no torch: the integer engine
codes without it).

Tables are float64 rows of integer frequencies over a power-of-two total
(exact), as :func:`toolkit.entropy.freqs_to_table` makes them.
"""

from __future__ import annotations

import constriction
import numpy as np

from toolkit.errors import ConfigError, FormatError

__all__ = ["CATEGORICAL", "DEFAULT_TOTAL_BITS", "MAX_TOTAL_BITS", "RangeCoder"]

#: constriction's range coder quantizes probabilities to 24 bits; tables with
#: the same total pass through it unchanged in practice.
DEFAULT_TOTAL_BITS = 24
MAX_TOTAL_BITS = 24
#: what constriction raises when it decodes words no encoder wrote (it asserts)
_DAMAGED = (AssertionError, ValueError, RuntimeError)

#: the model family every coder here uses; it quantizes the exact rows of :func:`toolkit.entropy.freqs_to_table`.
CATEGORICAL = constriction.stream.model.Categorical(perfect=False)


def _words(data: bytes) -> np.ndarray:
    if len(data) % 4:
        raise FormatError("range-coded stream length is not a multiple of 4 bytes")
    return np.frombuffer(data, dtype=np.uint32).copy()


class RangeCoder:
    """One range-coded stream seen from either side, so that a coding loop is written once.

    ``code(table, symbol)`` encodes ``symbol`` under the one-row ``table`` and
    returns it (an encoder), or decodes a symbol under it and returns that (a
    decoder, ``symbol`` left out). Encoder and decoder run the same loop and
    compute the same tables; only this call differs.
    """

    def __init__(self, words: np.ndarray | None = None):
        self.decoding = words is not None
        self._coder = (constriction.stream.queue.RangeDecoder(words) if self.decoding
                       else constriction.stream.queue.RangeEncoder())

    @classmethod
    def encoder(cls) -> RangeCoder:
        return cls()

    @classmethod
    def decoder(cls, data: bytes | np.ndarray) -> RangeCoder:
        """A decoder over coded ``data`` (bytes, a whole number of 32-bit words, or the words)."""
        return cls(data if isinstance(data, np.ndarray) else _words(data))

    def code(self, table: np.ndarray, symbol: int | None = None) -> int:
        if self.decoding:
            try:
                return int(self._coder.decode(CATEGORICAL, table)[0])
            except _DAMAGED as e:  # constriction on words no encoder wrote
                raise FormatError(f"range-coded data is damaged ({e})") from None
        self._coder.encode(np.array([symbol], dtype=np.int32), CATEGORICAL, table)
        return int(symbol)  # type: ignore[arg-type]

    def finish(self) -> bytes:
        """The encoder's output (32-bit words as bytes)."""
        if self.decoding:
            raise ConfigError("finish() is the encoder's: a decoder has no output")
        return self._coder.get_compressed().tobytes()
