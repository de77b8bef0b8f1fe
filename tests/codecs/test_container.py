import hashlib
import io
import json
import struct
import zlib
from pathlib import Path

import pytest
import tkz_tools
import zstandard

import toolkit
from toolkit.codecs import container
from toolkit.codecs.container import varint
from toolkit.codecs.registry import Codec, get_codec, list_codecs, register_codec
from toolkit.entropy.varint import read_varint
from toolkit.errors import ChecksumError, ConfigError, FormatError, UnknownCodecError, UnsupportedInputError

DATA = b"The quick brown fox jumps over the lazy dog. " * 300
SAMPLES = Path(toolkit.__file__).parent / "assets" / "samples"


@register_codec("test-json")
class JsonHeaderCodec(Codec):
    """A codec written by name with a JSON header (as the learned codecs are)."""

    def encode_chunks(self, chunks):
        return [zlib.compress(c, 9) for c in chunks]

    def decode_chunks(self, payloads, sizes, known):
        return [k if p is None else zlib.decompress(p) for p, k in zip(payloads, known, strict=True)]


def _named_header(header: dict, name: str = "test-json", version: int = 1, chunk_code: int = (1 << 5) | 20,
                  batch: int = 1) -> bytes:
    text = json.dumps(header).encode()
    return (container.MAGIC + bytes([2, 0, len(name)]) + name.encode() + varint(version) + varint(chunk_code)
            + varint(batch) + varint(len(text)) + text)


def _with_named_header(blob: bytes, header: dict, **kw) -> bytes:
    f = tkz_tools.parse(blob)
    return _named_header(header, **kw) + f.to_bytes()[len(f.head):]


def test_layout_matches_spec():
    blob = toolkit.compress(DATA, codec="zstd")
    # magic, version 2, zstd's id, chunk code of 8 MiB (1 << 23: 1 * 32 + 23), level 19
    assert blob[:8] == b"\x89TKZ\x02\x02" + bytes([55, 19])
    tag, n = read_varint(blob[8:])
    assert tag == 4 * len(DATA) + container.METHOD_CODEC
    plen, m = read_varint(blob[8 + n :])
    pos = 8 + n + m
    (crc,) = struct.unpack_from("<I", blob, pos)
    payload = blob[pos + 4 : pos + 4 + plen]
    assert zlib.crc32(payload) == crc and len(payload) == plen
    end = pos + 4 + plen
    assert blob[end] == container.TAG_END
    assert blob[end + 1 :] == hashlib.sha256(DATA).digest()[:4] and len(DATA) < container.SMALL_FILE
    big = b"".join(i.to_bytes(4, "little") for i in range(20000))  # 80000 bytes: the full SHA-256
    assert toolkit.compress(big, codec="store")[-32:] == hashlib.sha256(big).digest()


def test_named_codec_header_is_json():
    blob = toolkit.compress(DATA, codec="test-json")
    f = tkz_tools.parse(blob)
    assert f.head[5:16] == b"\x00\x09test-json"
    assert f.header["config"] == {} and f.header["codec_version"] == 1
    assert toolkit.decompress(blob) == DATA


@register_codec("test-whole")
class WholeFileCodec(Codec):
    """Needs its whole input at once, as the pc codec does."""

    whole_file = True
    seen: list[list[int]] = []

    def encode_chunks(self, chunks):
        WholeFileCodec.seen.append([len(c) for c in chunks])
        return [zlib.compress(c, 9) for c in chunks]

    def decode_chunks(self, payloads, sizes, known):
        return [k if p is None else zlib.decompress(p) for p, k in zip(payloads, known, strict=True)]


