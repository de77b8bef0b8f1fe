"""Classic codecs against the tools they wrap, in one run: `codec --codec xz` vs `xz -9e`, zstd vs `zstd -19`.

The data is real text: the Debian changelogs of this machine
(``/usr/share/doc/*/changelog*.gz``, decompressed and concatenated in path
order, cut at ``--bytes``, 20 MB by default). The tools are the command-line
programs themselves (Debian ``xz-utils`` and ``zstd``), run on the same file;
the codec runs through the ``codec`` command, and every .tkz file is decoded
and checked byte for byte.

    python benchmarks/classic_stream.py --out benchmarks/results/classic_stream.json
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from toolkit.bench import machine

PAIRS = [("xz", ["xz", "-9e", "-k", "-c"]), ("zstd", ["zstd", "-19", "-q", "-c"])]


def changelogs(limit: int) -> bytes:
    out = bytearray()
    for path in sorted(Path("/usr/share/doc").glob("*/changelog*.gz")):
        try:
            out += gzip.decompress(path.read_bytes())
        except (OSError, EOFError):
            continue  # a damaged or odd file: skip it, the data set is named by its hash
        if len(out) >= limit:
            break
    return bytes(out[:limit])


def tool_size(cmd: list[str], path: Path) -> tuple[int, float]:
    t0 = time.perf_counter()
    out = subprocess.run([*cmd, str(path)], check=True, capture_output=True).stdout
    return len(out), time.perf_counter() - t0


def codec_size(name: str, path: Path, tmp: Path, data: bytes) -> tuple[int, float]:
    tkz, back = tmp / f"{name}.tkz", tmp / f"{name}.out"
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "toolkit", "compress", str(path), "-o", str(tkz), "--codec", name, "-q"],
                   check=True)
    seconds = time.perf_counter() - t0
    subprocess.run([sys.executable, "-m", "toolkit", "decompress", str(tkz), "-o", str(back), "-q"], check=True)
    if back.read_bytes() != data:
        raise SystemExit(f"codec {name} did not round-trip")
    return tkz.stat().st_size, seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bytes", type=int, default=20_000_000)
    ap.add_argument("--out", default="benchmarks/results/classic_stream.json")
    args = ap.parse_args()
    for tool in ("xz", "zstd"):
        if not shutil.which(tool):
            raise SystemExit(f"{tool} is not installed (apt-get install xz-utils zstd)")
    data = changelogs(args.bytes)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "changelogs.txt"
        path.write_bytes(data)
        for name, cmd in PAIRS:
            ours, ours_s = codec_size(name, path, Path(tmp), data)
            theirs, theirs_s = tool_size(cmd, path)
            rows.append({"codec": f"codec --codec {name}", "tool": " ".join(cmd[:2]), "codec_bytes": ours,
                         "tool_bytes": theirs, "ratio": ours / theirs, "codec_s": ours_s, "tool_s": theirs_s})
    versions = {t: subprocess.run([t, "--version"], capture_output=True, text=True).stdout.splitlines()[0]
                for t in ("xz", "zstd")}
    result = {"data": {"name": "Debian changelogs (/usr/share/doc/*/changelog*.gz, path order)",
                       "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()},
              "tools": versions, "machine": machine(), "rows": rows}
    out = Path(args.out)
    out.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    lines = [f"{len(data):,} bytes of Debian changelogs; {versions['xz']}; {versions['zstd']}", "",
             "| codec | bytes | tool | bytes | codec / tool | codec s | tool s |", "|---|---:|---|---:|---:|---:|---:|"]
    lines += [f"| {r['codec']} | {r['codec_bytes']:,} | {r['tool']} | {r['tool_bytes']:,} | {r['ratio']:.4f} | "
              f"{r['codec_s']:.1f} | {r['tool_s']:.1f} |" for r in rows]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
