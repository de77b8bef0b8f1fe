"""Side-by-side benchmark of registered codecs and classic tools, in one run.

Every row is a verified round trip: the decoded bytes must equal the input.
Classic tools run in-process through their Python bindings at their
strongest common settings (zstd -19, xz -9e, brotli -q 11, bzip2 -9 and
7-Zip's PPMd var.H at the ``-mx9`` order 32 / 192 MB), so their timings
compare with the codecs' on equal terms.
"""

from __future__ import annotations

import bz2
import json
import lzma
import os
import platform
import time
from collections.abc import Callable
from importlib import resources
from pathlib import Path

from toolkit.errors import InputError, ToolkitError
from toolkit.progress import Progress, reporter

__all__ = ["RIVALS", "LONG_RIVALS", "run_bench", "format_table", "speed", "write_json", "machine", "demo",
           "sample_files"]


def _zstd() -> tuple[Callable[[bytes], bytes], Callable[[bytes, int], bytes]]:
    import zstandard

    return (lambda d: zstandard.ZstdCompressor(level=19).compress(d),
            lambda c, n: zstandard.ZstdDecompressor().decompress(c, max_output_size=n))


def _zstd_long() -> tuple[Callable[[bytes], bytes], Callable[[bytes, int], bytes]]:
    import zstandard

    # what `zstd -19 --long` sets: long-distance matching over a 128 MiB window
    params = zstandard.ZstdCompressionParameters.from_level(19, enable_ldm=True, window_log=27)
    return (lambda d: zstandard.ZstdCompressor(compression_params=params).compress(d),
            lambda c, n: zstandard.ZstdDecompressor(max_window_size=1 << 27).decompress(c, max_output_size=n))


def _xz():
    preset = 9 | lzma.PRESET_EXTREME
    return (lambda d: lzma.compress(d, preset=preset), lambda c, n: lzma.decompress(c))


def _brotli():
    import brotli

    return (lambda d: brotli.compress(d, quality=11), lambda c, n: brotli.decompress(c))


def _bzip2():
    return (lambda d: bz2.compress(d, 9), lambda c, n: bz2.decompress(c))


def _ppmd():
    import pyppmd

    order, mem = 32, 192 << 20

    def enc(d: bytes) -> bytes:
        e = pyppmd.Ppmd7Encoder(order, mem)
        return e.encode(d) + e.flush()

    return enc, lambda c, n: pyppmd.Ppmd7Decoder(order, mem).decode(c, n)


#: rivals for long inputs that only the text benchmark adds (same shape as RIVALS)
LONG_RIVALS: dict[str, Callable] = {"zstd -19 --long": _zstd_long}

#: rival name -> factory of (compress, decompress(blob, size))
RIVALS: dict[str, Callable] = {
    "zstd -19": _zstd,
    "xz -9e": _xz,
    "brotli -q11": _brotli,
    "bzip2 -9": _bzip2,
    "ppmd (7z -mx9)": _ppmd,
}


def machine() -> dict:
    import torch

    return {"cores": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "python": platform.python_version(), "platform": platform.platform(),
            "cpu": platform.processor() or platform.machine()}


def _row(file: str, name: str, kind: str, data: bytes, enc, dec) -> dict:
    t0 = time.perf_counter()
    blob = enc(data)
    t1 = time.perf_counter()
    out = dec(blob, len(data))
    t2 = time.perf_counter()
    if out != data:
        raise ToolkitError(f"{name} did not round-trip {file}")
    n = len(data)
    return {"file": file, "codec": name, "kind": kind, "in_bytes": n, "out_bytes": len(blob),
            "bpb": 8 * len(blob) / n if n else None,
            "compress_MBps": n / 1e6 / max(t1 - t0, 1e-9), "decompress_MBps": n / 1e6 / max(t2 - t1, 1e-9),
            "compress_s": t1 - t0, "decompress_s": t2 - t1}


def run_bench(files: list[str | Path], codecs: list[str] | None = None, rivals: bool | list[str] = True,
              progress: Progress = False) -> list[dict]:
    """Rows of (file, codec, bytes, bpb, MB/s) for every file and codec, each round-trip verified.

    ``codecs`` are registered codec names (``auto`` allowed); the default is
    every lossless registered codec except ``store``. ``rivals`` selects classic tools.
    ``progress`` counts the files done.
    """
    from toolkit.api import compress, decompress, info
    from toolkit.codecs.registry import list_codecs

    names = codecs or [n for n, c in list_codecs().items() if n != "store" and not c.lossy]
    rival_names = list(RIVALS) if rivals is True else list(rivals or [])
    rows = []
    report = reporter(progress, len(files), "bench")
    for done, path in enumerate(files, 1):
        try:
            data = Path(path).read_bytes()
        except OSError as e:
            raise InputError(f"{path}: cannot read ({e.strerror})") from None
        label = Path(path).name
        for name in names:
            blobs: list[bytes] = []

            def enc(d: bytes, c: str = name, keep: list[bytes] = blobs) -> bytes:
                keep.append(compress(d, codec=c))
                return keep[-1]

            rows.append(_row(label, name, "toolkit", data, enc, lambda b, n: decompress(b)))
            if name == "auto":  # name the codec auto chose, as recorded in the file it wrote
                rows[-1]["codec"] = f"auto ({info(blobs[-1])['header']['codec']})"
        for name in rival_names:
            enc, dec = RIVALS[name]()
            rows.append(_row(label, name, "rival", data, enc, dec))
        report(done, len(files))
    return rows


def format_table(rows: list[dict]) -> str:
    """A markdown table, with each codec's size relative to xz -9e on the same file."""
    xz = {r["file"]: r["out_bytes"] for r in rows if r["codec"] == "xz -9e"}
    lines = ["| file | codec | bytes | bits/byte | vs xz -9e | compress | decompress |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        rel = f"{r['out_bytes'] / xz[r['file']]:.3f}" if r["file"] in xz and xz[r["file"]] else "-"
        bpb = f"{r['bpb']:.3f}" if r["bpb"] is not None else "-"
        lines.append(f"| {r['file']} | {r['codec']} | {r['out_bytes']} | {bpb} | {rel} | "
                     f"{speed(r['compress_MBps'])} | {speed(r['decompress_MBps'])} |")
    return "\n".join(lines)


def speed(mb_per_s: float) -> str:
    """MB/s, or KB/s where MB/s would round to 0.00 (learned codecs run at kilobytes per second)."""
    return f"{mb_per_s:.2f} MB/s" if mb_per_s >= 0.995 else f"{mb_per_s * 1000:.1f} KB/s"


def write_json(path: str | Path, rows: list[dict], extra: dict | None = None) -> None:
    payload = {"machine": machine(), "rows": rows}
    if extra:
        payload.update(extra)
    Path(path).write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")


def sample_files() -> list[Path]:
    """The sample files shipped in ``toolkit/assets/samples``."""
    root = resources.files("toolkit") / "assets" / "samples"
    return sorted(Path(str(p)) for p in root.iterdir() if p.is_file() and not p.name.startswith("."))


def demo(progress: Progress = False) -> str:
    """Compress the shipped samples with ``auto``, verify every byte, and compare with zstd and xz."""
    rows = run_bench(sample_files(), codecs=["auto"], rivals=["zstd -19", "xz -9e"], progress=progress)
    total_in = sum(r["in_bytes"] for r in rows if r["codec"].startswith("auto"))
    lines = [format_table(rows), "",
             f"{len(sample_files())} sample files, {total_in} bytes: every round trip verified byte for byte."]
    return "\n".join(lines)
