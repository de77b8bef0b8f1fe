"""Lossless text benchmark: the LM codec against classic compressors, in one run.

Every file is held-out text that no shipped model was trained on (built by
``python -m toolkit.recipes.build_corpus --eval-out DIR``; sources in
``DIR/eval_sources.json`` and toolkit/data/SOURCES.md). For each file and
compressor: bits per byte, compress and decompress KB/s, and an exact round
trip; LM decoding runs in a fresh process (the ``codec`` command), as a user
would run it.

The lm codec runs with each engine of ``--engines``: ``int`` (the default,
integer arithmetic, decodes anywhere) and ``lean`` (the float forward in
bf16 on CPUs with bf16 arithmetic, machine-bound). The run also times what
a user of small files sees (a 2 KB note compressed and decompressed by the
``codec`` command in a fresh process, and ``codec demo``), and two ``codec``
processes started at once on the 2 cores, against one alone.

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


def _codec(*argv: str) -> float:
    """Wall seconds of one ``codec`` command in a fresh process."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "toolkit", *argv], check=True)
    return time.perf_counter() - t0


def lm_row(path: Path, settings: list[str], data: bytes, engine: str = "int") -> dict:
    settings = [*settings, f"engine={engine}"]
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
    return {"file": path.name, "codec": f"lm ({engine})", "in_bytes": len(data), "out_bytes": size,
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


def small_files(path: Path, n: int = 2048) -> dict:
    """A note of ``n`` bytes (the start of a held-out file): compress and decompress, each a fresh ``codec``."""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "note.txt"
        src.write_bytes(path.read_bytes()[:n])
        _codec("compress", str(src), "-o", str(src) + ".warm", "-q", "--codec", "lm")  # compiled loops cached
        comp = _codec("compress", str(src), "-o", str(src) + ".tkz", "-q", "--codec", "lm")
        dec = _codec("decompress", str(src) + ".tkz", "-o", str(src) + ".out", "-q")
        if (Path(tmp) / "note.txt.out").read_bytes() != src.read_bytes():
            raise SystemExit("lm did not round-trip the note")
        size = (Path(tmp) / "note.txt.tkz").stat().st_size
    demo = _codec("demo", "-q")
    return {"file": f"first {n} bytes of {path.name}", "compress_s": comp, "decompress_s": dec,
            "out_bytes": size, "demo_s": demo}


def concurrency(path: Path, n: int) -> dict:
    """KB/s of one ``codec compress`` alone, and of each of two started at once on the same input."""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "in.txt"
        src.write_bytes(path.read_bytes()[:n])
        solo = n / 1e3 / _codec("compress", str(src), "-o", str(src) + ".solo", "-q", "--codec", "lm")
        t0 = time.perf_counter()
        procs = [subprocess.Popen([sys.executable, "-m", "toolkit", "compress", str(src), "-o", f"{src}.{i}", "-q",
                                   "--codec", "lm"]) for i in range(2)]
        ends = []
        for p in procs:
            if p.wait() != 0:
                raise SystemExit("a concurrent codec process failed")
            ends.append(time.perf_counter() - t0)
    pair = [n / 1e3 / e for e in ends]
    return {"file": f"first {n} bytes of {path.name}", "solo_KBps": solo, "pair_KBps": pair,
            "share_of_solo": [k / solo for k in pair]}


def engines_table(rows: list[dict], engines: list[str]) -> str:
    """The integer engine against the float one, per file: bits per byte and speed (process wall)."""
    if len(engines) < 2:
        return ""
    a, b = (f"lm ({e})" for e in engines[:2])
    by = {(r["file"], r["codec"]): r for r in rows}
    out = [f"| file | {a} bits/byte | {b} bits/byte | difference | compress KB/s ({a} / {b}) | "
           "decompress KB/s |", "|---|---:|---:|---:|---:|---:|"]
    for f in sorted({r["file"] for r in rows}):
        x, y = by[(f, a)], by[(f, b)]
        cx, cy, dx, dy = x["compress_KBps"], y["compress_KBps"], x["decompress_KBps"], y["decompress_KBps"]
        out.append(f"| {f} | {x['bpb']:.4f} | {y['bpb']:.4f} | {x['bpb'] / y['bpb'] - 1:+.2%} | "
                   f"{cx:.1f} / {cy:.1f} ({cx / cy:.2f}x) | {dx:.1f} / {dy:.1f} ({dx / dy:.2f}x) |")
    return "\n".join(out)


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
    ap.add_argument("--engines", default="int,lean", help="lm engines to run, comma-separated (the first is compared "
                    "against the second)")
    ap.add_argument("--pair-bytes", type=int, default=131072, help="input of the two-process run")
    args = ap.parse_args(argv)
    engines = args.engines.split(",")
    files = sorted(p for p in args.eval_dir.iterdir() if p.suffix in (".txt", ".c")
                   and (not args.files or p.name in args.files))
    rows = []
    total = 0
    for p in files:
        data = p.read_bytes()[: args.max_bytes or None]
        total += len(data)
        for engine in engines:
            rows.append(lm_row(p, args.set, data, engine))
            print(f"{rows[-1]['codec']} {p.name}: {rows[-1]['bpb']:.4f} bpb, {rows[-1]['compress_KBps']:.1f} / "
                  f"{rows[-1]['decompress_KBps']:.1f} KB/s", flush=True)
        for name in {**RIVALS, **LONG_RIVALS}:
            rows.append(rival_row(p, name, data))
    if total < 2_000_000:
        print(f"note: {total} bytes in all, below the 2 MB of the full benchmark", flush=True)
    small = small_files(files[0])
    pair = concurrency(files[0], args.pair_bytes)
    print(json.dumps({"small": small, "pair": pair}, indent=1), flush=True)
    srcs = args.eval_dir / "eval_sources.json"
    extra = (f"\n\n{engines_table(rows, engines)}\n\n"
             f"2 KB note ({small['file']}), fresh `codec` process each: compress {small['compress_s']:.2f} s, "
             f"decompress {small['decompress_s']:.2f} s ({small['out_bytes']} bytes); `codec demo` "
             f"{small['demo_s']:.1f} s.\n\nTwo `codec compress` processes at once ({pair['file']}): "
             f"{' and '.join(f'{k:.1f}' for k in pair['pair_KBps'])} KB/s against {pair['solo_KBps']:.1f} KB/s alone "
             f"({' and '.join(f'{k:.0%}' for k in pair['share_of_solo'])} of solo speed).")
    payload = {"machine": machine(), "rows": rows, "table": table(rows) + extra, "total_bytes": total,
               "engines": engines, "small_file": small, "two_processes": pair,
               "sources": json.loads(srcs.read_text()) if srcs.exists() else None,
               "command": "python benchmarks/lossless_text.py " + " ".join(argv or sys.argv[1:])}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(table(rows) + extra + "\n")
    print(table(rows) + extra)
    return 0


if __name__ == "__main__":
    sys.exit(main())
