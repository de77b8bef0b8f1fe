"""Damaged pc payloads fed straight to a decoder session: only ToolkitError subclasses come out.

A seeded loop (reproducible, and fast enough to run every time) mutates real
payloads, a dataset-mode one and grey and RGB image ones, with bit flips,
truncation, inserted bytes and forged length, count and shape fields (inside
the zstd-compressed PNG layout too), and decodes each with
``codec.open_decoder().decode_chunks([mutated], [size], [None])``. A case
may decode (the container's digest catches wrong output), but then to the
chunk's size; anything but a :class:`ToolkitError` fails the test, and so
does a case that runs long (the inputs are tiny, so honest work is quick).
"""

from __future__ import annotations

import io
import random
import signal
import struct
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zstandard

from toolkit.codecs.pc import PCCodec, PCConfig
from toolkit.errors import ToolkitError
from toolkit.formats import encode_png

torch.set_num_threads(1)

DATA = Path(__file__).parents[1] / "data" / "pc"
_STREAM = struct.Struct("<3sBBBIHHI")  # the record stream's header (toolkit/circuits/coder.py)
_LAYOUT = struct.Struct("<IIBBBBbI")  # the PNG layout's fixed fields (toolkit/formats/png.py)
#: one case may take this long before it counts as a hang
CASE_SECONDS = 3.0
_EDGES = (0, 1, 2, 3, 255, 256, 65535, 65536, 2**31 - 1, 2**31, 2**32 - 1)


def _u32(rng: random.Random) -> int:
    return rng.choice(_EDGES) if rng.random() < 0.7 else rng.getrandbits(32)


def _poke(data: bytes, offset: int, fmt: str, value: int) -> bytes:
    size = struct.calcsize(fmt)
    if offset + size > len(data):
        return data
    mask = (1 << (8 * size)) - 1
    return data[:offset] + struct.pack(fmt, value & mask) + data[offset + size :]


def _forge_layout(payload: bytes, rng: random.Random) -> bytes:
    """Rewrite one field of an image payload's PNG layout, re-compressed so zstd accepts it."""
    (n,) = struct.unpack_from("<I", payload, 1)
    layout = zstandard.ZstdDecompressor().decompress(payload[5 : 5 + n])
    field = rng.randrange(9)
    if field < 8:  # height, width, channels, level, memLevel, strategy, wbits, IDAT count
        offsets = (0, 4, 8, 9, 10, 11, 12, 13)
        fmt = "<I" if field in (0, 1, 7) else "<B"  # wbits is signed; any byte will do
        layout = _poke(layout, offsets[field], fmt, _u32(rng))
    else:  # one IDAT length
        count = _LAYOUT.unpack_from(layout)[7]
        layout = _poke(layout, _LAYOUT.size + 4 * rng.randrange(max(count, 1)), "<I", _u32(rng))
    z = zstandard.ZstdCompressor(level=1).compress(layout)
    return payload[:1] + struct.pack("<I", len(z)) + z + payload[5 + n :]


def _forge_npy_shape(payload: bytes, rng: random.Random) -> bytes:
    """Replace a dataset payload's .npy shape with other (large, negative, empty) dimensions."""
    (n,) = struct.unpack_from("<I", payload, 1)
    head = payload[5 : 5 + n].decode("latin1")
    dims = [rng.choice([0, 1, 36, -1, 2**31, 2**32 + 1, 2**63, rng.randrange(100)]) for _ in range(rng.randrange(4))]
    shape = "(" + "".join(f"{d}, " for d in dims) + ")"
    a, b = head.index("'shape': ") + 9, head.index(")") + 1
    text = head[10:a] + shape + head[b:].rstrip() + "\n"
    text = text[: text.rindex("}") + 1] + " " * (-(10 + len(text)) % 64) + "\n"
    new = b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text.encode("latin1")
    return b"N" + struct.pack("<I", len(new)) + new + payload[5 + n :]


def _mutate(payload: bytes, rng: random.Random) -> bytes:
    kind = rng.randrange(7)
    if kind == 0:  # bit flips
        out = bytearray(payload)
        for _ in range(rng.randrange(1, 4)):
            out[rng.randrange(len(out))] ^= 1 << rng.randrange(8)
        return bytes(out)
    if kind == 1:  # truncation
        return payload[: rng.randrange(len(payload))]
    if kind == 2:  # inserted bytes
        i = rng.randrange(len(payload) + 1)
        return payload[:i] + rng.randbytes(rng.randrange(1, 9)) + payload[i:]
    if kind == 3:  # the side-data length
        return _poke(payload, 1, "<I", _u32(rng))
    (n,) = struct.unpack_from("<I", payload, 1)
    stream = 5 + n
    if kind == 4:  # a record-stream header field: method, total bits, count, variables, categories, batch
        offset, fmt = rng.choice([(4, "<B"), (5, "<B"), (6, "<I"), (10, "<H"), (12, "<H"), (14, "<I")])
        return _poke(payload, stream + offset, fmt, _u32(rng))
    if kind == 5:  # one batch length
        return _poke(payload, stream + _STREAM.size + 4 * rng.randrange(4), "<I", _u32(rng))
    return _forge_layout(payload, rng) if payload[:1] == b"I" else _forge_npy_shape(payload, rng)


def _alarm(*_):
    raise TimeoutError(f"a damaged payload kept the decoder busy for {CASE_SECONDS} s")


def _npy_bytes() -> bytes:
    x = np.load(DATA / "records.npy", allow_pickle=False)[:12]
    buf = io.BytesIO()
    np.save(buf, x, allow_pickle=False)
    return buf.getvalue()


def _tiny_photo(colour: bool) -> bytes:
    rng = np.random.default_rng(4)
    y, x = np.mgrid[0:11, 0:13]
    base = 100 + 5 * x + 3 * y
    planes = [base + 20 * c + rng.integers(0, 4, base.shape) for c in range(3 if colour else 1)]
    px = np.stack(planes, -1).astype(np.uint8)
    return encode_png(px if colour else px[..., 0])


@pytest.mark.parametrize("mode, cases", [("npy", 160), ("grey", 70), ("rgb", 70)])
@pytest.mark.slow
def test_damaged_payloads_raise_only_toolkit_errors(mode, cases):
    if mode == "npy":
        codec, data = PCCodec(PCConfig(model=str(DATA / "circuit"), batch=5)), _npy_bytes()
    else:
        codec, data = PCCodec(PCConfig(batch=3)), _tiny_photo(mode == "rgb")
    (payload,) = codec.open_encoder().encode_chunks([data])
    rng = random.Random(f"pc-fuzz-{mode}")
    old = signal.signal(signal.SIGALRM, _alarm)
    outcomes = {"refused": 0, "decoded": 0}
    try:
        for i in range(cases):
            bad = _mutate(payload, rng)
            size = len(data) if rng.random() < 0.8 else rng.randrange(2 * len(data) + 100)
            signal.setitimer(signal.ITIMER_REAL, CASE_SECONDS)
            t = time.perf_counter()
            try:
                out = codec.open_decoder().decode_chunks([bad], [size], [None])
            except ToolkitError:
                outcomes["refused"] += 1
            else:
                assert len(out) == 1 and len(out[0]) == size, f"case {i}: wrong output size"
                outcomes["decoded"] += 1
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            assert time.perf_counter() - t < CASE_SECONDS, f"case {i} took too long"
    finally:
        signal.signal(signal.SIGALRM, old)
    assert outcomes["refused"] > cases // 2, outcomes  # most damage is found, not decoded to garbage
