"""The .tkz container, format version 2: framing, checksums, per-chunk fallback and streaming.

Layout (numbers are LEB128 varints unless a size is given; docs/FORMAT.md is the full spec)::

    magic b"\\x89TKZ" | version u8 = 2 | header | record* | end
    header : id u8 1..3 (store, zstd, xz) | chunk code | one varint per config field
           | id 0 | name length u8 | name | codec_version | chunk code | batch_chunks | JSON length | JSON
    record : tag = 4 * raw_len + method | method 0 (codec) or 1 (zstd): payload_len | crc32 u32 | payload
    end    : tag 3 | digest (SHA-256 of the content; its first 4 bytes for files under 64 KiB)

The framing costs a few bytes, so a small file is not larger than the
tool the codec wraps. Chunks are coded in batches of ``batch_chunks`` (a
codec may code a batch as parallel streams). For codecs that allow it the
container keeps the smallest of the codec's payload, a zstd frame and the
raw bytes for every chunk. Every length read from a file is checked before
anything is allocated; damage raises :class:`FormatError` or
:class:`ChecksumError` naming the chunk.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import logging
import lzma
import struct
import typing
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from typing import BinaryIO

import zstandard

from toolkit.codecs.registry import Codec, DecodeSession, environment_mismatch, get_codec
from toolkit.entropy.varint import varint
from toolkit.errors import (
    ChecksumError,
    EnvironmentMismatchError,
    FormatError,
    ToolkitError,
    UnknownCodecError,
    UnsupportedInputError,
)

logger = logging.getLogger(__name__)

__all__ = ["MAGIC", "FORMAT_VERSION", "write_stream", "read_stream", "read_info", "FileInfo"]

MAGIC = b"\x89TKZ"
FORMAT_VERSION = 2
#: one-byte ids of the classic codecs at their current versions; their settings are varints.
#: Any other codec, or version, is written by name with a JSON settings object.
CLASSIC_IDS = {("store", 1): 1, ("zstd", 2): 2, ("xz", 2): 3}
_CLASSIC = {v: k for k, v in CLASSIC_IDS.items()}
_CRC = struct.Struct("<I")

METHOD_CODEC, METHOD_ZSTD, METHOD_STORED, TAG_END = 0, 1, 2, 3
METHOD_NAMES = {METHOD_CODEC: "codec", METHOD_ZSTD: "zstd", METHOD_STORED: "stored"}

MAX_HEADER = 1 << 20
MAX_CHUNK = 64 << 20
MAX_BATCH_BYTES = 256 << 20
MAX_BATCH_CHUNKS = 4096
#: files shorter than this end with the first 4 bytes of their SHA-256, longer ones with all 32:
#: on a small file the digest would otherwise cost more than the framing.
SMALL_FILE = 1 << 16
_FALLBACK_ZSTD_LEVEL = 3

ProgressFn = Callable[[int], None]


def max_payload(raw_len: int) -> int:
    """The longest codec payload a chunk of ``raw_len`` bytes may have: a stream codec's piece of
    incompressible bytes carries its block headers (zstd 3 bytes per 128 KiB, LZMA2 3 per 64 KiB)."""
    return raw_len + raw_len // 256 + 64


def digest_size(total: int) -> int:
    return 4 if total < SMALL_FILE else 32


# --------------------------------------------------------------------------- small helpers
def _read_exact(f: BinaryIO, n: int, what: str) -> bytes:
    buf = read_full(f, n)
    if len(buf) != n:
        raise FormatError(f"truncated file: {what} ends early")
    return buf


def read_full(f: BinaryIO, n: int) -> bytes:
    """Read up to ``n`` bytes, looping over short reads (pipes)."""
    parts, got = [], 0
    while got < n:
        b = f.read(n - got)
        if not b:
            break
        parts.append(b)
        got += len(b)
    return b"".join(parts)


def _read_varint(f: BinaryIO, what: str) -> int:
    n = shift = 0
    for _ in range(10):
        b = f.read(1)
        if not b:
            raise FormatError(f"truncated file: {what} ends early")
        n |= (b[0] & 0x7F) << shift
        if not b[0] & 0x80:
            return n
        shift += 7
    raise FormatError(f"{what}: overlong number")


def _mib(n: int) -> str:
    return f"{n / (1 << 20):g} MiB"


def _chunk_code(chunk_size: int) -> int:
    # chunk sizes are mostly powers of two: m << s with m odd is written as m * 32 + s (one byte for 8 MiB)
    s = (chunk_size & -chunk_size).bit_length() - 1
    return ((chunk_size >> s) << 5) | s


def _check_framing(chunk_size: int, batch_chunks: int) -> None:
    if not 1 <= chunk_size <= MAX_CHUNK:
        raise FormatError(f"chunk size {chunk_size} outside 1..{MAX_CHUNK}")
    if not 1 <= batch_chunks <= MAX_BATCH_CHUNKS or chunk_size * batch_chunks > MAX_BATCH_BYTES:
        raise FormatError(f"batch of {batch_chunks} chunks of {chunk_size} bytes is too large")


def _zstd_frame(raw: bytes) -> bytes:
    params = zstandard.ZstdCompressionParameters.from_level(_FALLBACK_ZSTD_LEVEL,
                                                            format=zstandard.FORMAT_ZSTD1_MAGICLESS)
    return zstandard.ZstdCompressor(compression_params=params).compress(raw)


def _record(method: int, raw_len: int, payload: bytes) -> bytes:
    """A record's head: tag, payload length (not for stored bytes: it is ``raw_len``), CRC."""
    length = b"" if method == METHOD_STORED else varint(len(payload))
    return varint(4 * raw_len + method) + length + _CRC.pack(zlib.crc32(payload))


