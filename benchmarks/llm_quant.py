"""LLM weight quantization: this project against float, llm-compressor, torchao and HQQ, in one run.

    python benchmarks/llm_quant.py --out benchmarks/results/llm_quant.json

Model: the shipped ``lm-default`` (LlamaForCausalLM, 4 layers, hidden 256,
intermediate 704, tied embeddings), float32. Data: the licence texts in
/usr/share/common-licenses, which no shipped model was trained on
(toolkit/assets/MANIFEST.json lists the training sources). Calibration uses
the GNU licences and evaluation the others (benchmarks/rivals/make_data.py),
both as the same token tensors for every tool. Perplexity: non-overlapping
windows of 512 tokens (the model's context), mean NLL over every predicted
token.

Group 128 does not divide down_proj's input width (704 = 11 x 64); every
tool, this project included, quantizes down_proj with group 64 in the
"group 128" rows, and the effective bits count it.

The rivals run in their own virtual environment (benchmarks/rivals/setup_env.sh
builds it: llm-compressor pins an older transformers), one process each,
through benchmarks/rivals/run_rival.py, on the same tensors.

Speed: a 4096x4096 linear at batch 1 and 8 (float32, bfloat16, packed 4-bit
through torch's CPU int4 kernel) and ``generate`` tokens per second.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RIVALS = ROOT / "benchmarks" / "rivals"
MODEL_DIR = ROOT / "toolkit" / "assets" / "lm-default"


def _load_make_data():
    spec = importlib.util.spec_from_file_location("make_data", RIVALS / "make_data.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def build_data(work: Path, seq_len: int) -> dict:
    subprocess.run([sys.executable, str(RIVALS / "make_data.py"), "--model", str(MODEL_DIR),
                    "--out-dir", str(work / "data"), "--seq-len", str(seq_len)], check=True,
                   stdout=subprocess.DEVNULL)
    return json.loads((work / "data" / "data.json").read_text())


def load_model():
    import transformers

    transformers.logging.set_verbosity_error()
    return transformers.AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32).eval()


def ppl(model, windows: torch.Tensor) -> dict:
    from toolkit.llm.eval import perplexity

    r = perplexity(model, windows.reshape(-1), window=windows.shape[1], batch_size=8)
    return {"perplexity": r["perplexity"], "tokens": r["tokens"], "protocol": r["protocol"]}


def ours(method: str, bits: int, group: int | None, calib: torch.Tensor, evals: torch.Tensor,
         symmetric: bool, **extra) -> dict:
    import toolkit.llm as L
    from toolkit.llm.eval import bits_per_weight, measure

    kinds = {"rtn": L.RTNConfig, "gptq": L.GPTQConfig, "outlier": L.OutlierConfig}
    cfg = kinds[method](bits=bits, group_size=group, symmetric=symmetric, **extra)
    overrides = None
    if group is not None and 704 % group:
        overrides = {"re:.*down_proj": kinds[method](bits=bits, group_size=64, symmetric=symmetric, **extra)}
    model = load_model()
    # Batches of 8 windows, as the llm-compressor rows run (batching changes speed, not the Hessian).
    batches = list(calib.split(8))
    _, cost = measure(L.quantize_, model, cfg, calib=batches if cfg.needs_data else None, overrides=overrides,
                      progress=False)
    row = {"tool": "toolkit", "method": method, "bits": bits, "group": group or "channel",
           "symmetric": symmetric, "config": cfg.to_dict(), "quant_s": cost["seconds"],
           "peak_rss_mb": cost["peak_rss_bytes"] / 2**20,
           "bits_per_weight": bits_per_weight(model)["bits_per_weight"]}
    row.update(ppl(model, evals))
    return row


def rival(method: str, bits: int, group: int | None, work: Path, threads: int, asym: bool = False) -> dict:
    py = ROOT / "runs" / "rival-venv" / "bin" / "python"
    out = work / f"{method}-w{bits}g{group or -1}{'-asym' if asym else ''}.json"
    cmd = [str(py), str(RIVALS / "run_rival.py"), "--method", method, "--model", str(MODEL_DIR),
           "--bits", str(bits), "--group-size", str(group or -1), "--eval", str(work / "data" / "eval.pt"),
           "--out", str(out), "--threads", str(threads), "--no-baseline"]
    if method == "llmc-gptq":
        # Its default batch of 1 is several times slower here for the same result.
        cmd += ["--calib", str(work / "data" / "calib.pt"), "--llmc-batch-size", "8"]
    if asym:
        cmd += ["--asym"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0 or not out.exists():
        return {"tool": method, "bits": bits, "group": group or "channel", "error": proc.stderr[-800:]}
    rep = json.loads(out.read_text())
    quant = rep.get("reloaded") or rep.get("quant") or {}
    return {"tool": method, "method": method, "bits": bits, "group": group or "channel", "symmetric": not asym,
            "quant_s": rep.get("quant_s"), "peak_rss_mb": rep.get("peak_rss_mb"),
            "bits_per_weight": rival_bits(method, bits, group, asym), "perplexity": quant.get("ppl"),
            "versions": rep.get("versions"), "raw": rep}


# lm-default's quantized linears per decoder layer: (in_features, out_features).
_SHAPES = [(256, 256)] * 4 + [(256, 704)] * 2 + [(704, 256)]


def rival_bits(method: str, bits: int, group: int | None, asym: bool) -> float:
    """Bits per weight of a rival's stored form: codes plus its per-group statistics.

    llm-compressor stores scales in the model's dtype (float32 here) and packed
    zero points; torchao's CPU int4 keeps a bfloat16 scale and zero per group;
    HQQ a scale and zero in the compute dtype (float32).
    """
    stat = {"llmc-gptq": 32 + (bits if asym else 0), "torchao-int4": 32, "hqq": 64}[method]
    total = weights = 0
    for k, n in _SHAPES:
        g = k if group is None else (group if k % group == 0 else 64)
        total += n * k * bits + n * (k // g) * stat
        weights += n * k
    return total / weights


# ----------------------------------------------------------------- speed
def _time(fn, reps: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


@torch.no_grad()
def linear_speed(reps: int) -> list[dict]:
    import toolkit.llm as L

    torch.manual_seed(0)
    lin = torch.nn.Linear(4096, 4096, bias=False)
    lin.weight.data.normal_(0, 0.02)
    w_bf16 = lin.weight.detach().to(torch.bfloat16)
    q = torch.nn.Sequential(torch.nn.Linear(4096, 4096, bias=False))
    q[0].weight.data.copy_(lin.weight.data)
    L.quantize_(q, L.RTNConfig(bits=4, group_size=128), progress=False)
    qlin = q[0]
    rows = []
    for batch in (1, 8):
        x = torch.randn(batch, 4096)
        xb = x.to(torch.bfloat16)
        f32 = _time(lambda x=x: torch.nn.functional.linear(x, lin.weight), reps)
        bf16 = _time(lambda xb=xb: torch.nn.functional.linear(xb, w_bf16), reps)
        q4 = _time(lambda xb=xb: qlin(xb), reps)
        q4_f32 = _time(lambda x=x: qlin(x), max(3, reps // 10))
        rows.append({"batch": batch, "float32_ms": f32 * 1e3, "bfloat16_ms": bf16 * 1e3,
                     "packed4_bf16_ms": q4 * 1e3, "packed4_float32_in_ms": q4_f32 * 1e3,
                     "speedup_vs_bf16": bf16 / q4, "speedup_vs_float32": f32 / q4,
                     "weight_bytes": {"float32": 4 * 4096 * 4096, "bfloat16": 2 * 4096 * 4096,
                                      "packed4": int(qlin.storage_bits() // 8)}})
    return rows


@torch.no_grad()
def generate_speed(calib: torch.Tensor, new_tokens: int) -> list[dict]:
    import toolkit.llm as L

    prompt = calib[:1, :32]
    rows = []
    variants = [("float32", None, torch.float32), ("bfloat16", None, torch.bfloat16),
                ("gptq4-g128 (bf16 activations)", "gptq", torch.bfloat16)]
    for name, method, dtype in variants:
        model = load_model()
        if method:
            L.quantize_(model, L.GPTQConfig(bits=4, group_size=128), calib=list(calib[:32].split(1)),
                        overrides={"re:.*down_proj": L.GPTQConfig(bits=4, group_size=64)}, progress=False)
        model.to(dtype)

        def run(model=model):
            return model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)

        run()
        t = min(_time_once(run) for _ in range(3))
        rows.append({"model": name, "tokens_per_s": new_tokens / t, "new_tokens": new_tokens})
    return rows


def _time_once(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# ---------------------------------------------------------------- report
def interpolate(points: list[tuple[float, float]], x: float) -> float | None:
    pts = sorted(points)
    for (x0, y0), (x1, y1) in zip(pts, pts[1:], strict=False):
        if x0 <= x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0) if x1 > x0 else min(y0, y1)
    return None


def targets(rows: list[dict], float_ppl: float, lin: list[dict]) -> dict:
    def find(tool, method, bits, group, sym=None):
        for r in rows:
            if (r.get("tool") == tool and r.get("method") == method and r["bits"] == bits and r["group"] == group
                    and (sym is None or r.get("symmetric") == sym) and "perplexity" in r and r["perplexity"]):
                return r
        return None

    out = {}
    g4 = find("toolkit", "gptq", 4, 128)
    if g4:
        out["gptq4_g128_vs_float_pct"] = 100 * (g4["perplexity"] / float_ppl - 1)
        out["gptq4_g128_within_3pct"] = out["gptq4_g128_vs_float_pct"] <= 3
    r3, g3 = find("toolkit", "rtn", 3, 128), find("toolkit", "gptq", 3, 128)
    if r3 and g3:
        out["gptq3_gap_closed"] = 1 - (g3["perplexity"] - float_ppl) / (r3["perplexity"] - float_ppl)
        out["gptq3_closes_half"] = out["gptq3_gap_closed"] >= 0.5
    gptq_curve = [(r["bits_per_weight"], r["perplexity"]) for r in rows
                  if r.get("tool") == "toolkit" and r.get("method") == "gptq" and r["bits"] == 2]
    outl = [r for r in rows if r.get("tool") == "toolkit" and r.get("method") == "outlier" and r["bits"] == 2]
    out["outlier_vs_gptq_same_bits"] = []
    for r in outl:
        same = interpolate(gptq_curve, r["bits_per_weight"])
        out["outlier_vs_gptq_same_bits"].append({"group": r["group"], "bits_per_weight": r["bits_per_weight"],
                                                 "outlier_ppl": r["perplexity"], "gptq_ppl_same_bits": same,
                                                 "lower": same is not None and r["perplexity"] < same})
    for bits in (4, 3):
        ours_r, llmc = find("toolkit", "gptq", bits, 128), find("llmc-gptq", "llmc-gptq", bits, 128)
        if ours_r and llmc:
            out[f"gptq{bits}_vs_llmc_ppl_pct"] = 100 * (ours_r["perplexity"] / llmc["perplexity"] - 1)
            out[f"gptq{bits}_vs_llmc_time_ratio"] = ours_r["quant_s"] / llmc["quant_s"]
    if lin:
        out["packed4_bs1_speedup_vs_bf16"] = lin[0]["speedup_vs_bf16"]
    return out


def plot(rows: list[dict], float_ppl: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    series = {}
    for r in rows:
        if not r.get("perplexity") or not r.get("bits_per_weight"):
            continue
        label = f"{r['tool']} {r['method']}" if r["tool"] == "toolkit" else r["tool"]
        label += "" if r["tool"] != "toolkit" or r["method"] == "outlier" else f" g{r['group']}"
        series.setdefault(label, []).append((r["bits_per_weight"], r["perplexity"]))
    for label, pts in sorted(series.items()):
        pts.sort()
        style = "-o" if label.startswith("toolkit") else "s"
        ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=label, markersize=5)
    ax.axhline(float_ppl, color="k", linestyle="--", linewidth=1, label="float32")
    ax.set_xlabel("effective bits per weight (codes, scales, zeros, outliers)")
    ax.set_ylabel("perplexity (held-out licences, 512-token windows)")
    ax.set_yscale("log")
    ax.set_title("lm-default: bits against perplexity")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def markdown(report: dict) -> str:
    lines = ["# LLM weight quantization on lm-default", "",
             f"Command: `{report['command']}`", "",
             f"Machine: {report['machine']}", "",
             f"Data: calibration {report['data']['calib_shape']} tokens from "
             f"{', '.join(report['data']['calib_files'])}; "
             f"evaluation {report['data']['eval_shape']} from {', '.join(report['data']['eval_files'])} "
             "(/usr/share/common-licenses; no shipped model saw them).", "",
             f"Float32 perplexity: {report['float']['perplexity']:.3f}", "",
             "| tool | method | bits | group | bits/weight | perplexity | vs float | quantize s | peak RSS MB |",
             "|---|---|---:|---|---:|---:|---:|---:|---:|"]
    fp = report["float"]["perplexity"]
    for r in report["rows"]:
        if "error" in r:
            lines.append(f"| {r['tool']} | - | {r['bits']} | {r['group']} | - | failed | - | - | - |")
            continue
        bpw = f"{r['bits_per_weight']:.3f}" if r.get("bits_per_weight") else "-"
        rss = f"{r['peak_rss_mb']:.0f}" if r.get("peak_rss_mb") else "-"
        qs = f"{r['quant_s']:.1f}" if r.get("quant_s") is not None else "-"
        lines.append(f"| {r['tool']} | {r['method']}{'' if r.get('symmetric', True) else ' asym'} | {r['bits']} | "
                     f"{r['group']} | {bpw} | {r['perplexity']:.3f} | {100 * (r['perplexity'] / fp - 1):+.1f}% | "
                     f"{qs} | {rss} |")
    lines += ["", "## CPU speed", "", "| batch | float32 ms | bfloat16 ms | packed 4-bit ms (bf16 in) | "
              "vs bf16 | packed 4-bit, float32 in ms |", "|---:|---:|---:|---:|---:|---:|"]
    for r in report["linear_speed"]:
        lines.append(f"| {r['batch']} | {r['float32_ms']:.2f} | {r['bfloat16_ms']:.2f} | {r['packed4_bf16_ms']:.2f} | "
                     f"{r['speedup_vs_bf16']:.2f}x | {r['packed4_float32_in_ms']:.1f} |")
    lines += ["", "| model | generate tokens/s |", "|---|---:|"]
    for r in report["generate_speed"]:
        lines.append(f"| {r['model']} | {r['tokens_per_s']:.1f} |")
    lines += ["", "## Targets", "", "```json", json.dumps(report["targets"], indent=2), "```", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "llm_quant.json"))
    ap.add_argument("--work", default=str(ROOT / "runs" / "llm_quant"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-rivals", action="store_true", help="skip the rival tools")
    ap.add_argument("--quick", action="store_true", help="a few rows only (checks the script)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    data = build_data(work, seq_len=512)
    calib = torch.load(work / "data" / "calib.pt")
    evals = torch.load(work / "data" / "eval.pt")

    float_row = ppl(load_model(), evals)
    rows: list[dict] = []
    plan = []
    for bits in ((4, 3) if args.quick else (8, 4, 3, 2)):
        sym = bits != 2  # a symmetric 2-bit grid wastes one of its four levels
        for group in ((128,) if args.quick else (128, None)):
            plan += [("rtn", bits, group, sym, {}), ("gptq", bits, group, sym, {})]
    if not args.quick:
        # The 2-bit GPTQ curve the outlier rows are compared on, at their effective bits.
        plan += [("gptq", 2, g, False, {}) for g in (64, 32, 16)]
        plan += [("outlier", 2, 16, False, {"outlier_fraction": f}) for f in (0.002, 0.005)]
        plan += [("outlier", 2, 16, False, {"outlier_fraction": 0.002, "stat_group": 32}),
                 ("outlier", 2, 32, False, {"outlier_fraction": 0.005}),
                 ("outlier", 3, 16, False, {"outlier_fraction": 0.005})]
    for method, bits, group, sym, extra in plan:
        row = ours(method, bits, group, calib, evals, sym, **extra)
        rows.append(row)
        print(f"{method:8s} {bits} g{group or 'ch':<4} {row['bits_per_weight']:.3f} bpw  ppl {row['perplexity']:.3f}  "
              f"{row['quant_s']:.1f}s", flush=True)

    if not args.no_rivals:
        subprocess.run(["bash", str(RIVALS / "setup_env.sh")], check=False, stdout=subprocess.DEVNULL)
        rival_plan = [("llmc-gptq", 4, 128), ("llmc-gptq", 3, 128)]
        if not args.quick:
            rival_plan += [("llmc-gptq", 4, None), ("llmc-gptq", 8, 128), ("torchao-int4", 4, 128),
                           ("hqq", 4, 128), ("hqq", 3, 128)]
        for method, bits, group in rival_plan:
            row = rival(method, bits, group, work, args.threads)
            rows.append(row)
            print(method, bits, group, row.get("perplexity"), row.get("quant_s"), row.get("error", "")[-200:],
                  flush=True)

    lin = linear_speed(reps=10 if args.quick else 50)
    gen = generate_speed(calib, new_tokens=32 if args.quick else 128)
    report = {
        "command": "python benchmarks/llm_quant.py" + (" --quick" if args.quick else "")
                   + (" --no-rivals" if args.no_rivals else ""),
        "machine": f"{os.cpu_count()} cores, {platform.machine()}, torch {torch.__version__}, "
                   f"{args.threads} torch threads",
        "model": "lm-default", "data": data, "float": float_row, "rows": rows,
        "linear_speed": lin, "generate_speed": gen,
    }
    report["targets"] = targets(rows, float_row["perplexity"], lin)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    out.with_suffix(".md").write_text(markdown(report))
    plot(rows, float_row["perplexity"], out.with_suffix(".png"))
    print(markdown(report))


if __name__ == "__main__":
    main()
