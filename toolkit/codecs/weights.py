"""The ``weights`` codec: lossless coding of checkpoints (safetensors, ``.npy``, tar archives of them).

A thin adapter over :mod:`toolkit.weights`. The container hands the file
over in chunks; the encoder runs them through a
:class:`~toolkit.weights.layout.Scanner`, which checks each header before
anything after it is read and tells which bytes are float values of which
tensor. Each chunk's payload lists its segments, each saying what it holds:

    kind 0, stored:  varint n, n bytes
    kind 1, zstd:    varint n (bytes it decodes to), varint m, m bytes
    kind 2, floats:  u8 dtype (0 BF16, 1 F16, 2 F32, 3 F64), varint index of the
                     first value in its tensor, varint row length, varint n,
                     varint m, m bytes (:func:`toolkit.weights.encode_segment`)

Headers, integer and bool tensors and other files are zstd segments; the
ends of values a chunk boundary cuts are stored. So a chunk decodes from its
own payload alone: chunks decode in parallel (threads here; the layout is
what a GPU decoder takes), memory stays at one batch of chunks, and the
decoder gives back the file exactly, header bytes and tensor order included.

Settings: ``level`` (``fast``: zstd on byte planes, the fastest to decode;
``max``: ANS under row and column contexts, the smallest) and
``zstd_level`` for the exponent plane and side data.

:func:`load_state_dict` reads a coded checkpoint straight into tensors.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from toolkit.codecs.registry import Codec, DecodeSession, EncodeSession, register_codec
from toolkit.config import Config, check
from toolkit.entropy.varint import varint
from toolkit.errors import FormatError, UnsupportedInputError
from toolkit.formats.binary import ByteReader
from toolkit.weights.checkpoint import DTYPE_BYTES  # light: the coder (numpy, numba) loads when a file is coded

if TYPE_CHECKING:
    import torch

__all__ = ["WeightsCodec", "WeightsConfig", "load_state_dict"]

_STORED, _ZSTD, _FLOAT = 0, 1, 2
_DTYPES = ("BF16", "F16", "F32", "F64")
_CHUNK = 2 << 20
#: other bytes up to this size (headers) get zstd -19; larger runs (integer tensors, other files) level 3
_SMALL = 1 << 20


@dataclass(frozen=True)
class WeightsConfig(Config):
    versioned = False  # a header's config: the codec's version is the header's

    #: ``fast`` (zstd byte planes) or ``max`` (context-coded exponents with ANS)
    level: str = "fast"
    #: zstd level of the exponent plane and side data (17 and 19 code it within 1% of its entropy)
    zstd_level: int = 17

    def __post_init__(self):
        check(self.level in ("fast", "max"), f"weights level must be fast or max, got {self.level!r}")
        check(1 <= self.zstd_level <= 22, f"zstd_level must be in 1..22, got {self.zstd_level}")


def _pieces(spans, pos: int) -> list[tuple]:
    """A chunk's spans (at file offset ``pos``) as ``(lo, hi)`` other bytes or ``(lo, hi, span, v0)``
    whole float values, offsets within the chunk; neighbouring other bytes are merged."""
    out: list[tuple] = []

    def other(lo: int, hi: int) -> None:
        if hi <= lo:
            return
        if out and len(out[-1]) == 2 and out[-1][1] == lo:
            out[-1] = (out[-1][0], hi)
        else:
            out.append((lo, hi))

    for sp in spans:
        lo, hi = sp.begin - pos, sp.end - pos
        if sp.dtype is None:
            other(lo, hi)
            continue
        item = DTYPE_BYTES[sp.dtype]
        v0, v1 = sp.first_value, (sp.end - sp.first) // item
        a, b = sp.first + v0 * item - pos, sp.first + v1 * item - pos
        if v1 <= v0:
            other(lo, hi)
            continue
        other(lo, a)
        out.append((a, b, sp, v0))
        other(b, hi)
    return out


class _Encoder(EncodeSession):
    def __init__(self, codec: WeightsCodec):
        from toolkit.weights.layout import Scanner

        self.codec = codec
        self.scanner = Scanner()
        self.pos = 0

    def encode_chunks(self, chunks: list[bytes]) -> list[bytes | None]:
        jobs = []
        for raw in chunks:  # the scan is sequential (a header tells what follows); the coding is not
            jobs.append((raw, _pieces(self.scanner.feed(raw), self.pos)))
            self.pos += len(raw)
        from toolkit.weights.coding import parallel_map

        config = self.codec.config
        return parallel_map(lambda j: _encode_pieces(config, *j), jobs)

    def finish(self) -> None:
        self.scanner.finish()


class _Decoder(DecodeSession):
    def __init__(self, codec: WeightsCodec):
        self.codec = codec

    def decode_chunks(self, payloads, sizes, known):
        from toolkit.weights.coding import parallel_map

        out: list = list(known)
        jobs = [(i, p, n) for i, (p, n) in enumerate(zip(payloads, sizes, strict=True)) if p is not None]
        for (i, *_), data in zip(jobs, parallel_map(lambda j: _decode_payload(j[1], j[2]), jobs), strict=True):
            out[i] = data
        return out


def _encode_pieces(config: WeightsConfig, raw: bytes, pieces: list[tuple]) -> bytes:
    from toolkit.weights.coding import SegmentShape, encode_segment, zstd_compress

    out = bytearray()
    for piece in pieces:
        data = raw[piece[0]:piece[1]]
        if len(piece) == 4:
            sp, v0 = piece[2], piece[3]
            coded = encode_segment(data, sp.dtype, SegmentShape(v0, sp.row), level=config.level,
                                   zstd_level=config.zstd_level)
            out += bytes([_FLOAT, _DTYPES.index(sp.dtype)]) + varint(v0) + varint(sp.row) + varint(len(data))
            out += varint(len(coded)) + coded
            continue
        z = zstd_compress(data, 19 if len(data) <= _SMALL else 3) if len(data) >= 32 else data
        if len(z) < len(data):
            out += bytes([_ZSTD]) + varint(len(data)) + varint(len(z)) + z
        else:
            out += bytes([_STORED]) + varint(len(data)) + data
    return bytes(out)


def _decode_payload(payload: bytes, size: int) -> memoryview:
    """Decode one chunk of ``size`` bytes into one buffer, segment after segment."""
    import numpy as np
    import zstandard

    from toolkit.weights.coding import SegmentShape, decode_segment, zstd_decompressor

    buf = np.empty(size, dtype=np.uint8)
    r = ByteReader(payload, "weights chunk")
    at = 0
    while r.remaining:
        kind = r.u8()
        if kind == _FLOAT:
            code = r.u8()
            if code >= len(_DTYPES):
                raise FormatError(f"weights chunk: unknown float type {code}")
            dtype = _DTYPES[code]
            v0, row = r.varint(1 << 62), r.varint(1 << 62)
            n = r.varint(size - at)
            if n % DTYPE_BYTES[dtype] or n == 0 or row == 0:
                raise FormatError(f"weights chunk: {n} bytes of {dtype} values in rows of {row}")
            values = decode_segment(bytes(r.blob()), dtype, SegmentShape(v0, row), n // DTYPE_BYTES[dtype])
            buf[at:at + n] = values.view(np.uint8)
        elif kind == _ZSTD:
            n = r.varint(size - at)
            try:
                part = zstd_decompressor().decompress(r.blob(), max_output_size=n)
            except zstandard.ZstdError as e:
                raise FormatError(f"weights chunk: zstd data is damaged ({e})") from None
            if len(part) != n:
                raise FormatError(f"weights chunk: a zstd segment of {len(part)} bytes where {n} belong")
            buf[at:at + n] = np.frombuffer(part, dtype=np.uint8)
        elif kind == _STORED:
            part = r.blob()
            n = len(part)
            if n > size - at:
                raise FormatError("weights chunk: its segments hold more bytes than the chunk")
            buf[at:at + n] = np.frombuffer(part, dtype=np.uint8)
        else:
            raise FormatError(f"weights chunk: unknown segment kind {kind}")
        at += n
    if at != size:
        raise FormatError(f"weights chunk: its segments hold {at:,} bytes, the chunk {size:,}")
    return buf.data


@register_codec("weights")
class WeightsCodec(Codec):
    description = "checkpoints (safetensors, .npy, tar of them): float planes with context-coded exponents, byte-exact"
    version = 2  # 2: every segment says what it holds, so chunks decode without the header
    Config = WeightsConfig
    chunk_size = _CHUNK
    batch_chunks = 2  # two chunks decode on two cores while the container hashes the batch before

    def open_encoder(self, progress=None) -> EncodeSession:
        return _Encoder(self)

    def open_decoder(self, progress=None) -> DecodeSession:
        return _Decoder(self)


def load_state_dict(file: str | os.PathLike | bytes, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The tensors of a coded checkpoint (``codec compress model.safetensors`` or a directory of shards).

    ``file``: a ``.tkz`` path or its bytes. Tensors come back as the
    safetensors file held them (names, dtypes, shapes, every bit), as views of
    the one decoded buffer (:func:`toolkit.weights.load.read_checkpoint`); the
    shards of a tar archive are merged, and a name found in two shards is an error.
    """
    from toolkit.codecs import container
    from toolkit.weights.load import read_checkpoint

    blob = bytes(file) if isinstance(file, bytes | bytearray | memoryview) else open(file, "rb").read()  # noqa: SIM115
    header = container.read_info(io.BytesIO(blob)).header
    if header["codec"] != "weights":
        raise UnsupportedInputError(f"a .tkz of codec {header['codec']}, not a coded checkpoint (codec weights)")
    raw = io.BytesIO()
    container.read_stream(io.BytesIO(blob), raw)
    return read_checkpoint(raw.getbuffer(), device)