def _smallest_record(raw: bytes, payload: bytes | None) -> tuple[int, bytes, bytes]:
    """(method, record head, payload) of the smallest of the codec's payload, a zstd frame and the raw bytes."""
    options = [(METHOD_STORED, raw), (METHOD_ZSTD, _zstd_frame(raw))]
    if payload is not None and len(payload) <= max_payload(len(raw)):
        options.insert(0, (METHOD_CODEC, payload))  # first: it wins ties
    heads = [(m, _record(m, len(raw), p), p) for m, p in options]
    return min(heads, key=lambda mhp: len(mhp[1]) + len(mhp[2]))


# --------------------------------------------------------------------------- header
def _encode_header(codec: Codec, chunk_size: int, batch_chunks: int, extra: dict | None = None) -> bytes:
    out = bytearray(MAGIC + bytes([FORMAT_VERSION]))
    cid = CLASSIC_IDS.get((codec.name, codec.version))
    if cid:
        if batch_chunks != 1 or codec.header_fields() or codec.environment():
            raise TypeError(f"classic codec {codec.name} must code one chunk at a time with no header fields")
        out += bytes([cid]) + varint(_chunk_code(chunk_size))
        for f in fields(codec.config):
            value = getattr(codec.config, f.name)
            if not isinstance(value, int) or value < 0:
                raise TypeError(f"{codec.name} config field {f.name} is not an int >= 0")
            out += varint(int(value))
        return bytes(out)
    name = codec.name.encode()
    if not 1 <= len(name) <= 255 or not codec.name.isascii():
        raise ToolkitError(f"codec name {codec.name!r} must be 1..255 ASCII characters")
    settings = {"config": codec.config_dict(), **codec.header_fields(), **(extra or {})}
    env = codec.environment()
    if env:
        settings["env"] = env
    text = json.dumps(settings, sort_keys=True, separators=(",", ":")).encode()
    if len(text) > MAX_HEADER:
        raise FormatError("header too large")
    out += b"\0" + bytes([len(name)]) + name + varint(codec.version) + varint(_chunk_code(chunk_size))
    out += varint(batch_chunks) + varint(len(text)) + text
    return bytes(out)


