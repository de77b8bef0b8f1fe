"""The safetensors frame: one sniff and one bounded length read for ``auto``, the scanner and the loader."""

from __future__ import annotations

import json
import struct

import pytest

from toolkit.errors import UnsupportedInputError
from toolkit.formats.safetensors import MAX_HEADER_BYTES, header_json, header_size, is_safetensors
from toolkit.weights.checkpoint import parse_header


def _length(n: int) -> bytes:
    return struct.pack("<Q", n)


def test_sniff_needs_a_plausible_length_then_a_brace():
    assert is_safetensors(_length(2) + b"{")
    assert is_safetensors(memoryview(_length(MAX_HEADER_BYTES) + b"{}"))
    for head in (b"", _length(2), _length(1) + b"{", _length(MAX_HEADER_BYTES + 1) + b"{", _length(2) + b"[",
                 b"\xff" * 64):
        assert not is_safetensors(head)


@pytest.mark.parametrize("prefix, file_size, why", [
    (b"\x02\0\0", None, "shorter than its 8-byte"),
    (_length(1), None, "outside"),
    (_length(1 << 40), None, "outside"),
    (_length(6), 13, "in a file of 13"),
])
def test_header_length_is_checked_against_the_limit_and_the_file(prefix, file_size, why):
    with pytest.raises(UnsupportedInputError, match=why):
        header_size(prefix, file_size)


def test_header_json_is_the_framed_bytes_and_no_more():
    assert header_size(_length(2)) == 10
    assert header_size(_length(5), file_size=13) == 13
    assert bytes(header_json(_length(2) + b"{}" + b"\0" * 8)) == b"{}"
    with pytest.raises(UnsupportedInputError, match="truncated"):
        header_json(_length(4) + b"{}")


def test_header_parses_the_same_from_bytes_and_from_a_view():
    text = json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
    data = _length(len(text)) + text + bytes(8)
    framed = bytearray(b"padding" + data + b"more")
    assert parse_header(memoryview(framed)[7:7 + len(data)], len(data)) == parse_header(data, len(data))
