"""A raw LZMA2 encoder that can sync-flush, through liblzma itself (ctypes).

Python's :mod:`lzma` cannot flush an encoder without ending its stream, so
chunks coded with it each restart their dictionary. liblzma's
``LZMA_SYNC_FLUSH`` ends the current LZMA2 chunk and keeps the dictionary:
everything fed so far becomes decodable, and the next chunk still matches
against it. The output is a plain raw LZMA2 stream, which Python's
``lzma.LZMADecompressor(format=FORMAT_RAW)`` decodes piece by piece.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

from toolkit.errors import DependencyError, ToolkitError

__all__ = ["LZMA2Encoder"]

_LZMA_OK, _LZMA_STREAM_END, _LZMA_MEM_ERROR = 0, 1, 5
_LZMA_SYNC_FLUSH = 1
_FILTER_LZMA2 = 0x21
_VLI_UNKNOWN = 2**64 - 1
_OUT = 1 << 20


class _Stream(ctypes.Structure):
    # lzma_stream from <lzma/base.h>; liblzma 5.x keeps this layout (the reserved fields pad it)
    _fields_ = [
        ("next_in", ctypes.c_void_p), ("avail_in", ctypes.c_size_t), ("total_in", ctypes.c_uint64),
        ("next_out", ctypes.c_void_p), ("avail_out", ctypes.c_size_t), ("total_out", ctypes.c_uint64),
        ("allocator", ctypes.c_void_p), ("internal", ctypes.c_void_p),
        ("reserved_ptr", ctypes.c_void_p * 4), ("reserved_int1", ctypes.c_uint64),
        ("reserved_int2", ctypes.c_uint64), ("reserved_int3", ctypes.c_size_t),
        ("reserved_int4", ctypes.c_size_t), ("reserved_enum", ctypes.c_int * 2),
    ]


class _Filter(ctypes.Structure):
    _fields_ = [("id", ctypes.c_uint64), ("options", ctypes.c_void_p)]


@functools.lru_cache(maxsize=1)
def _liblzma() -> ctypes.CDLL:
    name = ctypes.util.find_library("lzma") or "liblzma.so.5"
    try:
        lib = ctypes.CDLL(name)
    except OSError:
        raise DependencyError("the xz codec needs liblzma (install xz-utils / liblzma5)") from None
    lib.lzma_code.argtypes = [ctypes.POINTER(_Stream), ctypes.c_int]
    lib.lzma_raw_encoder.argtypes = [ctypes.POINTER(_Stream), ctypes.POINTER(_Filter)]
    lib.lzma_lzma_preset.argtypes = [ctypes.c_void_p, ctypes.c_uint32]
    lib.lzma_end.argtypes = [ctypes.POINTER(_Stream)]
    return lib


class LZMA2Encoder:
    """One raw LZMA2 stream at an xz ``preset``; :meth:`flush_piece` codes bytes and sync-flushes."""

    def __init__(self, preset: int):
        lib = _liblzma()
        # lzma_options_lzma is about 112 bytes in liblzma 5.x; the buffer leaves room for growth
        self._options = ctypes.create_string_buffer(512)
        if lib.lzma_lzma_preset(self._options, preset):
            raise ToolkitError(f"liblzma does not support preset {preset:#x}")
        self._filters = (_Filter * 2)((_FILTER_LZMA2, ctypes.cast(self._options, ctypes.c_void_p)),
                                      (_VLI_UNKNOWN, None))
        self._stream = _Stream()
        self._check(lib.lzma_raw_encoder(ctypes.byref(self._stream), self._filters))
        self._out = ctypes.create_string_buffer(_OUT)

    @staticmethod
    def _check(ret: int) -> None:
        if ret == _LZMA_MEM_ERROR:
            raise MemoryError("liblzma could not allocate its encoder")
        if ret not in (_LZMA_OK, _LZMA_STREAM_END):
            raise ToolkitError(f"liblzma encoder failed (lzma_ret {ret})")

    def flush_piece(self, data: bytes) -> bytes:
        """Code ``data`` and flush: the returned bytes decode to exactly ``data`` after what came before."""
        s, lib = self._stream, _liblzma()
        keep = ctypes.c_char_p(data)  # points into ``data`` without a copy; alive for this call
        s.next_in, s.avail_in = ctypes.cast(keep, ctypes.c_void_p), len(data)
        parts = []
        while True:
            s.next_out, s.avail_out = ctypes.cast(self._out, ctypes.c_void_p), _OUT
            ret = lib.lzma_code(ctypes.byref(s), _LZMA_SYNC_FLUSH)
            self._check(ret)
            parts.append(ctypes.string_at(self._out, _OUT - s.avail_out))
            if ret == _LZMA_STREAM_END:  # the flush is complete
                return b"".join(parts)

    def close(self) -> None:
        if self._stream is not None:
            _liblzma().lzma_end(ctypes.byref(self._stream))
            self._stream = None
