"""zstd and xz code a file as one stream across the container's chunks, in bounded memory."""

import io
import os
import subprocess
import sys

import pytest
import tkz_tools
import zstandard

import toolkit
from toolkit.codecs import container
from toolkit.codecs.registry import get_codec
from toolkit.errors import FormatError

BLOCK = os.urandom(6000)
DATA = BLOCK * 4  # every copy after the first lies across a chunk boundary from the one before


def _compress(name: str, data: bytes, chunk_size: int) -> bytes:
    codec = get_codec(name)()
    codec.chunk_size = chunk_size
    out = io.BytesIO()
    container.write_stream(codec, io.BytesIO(data), out, size=len(data))
    return out.getvalue()


@pytest.mark.parametrize("name", ["zstd", "xz"])
def test_repeats_across_chunk_boundaries_match_like_one_stream(name):
    blob = _compress(name, DATA, chunk_size=4096)
    assert toolkit.info(blob)["chunks"] == 6
    # independent chunks would each hold ~4 KB of noise; one stream codes the repeats as matches
    assert len(blob) < len(BLOCK) + 600
    assert toolkit.decompress(blob) == DATA


@pytest.mark.slow
def test_sizes_match_the_command_line_tools_settings():
    text = b"".join(b"line %d of a changelog: fixed bug #%d in module %d\n" % (i, i * 7 % 1000, i % 37)
                    for i in range(40000))
    z = len(_compress("zstd", text, chunk_size=1 << 18))
    assert z <= 1.01 * len(zstandard.ZstdCompressor(level=19).compress(text))
    import lzma

    x = len(_compress("xz", text, chunk_size=1 << 18))
    assert x <= 1.01 * len(lzma.compress(text, preset=9 | lzma.PRESET_EXTREME))


_DECODE_RSS = (
    "import resource, sys\n"
    "from toolkit.codecs import container, classic\n"
    "from toolkit.errors import FormatError\n"
    "class Sink:\n"
    "    def write(self, b): pass\n"
    "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
    "try:\n"
    "    with open(sys.argv[1], 'rb') as f:\n"
    "        container.read_stream(f, Sink())\n"
    "    print('decoded')\n"
    "except FormatError as e:\n"
    "    print('refused', e)\n"
    "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)\n"
)


def _decode_rss(path) -> tuple[str, int]:
    """Decode ``path`` in a fresh process: (first output line, peak RSS growth in MB)."""
    out = subprocess.run([sys.executable, "-c", _DECODE_RSS, str(path)], capture_output=True, text=True,
                         check=True).stdout.splitlines()
    return out[0], int(out[1])


def test_a_piece_that_decodes_past_its_chunk_is_refused_in_bounded_memory(tmp_path):
    f = tkz_tools.parse(_compress("zstd", bytes(1 << 26), chunk_size=1 << 26))  # 64 MiB of zeros: 2 KB
    f.records[0].raw_len = 4000  # the piece claims 4000 bytes
    (tmp_path / "forged.tkz").write_bytes(f.to_bytes())
    line, grown_mb = _decode_rss(tmp_path / "forged.tkz")
    assert line.startswith("refused") and "more than its chunk" in line
    assert grown_mb < 48  # the piece would decode to 64 MiB


def test_decoding_memory_is_bounded_by_chunk_and_window(tmp_path):
    data = b"".join(b"record %d: %d\n" % (i, i * i % 9973) for i in range(1500000))  # ~28 MB
    for name, cfg in (("zstd", {"level": 3}), ("xz", {"preset": 1, "extreme": False})):
        codec = get_codec(name)(get_codec(name).Config(**cfg))
        codec.chunk_size = 1 << 20
        with open(tmp_path / "f.tkz", "wb") as dst:
            container.write_stream(codec, io.BytesIO(data), dst)
        line, grown_mb = _decode_rss(tmp_path / "f.tkz")
        assert line == "decoded" and grown_mb < 16, (name, grown_mb)  # 1 MiB chunks, 1-8 MiB windows


def test_damaged_stream_pieces_give_clean_errors():
    for name in ("zstd", "xz"):
        blob = _compress(name, DATA, chunk_size=4096)
        for i in range(6):
            bad = tkz_tools.mutate_payloads(blob, lambda j, p, i=i: p[:3] + bytes([p[3] ^ 0xFF]) + p[4:]
                                            if j == i else p)
            with pytest.raises(FormatError):
                toolkit.decompress(bad)
        cut = tkz_tools.mutate_payloads(blob, lambda j, p: p[: len(p) // 2] if j == 2 else p)
        with pytest.raises(FormatError):
            toolkit.decompress(cut)
