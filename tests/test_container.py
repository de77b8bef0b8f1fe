import io
import json
import struct
import zlib

import pytest

import toolkit
from toolkit.codecs import container
from toolkit.codecs.registry import Codec, get_codec, list_codecs, register_codec
from toolkit.errors import ChecksumError, ConfigError, FormatError, UnknownCodecError, UnsupportedInputError

DATA = b"The quick brown fox jumps over the lazy dog. " * 300


def _header_of(blob: bytes) -> tuple[dict, int]:
    _, _, _, n = struct.unpack_from("<4sBBI", blob)
    return json.loads(blob[10 : 10 + n]), 10 + n


def _with_header(blob: bytes, header: dict) -> bytes:
    _, end = _header_of(blob)
    h = json.dumps(header).encode()
    return container.MAGIC + bytes([container.FORMAT_VERSION, 0]) + struct.pack("<I", len(h)) + h + blob[end:]


def test_layout_matches_spec():
    blob = toolkit.compress(DATA, codec="zstd")
    assert blob[:4] == b"\x89TKZ" and blob[4] == 1 and blob[5] == 0
    header, pos = _header_of(blob)
    assert header["codec"] == "zstd" and header["size"] == len(DATA)
    assert blob[pos : pos + 1] == b"C"
    method, raw_len, plen, crc = struct.unpack_from("<BIII", blob, pos + 1)
    assert method == 0 and raw_len == len(DATA)
    payload = blob[pos + 14 : pos + 14 + plen]
    assert zlib.crc32(payload) == crc
    end = pos + 14 + plen
    assert blob[end : end + 1] == b"E"
    count, total, digest = struct.unpack_from("<IQ32s", blob, end + 1)
    assert (count, total) == (1, len(DATA))
    assert len(blob) == end + 1 + 44 + 4


def test_multi_chunk_and_empty():
    codec = get_codec("zstd")()
    codec.chunk_size = 1000
    out = io.BytesIO()
    summary = container.write_stream(codec, io.BytesIO(DATA), out, size=len(DATA))
    assert summary["chunks"] == -(-len(DATA) // 1000)
    assert toolkit.decompress(out.getvalue()) == DATA
    empty = toolkit.compress(b"", codec="xz")
    assert toolkit.decompress(empty) == b""
    assert toolkit.info(empty)["chunks"] == 0


def test_incompressible_chunk_is_stored_not_grown(codec_settings):
    import os

    noise = os.urandom(50000)
    store = toolkit.compress(noise, codec="store")
    for name in list_codecs():
        kw = codec_settings.get(name, {})
        if name == "pc":  # codes PNG / .npy only and refuses other bytes (tests/test_pc_codec.py)
            with pytest.raises(UnsupportedInputError):
                toolkit.compress(noise, codec=name, **kw)
            continue
        blob = toolkit.compress(noise, codec=name, **kw)
        header_extra = len(toolkit.compress(b"", codec=name, **kw)) - len(toolkit.compress(b"", codec="store"))
        chunks = toolkit.info(blob)["chunks"]
        assert len(blob) <= len(store) + header_extra + 14 * chunks, name
        assert toolkit.decompress(blob) == noise
    assert toolkit.info(toolkit.compress(noise, codec="xz"))["methods"]["stored"] == 1


def test_unknown_codec_in_header():
    blob = toolkit.compress(DATA, codec="zstd")
    header, _ = _header_of(blob)
    header["codec"] = "nonesuch"
    with pytest.raises(UnknownCodecError, match="nonesuch"):
        toolkit.decompress(_with_header(blob, header))


@pytest.mark.parametrize(
    "mutate,exc",
    [
        (lambda h: h.update(codec_version=99), FormatError),
        (lambda h: h.update(chunk_size=1 << 40), FormatError),
        (lambda h: h.update(batch_chunks=10**9), FormatError),
        (lambda h: h.pop("config"), FormatError),
        (lambda h: h.update(config={"level": 99}), ConfigError),
        (lambda h: h.update(config={"bogus": 1}), ConfigError),
        (lambda h: h.update(size=5), FormatError),
    ],
)
def test_absurd_headers(mutate, exc):
    blob = toolkit.compress(DATA, codec="zstd")
    header, _ = _header_of(blob)
    mutate(header)
    with pytest.raises(exc):
        toolkit.decompress(_with_header(blob, header))


def test_huge_lengths_are_rejected_before_allocation():
    blob = toolkit.compress(DATA, codec="zstd")
    # header length of 4 GiB
    bad = blob[:6] + struct.pack("<I", 0xFFFFFFFF) + blob[10:]
    with pytest.raises(FormatError, match="header length"):
        toolkit.decompress(bad)
    # a chunk claiming a 4 GiB payload
    _, pos = _header_of(blob)
    bad = bytearray(blob)
    struct.pack_into("<I", bad, pos + 6, 0xFFFFFFF0)
    with pytest.raises(FormatError, match="chunk 0"):
        toolkit.decompress(bytes(bad))


@pytest.mark.parametrize("blob,msg", [
    (b"", "empty"),
    (b"PK\x03\x04 not ours", "bad magic"),
    (b"\x89TK", "truncated"),
    (b"\x89TKZ\x07\x00\x00\x00\x00\x00", "version"),
    (b"\x89TKZ\x01\x00\x03\x00\x00\x00abc", "JSON"),
    (b"\x89TKZ\x01\x00\x02\x00\x00\x00[]", "object"),
])
def test_foreign_and_broken_prefixes(blob, msg):
    with pytest.raises(FormatError, match=msg):
        toolkit.decompress(blob)


def test_crc_names_the_chunk():
    codec = get_codec("store")()
    codec.chunk_size = 1000
    out = io.BytesIO()
    container.write_stream(codec, io.BytesIO(DATA), out)
    blob = bytearray(out.getvalue())
    _, pos = _header_of(bytes(blob))
    blob[pos + 14 + 1000 + 14 + 10] ^= 0x40  # inside chunk 1's payload
    with pytest.raises(ChecksumError, match="chunk 1"):
        toolkit.decompress(bytes(blob))


def test_trailing_garbage_and_missing_end():
    blob = toolkit.compress(DATA, codec="zstd")
    with pytest.raises(FormatError, match="after the end"):
        toolkit.decompress(blob + b"x")
    with pytest.raises(FormatError, match="truncated"):
        toolkit.decompress(blob[:-48])


def test_duplicate_registration_is_an_error():
    with pytest.raises(ValueError, match="already registered"):
        register_codec("zstd")(type("Other", (Codec,), {}))


def test_settings_are_typed_and_checked():
    assert toolkit.decompress(toolkit.compress(DATA, codec="zstd", level=3)) == DATA
    with pytest.raises(ConfigError):
        toolkit.compress(DATA, codec="zstd", level="high")
    with pytest.raises(ConfigError, match="unknown setting"):
        toolkit.compress(DATA, codec="xz", nonsense=1)
    with pytest.raises(UnknownCodecError):
        toolkit.compress(DATA, codec="nope")


def test_auto_picks_by_estimate():
    import os

    from toolkit.api import choose_codec

    assert choose_codec(os.urandom(5000)) == "store"
    assert choose_codec(DATA) in {"zstd", "xz"} | set(list_codecs())


def test_info_walks_framing_without_decoding():
    blob = toolkit.compress(DATA, codec="xz")
    data = toolkit.info(blob)
    assert data["raw_bytes"] == len(DATA) and data["file_bytes"] == len(blob)
    assert data["header"]["config"] == {"preset": 9, "extreme": True}