def test_whole_file_codec_gets_one_chunk_and_hears_the_limit_before_any_work(monkeypatch):
    data = DATA * 20
    codec = WholeFileCodec()
    codec.chunk_size = 1000  # ignored: the capability decides
    WholeFileCodec.seen.clear()
    out = io.BytesIO()
    container.write_stream(codec, io.BytesIO(data), out)
    assert WholeFileCodec.seen == [[len(data)]]
    assert toolkit.decompress(out.getvalue()) == data
    monkeypatch.setattr(container, "MAX_CHUNK", 1 << 16)
    for size in (len(data), None):  # known size, and a pipe
        WholeFileCodec.seen.clear()
        out = io.BytesIO()
        with pytest.raises(UnsupportedInputError, match="whole files of at most 0.0625 MiB"):
            container.write_stream(WholeFileCodec(), io.BytesIO(data), out, size=size)
        assert WholeFileCodec.seen == [] and out.getvalue() == b""


@register_codec("test-loose")
class LooseCodec(Codec):
    """Payloads smaller than the chunk, yet larger than a zstd frame of it."""

    chunk_size = 4000

    def encode_chunks(self, chunks):
        return [zlib.compress(c, 9) + bytes(len(c) // 2) for c in chunks]

    def decode_chunks(self, payloads, sizes, known):
        return [k if p is None else zlib.decompressobj().decompress(p) for p, k in zip(payloads, known, strict=True)]


def test_every_chunk_keeps_the_smallest_of_codec_zstd_and_raw():
    import os

    data = DATA + os.urandom(4000)
    info = toolkit.info(blob := toolkit.compress(data, codec="test-loose"))
    assert info["methods"] == {"codec": 0, "zstd": 4, "stored": 1}
    assert toolkit.decompress(blob) == data


@pytest.mark.parametrize("sample", ["noise.bin", "prose.txt", "code_sample.py", "weather.csv"])
def test_small_files_cost_a_few_bytes_over_zstd_19(sample):
    data = (SAMPLES / sample).read_bytes()
    rival = len(zstandard.ZstdCompressor(level=19).compress(data))
    sizes = {name: len(toolkit.compress(data, codec=name)) for name in ("store", "zstd", "xz")}
    assert min(sizes.values()) <= rival + 20, sizes  # magic, version, codec id, one chunk record, a short digest
    assert sizes["zstd"] <= rival + 20, sizes  # zstd's own frame header + the container's framing


def test_version_1_files_are_refused_with_a_reason():
    v1 = b"\x89TKZ\x01\x00" + struct.pack("<I", 2) + b"{}"
    with pytest.raises(FormatError, match="version-1 .tkz file"):
        toolkit.decompress(v1)


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
    for name, cls in list_codecs().items():
        if cls.lossy:  # its output is not its input: test_audio covers it
            continue
        kw = codec_settings.get(name, {})
        if name in ("pc", "kv", "weights"):  # structured inputs only (PNG, .npy, KV bitstreams, safetensors)
            with pytest.raises(UnsupportedInputError):
                toolkit.compress(noise, codec=name, **kw)
            continue
        blob = toolkit.compress(noise, codec=name, **kw)
        header_extra = len(toolkit.compress(b"", codec=name, **kw)) - len(toolkit.compress(b"", codec="store"))
        chunks = toolkit.info(blob)["chunks"]
        assert len(blob) <= len(store) + header_extra + 14 * chunks, name
        assert toolkit.decompress(blob) == noise
    assert toolkit.info(toolkit.compress(noise, codec="test-json"))["methods"]["stored"] == 1


def test_unknown_codec_in_header():
    blob = toolkit.compress(DATA, codec="test-json")
    with pytest.raises(UnknownCodecError, match="nonesuch"):
        toolkit.decompress(_with_named_header(blob, {"config": {}}, name="nonesuch"))
    with pytest.raises(FormatError, match="codec id 9"):
        toolkit.decompress(b"\x89TKZ\x02\x09" + blob[6:])


@pytest.mark.parametrize(
    "header,kw,exc",
    [
        ({"config": {}}, dict(version=99), FormatError),
        ({"config": {}}, dict(chunk_code=1 << 40), FormatError),
        ({"config": {}}, dict(chunk_code=(1 << 5) | 27), FormatError),
        ({"config": {}}, dict(batch=10**9), FormatError),
        ({}, {}, FormatError),
        ([], {}, FormatError),
        ({"config": {"bogus": 1}}, {}, ConfigError),
    ],
)
def test_absurd_headers(header, kw, exc):
    blob = toolkit.compress(DATA, codec="test-json")
    with pytest.raises(exc):
        toolkit.decompress(_with_named_header(blob, header, **kw))


def test_absurd_classic_settings():
    blob = bytearray(toolkit.compress(DATA, codec="zstd"))
    blob[7] = 99  # level 99
    with pytest.raises(ConfigError, match="level"):
        toolkit.decompress(bytes(blob))
    blob = bytearray(toolkit.compress(DATA, codec="xz"))
    blob[8] = 7  # extreme = 7
    with pytest.raises(FormatError, match="not 0 or 1"):
        toolkit.decompress(bytes(blob))


def test_huge_lengths_are_rejected_before_allocation():
    # a JSON header of 2**40 bytes
    bad = container.MAGIC + b"\x02\x00\x09test-json" + varint(1) + varint(52) + varint(1) + varint(1 << 40) + b"{}"
    with pytest.raises(FormatError, match="header length"):
        toolkit.decompress(bad)
    # a chunk claiming a payload far larger than its size
    blob = toolkit.compress(DATA, codec="zstd")
    bad = blob[:8] + varint(4 * len(DATA)) + varint(1 << 40) + blob[8 + 6 :]
    with pytest.raises(FormatError, match="chunk 0"):
        toolkit.decompress(bad)


@pytest.mark.parametrize("blob,msg", [
    (b"", "empty"),
    (b"PK\x03\x04 not ours", "bad magic"),
    (b"\x89TK", "truncated"),
    (b"\x89TKZ\x07\x00\x00\x00\x00\x00", "version"),
    (b"\x89TKZ\x02\x00\x01x\x01\x34\x01\x03abc", "JSON"),
    (b"\x89TKZ\x02\x00\x01x\x01\x34\x01\x02[]", "object"),
    (b"\x89TKZ\x02\x02\x37", "truncated"),
])
def test_foreign_and_broken_prefixes(blob, msg):
    with pytest.raises(FormatError, match=msg):
        toolkit.decompress(blob)


def test_crc_names_the_chunk():
    codec = get_codec("store")()
    codec.chunk_size = 1000
    out = io.BytesIO()
    container.write_stream(codec, io.BytesIO(DATA), out)
    f = tkz_tools.parse(out.getvalue())
    rec0 = len(container._record(0, 1000, f.records[0].payload)) + 1000
    rec1_head = len(container._record(0, 1000, f.records[1].payload))
    blob = bytearray(out.getvalue())
    blob[len(f.head) + rec0 + rec1_head + 10] ^= 0x40  # inside chunk 1's payload
    with pytest.raises(ChecksumError, match="chunk 1"):
        toolkit.decompress(bytes(blob))


def test_trailing_garbage_and_missing_end():
    blob = toolkit.compress(DATA, codec="zstd")
    with pytest.raises(FormatError, match="after the end"):
        toolkit.decompress(blob + b"x")
    with pytest.raises(FormatError, match="truncated"):
        toolkit.decompress(blob[:-5])
    with pytest.raises(FormatError, match="truncated"):
        toolkit.decompress(blob[:-2])


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


def test_auto_picks_by_cheap_statistics(monkeypatch):
    import os

    from toolkit.codecs import auto

    _no_model_loads(monkeypatch)
    choice = auto.choose_codec(os.urandom(5000), size=5000)
    assert choice.codec == "store" and "binary" in choice.reason
    # long text: the smaller classic codec, exactly, and a hint saying how to ask for lm
    sizes = {name: len(toolkit.compress(DATA, codec=name)) for name in ("zstd", "xz")}
    choice = auto.choose_codec(DATA, size=20_000_000)
    assert choice.codec == min(sizes, key=sizes.get)
    assert "--best" in choice.hint and "min" in choice.reason
    assert auto.choose_codec(DATA, size=None).hint  # a pipe: length unknown, no lm
    png = (SAMPLES.parent / "pc-patch").exists() and b"\x89PNG\r\n\x1a\n" + bytes(100)
    assert auto.choose_codec(png, size=108).codec == "pc"
    assert auto.choose_codec(b"\x93NUMPY" + bytes(100), size=106).hint.startswith("for records")
    assert auto.choose_codec(b"", size=0).codec == "store"


def _no_model_loads(monkeypatch):
    from toolkit.codecs.lm import LMCodec

    def refuse(self):
        raise AssertionError("auto loaded a model where the cheap test decides")

    monkeypatch.setattr(LMCodec, "coding_model", property(refuse))


def test_auto_decides_lm_from_classic_sizes_without_a_model(monkeypatch):
    from toolkit.codecs import auto

    _no_model_loads(monkeypatch)
    prose = (SAMPLES / "prose.txt").read_bytes()
    assert auto.choose_codec(prose, size=len(prose)).codec == "lm"
    long = 10 * auto.LM_BYTES_PER_S * auto.LM_BUDGET_S
    assert auto.choose_codec(prose, size=long).codec != "lm"
    assert auto.choose_codec(prose, size=long, best=True).codec == "lm"
    assert auto.choose_codec(DATA, size=len(DATA)).codec != "lm"  # one sentence repeated
    # text so repetitive that xz needs under LM_MIN_BPB bits/byte: the classic pick, with a hint
    repetitive = b"2026-12-04 10:00:00 ok\n" * 400
    choice = auto.choose_codec(repetitive, size=len(repetitive))
    assert choice.codec in {"zstd", "xz"} and "--codec lm" in choice.hint


def test_auto_falls_back_where_pc_refuses_a_png():
    bad_png = b"\x89PNG\r\n\x1a\n" + b"not really a png " * 50
    blob = toolkit.compress(bad_png)
    assert toolkit.info(blob)["header"]["codec"] in {"zstd", "xz", "store"}
    assert toolkit.decompress(blob) == bad_png


def test_bytes_only_and_info_takes_a_path(tmp_path):
    with pytest.raises(UnsupportedInputError, match="encode the text first"):
        toolkit.compress("some text")
    with pytest.raises(UnsupportedInputError, match="not int"):
        toolkit.decompress(5)
    blob = toolkit.compress(DATA, codec="zstd")
    (tmp_path / "d.tkz").write_bytes(blob)
    assert toolkit.info(tmp_path / "d.tkz") == toolkit.info(str(tmp_path / "d.tkz")) == toolkit.info(blob)
    with pytest.raises(toolkit.ToolkitError, match="no such file"):
        toolkit.info(tmp_path / "missing.tkz")


def test_info_walks_framing_without_decoding():
    blob = toolkit.compress(DATA, codec="xz")
    data = toolkit.info(blob)
    assert data["raw_bytes"] == len(DATA) and data["file_bytes"] == len(blob)
    assert data["header"]["config"] == {"preset": 9, "extreme": True}


class PanicException(BaseException):
    """Stands in for pyo3's PanicException (constriction's Rust asserts): a BaseException, by name."""


@pytest.mark.parametrize("raised,expected", [
    (AssertionError("invalid compressed data"), FormatError),
    (PanicException("range decoder"), FormatError),
    (struct.error("unpack requires a buffer"), FormatError),
    (MemoryError(), MemoryError),
    (TypeError("a bug, not damage"), TypeError),
    (RuntimeError("DefaultCPUAllocator: can't allocate memory"), RuntimeError),
])
def test_only_damage_becomes_cannot_decode(monkeypatch, raised, expected):
    blob = toolkit.compress(DATA, codec="test-json")

    def fail(self, payloads, sizes, known):
        raise raised

    monkeypatch.setattr(JsonHeaderCodec, "decode_chunks", fail)
    with pytest.raises(expected) as info:
        toolkit.decompress(blob)
    assert (expected is FormatError) == ("cannot decode" in str(info.value))
