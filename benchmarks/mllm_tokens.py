"""Vision-token dropping: accuracy against the share of vision tokens kept, with FLOPs, latency and KV bytes.

    python benchmarks/mllm_tokens.py --out benchmarks/results/mllm_tokens.json

Model: the shipped ``vlm-scenes`` (LlavaForConditionalGeneration: a CLIP
tower of 3 layers over 256 patch tokens, LLaVA's projector, and the
``lm-default`` Llama), trained on drawn scenes of the ``train`` seed stream.
Held-out data: ``--items`` questions on new scenes of the ``test`` stream
(:mod:`toolkit.data.scenes`), answered greedily through ``generate``,
exact match of the first word.

For each method (``random``, ``fastv``, ``visionzip``, ``multistage``; the
merging ones also with ``proportional_attention``) and
share kept (50, 25, 12.5, 6.25%; 100% is the unmodified model):

* accuracy overall and by question kind;
* prefill FLOPs of one prompt by part (vision tower, projector, language
  model), counted by ``torch.utils.flop_counter`` with CPU SDPA added;
* KV-cache bytes after the prefill of one prompt;
* CPU latency of the prefill of one prompt and of one decoding step
  (medians, ``--threads`` threads).

Baselines: chance (the most frequent answer of each kind is not chance; the
text-only figure is the best answer to each exact question over 20,000
training items, the most any image-blind model can reach).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SHARES = (1.0, 0.5, 0.25, 0.125, 0.0625)
METHODS = ("random", "fastv", "visionzip", "multistage")
# (row label, method, proportional attention): the merging methods run as published and with ToMe's
# proportional attention, which lets a merged token draw the attention of the tokens it stands for
VARIANTS = (("random", "random", False), ("fastv", "fastv", False), ("visionzip", "visionzip", False),
            ("visionzip+prop", "visionzip", True), ("multistage", "multistage", False),
            ("multistage+prop", "multistage", True))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="vlm-scenes")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "mllm_tokens.json")
    ap.add_argument("--items", type=int, default=600)
    ap.add_argument("--batch", type=int, default=50)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--fastv-layer", type=int, default=2)
    ap.add_argument("--multistage-layer", type=int, default=1)
    ap.add_argument("--only", help="comma-separated row labels (see VARIANTS)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from toolkit.bench import machine
    from toolkit.data import scenes
    from toolkit.vision import TokenDropConfig, drop_vision_tokens_, evaluate_vqa, load_vlm
    from toolkit.vision.measure import decode_step_latency, kv_cache_bytes, prefill_flops, prefill_latency

    model, proc = load_vlm(args.model)  # a shipped name or a directory
    test = scenes.items(args.items, "test")
    train = scenes.items(20_000, "train", start=10_000_000)
    text_only = scenes.text_only_accuracy(train, test)
    chance = float(np.mean([1 / _n_answers(it.kind) for it in test]))
    probe = proc([test[0].image], [test[0].question])

    def measure(cfg) -> dict:
        handle = drop_vision_tokens_(model, cfg) if cfg is not None else None
        try:
            t = time.perf_counter()
            ev = evaluate_vqa(model, proc, test, batch_size=args.batch)
            eval_s = time.perf_counter() - t
            flops = prefill_flops(model, probe)
            with torch.no_grad():
                out = model.generate(**probe, max_new_tokens=1, do_sample=False, return_dict_in_generate=True,
                                     pad_token_id=proc.config.pad_token_id)
            cache = out.cache if hasattr(out, "cache") else out.past_key_values
            kv = kv_cache_bytes(cache)
            pre = prefill_latency(model, probe, repeats=7)
            dec = decode_step_latency(model, probe, repeats=7)
        finally:
            if handle is not None:
                handle.remove()
        return {**ev, "flops": flops, "kv_bytes": kv, "prefill_s": pre, "decode_step_s": dec, "eval_s": eval_s}

    rows = []
    full = measure(None)
    rows.append({"method": "full", "keep": 1.0, **full})
    print(_line(rows[-1], full), flush=True)
    only = set(args.only.split(",")) if args.only else None
    for label, method, prop in VARIANTS:
        if only and label not in only:
            continue
        for keep in SHARES[1:]:
            layer = args.fastv_layer if method == "fastv" else args.multistage_layer
            cfg = TokenDropConfig(method, keep=keep, layer=layer, proportional_attention=prop)
            r = {"method": label, "keep": keep, "layer": layer if method in ("fastv", "multistage") else None,
                 "proportional_attention": prop, **measure(cfg)}
            rows.append(r)
            print(_line(r, full), flush=True)
    for r in rows:
        r["accuracy_retained"] = r["accuracy"] / full["accuracy"]
        r["flops_ratio"] = r["flops"]["total"] / full["flops"]["total"]
        r["kv_ratio"] = r["kv_bytes"] / full["kv_bytes"]
    result = {"benchmark": "mllm_tokens", "model": args.model, "items": args.items,
              "data": "toolkit.data.scenes split='test' (held-out seeds), first N items",
              "text_only_accuracy": text_only, "chance_accuracy": chance, "machine": machine(),
              "command": "python benchmarks/mllm_tokens.py", "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    md = _table(result)
    args.out.with_suffix(".md").write_text(md)
    print(md)
    _plot(result, args.out.with_suffix(".png"))


def _n_answers(kind: str) -> int:
    return {"count_colour": 7, "count_shape": 7, "colour_of": 5, "shape_of": 3, "left_of": 5, "is_left": 2}[kind]


def _line(r: dict, full: dict) -> str:
    return (f"{r['method']:>10} keep {r['keep']:.4f}: acc {r['accuracy']:.3f} "
            f"flops {r['flops']['total'] / full['flops']['total']:.3f} kv {r['kv_bytes'] / full['kv_bytes']:.3f} "
            f"prefill {r['prefill_s'] * 1e3:.1f} ms decode {r['decode_step_s'] * 1e3:.2f} ms")


def _table(res: dict) -> str:
    m = res["machine"]
    lines = ["`python benchmarks/mllm_tokens.py` (model vlm-scenes; K = 2 for fastv, 1 for multistage).", "",
             f"Held-out scenes: {res['items']} questions; text-only best {res['text_only_accuracy']:.1%}, "
             f"chance {res['chance_accuracy']:.1%}. Machine: {m['cores']} cores, torch {m['torch']}, "
             f"{m['threads']} threads.", "",
             "| method | kept | accuracy | retained | prefill FLOPs | LM FLOPs | KV bytes | prefill ms | decode ms |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    full = res["rows"][0]
    for r in res["rows"]:
        lm = r["flops"]["language_model"] / full["flops"]["language_model"]
        lines.append(f"| {r['method']} | {r['keep']:.2%} | {r['accuracy']:.1%} | {r['accuracy_retained']:.1%} | "
                     f"{r['flops_ratio']:.1%} | {lm:.1%} | {r['kv_ratio']:.1%} | {r['prefill_s'] * 1e3:.1f} | "
                     f"{r['decode_step_s'] * 1e3:.2f} |")
    kinds = sorted(full["by_kind"])
    lines += ["", "Accuracy by question kind:", "",
              "| method | kept | " + " | ".join(kinds) + " |", "|---|---:|" + "---:|" * len(kinds)]
    for r in res["rows"]:
        lines.append(f"| {r['method']} | {r['keep']:.2%} | " +
                     " | ".join(f"{r['by_kind'][k]:.0%}" for k in kinds) + " |")
    return "\n".join(lines) + "\n"


def _plot(res: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    full = res["rows"][0]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for method, *_ in VARIANTS:
        rs = [full] + [r for r in res["rows"] if r["method"] == method]
        if len(rs) == 1:
            continue
        style = "o--" if method.endswith("+prop") else "o-"
        axes[0].plot([r["keep"] for r in rs], [r["accuracy"] for r in rs], style, label=method)
        axes[1].plot([r["flops_ratio"] for r in rs], [r["accuracy"] for r in rs], style, label=method)
    for ax in axes:
        ax.axhline(res["text_only_accuracy"], color="grey", ls=":", label="text only")
        ax.set_ylabel("held-out accuracy")
        ax.grid(alpha=0.3)
    axes[0].set_xscale("log", base=2)
    axes[0].set_xlabel("share of vision tokens kept")
    axes[1].set_xlabel("prefill FLOPs / full model")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
