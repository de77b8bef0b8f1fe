"""KV-cache compression: full cache against KIVI, GEAR, MiniCache, bitstreams and transformers' QuantizedCache.

    python benchmarks/kv_cache.py --out benchmarks/results/kv_cache.json

Model: the shipped ``lm-long`` (LlamaForCausalLM, 4 layers, 4 heads of 64,
2,048 positions; trained on the toolkit corpus plus synthetic recall rows).
Held-out data: the licence texts in /usr/share/common-licenses, which no
shipped model was trained on, as text windows and as the filler of the recall
tasks.

* Text: ``--windows`` windows of 2,048 tokens; the first 1,536 are prefilled
  into the cache, the other 512 are fed one token a step through it.
  Perplexity over those 512 predictions and KL(full || compressed) per token.
* Recall: key-value recall (8 facts, one asked) and needle retrieval (one fact
  at depths 0.05..0.95) with contexts of 2,000 tokens; the question is fed
  through the cache, the answer decoded greedily, exact match.
* Bytes per token: what the cache holds at the end of a text window over the
  2,047 tokens it covers, against a float16 cache.
* Decode step latency: median of 32 steps after a 2,000-token prefill, one
  thread and two.
* Bitstreams: file bytes (the .tkz) against the float16 cache, load time
  (read, decode, hash check) against the prefill time of 2,048 tokens.

transformers' QuantizedCache backends (quanto, HQQ) are imported from
``--rival-site`` (a ``pip install --target`` directory: ``pip install --target
runs/kvbench/site --no-deps optimum-quanto hqq && pip install --target
runs/kvbench/site einops termcolor ninja``), so they never change this
environment's torch; its fp8 backend needs nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
MODEL_DIR = ROOT / "toolkit" / "assets" / "lm-long"
LICENCES = Path("/usr/share/common-licenses")


def held_out_tokens(tok) -> np.ndarray:
    """Every licence text, in name order, as one token stream (documents separated by bos)."""
    out = []
    for p in sorted(LICENCES.iterdir()):
        if p.is_file() and not p.is_symlink():
            out.append([tok.bos_id] + tok.encode(p.read_bytes()))
    return np.array([t for doc in out for t in doc], dtype=np.int64)


def _tensor_bytes(obj, depth: int = 0) -> int:
    """Bytes of the tensors inside a rival's cache layer (quanto/HQQ wrap theirs in objects)."""
    if type(obj) in (torch.Tensor, torch.nn.Parameter):
        return obj.numel() * obj.element_size()
    if depth > 4:
        return 0
    if isinstance(obj, (tuple, list)):
        return sum(_tensor_bytes(o, depth + 1) for o in obj)
    if isinstance(obj, dict):
        return sum(_tensor_bytes(o, depth + 1) for o in obj.values())
    if hasattr(obj, "__dict__"):
        return sum(_tensor_bytes(o, depth + 1) for o in vars(obj).values())
    return 0


def hf_cache_bytes(cache) -> int:
    total = 0
    for layer in cache.layers:
        total += _tensor_bytes(getattr(layer, "_quantized_keys", None))
        total += _tensor_bytes(getattr(layer, "_quantized_values", None))
        for t in (layer.keys, layer.values):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


