"""Forged pc payloads and inputs: small files claiming huge shapes fail fast with one clear error.

Each case once ran for hours (a shape whose element count wrapped in int64,
a layout claiming a 16384x16384 image, a stream of empty batches), raised a
bare ValueError or MemoryError, or allocated what a size field said. Now
every count is checked with exact integers against the model and the
payload before any work. A watchdog turns a regression into a failure
rather than a hang.
"""

from __future__ import annotations

import contextlib
import math
import signal
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import zstandard

from toolkit.circuits import Circuit, encode_records
from toolkit.codecs.pc import PCCodec, PCConfig
from toolkit.errors import FormatError, UnsupportedInputError

torch.set_num_threads(1)

CIRCUIT = Path(__file__).parents[1] / "data" / "pc" / "circuit"  # 36 variables, 5 categories
_STREAM = struct.Struct("<3sBBBIHHI")  # the record stream's header (toolkit/circuits/coder.py)


@contextlib.contextmanager
def _watchdog(seconds: float = 5.0):
    """Fail (TimeoutError) instead of hanging; and the case must be fast anyway."""

    def bark(*_):
        raise TimeoutError(f"still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, bark)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    t = time.perf_counter()
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert time.perf_counter() - t < seconds


def _npy_head(shape: str) -> bytes:
    """A version-1 uint8 .npy header with any shape text, padded as numpy pads it."""
    text = f"{{'descr': '|u1', 'fortran_order': False, 'shape': {shape}, }}"
    text += " " * (-(10 + len(text) + 1) % 64) + "\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text.encode("latin1")


def _empty_batches_stream(count: int, d: int, k: int, batch: int = 1 << 16, word_bytes: int = 4) -> bytes:
    """A record stream claiming ``count`` records whose batches hold (almost) nothing."""
    nb = math.ceil(count / batch)
    return (_STREAM.pack(b"PCR", 1, 2, 24, count, d, k, batch) + struct.pack(f"<{nb}I", *[word_bytes] * nb)
            + bytes(word_bytes * nb))


def _decode(codec: PCCodec, payload: bytes, size: int) -> None:
    codec.open_decoder().decode_chunks([payload], [size], [None])


@pytest.fixture(scope="module")
def dataset_codec() -> PCCodec:
    return PCCodec(PCConfig(model=str(CIRCUIT)))


@pytest.fixture(scope="module")
def image_codec() -> PCCodec:
    return PCCodec(PCConfig())


def test_shape_whose_element_count_wraps_int64(dataset_codec):
    # 2**31 * 2**33 == 2**64 wraps to 0 in int64: "no data bytes", consistent with a header-only chunk
    head = _npy_head("(2147483648, 8589934592)")
    payload = b"N" + struct.pack("<I", len(head)) + head + _empty_batches_stream(2**31, 36, 5)
    with _watchdog(), pytest.raises(FormatError):
        _decode(dataset_codec, payload, len(head))


def test_record_width_not_the_circuits(dataset_codec):
    head = _npy_head("(2, 18)")  # 36 bytes, as two 36-value records would be, but records of 18
    stream = encode_records(Circuit.load(CIRCUIT), np.zeros((2, 36), np.uint8))
    payload = b"N" + struct.pack("<I", len(head)) + head + stream
    with _watchdog(), pytest.raises(FormatError):
        _decode(dataset_codec, payload, len(head) + 36)


def _layout(h: int, w: int, idat: list[int], prefix: bytes) -> bytes:
    return (struct.pack("<IIBBBBbI", h, w, 1, 6, 8, 0, 15, len(idat)) + struct.pack(f"<{len(idat)}I", *idat)
            + bytes(h) + struct.pack("<I", len(prefix)) + prefix + struct.pack("<I", 0))


def test_layout_claiming_a_huge_image(image_codec):
    # A 16384x16384 grey image from 10 bytes of image data (deflate cannot expand that far),
    # with a 1 MiB prefix so the file size allows it: a zero prefix zstd-compresses to nothing.
    prefix = bytes(1 << 20)
    layout = zstandard.ZstdCompressor(level=19).compress(_layout(16384, 16384, [10], prefix))
    size = len(prefix) + 12 + 10
    payload = b"I" + struct.pack("<I", len(layout)) + layout + _empty_batches_stream(2048 * 2048, 64, 256)
    with _watchdog(), pytest.raises(FormatError):
        _decode(image_codec, payload, size)


def test_layout_whose_file_size_is_not_the_chunks(image_codec):
    layout = zstandard.ZstdCompressor(level=19).compress(_layout(4096, 4096, [1 << 16], b""))
    payload = b"I" + struct.pack("<I", len(layout)) + layout + _empty_batches_stream(512 * 512, 64, 256)
    with _watchdog(), pytest.raises(FormatError):
        _decode(image_codec, payload, 1 << 20)


def test_layout_frame_declaring_a_terabyte(image_codec):
    body = b"xyz"
    frame = (b"\x28\xb5\x2f\xfd" + bytes([0xE0]) + struct.pack("<Q", 1 << 40)
             + ((len(body) << 3) | 1).to_bytes(3, "little") + body)  # one raw block
    payload = b"I" + struct.pack("<I", len(frame)) + frame + _empty_batches_stream(1, 64, 256)
    with _watchdog(), pytest.raises(FormatError):
        _decode(image_codec, payload, 4096)


@pytest.mark.parametrize("shape, data", [
    ("(-2, -18)", bytes(36)),  # negative dimensions whose product is the data length
    ("(2147483648, 8589934592)", b""),  # element count wraps to 0 in int64
    ("(5, 0)", b""),  # records of no values
])
def test_encoder_refuses_forged_npy_shapes(dataset_codec, shape, data):
    with _watchdog(), pytest.raises(UnsupportedInputError):
        dataset_codec.open_encoder().encode_chunks([_npy_head(shape) + data])


def test_png_header_chunk_of_the_wrong_length(image_codec):
    def chunk(t: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + t + body + struct.pack(">I", zlib.crc32(t + body))

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">II", 4, 4)) + chunk(b"IEND", b"")
    with _watchdog(), pytest.raises(UnsupportedInputError, match="header chunk"):
        image_codec.open_encoder().encode_chunks([png])



def test_record_stream_of_empty_batches():
    # Without a count from a checked header (n=None) the stream's own count rules; every
    # batch of records is at least one range-coder word, so 2**31 records need 2**15 words.
    from toolkit.circuits import decode_records

    circuit = Circuit.load(CIRCUIT)
    with _watchdog(), pytest.raises(FormatError):
        decode_records(circuit, _empty_batches_stream(2**31, 36, 5, word_bytes=0))


def test_stream_method_not_the_headers(image_codec):
    # the header's config says context; a damaged method byte must not switch the decoder
    # to naive (a full pass over B*K records per variable: seconds for even four patches)
    from toolkit.formats import encode_png

    data = encode_png(np.arange(11 * 13, dtype=np.uint8).reshape(11, 13))
    (payload,) = image_codec.open_encoder().encode_chunks([data])
    (n,) = struct.unpack_from("<I", payload, 1)
    method = 5 + n + 4
    assert payload[method] == 2  # context
    forged = payload[:method] + bytes([1]) + payload[method + 1 :]
    with _watchdog(), pytest.raises(FormatError, match="method"):
        _decode(image_codec, forged, len(data))
