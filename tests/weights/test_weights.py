"""Lossless weight coding: float planes, the lane ANS coder, segments, safetensors headers, the weights codec."""

import json
import os
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save

import toolkit
from toolkit.codecs.weights import WeightsCodec, WeightsConfig
from toolkit.entropy.lanes import TOTAL, decode_lanes, encode_lanes
from toolkit.entropy.tables import from_counts
from toolkit.errors import ConfigError, FormatError, ToolkitError, UnsupportedInputError
from toolkit.weights import planes as P
from toolkit.weights.checkpoint import parse_header
from toolkit.weights.coding import SegmentShape, decode_segment, encode_segment, plane_entropy

DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64}


def _weights(shape, dtype=torch.bfloat16, seed=0, scale=0.02):
    """A trained-like matrix: Gaussian values whose scale varies by row and by column."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.exp(torch.randn(shape[0], 1, generator=g) * 0.5)
    cols = torch.exp(torch.randn(1, int(np.prod(shape[1:])), generator=g) * 0.5)
    w = torch.randn(shape[0], int(np.prod(shape[1:])), generator=g) * rows * cols * scale
    return w.reshape(shape).to(dtype)


# ------------------------------------------------------------------ planes
@pytest.mark.parametrize("dtype", list(P.LAYOUTS))
def test_planes_split_and_join_every_bit_pattern(dtype):
    layout = P.layout_for(dtype)
    rng = np.random.default_rng(1)
    raw = rng.integers(0, 256, size=4096 * layout.nbytes, dtype=np.uint8)
    raw[: 2 * layout.nbytes] = 0xFF  # NaN patterns
    planes = P.byte_planes(raw, layout)
    assert len(planes) == layout.nbytes
    assert P.join_byte_planes(planes, layout).tobytes() == raw.tobytes()
    sym, rem = P.split_symbols(raw, layout)
    assert int(sym.max()) < 1 << layout.symbol_bits
    assert P.join_symbols(sym, rem, layout).tobytes() == raw.tobytes()
    full, low = layout.remainder_bits // 8, layout.remainder_bits % 8
    for n in (4096, 4093, 7, 1):  # the joiner takes eight values at a time, then the rest one by one
        planes = [((rem[:n] >> (layout.remainder_bits - 8 * (k + 1))) & 0xFF).astype(np.uint8) for k in range(full)]
        packed = P.pack_bits((rem[:n] & ((1 << low) - 1)).astype(np.uint8), low) if low else b""
        assert P.join_packed(sym[:n], planes, packed, layout).tobytes() == raw[:n * layout.nbytes].tobytes()


def test_bf16_exponent_is_the_first_plane():
    x = torch.tensor([1.0, 2.0, -0.5, 3.0e-3], dtype=torch.bfloat16)
    planes = P.byte_planes(x.view(torch.int16).numpy(), P.layout_for("BF16"))
    expected = (x.view(torch.int16).numpy().view(np.uint16) >> 7) & 0xFF
    assert (planes[0] == expected).all()
    assert (planes[1] & 1 == (x < 0).numpy()).all()  # the sign is the last bit after the rotation


@given(st.integers(1, 8), st.lists(st.integers(0, 255), max_size=200))
def test_pack_bits_round_trip(width, values):
    v = np.array(values, dtype=np.uint8) & ((1 << width) - 1)
    packed = P.pack_bits(v, width)
    assert len(packed) == (v.size * width + 7) // 8
    assert (P.unpack_bits(packed, width, v.size) == v).all()


# ------------------------------------------------------------------ lane ANS
def _tables(rng, k, a):
    return np.stack([from_counts(rng.integers(1, 1000, a), total_bits=12) for _ in range(k)])


@pytest.mark.parametrize("lanes", [1, 3, 64])
def test_lanes_round_trip_near_the_ideal_cost(lanes):
    rng = np.random.default_rng(2)
    freq = _tables(rng, 5, 17)
    ctx = rng.integers(0, 5, 50_000).astype(np.uint16)
    idx = np.array([rng.choice(17, p=freq[c] / TOTAL) for c in ctx[:2000]] * 25, dtype=np.uint16)
    ctx = np.tile(ctx[:2000], 25)
    data = encode_lanes(idx, ctx, freq, lanes)
    syms = np.tile(np.arange(17, dtype=np.uint16) + 100, (5, 1))
    assert (decode_lanes(data, ctx, freq, syms, lanes) == idx + 100).all()
    ideal = -np.log2(freq[ctx, idx] / TOTAL).sum() / 8
    assert len(data) < ideal * 1.002 + 8 * lanes


def test_lanes_report_damage_and_refuse_bad_tables():
    rng = np.random.default_rng(3)
    freq = _tables(rng, 2, 9)
    ctx = rng.integers(0, 2, 20_000).astype(np.uint16)
    idx = rng.integers(0, 9, 20_000).astype(np.uint16)
    data = encode_lanes(idx, ctx, freq, 8)
    syms = np.tile(np.arange(9, dtype=np.uint16), (2, 1))
    for cut in (data[:-2], data[:20], b""):
        with pytest.raises(FormatError):
            decode_lanes(cut, ctx, freq, syms, 8)
    bad = bytearray(data)
    bad[len(bad) // 2] ^= 0x5A
    with pytest.raises(FormatError):
        decode_lanes(bytes(bad), ctx, freq, syms, 8)
    with pytest.raises(ConfigError):
        encode_lanes(idx, ctx, freq[:, :5] * 0 + 1, 8)  # tables that do not sum to the total


# ------------------------------------------------------------------ segments
@pytest.mark.parametrize("level", ["fast", "max"])
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_segments_round_trip_bit_exact(level, dtype):
    w = _weights((96, 160), DTYPES[dtype])
    raw = w.contiguous().view(torch.uint8).numpy().tobytes()
    item = w.element_size()
    for start, count in ((0, w.numel()), (37, 5000), (160 * 3, 160 * 20), (5, 1)):
        part = raw[start * item:(start + count) * item]
        payload = encode_segment(part, dtype, SegmentShape(start, 160), level=level)
        assert decode_segment(payload, dtype, SegmentShape(start, 160), count).tobytes() == part


def test_special_values_survive():
    x = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1e-40, -1e-45, 3.4e38] * 700)
    for dtype in ("F32", "BF16", "F16"):
        t = x.to(DTYPES[dtype])
        raw = t.view(torch.uint8).numpy().tobytes()
        for level in ("fast", "max"):
            p = encode_segment(raw, dtype, SegmentShape(0, t.numel()), level=level)
            assert decode_segment(p, dtype, SegmentShape(0, t.numel()), t.numel()).tobytes() == raw


def test_max_beats_the_order0_bound_and_fast_stays_near_it():
    """Context coding goes below the per-plane entropy on weights whose scales vary by row and column."""
    w = _weights((512, 1024))
    raw = w.view(torch.int16).numpy()
    bound = sum(plane_entropy(raw, P.layout_for("BF16"))) / 16
    shape = SegmentShape(0, 1024)
    fast = len(encode_segment(raw.tobytes(), "BF16", shape, level="fast")) / raw.nbytes
    best = len(encode_segment(raw.tobytes(), "BF16", shape, level="max")) / raw.nbytes
    assert best < bound - 0.005
    assert fast < bound + 0.01


def test_damaged_segments_raise_format_errors():
    w = _weights((64, 128))
    raw = w.view(torch.uint8).numpy().tobytes()
    shape = SegmentShape(0, 128)
    rng = np.random.default_rng(4)
    for level in ("fast", "max"):
        payload = encode_segment(raw, "BF16", shape, level=level)
        for _ in range(60):
            bad = bytearray(payload)
            i = int(rng.integers(len(bad)))
            bad[i] ^= 1 << int(rng.integers(8))
            try:
                out = decode_segment(bytes(bad), "BF16", shape, w.numel())
            except FormatError:
                continue
            assert out.nbytes == len(raw)  # a flip the format cannot see still decodes to the right size
        with pytest.raises(FormatError):
            decode_segment(payload[:-3], "BF16", shape, w.numel())


# ------------------------------------------------------------------ safetensors headers
def _file(tensors: dict, metadata=None) -> bytes:
    return save(tensors, metadata=metadata)


def _forge(header: dict, body: bytes = b"\0" * 64) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + body


def test_header_parses_in_file_order():
    data = _file({"b": torch.zeros(3, 2), "a": torch.ones(4, dtype=torch.bfloat16)}, metadata={"k": "v"})
    h = parse_header(data, len(data))
    assert {t.name for t in h.tensors} == {"a", "b"}
    assert h.tensors[0].begin == h.size and h.tensors[0].end == h.tensors[1].begin  # file order, no gaps
    assert h.metadata == {"k": "v"}
    assert h.data_end == len(data)


@pytest.mark.parametrize("header, why", [
    ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 100]}}, "bytes for"),
    ({"w": {"dtype": "F32", "shape": [16], "data_offsets": [0, 64]},
      "v": {"dtype": "F32", "shape": [2], "data_offsets": [60, 68]}}, "overlaps"),
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}, "gap"),
    ({"w": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 8]}}, "unknown dtype"),
    ({"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 8]}}, "shape"),
    ({"w": {"dtype": "F32", "shape": [32], "data_offsets": [0, 128]}}, "file has"),
    ({"w": [1, 2]}, "exactly"),
    ({"__metadata__": {"a": 1}}, "__metadata__"),
])
def test_lying_headers_are_refused(header, why):
    data = _forge(header)
    with pytest.raises(UnsupportedInputError, match=why):
        parse_header(data, len(data))
    with pytest.raises(UnsupportedInputError):
        toolkit.compress(data, codec="weights")


def test_non_safetensors_inputs_are_refused():
    assert toolkit.decompress(toolkit.compress(b"", codec="weights")) == b""  # empty input: an empty file
    for data in (b"short", b"\xff" * 64, struct.pack("<Q", 10) + b"not json!!" + b"\0" * 8,
                 struct.pack("<Q", 1 << 40) + b"{}"):
        with pytest.raises(UnsupportedInputError):
            toolkit.compress(data, codec="weights")


# ------------------------------------------------------------------ the codec
def _model_file() -> bytes:
    tensors = {
        "embed.weight": _weights((300, 64), torch.bfloat16, seed=1),
        "layers.0.q.weight": _weights((64, 64), torch.bfloat16, seed=2),
        "layers.0.norm.weight": torch.ones(64, dtype=torch.bfloat16),
        "layers.0.f16": _weights((50, 40), torch.float16, seed=3),
        "layers.0.f32": _weights((33, 70), torch.float32, seed=4),
        "layers.0.f64": _weights((10, 7), torch.float64, seed=5),
        "step": torch.tensor([12345], dtype=torch.int64),
        "mask": torch.tensor([True, False, True]),
        "empty": torch.zeros(0, 4),
        "scalar": torch.tensor(1.5),
    }
    return _file(tensors, metadata={"format": "pt"})


@pytest.mark.parametrize("level", ["fast", "max"])
@pytest.mark.parametrize("chunk", [4 << 20, 4099, 257])
def test_codec_round_trips_byte_identical(level, chunk):
    """Chunk sizes that cut the header and values at odd places."""
    data = _model_file()
    codec = WeightsCodec(WeightsConfig(level=level))
    codec.chunk_size = chunk
    blob = toolkit.compress(data, codec=codec)
    assert toolkit.decompress(blob) == data
    if chunk > len(data):
        assert len(blob) < 0.8 * len(data)


def test_auto_picks_weights_for_safetensors():
    data = _model_file()
    assert toolkit.info(toolkit.compress(data))["header"]["codec"] == "weights"
    forged = _forge({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 100]}})
    assert toolkit.info(toolkit.compress(forged))["header"]["codec"] != "weights"  # a header that does not parse


def test_truncated_checkpoint_is_refused_and_trailing_bytes_too():
    data = _model_file()
    with pytest.raises(UnsupportedInputError, match="runs to byte"):
        toolkit.compress(data[:-10], codec="weights")
    with pytest.raises(UnsupportedInputError, match="after its data"):
        toolkit.compress(data + b"extra", codec="weights")


def test_damaged_tkz_gives_one_clear_error():
    data = _model_file()
    blob = toolkit.compress(data, codec="weights", level="max")
    rng = np.random.default_rng(5)
    for _ in range(40):
        bad = bytearray(blob)
        i = int(rng.integers(len(bad)))
        bad[i] ^= 1 << int(rng.integers(8))
        try:
            out = toolkit.decompress(bytes(bad))
        except ToolkitError:
            continue
        assert out == data  # never wrong output: the container's digest catches the rest
    for cut in (len(blob) // 3, len(blob) - 5):
        with pytest.raises(ToolkitError):
            toolkit.decompress(blob[:cut])


def test_cli_round_trip_in_a_fresh_process(tmp_path):
    src = tmp_path / "model.safetensors"
    src.write_bytes(_model_file())
    run = [sys.executable, "-m", "toolkit"]
    subprocess.run(run + ["compress", str(src), "--set", "level=max", "--codec", "weights"], check=True,
                   capture_output=True)
    out = tmp_path / "back.safetensors"
    subprocess.run(run + ["decompress", str(tmp_path / "model.safetensors.tkz"), "-o", str(out)], check=True,
                   capture_output=True)
    assert out.read_bytes() == src.read_bytes()


def test_bad_settings():
    with pytest.raises(ConfigError):
        WeightsConfig(level="best")
    with pytest.raises(ConfigError):
        WeightsConfig(zstd_level=40)


# ------------------------------------------------------------------ .npy, tar and the scanner
def _npy(array: np.ndarray) -> bytes:
    import io
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def _tar(members: dict[str, bytes], pax: bool = True) -> bytes:
    import io
    import tarfile
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT if pax else tarfile.USTAR_FORMAT) as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _npy_files() -> dict[str, bytes]:
    w = _weights((40, 96), torch.float32, seed=7).numpy()
    return {"c32.npy": _npy(w), "f64.npy": _npy(np.asfortranarray(w.astype(np.float64))),
            "f16.npy": _npy(w.astype(np.float16)), "ints.npy": _npy(np.arange(500)),
            "big-endian.npy": _npy(w.astype(">f4")), "scalar.npy": _npy(np.float32(3.5))}


def _scan(data: bytes, cuts: list[int]):
    from toolkit.weights.layout import Scanner
    s, spans, at = Scanner(), [], 0
    for n in cuts + [len(data)]:
        spans += s.feed(data[at:at + n])
        at += n
        if at >= len(data):
            break
    s.finish()
    return spans


@settings(deadline=None)
@given(st.lists(st.integers(1, 700), min_size=1, max_size=40))
def test_scanner_spans_cover_every_byte_however_the_file_is_cut(cuts):
    data = _tar({"m/a.safetensors": _model_file(), "m/" + "x" * 120 + ".npy": _npy_files()["c32.npy"],
                 "m/readme": b"text " * 50})
    spans = _scan(data, cuts)
    assert spans[0].begin == 0 and spans[-1].end == len(data)
    assert all(a.end == b.begin for a, b in zip(spans, spans[1:], strict=False))
    whole = {(s.dtype, s.first, s.row) for s in _scan(data, [len(data)]) if s.dtype}
    assert {(s.dtype, s.first, s.row) for s in spans if s.dtype} == whole
    assert len(whole) == 8  # the checkpoint's 7 float tensors with bytes (the empty one has none) and the .npy


def test_npy_rows_follow_the_memory_order():
    files = _npy_files()
    (c,) = [s for s in _scan(files["c32.npy"], []) if s.dtype]
    (f,) = [s for s in _scan(files["f64.npy"], []) if s.dtype]
    assert (c.dtype, c.row, c.end) == ("F32", 96, len(files["c32.npy"]))
    assert (f.dtype, f.row) == ("F64", 40)  # Fortran order: rows run along the first axis
    assert not [s for s in _scan(files["big-endian.npy"], []) if s.dtype]  # other bytes, still lossless


@pytest.mark.parametrize("level", ["fast", "max"])
@pytest.mark.parametrize("chunk", [4 << 20, 1000])
def test_npy_and_tar_round_trip_byte_identical(level, chunk):
    codec = WeightsCodec(WeightsConfig(level=level))
    codec.chunk_size = chunk
    files = _npy_files()
    for data in list(files.values()) + [_tar({**files, "model.safetensors": _model_file()}),
                                        _tar({"model.safetensors": _model_file()}, pax=False)]:
        assert toolkit.decompress(toolkit.compress(data, codec=codec)) == data
    archive = _tar({"shard-1.safetensors": _model_file(), "shard-2.safetensors": _model_file()})
    if chunk > len(archive):
        assert len(toolkit.compress(archive, codec=codec)) < 0.8 * len(archive)


def test_auto_picks_weights_for_float_npy_and_checkpoint_archives():
    files = _npy_files()
    pick = lambda data: toolkit.info(toolkit.compress(data))["header"]["codec"]  # noqa: E731
    assert pick(files["c32.npy"]) == "weights"
    assert pick(_tar({"model.safetensors": _model_file()})) == "weights"
    assert pick(files["ints.npy"]) != "weights"
    assert pick(_tar({"a.txt": b"hello world " * 400})) != "weights"


@pytest.mark.parametrize("data, why", [
    (_npy(np.zeros((4, 4), np.float32))[:-3], "runs to byte"),
    (_npy(np.zeros((4, 4), np.float32)) + b"x", "after its data"),
    (b"\x93NUMPY\x01\x00\x10\x00{'descr': 1}    \n", "exactly descr"),
    (b"\x93NUMPY\x01\x00\x10\x00__import__('os')\n", "literal"),
    (b"\x93NUMPY\x07\x00" + b"\0" * 8, "version"),
    (b"\x93NUMPY\x01\x00\x40\x00{'descr': '<f4', 'fortran_order': False, 'shape': (2,)}", "ends inside"),
])
def test_lying_npy_files_are_refused(data, why):
    with pytest.raises(UnsupportedInputError, match=why):
        toolkit.compress(data, codec="weights")


def test_damaged_members_of_an_archive_are_other_bytes():
    """Inside a tar, a member with a lying header is coded as it is (the archive is still valid)."""
    lying = _forge({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 100]}})
    data = _tar({"bad.safetensors": lying, "cut.npy": _npy_files()["c32.npy"][:300],
                 "good.safetensors": _model_file()})
    spans = _scan(data, [])
    assert sum(s.end - s.begin for s in spans if s.dtype) > 0.5 * len(_model_file())
    assert toolkit.decompress(toolkit.compress(data, codec="weights", level="max")) == data


def test_cli_compresses_a_directory_of_shards_as_tar(tmp_path):
    import tarfile
    shards = tmp_path / "ckpt"
    shards.mkdir()
    (shards / "model-00001.safetensors").write_bytes(_model_file())
    (shards / "weights.npy").write_bytes(_npy_files()["c32.npy"])
    (shards / "config.json").write_text('{"layers": 2}')
    run = [sys.executable, "-m", "toolkit"]
    done = subprocess.run(run + ["compress", str(shards)], check=True, capture_output=True, text=True)
    assert "codec weights" in done.stderr
    subprocess.run(run + ["decompress", str(tmp_path / "ckpt.tar.tkz")], check=True, capture_output=True)
    with tarfile.open(tmp_path / "ckpt.tar") as tf:
        tf.extractall(tmp_path / "out", filter="data")
    for f in shards.iterdir():
        assert (tmp_path / "out" / "ckpt" / f.name).read_bytes() == f.read_bytes()


@settings(deadline=None, max_examples=60)
@given(st.lists(st.tuples(st.integers(0, 1 << 30), st.integers(0, 255)), min_size=1, max_size=8),
       st.integers(64, 5000))
def test_scanner_survives_damaged_archives(flips, cut):
    """Damaged tar headers and member headers: spans still cover every byte, or one clear error."""
    data = bytearray(_tar({"a.safetensors": _model_file(), "b.npy": _npy_files()["f16.npy"]}))
    for at, value in flips:
        data[at % 3000] = value  # the headers sit in the first 3,000 bytes
    try:
        spans = _scan(bytes(data), [cut] * (len(data) // cut))
    except UnsupportedInputError:
        return
    assert spans[0].begin == 0 and spans[-1].end == len(data)
    assert all(a.end == b.begin for a, b in zip(spans, spans[1:], strict=False))


# ------------------------------------------------------------------ loading into models
def test_load_state_dict_gives_every_tensor_bit_for_bit(tmp_path):
    from safetensors.torch import load

    from toolkit.codecs.weights import load_state_dict

    data = _model_file()
    want = load(data)
    path = tmp_path / "m.safetensors.tkz"
    path.write_bytes(toolkit.compress(data, codec="weights", level="max"))
    got = load_state_dict(path)
    assert set(got) == set(want)
    for k, v in want.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape
        assert got[k].reshape(-1).view(torch.uint8).tolist() == v.reshape(-1).view(torch.uint8).tolist()  # every bit
    shards = _tar({"a.safetensors": _file({"x": _weights((20, 30))}), "b.safetensors": _file({"y": torch.ones(3)}),
                   "config.json": b"{}"})
    both = load_state_dict(toolkit.compress(shards, codec="weights"))
    assert set(both) == {"x", "y"} and torch.equal(both["y"], torch.ones(3))
    with pytest.raises(UnsupportedInputError, match="codec"):
        load_state_dict(toolkit.compress(b"plain text " * 50, codec="zstd"))
    from toolkit.weights import read_checkpoint

    plain = read_checkpoint(data)  # the library reads decoded bytes: read-only ones are copied once
    for k, v in want.items():
        assert torch.equal(plain[k].reshape(-1).view(torch.uint8), v.reshape(-1).view(torch.uint8))
    with pytest.raises(UnsupportedInputError, match="numpy.load"):
        read_checkpoint(_npy(np.zeros(3, np.float32)))
    with pytest.raises(UnsupportedInputError, match="two shards"):
        load_state_dict(toolkit.compress(_tar({"a.safetensors": _file({"x": torch.ones(2)}),
                                               "b.safetensors": _file({"x": torch.ones(2)})}), codec="weights"))


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    return LlamaForCausalLM(config).to(torch.bfloat16).eval()


@pytest.mark.parametrize("level", ["fast", "max"])
def test_weights_coded_in_memory_give_the_same_outputs(level):
    from toolkit.weights import InMemoryConfig, compress_weights_

    model = _tiny_llama()
    model.model.norm.weight.requires_grad_(False)
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        dense = model(ids).logits
        before = {k: v.clone() for k, v in model.state_dict().items()}
    grads = {n: p.requires_grad for n, p in model.named_parameters(remove_duplicate=False)}
    assert model.lm_head.weight is model.model.embed_tokens.weight
    coded = compress_weights_(model, InMemoryConfig(level=level))
    assert all(p.numel() == 0 for m, n, _ in coded.owners for p in [m._parameters[n]])  # nothing dense is left
    assert coded.coded_bytes < 0.8 * coded.dense_bytes
    with torch.no_grad():
        assert torch.equal(model(ids).logits, dense)
        out = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert out.shape == (2, 15)
    biggest = max(c.dense_bytes for c in coded.coded.values())
    assert biggest <= coded.peak_dense_bytes <= 3 * biggest  # one layer (or a few small ones) dense at a time
    assert all(p.numel() == 0 for m, n, _ in coded.owners for p in [m._parameters[n]])  # freed after the forward
    with pytest.raises(ConfigError, match="already"):
        compress_weights_(model)
    coded.remove()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied again, as it was
    assert {n: p.requires_grad for n, p in model.named_parameters(remove_duplicate=False)} == grads
    assert torch.equal(model(ids).logits, dense)
    coded.remove()  # a second remove does nothing
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_max_falls_back_to_fast_on_values_that_repeat():
    """A table of repeated values (log-probabilities, a quantized grid): LZ beats any order-0 context."""
    rng = np.random.default_rng(3)
    grid = torch.randn(64).to(torch.bfloat16)
    rows = grid[torch.from_numpy(rng.integers(0, 64, size=(16, 512)))]
    w = rows[torch.from_numpy(rng.integers(0, 16, size=256))].reshape(256, 512).contiguous()  # rows repeat
    raw = w.view(torch.uint16).numpy().tobytes()
    fast = encode_segment(raw, "BF16", SegmentShape(0, 512), level="fast")
    best = encode_segment(raw, "BF16", SegmentShape(0, 512), level="max")
    assert len(best) <= len(fast) and len(fast) < 0.2 * len(raw)
    assert decode_segment(best, "BF16", SegmentShape(0, 512), w.numel()).tobytes() == raw


def test_in_memory_settings_are_checked():
    from toolkit.weights import InMemoryConfig, compress_weights_

    with pytest.raises(ConfigError):
        InMemoryConfig(level="best")
    with pytest.raises(ConfigError):
        InMemoryConfig(min_values=0)
    with pytest.raises(ConfigError):
        compress_weights_(_tiny_llama(), {"level": "max"})


# ------------------------------------------------------------------ decoding on a device
def _segments(values: torch.Tensor, cuts: list[tuple[int, str]]) -> list[tuple[int, int, bytes]]:
    """``values`` coded as segments that start at each cut's value index, at its level."""
    from toolkit.weights.checkpoint import row_length

    dtype = {v: k for k, v in DTYPES.items()}[values.dtype]
    raw = values.reshape(-1).view(torch.uint8).numpy()
    item, row = values.element_size(), row_length(tuple(values.shape))
    ends = [c for c, _ in cuts[1:]] + [values.numel()]
    return [(v0, v1 - v0, encode_segment(raw[v0 * item:v1 * item], dtype, SegmentShape(v0, row), level=level))
            for (v0, level), v1 in zip(cuts, ends, strict=True)]


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_device_decoder_gives_the_cpu_decoders_values(dtype):
    """The device path (contexts, symbols and the join in torch) on the CPU, against the CPU decoder."""
    from toolkit.weights.coding import ContextSegment, read_segment
    from toolkit.weights.device import decode_on_device

    w = _weights((96, 512), DTYPES[dtype], seed=4)
    w.view(-1)[:5] = torch.tensor([float("nan"), float("inf"), -0.0, 1e-30, -3.5]).to(w.dtype)
    # a segment ending inside a row, a small one (coded fast), one starting inside a row
    segments = _segments(w, [(0, "max"), (30000, "max"), (33000, "max")])
    kinds = [type(read_segment(p, dtype, SegmentShape(v0, 512), n)) for v0, n, p in segments]
    assert kinds.count(ContextSegment) == 2
    got = decode_on_device(segments, dtype, tuple(w.shape), "cpu")
    assert got.dtype == w.dtype and got.shape == w.shape
    assert torch.equal(got.view(torch.uint8), w.view(torch.uint8))