def methods(model) -> list[dict]:
    from transformers.cache_utils import DynamicCache, QuantizedCache

    from toolkit.llm.kvcache import (
        BitstreamConfig,
        GEARCache,
        GEARConfig,
        KIVICache,
        KIVIConfig,
        MiniCache,
        MiniCacheConfig,
    )

    cfg = model.config
    rows = [
        {"name": "full (fp32 compute, fp16 bytes)", "kind": "full", "make": DynamicCache},
        {"name": "KIVI-4 g32 r128", "kind": "ours",
         "make": lambda: KIVICache(KIVIConfig(bits=4, group_size=32, residual_length=128), cfg)},
        {"name": "KIVI-2 g32 r128", "kind": "ours",
         "make": lambda: KIVICache(KIVIConfig(bits=2, group_size=32, residual_length=128), cfg)},
        {"name": "KIVI-2 g32 r32", "kind": "ours",
         "make": lambda: KIVICache(KIVIConfig(bits=2, group_size=32, residual_length=32), cfg)},
        {"name": "GEAR-2 (KIVI-2 g32 r128, rank 4, 1% outliers)", "kind": "ours",
         "make": lambda: GEARCache(GEARConfig(bits=2, group_size=32, residual_length=128, rank=4,
                                              outlier_fraction=0.01), cfg)},
        {"name": "MiniCache (layers 2-3, retain > 0.2 pi)", "kind": "ours",
         "make": lambda: MiniCache(MiniCacheConfig(), cfg)},
        {"name": "MiniCache (layers 2-3, retain > 0.45 pi)", "kind": "ours",
         "make": lambda: MiniCache(MiniCacheConfig(retain_angle=0.45), cfg)},
        {"name": "bitstream (default: key step 0.7, value step 1.0)", "kind": "bitstream",
         "config": BitstreamConfig(), "make": DynamicCache},
        {"name": "bitstream (steps 0.5 / 0.7)", "kind": "bitstream",
         "config": BitstreamConfig(key_step=0.5, value_step=0.7), "make": DynamicCache},
        {"name": "bitstream (steps 1.0 / 1.4)", "kind": "bitstream",
         "config": BitstreamConfig(key_step=1.0, value_step=1.4), "make": DynamicCache},
    ]
    for backend, bits in (("quanto", 4), ("quanto", 2), ("hqq", 4), ("hqq", 2), ("fp8", 8)):
        kw = {} if backend == "fp8" else {"nbits": bits, "q_group_size": 64, "residual_length": 128}
        name = f"transformers QuantizedCache {backend}" + ("" if backend == "fp8" else f"-{bits} g64 r128")
        try:
            QuantizedCache(backend, cfg, **kw)
        except Exception as e:  # a backend that does not install is reported, not fatal
            rows.append({"name": name, "kind": "rival", "error": f"{type(e).__name__}: {e}"[:200]})
            continue
        rows.append({"name": name, "kind": "rival",
                     "make": lambda b=backend, k=kw: QuantizedCache(b, cfg, **k)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, default=MODEL_DIR)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "kv_cache.json")
    ap.add_argument("--windows", type=int, default=6)
    ap.add_argument("--prefix", type=int, default=1536)
    ap.add_argument("--kv-tasks", type=int, default=24)
    ap.add_argument("--needle-tasks", type=int, default=19)
    ap.add_argument("--context", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rival-site", type=Path, default=ROOT / "runs" / "kvbench" / "site")
    ap.add_argument("--only", help="comma-separated substrings of method names to run")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.rival_site.is_dir():  # before transformers looks for its optional backends
        sys.path.insert(0, str(args.rival_site))

    from transformers import LlamaForCausalLM
    from transformers.cache_utils import DynamicCache

    from toolkit.codecs import kv
    from toolkit.data.recall import make_task
    from toolkit.llm import kvcache
    from toolkit.llm.kvcache.evaluate import decode_latency, fp16_cache_bytes, recall, score_cache
    from toolkit.models.tokenizer import ByteTokenizer

    model = LlamaForCausalLM.from_pretrained(args.model).eval()
    tok = ByteTokenizer.load(args.model / "tokenizer.json")
    seq = model.config.max_position_embeddings
    data = held_out_tokens(tok)
    n_win = min(args.windows, len(data) // seq)
    starts = np.linspace(0, len(data) - seq - 1, n_win).astype(int)
    windows = [torch.from_numpy(data[s:s + seq].copy())[None] for s in starts]
    rng = np.random.default_rng(0)
    tasks = {"kv_recall": [make_task(tok, data, rng, args.context, n_facts=8) for _ in range(args.kv_tasks)],
             "needle": [make_task(tok, data, rng, args.context, n_facts=1, depth=float(dp))
                        for dp in np.linspace(0.05, 0.95, args.needle_tasks)]}
    fp16_bytes = fp16_cache_bytes(model.config, seq - 1)
    lat_prefix = windows[0][:, :args.context]

    args.out.parent.mkdir(parents=True, exist_ok=True)
    rows = methods(model)
    if args.only:
        keys = [k.strip() for k in args.only.split(",")]
        rows = [r for r in rows if r["kind"] == "full" or any(k in r["name"] for k in keys)]
    reference = None
    sha = kvcache.model_fingerprint(model)
    results = []
    for row in rows:
        t0 = time.time()
        out = {"name": row["name"], "kind": row["kind"]}
        if "error" in row:
            out["error"] = row["error"]
            results.append(out)
            print(f"{row['name']}: not run ({row['error']})", flush=True)
            continue
        after = None
        if row["kind"] == "bitstream":
            cfg = row["config"]
            out["config"] = cfg.to_dict()

            def after(c, cfg=cfg):
                return kvcache.lossy(c, model, cfg)
        score, reference = score_cache(model, windows, args.prefix, row["make"], reference, after)
        out.update(score.as_dict())
        if row["kind"] == "bitstream":
            out["cache_bytes"] = out["bytes_per_token"] = None  # the stored file is what counts
        elif row["kind"] in ("full",):
            out["cache_bytes"] = fp16_bytes
            out["bytes_per_token"] = fp16_bytes / (seq - 1)
        elif row["kind"] == "rival":
            cache = row["make"]()
            with torch.no_grad():
                model(input_ids=windows[0][:, :-1], past_key_values=cache, use_cache=True)
            out["cache_bytes"] = hf_cache_bytes(cache)
            out["bytes_per_token"] = out["cache_bytes"] / (seq - 1)
        if out.get("cache_bytes"):
            out["ratio_vs_fp16"] = fp16_bytes / out["cache_bytes"]
        for task, items in tasks.items():
            if row["kind"] == "bitstream":
                out[task] = recall(model, items, row["make"], after_prefill=after)
            else:
                out[task] = recall(model, items, row["make"])
        if row["kind"] != "bitstream":
            out["decode_step_ms"] = 1000 * decode_latency(model, lat_prefix, row["make"])
        out["seconds"] = round(time.time() - t0, 1)
        results.append(out)
        print(json.dumps({k: v for k, v in out.items() if k != "config"}), flush=True)

    # Bitstreams as stored files: size, load time against the prefill they replace.
    streams = []
    ids = windows[0]
    for row in [r for r in rows if r["kind"] == "bitstream"]:
        cache = DynamicCache()
        with torch.no_grad():
            t0 = time.perf_counter()
            model(input_ids=ids, past_key_values=cache, use_cache=True)
            prefill_s = time.perf_counter() - t0
        path = args.out.parent / "kv_cache_prompt.tkz"
        t0 = time.perf_counter()
        size = kv.save(cache, path, model, row["config"])
        save_s = time.perf_counter() - t0
        loads, prefills = [], []
        for _ in range(5):
            t0 = time.perf_counter()
            kv.load(path, model)
            loads.append(time.perf_counter() - t0)
            c = DynamicCache()
            with torch.no_grad():
                t0 = time.perf_counter()
                model(input_ids=ids, past_key_values=c, use_cache=True)
                prefills.append(time.perf_counter() - t0)
        path.unlink()
        fp16 = fp16_cache_bytes(model.config, ids.shape[1])
        s = {"name": row["name"], "tokens": ids.shape[1], "file_bytes": size, "fp16_bytes": fp16,
             "fraction_of_fp16": size / fp16, "save_s": save_s, "load_s": float(np.median(loads)),
             "prefill_s": float(np.median(prefills)), "first_prefill_s": prefill_s}
        s["load_speedup"] = s["prefill_s"] / s["load_s"]
        streams.append(s)
        print(json.dumps(s), flush=True)

    report = {
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "threads": args.threads, "torch": torch.__version__,
                    "transformers": __import__("transformers").__version__},
        "model": str(args.model.relative_to(ROOT) if args.model.is_relative_to(ROOT) else args.model),
        "model_sha256": sha,
        "data": {"source": str(LICENCES), "tokens": int(len(data)), "windows": n_win,
                 "window": seq, "prefix": args.prefix,
                 "recall_context": args.context, "kv_tasks": args.kv_tasks,
                 "needle_tasks": args.needle_tasks},
        "fp16_cache_bytes_per_token": fp16_bytes / (seq - 1),
        "methods": results, "bitstreams": streams,
        "command": "python benchmarks/kv_cache.py " + " ".join(sys.argv[1:]),
    }
    report["targets"] = targets(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(report))
    plot(report, args.out.with_suffix(".png"))
    print(markdown(report))


def targets(report: dict) -> dict:
    by = {m["name"]: m for m in report["methods"] if "error" not in m}
    full = by.get("full (fp32 compute, fp16 bytes)")
    out = {}
    if full is None:
        return out

    def get(name):
        return by.get(name)
    k4, g2 = get("KIVI-4 g32 r128"), get("GEAR-2 (KIVI-2 g32 r128, rank 4, 1% outliers)")
    if k4:
        out["kivi4_ppl_change"] = k4["ppl_change"]
        out["kivi4_ppl_within_0.5pct"] = abs(k4["ppl_change"]) <= 0.005
        drop = max(full["kv_recall"] - k4["kv_recall"], full["needle"] - k4["needle"])
        out["kivi4_recall_drop_points"] = 100 * drop
        out["kivi4_recall_within_2_points"] = drop <= 0.02
    if g2:
        out["gear2_ppl_change"] = g2["ppl_change"]
        out["gear2_ppl_within_2pct"] = abs(g2["ppl_change"]) <= 0.02
    bs = [m for m in report["methods"] if m["kind"] == "bitstream" and "error" not in m]
    for m in bs:
        st = next((s for s in report["bitstreams"] if s["name"] == m["name"]), None)
        if st:
            out[m["name"]] = {"fraction_of_fp16": st["fraction_of_fp16"], "kl": m["kl"],
                              "load_speedup": st["load_speedup"],
                              "meets": st["fraction_of_fp16"] <= 1 / 6 and m["kl"] < 0.01
                              and st["load_speedup"] >= 5}
    return out


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [f"Model `{report['model']}`; held-out data: {report['data']['source']} "
             f"({report['data']['tokens']:,} tokens), {report['data']['windows']} windows of "
             f"{report['data']['window']} (prefix {report['data']['prefix']}, the rest decoded through the cache); "
             f"recall contexts of {report['data']['recall_context']} tokens. {m['cpu']}, {m['cores']} cores, "
             f"{m['threads']} thread(s), torch {m['torch']}, transformers {m['transformers']}.",
             "",
             "| cache | bytes/token | vs fp16 | ppl | ppl change | KL (nats) | kv recall | needle | decode step ms |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report["methods"]:
        if "error" in r:
            lines.append(f"| {r['name']} | not run: {r['error'][:80]} | | | | | | | |")
            continue
        lines.append(
            f"| {r['name']} | {_fmt(r.get('bytes_per_token'), ',.0f')} | "
            f"{_fmt(r.get('ratio_vs_fp16'), '.2f')}x | {r['ppl']:.3f} | {100 * r['ppl_change']:+.2f}% | "
            f"{r['kl']:.4f} | {100 * r['kv_recall']:.0f}% | {100 * r['needle']:.0f}% | "
            f"{_fmt(r.get('decode_step_ms'), '.1f')} |")
    if report["bitstreams"]:
        lines += ["", "| bitstream | tokens | file bytes | of fp16 | save s | load s | prefill s | load speed-up |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for s in report["bitstreams"]:
            lines.append(f"| {s['name']} | {s['tokens']} | {s['file_bytes']:,} | 1/{1 / s['fraction_of_fp16']:.2f} | "
                         f"{s['save_s']:.3f} | {s['load_s']:.3f} | {s['prefill_s']:.3f} | {s['load_speedup']:.1f}x |")
    lines += ["", "Targets: " + json.dumps(report["targets"]), "", f"Command: `{report['command']}`", ""]
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    streams = {s["name"]: s for s in report["bitstreams"]}
    fp16 = report["fp16_cache_bytes_per_token"]
    for r in report["methods"]:
        if "error" in r or r["kind"] == "full":
            continue
        bpt = r.get("bytes_per_token")
        if r["kind"] == "bitstream" and r["name"] in streams:
            s = streams[r["name"]]
            bpt = s["file_bytes"] / s["tokens"]
        if not bpt:
            continue
        color = {"ours": "C0", "bitstream": "C2", "rival": "C3"}[r["kind"]]
        ax.scatter(bpt, max(r["kl"], 1e-5), color=color)
        ax.annotate(r["name"].split(" (")[0].replace("transformers QuantizedCache ", "HF "),
                    (bpt, max(r["kl"], 1e-5)), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.axvline(fp16, color="grey", ls="--", lw=1)
    ax.text(fp16, ax.get_ylim()[1], " fp16 cache", fontsize=8, va="top", color="grey")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("bytes per cached token (log)")
    ax.set_ylabel("next-token KL vs full cache (nats, log)")
    ax.set_title("KV-cache bytes against quality (blue: toolkit caches, green: bitstreams, red: transformers)")
    ax.title.set_fontsize(9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
