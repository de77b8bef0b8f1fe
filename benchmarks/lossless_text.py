"""Lossless text benchmark: the LM codec against classic compressors, in one run.

Every file is held-out text that no shipped model was trained on (built by
``python -m toolkit.data.corpus --eval-out DIR``; sources in
``DIR/eval_sources.json`` and toolkit/data/SOURCES.md). For each file and
compressor: bits per byte, compress and decompress KB/s, and an exact round
trip; LM decoding runs in a fresh process (the ``codec`` command), as a user
would run it.

    python benchmarks/lossless_text.py --eval-dir runs/eval --out benchmarks/results/lossless_text.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from toolkit.bench import LONG_RIVALS, RIVALS, machine


def lm_row(path: Path, settings: list[str], data: bytes) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        tkz, out = Path(tmp) / "f.tkz", Path(tmp) / "f.out"
        sets = [a for s in settings for a in ("--set", s)]
        src = Path(tmp) / path.name
        src.write_bytes(data)
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "toolkit", "compress", str(src), "-o", str(tkz), "--codec", "lm",
                        "-q", *sets], check=True)
        t1 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "toolkit", "decompress", str(tkz), "-o", str(out), "-q"], check=True)
        t2 = time.perf_counter()
        if out.read_bytes() != data:
            raise SystemExit(f"lm did not round-trip {path.name}")
        size = tkz.stat().st_size
        info = json.loads(subprocess.run([sys.executable, "-m", "toolkit", "info", str(tkz), "--json"],
                                         check=True, capture_output=True, text=True).stdout)
    return {"file": path.name, "codec": "lm", "in_bytes": len(data), "out_bytes": size,
            "bpb": 8 * size / len(data), "compress_KBps": len(data) / 1e3 / (t1 - t0),
            "decompress_KBps": len(data) / 1e3 / (t2 - t1), "header": info["header"],
            "note": "wall time of the codec command, model loading included"}


def rival_row(path: Path, name: str, data: bytes) -> dict:
    enc, dec = {**RIVALS, **LONG_RIVALS}[name]()
    t0 = time.perf_counter()
    blob = enc(data)
    t1 = time.perf_counter()
    if dec(blob, len(data)) != data:
        raise SystemExit(f"{name} did not round-trip {path.name}")
    t2 = time.perf_counter()
    return {"file": path.name, "codec": name, "in_bytes": len(data), "out_bytes": len(blob),
            "bpb": 8 * len(blob) / len(data), "compress_KBps": len(data) / 1e3 / (t1 - t0),
            "decompress_KBps": len(data) / 1e3 / (t2 - t1)}


def table(rows: list[dict]) -> str:
    xz = {r["file"]: r["bpb"] for r in rows if r["codec"] == "xz -9e"}
    ppmd = {r["file"]: r["bpb"] for r in rows if r["codec"].startswith("ppmd")}
    out = ["| file | codec | bits/byte | vs xz -9e | vs PPMd | compress KB/s | decompress KB/s |",
           "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r['file']} | {r['codec']} | {r['bpb']:.3f} | {r['bpb'] / xz[r['file']] - 1:+.1%} | "
                   f"{r['bpb'] / ppmd[r['file']] - 1:+.1%} | {r['compress_KBps']:.1f} | {r['decompress_KBps']:.1f} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--eval-dir", type=Path, required=True)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/lossless_text.json"))
    ap.add_argument("--set", action="append", default=[], help="LM codec setting (key=value)")
    ap.add_argument("--files", nargs="*", help="only these file names from the eval dir")
    ap.add_argument("--max-bytes", type=int, default=0, help="use only the first N bytes of each file")
    args = ap.parse_args(argv)
    files = sorted(p for p in args.eval_dir.iterdir() if p.suffix in (".txt", ".c")
                   and (not args.files or p.name in args.files))
    rows = []
    total = 0
    for p in files:
        data = p.read_bytes()[: args.max_bytes or None]
        total += len(data)
        rows.append(lm_row(p, args.set, data))
        print(f"lm {p.name}: {rows[-1]['bpb']:.3f} bpb", flush=True)
        for name in {**RIVALS, **LONG_RIVALS}:
            rows.append(rival_row(p, name, data))
    if total < 2_000_000:
        print(f"note: {total} bytes in all, below the 2 MB of the full benchmark", flush=True)
    srcs = args.eval_dir / "eval_sources.json"
    payload = {"machine": machine(), "rows": rows, "table": table(rows), "total_bytes": total,
               "sources": json.loads(srcs.read_text()) if srcs.exists() else None,
               "command": "python benchmarks/lossless_text.py " + " ".join(argv or sys.argv[1:])}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(table(rows) + "\n")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