_INTERPRETED = """
import numpy as np, torch
from toolkit.kernels import rans
from toolkit.weights.coding import SegmentShape, encode_segment
from toolkit.weights.device import decode_on_device

rans.decode_segments = rans.decode_segments_triton  # the kernel's path on CPU tensors, interpreted
g = torch.Generator().manual_seed(5)
w = (torch.randn(40, 130, generator=g) * torch.exp(torch.randn(40, 1, generator=g))).to(torch.bfloat16)
raw = w.reshape(-1).view(torch.uint8).numpy()
segments = [(0, 4500, encode_segment(raw[:9000], "BF16", SegmentShape(0, 130), level="max")),
            (4500, 700, encode_segment(raw[9000:], "BF16", SegmentShape(4500, 130), level="max"))]
got = decode_on_device(segments, "BF16", (40, 130), "cpu")
print("RESULT", torch.equal(got.view(torch.uint8), w.view(torch.uint8)))
"""


def test_device_decoder_runs_the_rans_kernel_under_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "-c", _INTERPRETED], capture_output=True, text=True, env=env, timeout=600)
    assert "RESULT True" in proc.stdout, proc.stderr[-4000:]


@pytest.mark.gpu
def test_coded_tensors_decode_on_cuda():
    from toolkit.weights import CodedTensor, InMemoryConfig, compress_weights_

    for dtype in DTYPES.values():
        w = _weights((1500, 1000), dtype, seed=2).cuda()  # two segments, the second starting inside a row
        coded = CodedTensor.encode(w, "max")
        got = coded.decode()
        assert got.is_cuda and torch.equal(got.view(torch.uint8), w.view(torch.uint8))
    model = _tiny_llama().cuda()
    ids = torch.randint(0, 256, (2, 12), device="cuda")
    with torch.no_grad():
        dense = model(ids).logits
        handle = compress_weights_(model, InMemoryConfig(level="max", min_values=1024))
        assert torch.equal(model(ids).logits, dense)
    handle.remove()
