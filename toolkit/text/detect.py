"""Is a chunk text? A cheap byte-level test (no torch), used by the lm codec and by ``auto``."""

from __future__ import annotations

__all__ = ["looks_like_text"]

_TEXT_CONTROL = frozenset(b"\t\n\r\f\v\x1b")
_CONTROL_TABLE = bytes(0 if (b >= 0x20 and b != 0x7F) or b in _TEXT_CONTROL else 1 for b in range(256))


def looks_like_text(chunk: bytes) -> bool:
    """True when at most 1% of the bytes are control codes and the chunk is (nearly) UTF-8."""
    n = len(chunk)
    if n == 0:
        return False
    controls = n - len(chunk.translate(None, delete=bytes(b for b in range(256) if _CONTROL_TABLE[b])))
    if controls * 100 > n:
        return False
    bad = chunk.decode("utf-8", errors="replace").count("\ufffd")
    return bad * 100 <= n
