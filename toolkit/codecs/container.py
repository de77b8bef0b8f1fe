"""The .tkz container: framing, checksums, per-chunk fallback and streaming.

Layout (all integers little-endian; docs/FORMAT.md is the full spec)::

    magic  b"\\x89TKZ"  | version u8 | flags u8 | header_len u32 | header (UTF-8 JSON)
    chunk* : b"C" | method u8 | raw_len u32 | payload_len u32 | crc32(payload) u32 | payload
    end    : b"E" | chunk_count u32 | total_len u64 | sha256(original) 32 B | crc32(end record) u32

Chunks are coded in batches of ``batch_chunks`` (a codec may code a batch as
parallel streams). A chunk whose codec payload is not smaller than the raw
chunk is written with zstd or stored raw instead, so no file grows by more
than the framing. Every length read from a file is checked against limits
before anything is allocated; damage raises :class:`FormatError` or
:class:`ChecksumError` naming the chunk.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import struct
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

import zstandard

from toolkit.codecs.registry import Codec, DecodeSession, environment_mismatch, get_codec
from toolkit.errors import ChecksumError, EnvironmentMismatchError, FormatError, ToolkitError, UnknownCodecError

logger = logging.getLogger(__name__)

__all__ = [
    "MAGIC",
    "FORMAT_VERSION",
    "write_stream",
    "read_stream",
    "read_info",
    "FileInfo",
]

MAGIC = b"\x89TKZ"
FORMAT_VERSION = 1
_PRELUDE = struct.Struct("<4sBBI")  # magic, version, flags, header_len
_CHUNK = struct.Struct("<BIII")  # method, raw_len, payload_len, crc32 (after the b"C" tag)
_END = struct.Struct("<IQ32s")  # chunk_count, total_len, sha256 (after the b"E" tag)
_CRC = struct.Struct("<I")

METHOD_CODEC = 0
METHOD_STORED = 1
METHOD_ZSTD = 2
METHOD_NAMES = {METHOD_CODEC: "codec", METHOD_STORED: "stored", METHOD_ZSTD: "zstd"}

MAX_HEADER = 1 << 20
MAX_CHUNK = 64 << 20
MAX_BATCH_BYTES = 256 << 20
MAX_BATCH_CHUNKS = 4096
_FALLBACK_ZSTD_LEVEL = 3

ProgressFn = Callable[[int], None]


def _read_exact(f: BinaryIO, n: int, what: str) -> bytes:
    buf = f.read(n)
    if buf is None or len(buf) != n:
        raise FormatError(f"truncated file: {what} ends early")
    return buf


def _read_full(f: BinaryIO, n: int) -> bytes:
    """Read up to ``n`` bytes, looping over short reads (pipes)."""
    parts, got = [], 0
    while got < n:
        b = f.read(n - got)
        if not b:
            break
        parts.append(b)
        got += len(b)
    return b"".join(parts)


def _fallback(raw: bytes) -> tuple[int, bytes]:
    z = zstandard.ZstdCompressor(level=_FALLBACK_ZSTD_LEVEL).compress(raw)
    if len(z) < len(raw):
        return METHOD_ZSTD, z
    return METHOD_STORED, raw


# --------------------------------------------------------------------------- writing
def _header_dict(codec: Codec, size: int | None, extra: dict | None) -> dict:
    header = {
        "codec": codec.name,
        "codec_version": codec.version,
        "config": codec.config_dict(),
        "chunk_size": int(codec.chunk_size),
        "batch_chunks": int(codec.batch_chunks),
        "size": size,
    }
    header.update(codec.header_fields())
    env = codec.environment()
    if env:
        header["env"] = env
    if extra:
        header.update(extra)
    return header


def _check_codec_limits(chunk_size: int, batch_chunks: int) -> None:
    if not 1 <= chunk_size <= MAX_CHUNK:
        raise FormatError(f"chunk size {chunk_size} outside 1..{MAX_CHUNK}")
    if not 1 <= batch_chunks <= MAX_BATCH_CHUNKS or chunk_size * batch_chunks > MAX_BATCH_BYTES:
        raise FormatError(f"batch of {batch_chunks} chunks of {chunk_size} bytes is too large")


def write_stream(
    codec: Codec,
    src: BinaryIO,
    dst: BinaryIO,
    size: int | None = None,
    extra_header: dict | None = None,
    progress: ProgressFn | None = None,
) -> dict:
    """Compress everything readable from ``src`` into ``dst``; returns a summary dict.

    Memory is bounded by one batch (``batch_chunks * chunk_size`` raw bytes).
    The codec's coding state lives in one encoder session for this file.
    """
    _check_codec_limits(codec.chunk_size, codec.batch_chunks)
    header = json.dumps(_header_dict(codec, size, extra_header), sort_keys=True,
                        separators=(",", ":")).encode()
    if len(header) > MAX_HEADER:
        raise FormatError("header too large")
    dst.write(_PRELUDE.pack(MAGIC, FORMAT_VERSION, 0, len(header)))
    dst.write(header)
    written = _PRELUDE.size + len(header)
    sha = hashlib.sha256()
    total = count = 0
    methods = {name: 0 for name in METHOD_NAMES.values()}
    # progress inside a batch comes from the session; it is capped at the batch's size and
    # topped up when the batch is written, so the bar never runs ahead or double counts
    budget = reported = 0

    def tick(n: int) -> None:
        nonlocal reported
        n = max(0, min(int(n), budget - reported))
        if n and progress:
            reported += n
            progress(n)

    session = codec.open_encoder(tick if progress else None)
    try:
        while True:
            batch = []
            for _ in range(codec.batch_chunks):
                raw = _read_full(src, codec.chunk_size)
                if not raw:
                    break
                batch.append(raw)
                if len(raw) < codec.chunk_size:
                    break
            if not batch:
                break
            budget, reported = sum(len(b) for b in batch), 0
            payloads = session.encode_chunks(batch)
            if len(payloads) != len(batch):
                raise ToolkitError(f"codec {codec.name} returned {len(payloads)} payloads for {len(batch)} chunks")
            for raw, payload in zip(batch, payloads, strict=True):
                method = METHOD_CODEC
                if payload is None or len(payload) > len(raw):
                    method, payload = _fallback(raw)
                rec = b"C" + _CHUNK.pack(method, len(raw), len(payload), zlib.crc32(payload))
                dst.write(rec)
                dst.write(payload)
                written += len(rec) + len(payload)
                methods[METHOD_NAMES[method]] += 1
                sha.update(raw)
                total += len(raw)
                count += 1
            if progress and budget > reported:
                progress(budget - reported)
            if len(batch[-1]) < codec.chunk_size:
                break
    finally:
        session.close()
    if size is not None and total != size:
        raise ToolkitError(f"input changed while reading: expected {size} bytes, read {total}")
    end = b"E" + _END.pack(count, total, sha.digest())
    dst.write(end + _CRC.pack(zlib.crc32(end)))
    written += len(end) + _CRC.size
    return {"codec": codec.name, "in_bytes": total, "out_bytes": written, "chunks": count,
            "methods": methods, "sha256": sha.hexdigest()}


# --------------------------------------------------------------------------- reading
def _read_header(src: BinaryIO) -> dict:
    prelude = src.read(_PRELUDE.size)
    if not prelude:
        raise FormatError("empty input: not a .tkz file")
    if prelude[: len(MAGIC)] != MAGIC[: len(prelude)]:
        raise FormatError("not a .tkz file (bad magic)")
    if len(prelude) < _PRELUDE.size:
        raise FormatError("truncated file: prelude ends early")
    _, version, flags, header_len = _PRELUDE.unpack(prelude)
    if version != FORMAT_VERSION:
        raise FormatError(f"unsupported .tkz format version {version} (this build reads {FORMAT_VERSION})")
    if flags != 0:
        raise FormatError(f"unknown flags {flags:#x}")
    if header_len > MAX_HEADER:
        raise FormatError(f"header length {header_len} exceeds {MAX_HEADER}")
    raw = _read_exact(src, header_len, "header")
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise FormatError("header is not valid UTF-8 JSON") from None
    if not isinstance(header, dict):
        raise FormatError("header is not a JSON object")
    for key, typ in (("codec", str), ("codec_version", int), ("chunk_size", int),
                     ("batch_chunks", int), ("config", dict)):
        if not isinstance(header.get(key), typ) or isinstance(header.get(key), bool):
            raise FormatError(f"header field {key!r} is missing or has the wrong type")
    _check_codec_limits(header["chunk_size"], header["batch_chunks"])
    return header


def _codec_for(header: dict, local: dict[str, str] | None = None, allow_mismatch: bool = False) -> Codec:
    try:
        cls = get_codec(header["codec"])
    except UnknownCodecError as e:
        raise UnknownCodecError(f"file needs {e}") from None
    if header["codec_version"] != cls.version:
        raise FormatError(
            f"file was written by {cls.name} codec version {header['codec_version']}, "
            f"this build has version {cls.version}"
        )
    codec = cls.from_header(header, local)
    recorded = header.get("env", {})
    if not isinstance(recorded, dict):
        raise FormatError("header field 'env' is not an object")
    diff = environment_mismatch(recorded, codec.environment())
    if diff:
        if not allow_mismatch:
            raise EnvironmentMismatchError(
                f"file was coded where {'; '.join(diff)}; this can change the {cls.name} codec's numbers "
                "(decode anyway with --allow-mismatch: the SHA-256 check then decides)")
        logger.warning("decoding despite a different environment: %s", "; ".join(diff))
    # the file's framing wins over the codec's defaults: batches must match the encoder's
    codec.chunk_size = header["chunk_size"]
    codec.batch_chunks = header["batch_chunks"]
    return codec


@dataclass
class _Chunk:
    index: int
    method: int
    raw_len: int
    payload: bytes


@dataclass
class _End:
    count: int
    total: int
    sha256: bytes


def _iter_records(src: BinaryIO, chunk_size: int, skip_payload: bool = False) -> Iterator[_Chunk | _End]:
    index = 0
    while True:
        tag = src.read(1)
        if not tag:
            raise FormatError("truncated file: end record missing")
        if tag == b"C":
            method, raw_len, payload_len, crc = _CHUNK.unpack(_read_exact(src, _CHUNK.size, f"chunk {index}"))
            if method not in METHOD_NAMES:
                raise FormatError(f"chunk {index}: unknown method {method}")
            if not 1 <= raw_len <= chunk_size:
                raise FormatError(f"chunk {index}: size {raw_len} outside 1..{chunk_size}")
            limit = raw_len if method != METHOD_ZSTD else raw_len - 1
            if payload_len > limit or (method == METHOD_STORED and payload_len != raw_len):
                raise FormatError(f"chunk {index}: payload length {payload_len} impossible for size {raw_len}")
            if skip_payload:
                payload = b""
                _skip(src, payload_len, index)
            else:
                payload = _read_exact(src, payload_len, f"chunk {index}")
                if zlib.crc32(payload) != crc:
                    raise ChecksumError(f"chunk {index}: CRC mismatch (data damaged)")
            yield _Chunk(index, method, raw_len, payload)
            index += 1
        elif tag == b"E":
            body = _read_exact(src, _END.size, "end record")
            (crc,) = _CRC.unpack(_read_exact(src, _CRC.size, "end record"))
            if zlib.crc32(b"E" + body) != crc:
                raise ChecksumError("end record: CRC mismatch (data damaged)")
            count, total, digest = _END.unpack(body)
            if count != index:
                raise FormatError(f"end record counts {count} chunks, file has {index}")
            if src.read(1):
                raise FormatError("unexpected data after the end record")
            yield _End(count, total, digest)
            return
        else:
            raise FormatError(f"bad record tag {tag!r} before chunk {index}")


def _skip(src: BinaryIO, n: int, index: int) -> None:
    while n:
        b = src.read(min(n, 1 << 20))
        if not b:
            raise FormatError(f"truncated file: chunk {index} ends early")
        n -= len(b)


def _decode_batch(codec: Codec, session: DecodeSession, batch: list[_Chunk]) -> list[bytes]:
    payloads: list[bytes | None] = []
    known: list[bytes | None] = []
    for c in batch:
        if c.method == METHOD_CODEC:
            payloads.append(c.payload)
            known.append(None)
        else:
            payloads.append(None)
            known.append(_unfallback(c))
    try:
        out = session.decode_chunks(payloads, [c.raw_len for c in batch], known)
    except ToolkitError:
        raise
    except Exception as e:  # a damaged payload can make any decoder fail; name the chunk
        raise FormatError(f"chunks {batch[0].index}..{batch[-1].index}: cannot decode ({e})") from e
    for c, data in zip(batch, out, strict=True):
        if len(data) != c.raw_len:
            raise ChecksumError(f"chunk {c.index}: decoded {len(data)} bytes, expected {c.raw_len}")
    return out


def _unfallback(c: _Chunk) -> bytes:
    if c.method == METHOD_STORED:
        return c.payload
    try:
        data = zstandard.ZstdDecompressor().decompress(c.payload, max_output_size=c.raw_len)
    except zstandard.ZstdError as e:
        raise FormatError(f"chunk {c.index}: bad zstd data ({e})") from None
    if len(data) != c.raw_len:
        raise ChecksumError(f"chunk {c.index}: decoded {len(data)} bytes, expected {c.raw_len}")
    return data


def read_stream(src: BinaryIO, dst: BinaryIO, progress: ProgressFn | None = None,
                local: dict[str, str] | None = None, allow_mismatch: bool = False) -> dict:
    """Decompress a .tkz stream from ``src`` into ``dst``; returns the header.

    Chunks are checked (CRC) before decoding and the SHA-256 of everything
    written is compared with the end record; a mismatch raises after the
    fact, so callers writing to a file must discard it (the CLI does).
    ``local``: decode-time settings (where models are); ``allow_mismatch``:
    decode even where the file records another environment.
    """
    header = _read_header(src)
    codec = _codec_for(header, local, allow_mismatch)
    session = codec.open_decoder()
    try:
        return _read_chunks(header, codec, session, src, dst, progress)
    finally:
        session.close()


def _read_chunks(header: dict, codec: Codec, session: DecodeSession, src: BinaryIO, dst: BinaryIO,
                 progress: ProgressFn | None) -> dict:
    sha = hashlib.sha256()
    total = 0
    batch: list[_Chunk] = []

    def flush() -> None:
        nonlocal total
        for data in _decode_batch(codec, session, batch):
            dst.write(data)
            sha.update(data)
            total += len(data)
            if progress:
                progress(len(data))
        batch.clear()

    for rec in _iter_records(src, header["chunk_size"]):
        if isinstance(rec, _Chunk):
            batch.append(rec)
            if len(batch) == header["batch_chunks"]:
                flush()
        else:
            if batch:
                flush()
            if rec.total != total:
                raise ChecksumError(f"decoded {total} bytes, end record says {rec.total}")
            if sha.digest() != rec.sha256:
                raise ChecksumError("SHA-256 of the decoded data does not match (model or data differ)")
            if header.get("size") is not None and header["size"] != total:
                raise FormatError(f"header says {header['size']} bytes, file holds {total}")
    return header


@dataclass
class FileInfo:
    header: dict
    chunks: int = 0
    raw_bytes: int = 0
    file_bytes: int = 0
    methods: dict = field(default_factory=dict)
    sha256: str = ""

    def as_dict(self) -> dict:
        return {"header": self.header, "chunks": self.chunks, "raw_bytes": self.raw_bytes,
                "file_bytes": self.file_bytes, "methods": self.methods, "sha256": self.sha256,
                "bits_per_byte": 8 * self.file_bytes / self.raw_bytes if self.raw_bytes else None}


class _Counting(io.RawIOBase):
    def __init__(self, f: BinaryIO):
        self.f, self.n = f, 0

    def read(self, n: int = -1) -> bytes:
        b = self.f.read(n)
        self.n += len(b)
        return b

    def readable(self) -> bool:
        return True


def read_info(src: BinaryIO) -> FileInfo:
    """Walk the framing of a .tkz stream without decoding payloads."""
    counting = _Counting(src)
    header = _read_header(counting)
    info = FileInfo(header=header, methods={name: 0 for name in METHOD_NAMES.values()})
    for rec in _iter_records(counting, header["chunk_size"], skip_payload=True):
        if isinstance(rec, _Chunk):
            info.chunks += 1
            info.methods[METHOD_NAMES[rec.method]] += 1
        else:
            info.raw_bytes = rec.total
            info.sha256 = rec.sha256.hex()
    info.file_bytes = counting.n
    return info
