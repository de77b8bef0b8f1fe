"""Weights kept coded in memory (DFloat11-style) against the dense model, in one run.

    python benchmarks/weights_in_memory.py --out benchmarks/results/weights_in_memory.json

For each shipped model (cast to BF16, as DFloat11 codes BF16 models), in a
fresh process per mode so that peak memory is the mode's own:

* ``dense``: the model as loaded;
* ``coded fast`` / ``coded max``: :func:`toolkit.weights.compress_weights_`
  at that level, each layer's weights decoded in a forward pre-hook.

Reported: the weight bytes held (dense, or coded plus the most held dense at
once, which the hooks measure), the process's resident memory after a
forward (freed heap returned with ``malloc_trim``) and its peak
(``ru_maxrss``, which for the coded modes includes the coding itself), the forward time on a batch
of held-out-style token ids (best of ``--repeats``), the time it adds, and
whether the logits equal the dense model's bit for bit.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

_CHILD = r"""
import ctypes, gc, hashlib, json, resource, sys, time
import torch
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText
from toolkit.models import locate
name, mode, threads, repeats, batch, seq = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), \
    int(sys.argv[5]), int(sys.argv[6])
torch.set_num_threads(threads)
path = locate(name).path
cls = AutoModelForImageTextToText if name.startswith("vlm") else AutoModelForCausalLM
model = cls.from_pretrained(path, dtype=torch.bfloat16).eval()
dense_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
out = {"model": name, "mode": mode, "params": sum(p.numel() for p in model.parameters())}
coded = None
if mode != "dense":
    from toolkit.weights import InMemoryConfig, compress_weights_
    t = time.perf_counter()
    coded = compress_weights_(model, InMemoryConfig(level=mode.split()[-1]))
    out["encode_s"] = time.perf_counter() - t
g = torch.Generator().manual_seed(0)
vocab = model.config.get_text_config().vocab_size
ids = torch.randint(0, vocab, (batch, seq), generator=g)
run = lambda: model(input_ids=ids).logits  # noqa: E731 - text only for the VLM as well: its LM holds the weights
with torch.no_grad():
    logits = run()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - t)
out["forward_s"] = best
out["logits_sha256"] = hashlib.sha256(logits.float().numpy().tobytes()).hexdigest()
if coded is None:
    out["weight_bytes"] = dense_bytes
else:
    small = dense_bytes - coded.dense_bytes  # parameters left dense (norms, biases)
    out["weight_bytes"] = coded.coded_bytes + small + coded.peak_dense_bytes
    out["coded_bytes"], out["peak_dense_bytes"] = coded.coded_bytes, coded.peak_dense_bytes
out["dense_weight_bytes"] = dense_bytes
out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
del logits
gc.collect()
ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back, so the resident size is what is held
with torch.no_grad():
    run()
gc.collect()
ctypes.CDLL("libc.so.6").malloc_trim(0)
out["rss_mb"] = int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize() / 2**20
print("RESULT" + json.dumps(out))
"""

MODES = ("dense", "coded fast", "coded max")


def _run(name: str, mode: str, args) -> dict:
    cmd = [sys.executable, "-c", _CHILD, name, mode, str(args.threads), str(args.repeats), str(args.batch),
           str(args.seq)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT)
    line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT"))
    return json.loads(line[len("RESULT"):])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="lm-default,lm-long,vlm-scenes")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "weights_in_memory.json")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    args = ap.parse_args()

    from toolkit.bench import machine

    rows = []
    for name in args.models.split(","):
        runs = {mode: _run(name, mode, args) for mode in MODES}
        base = runs["dense"]
        for mode, r in runs.items():
            r["exact"] = r["logits_sha256"] == base["logits_sha256"]
            r["weight_ratio"] = r["weight_bytes"] / base["weight_bytes"]
            r["added_forward_s"] = r["forward_s"] - base["forward_s"]
            rows.append(r)
            print(f"{name:>11} {mode:>10}: weights {r['weight_bytes'] / 1e6:6.2f} MB ({r['weight_ratio']:.1%}), "
                  f"RSS {r['rss_mb']:.0f} MB (peak {r['peak_rss_mb']:.0f}), forward {1e3 * r['forward_s']:.1f} ms "
                  f"(+{1e3 * r['added_forward_s']:.1f}), exact {r['exact']}", flush=True)
    result = {"benchmark": "weights_in_memory", "machine": machine(), "threads": args.threads,
              "batch": args.batch, "seq": args.seq, "command": "python benchmarks/weights_in_memory.py",
              "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    md = _table(result)
    args.out.with_suffix(".md").write_text(md)
    print(md)


def _table(result: dict) -> str:
    lines = [f"`{result['command']}`: {result['machine']['cores']} cores, {result['threads']} threads, forward on "
             f"{result['batch']} x {result['seq']} token ids, BF16. Weight memory: dense bytes, or coded bytes + "
             "the parameters left dense + the most decoded at once (during a forward) or without it (between "
             "forwards). RSS after a forward; the coded modes' includes the coder's libraries (numba, zstd).", "",
             "| model | mode | weight MB | of dense | between forwards MB | RSS MB | peak RSS MB | forward ms "
             "| added ms | logits exact |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['model']} | {r['mode']} | {r['weight_bytes'] / 1e6:.2f} | {r['weight_ratio']:.1%} | "
                     f"{(r['weight_bytes'] - r.get('peak_dense_bytes', 0)) / 1e6:.2f} | "
                     f"{r['rss_mb']:.0f} | {r['peak_rss_mb']:.0f} | {1e3 * r['forward_s']:.1f} | "
                     f"{1e3 * r['added_forward_s']:+.1f} | "
                     f"{'yes' if r['exact'] else 'NO'} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