def _read_header(src: BinaryIO) -> dict:
    prelude = read_full(src, len(MAGIC) + 1)
    if not prelude:
        raise FormatError("empty input: not a .tkz file")
    if prelude[: len(MAGIC)] != MAGIC[: len(prelude)]:
        raise FormatError("not a .tkz file (bad magic)")
    if len(prelude) <= len(MAGIC):
        raise FormatError("truncated file: prelude ends early")
    version = prelude[len(MAGIC)]
    if version == 1:
        raise FormatError("this is a version-1 .tkz file (toolkit 0.1); this build reads version 2: "
                          "decode it with toolkit 0.1 and compress it again")
    if version != FORMAT_VERSION:
        raise FormatError(f"unsupported .tkz format version {version} (this build reads {FORMAT_VERSION})")
    cid = _read_exact(src, 1, "header")[0]
    if cid:
        return _read_classic_header(src, cid)
    raw = _read_exact(src, _read_exact(src, 1, "header")[0], "header")
    try:
        name = raw.decode("ascii")
    except UnicodeDecodeError:
        raise FormatError("codec name in header is not ASCII") from None
    header: dict = {"codec": name, "codec_version": _read_varint(src, "header"),
                    "chunk_size": _read_chunk_code(src), "batch_chunks": _read_varint(src, "header")}
    _check_framing(header["chunk_size"], header["batch_chunks"])
    header.update(_read_json_settings(src))
    return header


def _read_chunk_code(src: BinaryIO) -> int:
    code = _read_varint(src, "header")
    if code & 31 > 26:  # no chunk of at most 64 MiB needs a larger shift
        raise FormatError(f"chunk size code {code} is out of range")
    return (code >> 5) << (code & 31)


def _read_classic_header(src: BinaryIO, cid: int) -> dict:
    if cid not in _CLASSIC:
        raise FormatError(f"unknown codec id {cid} (a newer toolkit may know it)")
    name, version = _CLASSIC[cid]
    header: dict = {"codec": name, "codec_version": version, "chunk_size": _read_chunk_code(src),
                    "batch_chunks": 1}
    _check_framing(header["chunk_size"], 1)
    cls = get_codec(name)
    hints = typing.get_type_hints(cls.Config)
    header["config"] = {}
    for f in fields(cls.Config):
        value = _read_varint(src, "header")
        if hints[f.name] is bool:
            if value > 1:
                raise FormatError(f"header: {name} setting {f.name} is {value}, not 0 or 1")
            value = bool(value)
        header["config"][f.name] = value
    return header


