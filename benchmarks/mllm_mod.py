"""Mixture-of-Depths against dense and against training-free token dropping, at matched training and FLOPs.

    python benchmarks/mllm_mod.py --out benchmarks/results/mllm_mod.json

Models (all fine-tuned from the shipped ``vlm-scenes`` on the same batches
for the same steps; see each one's manifest entry for the command):

* ``--dense``: the dense fine-tune, the reference;
* ``--mod``: p-MoD fine-tunes (:mod:`toolkit.vision.mod`), one per schedule;
* the dense fine-tune converted to MoD with the default schedule and not
  trained (fresh routers: every token weighs 1 and ties are broken by
  position), to show what the fine-tune adds.

Training-free rivals: the best methods of ``benchmarks/mllm_tokens.py``
(``visionzip`` and ``multistage``, both with proportional attention) on the
dense fine-tune, each at the share of vision tokens whose prefill FLOPs
match each MoD model's (bisection on the counted FLOPs, within 0.5%), and
``visionzip+prop`` at the ``--sweep`` shares for the rest of its curve.

Held-out data: ``--items`` questions on new scenes of the ``test`` seed
stream (:mod:`toolkit.data.scenes`), answered greedily through ``generate``.
Reported: accuracy, prefill FLOPs (one prompt, the LM head on the last
position as ``generate`` runs it), KV-cache bytes (all and vision tokens'),
CPU latency of the prefill and of one decoding step (medians, ``--threads``
threads), and each fine-tune's logged training curve.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

RIVALS = (("visionzip+prop", "visionzip"), ("multistage+prop", "multistage"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dense", default="vlm-scenes-ft")
    ap.add_argument("--mod", default="vlm-scenes-mod,vlm-scenes-mod-lean", help="comma-separated MoD models")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "mllm_mod.json")
    ap.add_argument("--items", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=50)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sweep", default="0.0625,0.125,0.25,0.5", help="more shares for the visionzip+prop curve")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from toolkit.bench import machine
    from toolkit.data import scenes
    from toolkit.models import locate
    from toolkit.vision import TokenDropConfig, drop_vision_tokens_, evaluate_vqa, load_vlm
    from toolkit.vision import mod as M
    from toolkit.vision.measure import decode_step_latency, kv_cache_bytes, prefill_flops, prefill_latency

    dense, proc = load_vlm(args.dense)
    test = scenes.items(args.items, "test")
    probe = proc([test[0].image], [test[0].question])
    n_vis = int((probe["input_ids"] == proc.image_token_id).sum())
    length = probe["input_ids"].shape[1]

    def flops_of(model) -> dict:
        return prefill_flops(model, probe, logits_to_keep=1)

    def measure(model, label: str, **extra) -> dict:
        t = time.perf_counter()
        ev = evaluate_vqa(model, proc, test, batch_size=args.batch)
        eval_s = time.perf_counter() - t
        with torch.no_grad():
            out = model.generate(**probe, max_new_tokens=1, do_sample=False, return_dict_in_generate=True,
                                 pad_token_id=proc.config.pad_token_id)
        cache = out.cache if hasattr(out, "cache") else out.past_key_values
        lengths = [layer.keys.shape[-2] for layer in cache.layers]
        # the prefill's slots only: text tokens are in every layer's cache, vision tokens where kept
        vision_slots = sum(n - (length - n_vis) for n in lengths)
        row = {"model": label, **extra, **ev, "flops": flops_of(model), "kv_bytes": kv_cache_bytes(cache),
               "cache_lengths": lengths, "vision_kv_share": vision_slots / (len(lengths) * n_vis),
               "prefill_s": prefill_latency(model, probe, repeats=7),
               "decode_step_s": decode_step_latency(model, probe, repeats=7), "eval_s": eval_s}
        print(f"{label:>28}: acc {row['accuracy']:.3f} flops {row['flops']['total']:.3e} "
              f"vision kv {row['vision_kv_share']:.3f} prefill {row['prefill_s'] * 1e3:.1f} ms "
              f"decode {row['decode_step_s'] * 1e3:.2f} ms", flush=True)
        return row

    rows = [measure(dense, "dense", kind="dense")]
    mods = []
    for name in args.mod.split(","):
        model, _ = load_vlm(name)
        keep = list(M.mod_config_of(model).keep)
        mods.append(measure(model, name, kind="p-MoD", schedule=keep, training=_history(locate(name).path)))
        rows.append(mods[-1])
    untrained = copy.deepcopy(dense)
    M.convert_(untrained, M.MoDConfig())
    rows.append(measure(untrained, "dense + MoD, not fine-tuned", kind="MoD untrained",
                        schedule=list(M.mod_config_of(untrained).keep)))
    del untrained
    for label, method in RIVALS:
        for target in mods:
            goal = target["flops"]["total"]

            def flops_at(keep: float, method=method) -> int:
                with drop_vision_tokens_(dense, TokenDropConfig(method, keep=keep, layer=1,
                                                                proportional_attention=True)):
                    return flops_of(dense)["total"]

            keep = _match(flops_at, goal)
            with drop_vision_tokens_(dense, TokenDropConfig(method, keep=keep, layer=1, proportional_attention=True)):
                rows.append(measure(dense, f"{label} at {target['model']}'s FLOPs", kind="training-free",
                                    method=label, keep=keep))
    # the rest of the training-free curve, for the accuracy-against-FLOPs plot
    for keep in (float(k) for k in args.sweep.split(",") if k):
        with drop_vision_tokens_(dense, TokenDropConfig("visionzip", keep=keep, layer=1, proportional_attention=True)):
            rows.append(measure(dense, f"visionzip+prop at {keep:.1%}", kind="training-free sweep",
                                method="visionzip+prop", keep=keep))
    full = rows[0]
    for r in rows:
        r["accuracy_vs_dense"] = r["accuracy"] - full["accuracy"]
        r["flops_ratio"] = r["flops"]["total"] / full["flops"]["total"]
        r["kv_ratio"] = r["kv_bytes"] / full["kv_bytes"]
    result = {"benchmark": "mllm_mod", "dense": args.dense, "items": args.items,
              "data": "toolkit.data.scenes split='test' (held-out seeds), first N items",
              "dense_training": _history(locate(args.dense).path), "machine": machine(),
              "command": "python benchmarks/mllm_mod.py", "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    md = _table(result)
    args.out.with_suffix(".md").write_text(md)
    print(md)
    _plot(result, args.out.with_suffix(".png"))


def _match(flops_at, goal: float, tol: float = 0.005) -> float:
    """The share of vision tokens kept whose prefill FLOPs are ``goal`` (FLOPs grow with the share)."""
    lo, hi = 1 / 256, 1.0
    for _ in range(20):
        mid = (lo + hi) / 2
        f = flops_at(mid)
        if abs(f - goal) <= tol * goal:
            return mid
        lo, hi = (mid, hi) if f < goal else (lo, mid)
    return mid


def _history(path: Path) -> list | None:
    """The training log saved with a fine-tuned model (``training.json``), if any."""
    f = Path(path) / "training.json"
    return json.loads(f.read_text()) if f.exists() else None


def _table(res: dict) -> str:
    m = res["machine"]
    lines = ["`python benchmarks/mllm_mod.py` (dense = vlm-scenes fine-tuned; every model fine-tuned for the same "
             "steps on the same batches).", "",
             f"Held-out scenes: {res['items']} questions. Machine: {m['cores']} cores, torch {m['torch']}, "
             f"{m['threads']} threads. FLOPs of one prompt's prefill ({_tokens(res)}).", "",
             "| model | vision tokens per layer | accuracy | vs dense | prefill FLOPs | vision KV | all KV | "
             "prefill ms | decode ms |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in res["rows"]:
        if "schedule" in r:
            per = " / ".join(f"{s:.0%}" for s in r["schedule"])
        elif "keep" in r:
            per = f"{r['keep']:.1%} (all layers)"
        else:
            per = "100%"
        lines.append(f"| {r['model']} | {per} | {r['accuracy']:.1%} | {100 * r['accuracy_vs_dense']:+.1f} | "
                     f"{r['flops_ratio']:.1%} | {r['vision_kv_share']:.1%} | {r['kv_ratio']:.1%} | "
                     f"{r['prefill_s'] * 1e3:.1f} | {r['decode_step_s'] * 1e3:.2f} |")
    kinds = sorted(res["rows"][0]["by_kind"])
    lines += ["", "Accuracy by question kind:", "", "| model | " + " | ".join(kinds) + " |",
              "|---|" + "---:|" * len(kinds)]
    for r in res["rows"]:
        lines.append(f"| {r['model']} | " + " | ".join(f"{r['by_kind'][k]:.0%}" for k in kinds) + " |")
    return "\n".join(lines) + "\n"


def _tokens(res: dict) -> str:
    first = res["rows"][0]
    return f"{first['cache_lengths'][0]} tokens"


def _plot(res: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    ax = axes[0]
    dense = res["rows"][0]
    ax.plot([1.0], [dense["accuracy"]], "ks", label="dense")
    for kind, style in (("p-MoD", "o"), ("MoD untrained", "x")):
        rs = [r for r in res["rows"] if r["kind"] == kind]
        ax.plot([r["flops_ratio"] for r in rs], [r["accuracy"] for r in rs], style, ms=8, label=kind)
    for label, _ in RIVALS:
        rs = sorted((r for r in res["rows"] if r.get("method") == label), key=lambda r: r["flops_ratio"])
        rs += [dense] if rs else []
        ax.plot([r["flops_ratio"] for r in rs], [r["accuracy"] for r in rs], "^--", label=f"{label} (training-free)")
    ax.set_xlabel("prefill FLOPs / dense")
    ax.set_ylabel("held-out accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax = axes[1]
    curves = [("dense", res.get("dense_training"))] + [(r["model"], r.get("training")) for r in res["rows"]
                                                       if r["kind"] == "p-MoD"]
    for label, hist in curves:
        if not hist:
            continue
        ev = [h for h in hist if "accuracy" in h and not h.get("final")]
        ax.plot([h["step"] for h in ev], [h["accuracy"] for h in ev], "o-", label=label)
    ax.set_xlabel("fine-tuning step")
    ax.set_ylabel("held-out accuracy (logged)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
