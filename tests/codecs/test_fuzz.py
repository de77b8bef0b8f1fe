"""Damaged .tkz files: the decoder returns the exact original or raises a clean error."""

import io
import os
import random
import subprocess
import sys

import pytest
import tkz_tools
from hypothesis import given, settings
from hypothesis import strategies as st

import toolkit
from toolkit.codecs import container
from toolkit.codecs.registry import get_codec
from toolkit.errors import ToolkitError

ORIGINAL = (b"fuzzing the container: " * 50) + os.urandom(300) + b"tail " * 100
BLOBS = {name: toolkit.compress(ORIGINAL, codec=name) for name in ("store", "zstd", "xz")}


def _in_pieces(name: str, chunk_size: int = 512) -> bytes:
    codec = get_codec(name)()
    codec.chunk_size = chunk_size
    out = io.BytesIO()
    container.write_stream(codec, io.BytesIO(ORIGINAL), out)
    return out.getvalue()


#: streams cut into several pieces, so damage lands in the middle of a running stream too
PIECES = {name: _in_pieces(name) for name in ("zstd", "xz")}


def _decode_or_clean_error(blob: bytes) -> None:
    try:
        out = toolkit.decompress(blob)
    except ToolkitError:
        return
    assert out == ORIGINAL


@pytest.mark.parametrize("name", sorted(BLOBS))
@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_flips_and_cuts(name, data):
    blob = bytearray(BLOBS[name])
    op = data.draw(st.sampled_from(["flip", "cut", "insert", "zero"]))
    pos = data.draw(st.integers(0, len(blob) - 1))
    if op == "flip":
        blob[pos] ^= 1 << data.draw(st.integers(0, 7))
    elif op == "cut":
        blob = blob[:pos]
    elif op == "insert":
        blob[pos:pos] = data.draw(st.binary(min_size=1, max_size=8))
    else:
        n = data.draw(st.integers(1, 16))
        blob[pos : pos + n] = bytes(len(blob[pos : pos + n]))
    _decode_or_clean_error(bytes(blob))


@pytest.mark.parametrize("name", sorted(PIECES))
@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_payload_damage_reaches_the_codec(name, data):
    """Damage behind valid CRCs: the codec's own parser must give a clean error or the original."""
    blob = PIECES[name]
    records = tkz_tools.parse(blob).records
    target = data.draw(st.integers(0, len(records) - 1))
    op = data.draw(st.sampled_from(["flip", "cut", "insert", "zero", "swap"]))
    seed = data.draw(st.integers(0, 2**32 - 1))

    def damage(i: int, payload: bytes) -> bytes:
        if i != target or not payload:
            return payload
        rng = random.Random(seed)
        p, pos = bytearray(payload), rng.randrange(len(payload))
        if op == "flip":
            p[pos] ^= 1 << rng.randrange(8)
        elif op == "cut":
            del p[pos:]
        elif op == "insert":
            p[pos:pos] = rng.randbytes(rng.randint(1, 8))
        elif op == "zero":
            p[pos : pos + 16] = bytes(len(p[pos : pos + 16]))
        else:  # another chunk's piece in this one's place
            return records[(i + 1) % len(records)].payload
        return bytes(p)

    _decode_or_clean_error(tkz_tools.mutate_payloads(blob, damage))


def test_every_single_byte_truncation():
    blob = BLOBS["zstd"]
    for n in range(len(blob)):
        with pytest.raises(ToolkitError):
            toolkit.decompress(blob[:n])


def test_cli_never_tracebacks_on_damage(tmp_path):
    rng = random.Random(0)
    for i in range(12):
        blob = bytearray(BLOBS["xz"])
        for _ in range(rng.randint(1, 4)):
            blob[rng.randrange(len(blob))] = rng.randrange(256)
        p = tmp_path / f"d{i}.tkz"
        p.write_bytes(bytes(blob))
        r = subprocess.run([sys.executable, "-m", "toolkit", "decompress", str(p), "-o", str(tmp_path / f"o{i}"),
                            "-q"], capture_output=True, text=True, timeout=60)
        if r.returncode == 0:
            assert (tmp_path / f"o{i}").read_bytes() == ORIGINAL
        else:
            assert "Traceback" not in r.stderr and r.stderr.count("\n") == 1
            assert not (tmp_path / f"o{i}").exists()