def _read_json_settings(src: BinaryIO) -> dict:
    n = _read_varint(src, "header")
    if n > MAX_HEADER:
        raise FormatError(f"header length {n} exceeds {MAX_HEADER}")
    try:
        settings = json.loads(_read_exact(src, n, "header").decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise FormatError("header is not valid UTF-8 JSON") from None
    if not isinstance(settings, dict) or not isinstance(settings.get("config"), dict):
        raise FormatError("header settings are not a JSON object with a config object")
    for key in ("codec", "codec_version", "chunk_size", "batch_chunks"):
        settings.pop(key, None)  # the binary fields are the file's framing; JSON cannot override them
    return settings


# --------------------------------------------------------------------------- writing
def _batches(src: BinaryIO, codec: Codec, chunk_size: int, batch_chunks: int) -> Iterator[list[bytes]]:
    while True:
        batch = []
        for _ in range(batch_chunks):
            raw = read_full(src, chunk_size)
            if not raw:
                break
            batch.append(raw)
            if len(raw) < chunk_size:
                break
        if codec.whole_file and batch and len(batch[0]) == chunk_size and src.read(1):
            raise UnsupportedInputError(f"codec {codec.name} codes whole files of at most {_mib(MAX_CHUNK)}")
        if not batch:
            return
        yield batch
        if len(batch[-1]) < chunk_size:
            return


def write_stream(codec: Codec, src: BinaryIO, dst: BinaryIO, size: int | None = None,
                 progress: ProgressFn | None = None) -> dict:
    """Compress everything readable from ``src`` into ``dst``; returns a summary dict.

    Memory is bounded by one batch (``batch_chunks * chunk_size`` raw bytes).
    The codec's coding state lives in one encoder session for this file. A
    whole-file codec gets its input as one chunk of at most 64 MiB; a longer
    input is refused before anything is coded or written.
    """
    if codec.lossy:
        return _write_lossy(codec, src, dst, progress)
    chunk_size, batch_chunks = (MAX_CHUNK, 1) if codec.whole_file else (codec.chunk_size, codec.batch_chunks)
    _check_framing(chunk_size, batch_chunks)
    if codec.whole_file and size is not None and size > MAX_CHUNK:
        raise UnsupportedInputError(f"codec {codec.name} codes whole files of at most {_mib(MAX_CHUNK)}; "
                                    f"this input has {size} bytes")
    batches = _batches(src, codec, chunk_size, batch_chunks)
    first = next(batches, None)  # read before the header goes out: a refused input writes nothing
    head = _encode_header(codec, chunk_size, batch_chunks)
    dst.write(head)
    written = len(head)
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
        for batch in itertools.chain([first] if first else [], batches):
            budget, reported = sum(len(b) for b in batch), 0
            payloads = session.encode_chunks(batch)
            if len(payloads) != len(batch):
                raise ToolkitError(f"codec {codec.name} returned {len(payloads)} payloads for {len(batch)} chunks")
            for raw, payload in zip(batch, payloads, strict=True):
                if codec.chunk_fallback:
                    method, rec, payload = _smallest_record(raw, payload)
                elif payload is None or len(payload) > max_payload(len(raw)):
                    raise ToolkitError(f"codec {codec.name} gave no usable payload for chunk {count}")
                else:
                    method, rec = METHOD_CODEC, _record(METHOD_CODEC, len(raw), payload)
                dst.write(rec)
                dst.write(payload)
                written += len(rec) + len(payload)
                methods[METHOD_NAMES[method]] += 1
                sha.update(raw)
                total += len(raw)
                count += 1
            if progress and budget > reported:
                progress(budget - reported)
        session.finish()
    finally:
        session.close()
    if size is not None and total != size:
        raise ToolkitError(f"input changed while reading: expected {size} bytes, read {total}")
    end = varint(TAG_END) + sha.digest()[: digest_size(total)]
    dst.write(end)
    written += len(end)
    return {"codec": codec.name, "in_bytes": total, "out_bytes": written, "chunks": count,
            "methods": methods, "sha256": sha.hexdigest()}


def _write_lossy(codec: Codec, src: BinaryIO, dst: BinaryIO, progress: ProgressFn | None) -> dict:
    """A lossy codec reads its source itself; records carry the size of what each chunk decodes to,
    and the end digest is the SHA-256 of the payloads (the decoded output is not the input)."""
    _check_framing(codec.chunk_size, 1)
    session = codec.open_source(src)  # refuses input it cannot code before anything is written
    try:
        head = _encode_header(codec, codec.chunk_size, 1, session.header_fields())
        dst.write(head)
        written, total, count = len(head), 0, 0
        sha = hashlib.sha256()
        for raw_len, payload in session.payloads(progress):
            if not 1 <= raw_len <= codec.chunk_size or len(payload) > max_payload(raw_len):
                raise ToolkitError(f"codec {codec.name} gave an impossible chunk {count} ({raw_len} bytes)")
            rec = _record(METHOD_CODEC, raw_len, payload)
            dst.write(rec)
            dst.write(payload)
            written += len(rec) + len(payload)
            sha.update(payload)
            total += raw_len
            count += 1
        end = varint(TAG_END) + sha.digest()[: digest_size(total)]
        dst.write(end)
        written += len(end)
        notes = session.notes()
        return {"codec": codec.name, "in_bytes": session.bytes_read, "out_bytes": written, "chunks": count,
                "decoded_bytes": total, "methods": {"codec": count, "zstd": 0, "stored": 0},
                "sha256": sha.hexdigest(), **session.summary(), **({"hint": "; ".join(notes)} if notes else {})}
    finally:
        session.close()


# --------------------------------------------------------------------------- reading
def _codec_for(header: dict, local: dict[str, str] | None = None, allow_mismatch: bool = False) -> Codec:
    try:
        cls = get_codec(header["codec"])
    except UnknownCodecError as e:
        raise UnknownCodecError(f"file needs {e}") from None
    if header["codec_version"] != cls.version and header["codec_version"] not in cls.reads_versions:
        raise FormatError(
            f"file was written by {cls.name} codec version {header['codec_version']}, "
            f"this build has version {cls.version}"
        )
    codec = cls.from_header(header, local)
    recorded = header.get("env", {})
    if not isinstance(recorded, dict):
        raise FormatError("header field 'env' is not an object")
    # Files that record no environment (pc files before it was recorded) decode as
    # before; the content digest still turns any difference into an error.
    diff = environment_mismatch(recorded, codec.environment()) if recorded else []
    if diff:
        if not allow_mismatch:
            raise EnvironmentMismatchError(
                f"file was coded where {'; '.join(diff)}; this can change the {cls.name} codec's numbers"
                f"{codec.environment_note()} (decode anyway with --allow-mismatch: the SHA-256 check then decides)")
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
    digest: bytes


def _iter_records(src: BinaryIO, chunk_size: int, skip_payload: bool = False) -> Iterator[_Chunk | _End]:
    index = total = 0
    while True:
        if not (peek := src.read(1)):
            raise FormatError("truncated file: end record missing")
        tag = _read_varint(Prefixed(peek, src), f"chunk {index}")
        raw_len, method = tag >> 2, tag & 3
        if tag == TAG_END:
            digest = _read_exact(src, digest_size(total), "end record")
            if src.read(1):
                raise FormatError("unexpected data after the end record")
            yield _End(index, total, digest)
            return
        what = f"chunk {index}"
        if method == TAG_END:
            raise FormatError(f"bad record tag {tag} at chunk {index}")
        if not 1 <= raw_len <= chunk_size:
            raise FormatError(f"{what}: size {raw_len} outside 1..{chunk_size}")
        payload_len = raw_len if method == METHOD_STORED else _read_varint(src, what)
        limit = max_payload(raw_len) if method == METHOD_CODEC else raw_len - 1
        if method != METHOD_STORED and payload_len > limit:
            raise FormatError(f"{what}: payload length {payload_len} impossible for size {raw_len}")
        (crc,) = _CRC.unpack(_read_exact(src, _CRC.size, what))
        if skip_payload:
            payload = b""
            _skip(src, payload_len, index)
        else:
            payload = _read_exact(src, payload_len, what)
            if zlib.crc32(payload) != crc:
                raise ChecksumError(f"{what}: CRC mismatch (data damaged)")
        yield _Chunk(index, method, raw_len, payload)
        index += 1
        total += raw_len


class Prefixed(io.RawIOBase):
    """``head`` and then the rest of ``tail``: a record's first byte read to tell the end from EOF,
    or a sniffed sample put back in front of stdin."""

    def __init__(self, head: bytes, tail: BinaryIO):
        self.head, self.tail = head, tail

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        if self.head:
            if n < 0:
                out, self.head = self.head + self.tail.read(), b""
                return out
            out, self.head = self.head[:n], self.head[n:]
            return out
        return self.tail.read(n)


def _skip(src: BinaryIO, n: int, index: int) -> None:
    while n:
        b = src.read(min(n, 1 << 20))
        if not b:
            raise FormatError(f"truncated file: chunk {index} ends early")
        n -= len(b)


#: what coders raise on damaged payloads (range coders, zstd, lzma, parsers of side data). Anything
#: else, MemoryError and torch's allocator errors above all, is not damage and is not renamed.
_DAMAGE = (ValueError, IndexError, KeyError, AssertionError, OverflowError, EOFError, struct.error,
           zlib.error, lzma.LZMAError, zstandard.ZstdError)


def _is_damage(e: BaseException) -> bool:
    # constriction's Rust asserts surface as pyo3's PanicException, a BaseException subclass
    return isinstance(e, _DAMAGE) or type(e).__name__ == "PanicException"


def _decode_batch(session: DecodeSession, batch: list[_Chunk]) -> list[bytes]:
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
    except BaseException as e:
        if not _is_damage(e):
            raise
        raise FormatError(f"chunks {batch[0].index}..{batch[-1].index}: cannot decode ({e})") from e
    for c, data in zip(batch, out, strict=True):
        if len(data) != c.raw_len:
            raise ChecksumError(f"chunk {c.index}: decoded {len(data)} bytes, expected {c.raw_len}")
    return out


def _unfallback(c: _Chunk) -> bytes:
    if c.method == METHOD_STORED:
        return c.payload
    try:
        d = zstandard.ZstdDecompressor(format=zstandard.FORMAT_ZSTD1_MAGICLESS)
        data = d.decompress(c.payload, max_output_size=c.raw_len)
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
    # Writing and hashing a decoded batch runs in a second thread while the next batch decodes
    # (hashlib and file writes release the GIL): at most two batches are held.
    sha = hashlib.sha256()
    batch: list[_Chunk] = []
    pending: list[Future] = []

    def write(out: list[bytes]) -> None:
        for data in out:
            dst.write(data)
            if not codec.lossy:
                sha.update(data)
            if progress:
                progress(len(data))

    def flush(writer: ThreadPoolExecutor) -> None:
        out = _decode_batch(session, batch)
        batch.clear()
        if pending:
            pending.pop().result()
        pending.append(writer.submit(write, out))

    with ThreadPoolExecutor(max_workers=1) as writer:
        try:
            for rec in _iter_records(src, header["chunk_size"]):
                if isinstance(rec, _Chunk):
                    if rec.method != METHOD_CODEC and not codec.chunk_fallback:
                        raise FormatError(f"chunk {rec.index}: codec {codec.name} writes every chunk itself")
                    if codec.lossy:  # its digest is of the payloads: the output is not the input
                        sha.update(rec.payload)
                    batch.append(rec)
                    if len(batch) == header["batch_chunks"]:
                        flush(writer)
                else:
                    if batch:
                        flush(writer)
                    if pending:
                        pending.pop().result()
                    if sha.digest()[: len(rec.digest)] != rec.digest:
                        what = "coded chunks" if codec.lossy else "decoded data"
                        raise ChecksumError(f"SHA-256 of the {what} does not match (model or data differ)")
        finally:
            for f in pending:  # a failure above: let the write in flight end before the caller cleans up
                f.exception()
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
    """Walk the framing of a .tkz stream without decoding payloads (``sha256``: as much as the file keeps)."""
    counting = _Counting(src)
    header = _read_header(counting)
    info = FileInfo(header=header, methods={name: 0 for name in METHOD_NAMES.values()})
    for rec in _iter_records(counting, header["chunk_size"], skip_payload=True):
        if isinstance(rec, _Chunk):
            info.chunks += 1
            info.methods[METHOD_NAMES[rec.method]] += 1
        else:
            info.raw_bytes = rec.total
            info.sha256 = rec.digest.hex()
    info.file_bytes = counting.n
    return info
