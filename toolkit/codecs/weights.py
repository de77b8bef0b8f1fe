"""The ``weights`` codec: lossless coding of safetensors checkpoints, byte for byte.

A thin adapter over :mod:`toolkit.weights`. The container hands the file
over in chunks; this codec reads the safetensors header from the first of
them (:mod:`toolkit.weights.checkpoint` checks it before anything else is
read), and then knows, for every byte of every later chunk, which tensor it
belongs to. Each chunk's payload is a list of segments, the chunk cut at
tensor boundaries:

    kind u8, varint length, bytes
    kind 0: bytes stored            (the ends of values a chunk boundary cuts)
    kind 1: zstd                    (the header; integer, bool and 8-bit float tensors)
    kind 2: float values            (:func:`toolkit.weights.encode_segment`)

So a chunk decodes from its own payload and the header alone: chunks
decode in parallel (threads here; the layout is what a GPU decoder takes),
and memory stays at one batch of chunks. Decoding gives back the file
exactly, header bytes and tensor order included.

Settings: ``level`` (``fast``: zstd on byte planes, the fastest to decode;
``max``: ANS under row and column contexts, the smallest) and
``zstd_level`` for the exponent plane and side data.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from toolkit.codecs.registry import Codec, DecodeSession, EncodeSession, register_codec
from toolkit.entropy.varint import read_varint, varint
from toolkit.errors import ConfigError, FormatError, UnsupportedInputError

__all__ = ["WeightsCodec", "WeightsConfig"]

_STORED, _ZSTD, _FLOAT = 0, 1, 2
_CHUNK = 4 << 20


@dataclass
class WeightsConfig:
    #: ``fast`` (zstd byte planes) or ``max`` (context-coded exponents with ANS)
    level: str = "fast"
    #: zstd level of the exponent plane and side data (17 and 19 code it within 1% of its entropy)
    zstd_level: int = 17

    def __post_init__(self):
        if self.level not in ("fast", "max"):
            raise ConfigError(f"weights level must be fast or max, got {self.level!r}")
        if not 1 <= self.zstd_level <= 22:
            raise ConfigError(f"zstd_level must be in 1..22, got {self.zstd_level}")


def _pieces(header, start: int, stop: int) -> list[tuple[int, int, int, object, int]]:
    """The segments of file bytes ``[start, stop)``: ``(kind, begin, end, tensor, first value)``.

    Float tensors give a stored piece for a value a boundary cuts at either
    end and a float piece for the whole values between; header bytes and
    other tensors give zstd pieces (stored where zstd does not shrink them).
    """
    from toolkit.weights.checkpoint import DTYPE_BYTES, FLOAT_DTYPES

    out = []
    if start < header.size:
        out.append((_ZSTD, start, min(stop, header.size), None, 0))
    for t in header.tensors:
        lo, hi = max(start, t.begin), min(stop, t.end)
        if lo >= hi:
            continue
        if t.dtype not in FLOAT_DTYPES:
            out.append((_ZSTD, lo, hi, t, 0))
            continue
        item = DTYPE_BYTES[t.dtype]
        v0, v1 = -(-(lo - t.begin) // item), (hi - t.begin) // item
        a, b = t.begin + v0 * item, t.begin + v1 * item
        if v1 <= v0:
            out.append((_STORED, lo, hi, t, 0))
            continue
        if a > lo:
            out.append((_STORED, lo, a, t, 0))
        out.append((_FLOAT, a, b, t, v0))
        if hi > b:
            out.append((_STORED, b, hi, t, 0))
    return out


class _Session:
    """What encoder and decoder share: the file offset and, once read, the header."""

    def __init__(self, codec: WeightsCodec):
        self.codec = codec
        self.pos = 0
        self.head = bytearray()
        self.header = None

    def _take_header(self, data: bytes) -> int:
        """Feed bytes at ``self.pos`` while the header is incomplete; returns how many were header bytes."""
        from toolkit.weights.checkpoint import header_length, parse_header

        take = 0
        if len(self.head) < 8:
            take = min(len(data), 8 - len(self.head))
            self.head += data[:take]
        if len(self.head) >= 8:
            need = 8 + header_length(bytes(self.head[:8]))
            more = min(len(data) - take, need - len(self.head))
            self.head += data[take:take + more]
            take += more
            if len(self.head) == need:
                self.header = parse_header(bytes(self.head))
                self.head = bytearray()
        return take


class _Encoder(EncodeSession, _Session):
    def __init__(self, codec: WeightsCodec):
        _Session.__init__(self, codec)

    def encode_chunks(self, chunks: list[bytes]) -> list[bytes | None]:
        jobs = []
        for raw in chunks:
            k = self._take_header(raw) if self.header is None else 0
            head = _segment_zstd(raw[:k], 19) if k else b""
            if self.header is None:
                jobs.append((head, None, 0, b""))
            else:
                end = self.pos + len(raw)
                if end > self.header.data_end:
                    raise UnsupportedInputError(f"invalid safetensors file: {end - self.header.data_end:,} "
                                                "bytes after the last tensor")
                jobs.append((head, self.header, self.pos + k, raw[k:]))
            self.pos += len(raw)
        config = self.codec.config
        return _map(lambda j: j[0] + (_encode_pieces(config, *j[1:]) if j[1] is not None else b""), jobs)

    def finish(self) -> None:
        if self.pos == 0:  # an empty input codes to an empty file, as with every codec
            return
        if self.header is None:
            raise UnsupportedInputError("not a safetensors file: it ends inside its header")
        if self.pos != self.header.data_end:
            raise UnsupportedInputError(f"invalid safetensors file: the tensors end at byte "
                                        f"{self.header.data_end:,}, the file at {self.pos:,}")


class _Decoder(DecodeSession, _Session):
    def __init__(self, codec: WeightsCodec):
        _Session.__init__(self, codec)

    def decode_chunks(self, payloads, sizes, known):
        out: list[bytes | None] = [None] * len(sizes)
        jobs = []
        for i, (payload, size) in enumerate(zip(payloads, sizes, strict=True)):
            if payload is None:  # the container stored this chunk; its bytes may hold the header
                out[i] = known[i]
                if self.header is None:
                    self._feed(known[i])
                self.pos += size
                continue
            r = _Segments(payload)
            head = b""
            if self.header is None:
                kind, data = r.next()
                head = _unpack(kind, data, size)
                if self._feed(head) != len(head) or (self.header is None and len(head) != size):
                    raise FormatError("weights chunk: its header bytes do not match the header")
            if self.header is None:
                r.done()
                out[i] = head
            else:
                jobs.append((i, head, r, self.header, self.pos + len(head), size - len(head)))
            self.pos += size
        decoded = _map(lambda j: _decode_pieces(*j[1:]), jobs)
        for (i, *_), data in zip(jobs, decoded, strict=True):
            out[i] = data
        return out

    def _feed(self, data: bytes) -> int:
        try:
            return self._take_header(data)
        except UnsupportedInputError as e:
            raise FormatError(f"the coded safetensors header is damaged: {e}") from None


def _map(fn, jobs: list) -> list:
    if len(jobs) <= 1:
        return [fn(j) for j in jobs]
    with ThreadPoolExecutor(max_workers=min(len(jobs), os.cpu_count() or 1)) as ex:
        return list(ex.map(fn, jobs))


def _segment(kind: int, data: bytes) -> bytes:
    return bytes([kind]) + varint(len(data)) + data


def _segment_zstd(data: bytes, level: int) -> bytes:
    from toolkit.weights.coding import zstd_compress
    z = zstd_compress(data, level)
    return _segment(_ZSTD, z) if len(z) < len(data) else _segment(_STORED, data)


def _encode_pieces(config: WeightsConfig, header, pos: int, raw: bytes) -> bytes:
    """The segments of the chunk bytes ``raw`` at file offset ``pos`` (header known)."""
    from toolkit.weights.coding import SegmentShape, encode_segment

    out = bytearray()
    for kind, lo, hi, t, v0 in _pieces(header, pos, pos + len(raw)):
        data = raw[lo - pos:hi - pos]
        if kind == _FLOAT:
            out += _segment(_FLOAT, encode_segment(data, t.dtype, SegmentShape(v0, t.row), level=config.level,
                                                   zstd_level=config.zstd_level))
        elif kind == _ZSTD:
            out += _segment_zstd(data, 19 if t is None else 3)
        else:
            out += _segment(_STORED, data)
    return bytes(out)


def _decode_pieces(head: bytes, r: _Segments, header, pos: int, size: int) -> memoryview:
    """Decode a chunk's segments after its ``head`` (header bytes) into one buffer, without copies."""
    import numpy as np

    from toolkit.weights.checkpoint import DTYPE_BYTES
    from toolkit.weights.coding import SegmentShape, decode_segment

    buf = np.empty(len(head) + size, dtype=np.uint8)
    buf[:len(head)] = np.frombuffer(head, dtype=np.uint8)
    for kind, lo, hi, t, v0 in _pieces(header, pos, pos + size):
        got, data = r.next()
        at = len(head) + lo - pos
        if kind == _FLOAT:
            if got != _FLOAT:
                raise FormatError("weights chunk: bytes where the header has float values")
            values = decode_segment(data, t.dtype, SegmentShape(v0, t.row), (hi - lo) // DTYPE_BYTES[t.dtype])
            buf[at:at + hi - lo] = values.view(np.uint8)
        else:
            part = _unpack(got, data, hi - lo)
            if len(part) != hi - lo:
                raise FormatError(f"weights chunk: a segment of {len(part)} bytes where {hi - lo} belong")
            buf[at:at + hi - lo] = np.frombuffer(part, dtype=np.uint8)
    r.done()
    return buf.data


class _Segments:
    """Reads ``kind u8, varint length, bytes`` segments from a chunk payload."""

    def __init__(self, payload: bytes):
        self.view = memoryview(payload)
        self.at = 0

    def next(self) -> tuple[int, bytes]:
        if self.at >= len(self.view):
            raise FormatError("weights chunk: fewer segments than its tensors need")
        kind = self.view[self.at]
        n, used = read_varint(self.view[self.at + 1:self.at + 11], "weights segment length")
        start = self.at + 1 + used
        if start + n > len(self.view):
            raise FormatError("weights chunk: a segment runs past the payload")
        self.at = start + n
        return kind, bytes(self.view[start:start + n])

    def done(self) -> None:
        if self.at != len(self.view):
            raise FormatError("weights chunk: more segments than its tensors need")


def _unpack(kind: int, data: bytes, size: int) -> bytes:
    """A stored or zstd segment's bytes (at most ``size``)."""
    if kind == _STORED:
        out = data
    elif kind == _ZSTD:
        import zstandard

        from toolkit.weights.coding import zstd_decompressor
        try:
            out = zstd_decompressor().decompress(data, max_output_size=size)
        except zstandard.ZstdError as e:
            raise FormatError(f"weights chunk: zstd data is damaged ({e})") from None
    else:
        raise FormatError(f"weights chunk: segment kind {kind} where bytes were expected")
    if len(out) > size:
        raise FormatError("weights chunk: a segment holds more bytes than the chunk")
    return out


@register_codec("weights")
class WeightsCodec(Codec):
    description = "safetensors checkpoints: float planes with context-coded exponents, byte-exact"
    version = 1
    Config = WeightsConfig
    chunk_size = _CHUNK
    batch_chunks = 4

    def open_encoder(self, progress=None) -> EncodeSession:
        return _Encoder(self)

    def open_decoder(self, progress=None) -> DecodeSession:
        return _Decoder(self)
