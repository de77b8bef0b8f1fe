"""Run one rival weight-quantizer on a small HF Llama model, on CPU, and report.

Run it with the *rival* venv (see setup_env.sh), not the main one: llm-compressor
pins an older transformers / huggingface-hub, which live only in runs/rival-venv.

    runs/rival-venv/bin/python benchmarks/rivals/run_rival.py \
        --method llmc-gptq --model toolkit/assets/lm-default --bits 4 --group-size 128 \
        --calib runs/rivals-data/calib.pt --eval runs/rivals-data/eval.pt \
        --out runs/rivals/llmc-w4g128.json

Methods
  llmc-gptq     llm-compressor ``oneshot`` + ``GPTQModifier`` (compressed-tensors checkpoint)
  torchao-int4  torchao ``quantize_`` (int4 CPU tinygemm kernel for bits=4 with groups,
                IntxWeightOnlyConfig for other bits / per-channel); no calibration data
  hqq           HQQ (half-quadratic, calibration-free) via ``AutoHQQHFModel.quantize_model``

Every method quantizes the Linear layers inside the decoder blocks (q/k/v/o,
gate/up/down) and leaves the tied embedding / lm_head in float, so the numbers
are comparable.

Perplexity = exp(mean NLL over all predicted eval tokens): each window of L tokens
contributes L-1 next-token predictions (no context carried across windows).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import sys
import time
from importlib import metadata
from pathlib import Path

import torch

# Which decoder Linear layers every method quantizes; lm_head (tied to embed_tokens) stays float.
LINEAR_SUFFIXES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# --------------------------------------------------------------------------- helpers


def rss_mb() -> float:
    """Current resident set size (MiB), read from /proc (Linux)."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    # ru_maxrss is in KiB on Linux; it is the process-wide high-water mark.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def versions() -> dict:
    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "huggingface-hub", "llmcompressor", "compressed-tensors",
                "torchao", "hqq", "accelerate", "datasets"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def load_model(model_dir: str):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    return model


def load_tokenizer(model_dir: str):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_file=str(Path(model_dir) / "tokenizer.json"))


def decoder_linears(model):
    """(name, module) of the decoder-block Linear layers that all methods quantize."""
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and n.split(".")[-1] in LINEAR_SUFFIXES]


def effective_group(in_features: int, group_size: int) -> int:
    """Group size actually usable for a layer of this input width.

    None of the rivals accept a ragged last group (llm-compressor raises, torchao
    silently skips the layer), so a layer whose width the requested group does not
    divide gets gcd(width, group): for down_proj of width 704 and group 128 that is 64
    (704 = 11*64). -1 means per output channel.
    """
    if group_size <= 0 or in_features % group_size == 0:
        return group_size
    return math.gcd(in_features, group_size)


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, batch_size: int = 8) -> dict:
    """exp(mean NLL) over all next-token predictions in the eval windows."""
    total_nll, total_tok = 0.0, 0
    t0 = time.perf_counter()
    for i in range(0, windows.shape[0], batch_size):
        ids = windows[i:i + batch_size]
        logits = model(input_ids=ids).logits.float()
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
        total_nll += nll.item()
        total_tok += ids[:, 1:].numel()
    return {"ppl": math.exp(total_nll / total_tok), "mean_nll": total_nll / total_tok,
            "tokens": total_tok, "eval_s": time.perf_counter() - t0}


def describe_checkpoint(ckpt: Path) -> dict:
    """Tensor names / dtypes / shapes and the quantization_config of a saved checkpoint."""
    from safetensors import safe_open

    tensors = {}
    for f in sorted(ckpt.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as sf:
            for k in sf.keys():
                t = sf.get_slice(k)
                tensors[k] = {"dtype": str(t.get_dtype()), "shape": list(t.get_shape())}
    cfg = json.loads((ckpt / "config.json").read_text())
    # Only layer 0 in full (all layers repeat it), plus everything outside the blocks.
    shown = {k: v for k, v in tensors.items() if ".layers." not in k or ".layers.0." in k}
    return {
        "files": sorted(p.name for p in ckpt.iterdir()),
        "bytes_safetensors": sum(f.stat().st_size for f in ckpt.glob("*.safetensors")),
        "n_tensors": len(tensors),
        "tensors_layer0_and_top": shown,
        "quantization_config": cfg.get("quantization_config"),
    }


# --------------------------------------------------------------------------- llm-compressor


def run_llmc(args, model, tok, calib: torch.Tensor) -> dict:
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier

    # Our own token batches: a datasets.Dataset that already has input_ids (+ mask),
    # so llm-compressor skips its tokenization step and uses the rows as they are.
    ds = Dataset.from_dict({
        "input_ids": calib.tolist(),
        "attention_mask": torch.ones_like(calib).tolist(),
    })

    def weight_args(group: int) -> QuantizationArgs:
        kw = dict(num_bits=args.bits, type="int", symmetric=not args.asym, dynamic=False)
        if group > 0:
            kw.update(strategy="group", group_size=group)
        else:
            kw.update(strategy="channel")
        # actorder is set once on the modifier below, not per scheme: GPTQModifier
        # raises if both are given and differ.
        return QuantizationArgs(**kw)

    # One config group per distinct effective group size. compressed-tensors refuses
    # a group size that does not divide the layer width (ValueError at initialize),
    # so with --indivisible fallback such layers get their own group (gcd).
    # `targets` entries are module-name regexes ("re:" prefix) or class names.
    by_group: dict[int, list[str]] = {}
    for name, m in decoder_linears(model):
        g = args.group_size if args.indivisible != "fallback" else effective_group(m.in_features, args.group_size)
        suffix = name.split(".")[-1]
        by_group.setdefault(g, [])
        if f"re:.*{suffix}$" not in by_group[g]:
            by_group[g].append(f"re:.*{suffix}$")
    config_groups = {
        f"group_{i}": QuantizationScheme(targets=targets, weights=weight_args(g))
        for i, (g, targets) in enumerate(sorted(by_group.items(), reverse=True))
    }
    recipe = GPTQModifier(
        config_groups=config_groups,
        ignore=["lm_head"],
        block_size=128,
        dampening_frac=args.dampening,
        # llm-compressor 0.14 defaults to actorder="static" (a Sentinel); pass None
        # explicitly for plain left-to-right GPTQ. ("group", the mode that would store a
        # g_idx tensor, raises ValueError in 0.14; "static"/"weight" permute only during GPTQ.)
        actorder=None if args.actorder == "none" else args.actorder,
        # "bypass" asks llm-compressor to skip its divisibility check, to see what
        # compressed-tensors then does with a ragged last group.
        bypass_divisibility_checks=(args.indivisible == "bypass"),
    )

    t0 = time.perf_counter()
    oneshot(
        model=model,
        tokenizer=tok,
        dataset=ds,
        recipe=recipe,
        num_calibration_samples=calib.shape[0],
        max_seq_length=calib.shape[1],
        shuffle_calibration_samples=False,
        # Batching only changes speed: the Hessian is a running average over samples.
        batch_size=args.llmc_batch_size,
        # "independent" (default) picks the sequential pipeline for GPTQ: layer by
        # layer, which is also what a memory-bound GPU user would run.
        pipeline=args.llmc_pipeline,
    )
    quant_s = time.perf_counter() - t0
    rss_after = rss_mb()

    ckpt = Path(args.save_dir or (Path(args.out).with_suffix("") .as_posix() + "-ckpt"))
    t0 = time.perf_counter()
    model.save_pretrained(str(ckpt), save_compressed=True)
    tok.save_pretrained(str(ckpt))
    save_s = time.perf_counter() - t0

    return {
        "quant_s": quant_s,
        "save_s": save_s,
        "rss_after_quant_mb": rss_after,
        "checkpoint_dir": str(ckpt),
        "config_groups": {k: {"targets": v.targets, "weights": v.weights.model_dump(mode="json")}
                          for k, v in config_groups.items()},
        "checkpoint": describe_checkpoint(ckpt),
    }


def reload_llmc(ckpt: str):
    """Reload the compressed-tensors checkpoint through transformers, decompressed.

    run_compressed=False matters: with the default (True) transformers 5.17 +
    compressed-tensors 0.19 on CPU leave the Linear layers holding only
    weight_packed/weight_scale/..., and their forward then fails with
    "AttributeError: 'Linear' object has no attribute 'weight'" (seen in a fresh
    process; in the process that just ran oneshot the same call happened to
    decompress). False dequantizes to a float weight at load time.
    """
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig

    m = AutoModelForCausalLM.from_pretrained(
        ckpt, dtype=torch.float32, quantization_config=CompressedTensorsConfig(run_compressed=False))
    m.eval()
    return m


# --------------------------------------------------------------------------- torchao


def run_torchao(args, model) -> dict:
    from torchao.quantization import Int8WeightOnlyConfig, IntxWeightOnlyConfig, quantize_
    from torchao.quantization.granularity import PerAxis, PerGroup
    from torchao.quantization.quant_primitives import MappingType

    layers = decoder_linears(model)
    groups = {}
    for name, m in layers:
        groups.setdefault(effective_group(m.in_features, args.group_size), set()).add(name)

    def make_config(group: int):
        # bits=4 with groups 32/64/128: the CPU int4 tinygemm path
        # (Int4OpaqueTensor, asymmetric, _weight_int4pack_mm_for_cpu). In torchao 0.18
        # the public Int4WeightOnlyConfig has no CPU packing format (plain/preshuffled/
        # tile_packed_to_4d are CUDA kernels); the CPU one lives in prototype.
        if args.bits == 4 and group in (32, 64, 128) and not args.torchao_intx:
            from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig
            return "PrototypeInt4WeightOnlyConfig", PrototypeInt4WeightOnlyConfig(group_size=group)
        if args.bits == 8 and group <= 0 and not args.torchao_intx:
            return "Int8WeightOnlyConfig", Int8WeightOnlyConfig()
        # Any 1..8 bits, any group or per channel: IntxWeightOnlyConfig (int8 storage of
        # the int-N values + dequant + matmul; correct everywhere, not fast).
        gran = PerGroup(group) if group > 0 else PerAxis(0)
        mt = MappingType.ASYMMETRIC if args.asym else MappingType.SYMMETRIC
        return "IntxWeightOnlyConfig", IntxWeightOnlyConfig(
            weight_dtype=getattr(torch, f"int{args.bits}"), granularity=gran, mapping_type=mt)

    used = {}
    t0 = time.perf_counter()
    for g, names in groups.items():
        cname, cfg = make_config(g)
        used[str(g)] = {"config": cname, "repr": repr(cfg), "n_layers": len(names)}
        # filter_fn gets (module, fully-qualified name); restrict to this group's layers.
        quantize_(model, cfg, filter_fn=lambda mod, fqn, names=names: fqn in names)
    quant_s = time.perf_counter() - t0

    # Check nothing was silently skipped (torchao only logs at INFO when a shape
    # does not fit the group): every targeted weight must now be a tensor subclass.
    kinds = {}
    for name, m in layers:
        w = m.weight.data if isinstance(m.weight, torch.nn.Parameter) else m.weight
        kinds[name.split(".")[-1]] = type(w).__name__
    return {"quant_s": quant_s, "rss_after_quant_mb": rss_mb(), "configs": used, "weight_types": kinds}


# --------------------------------------------------------------------------- hqq


def run_hqq(args, model) -> dict:
    from hqq.core.quantize import BaseQuantizeConfig, HQQBackend, HQQLinear
    from hqq.models.hf.base import AutoHQQHFModel

    # Same per-layer group fallback as the others. HQQ itself groups the *flattened*
    # weight (reshape(-1, group)), so a non-dividing group would not error, but groups
    # would then straddle rows; keep groups within a row for a fair comparison.
    def qcfg(in_features: int) -> dict:
        g = effective_group(in_features, args.group_size)
        # group_size=None means per-channel (one scale/zero per output row, axis=1).
        return BaseQuantizeConfig(nbits=args.bits, group_size=(g if g > 0 else None), axis=1)

    widths = {n.split(".")[-1]: m.in_features for n, m in decoder_linears(model)}
    # Keys are HQQ's "linear tags" ("self_attn.q_proj", "mlp.down_proj", ...).
    quant_config = {}
    t0 = time.perf_counter()
    AutoHQQHFModel.setup_model(model)
    for tag in model.linear_tags:
        quant_config[tag] = qcfg(widths[tag.split(".")[-1]])
    # compute_dtype float32 + device cpu: HQQ's PyTorch backend dequantizes on the fly.
    AutoHQQHFModel.quantize_model(model, quant_config=quant_config, compute_dtype=torch.float32, device="cpu")
    quant_s = time.perf_counter() - t0
    HQQLinear.set_backend(HQQBackend.PYTORCH)
    n_hqq = sum(isinstance(m, HQQLinear) for m in model.modules())
    return {"quant_s": quant_s, "rss_after_quant_mb": rss_mb(), "n_hqq_linear": n_hqq,
            "quant_config": {k: {kk: (vv if isinstance(vv, (int, float, str, bool, type(None))) else str(vv))
                                 for kk, vv in v["weight_quant_params"].items()}
                             for k, v in quant_config.items()}}


# --------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", required=True, choices=["llmc-gptq", "torchao-int4", "hqq"])
    ap.add_argument("--model", default="toolkit/assets/lm-default")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128, help="-1 = per output channel")
    ap.add_argument("--calib", help="torch-saved LongTensor [n_samples, seq_len] (llmc only)")
    ap.add_argument("--eval", required=True, help="torch-saved LongTensor [n_windows, seq_len]")
    ap.add_argument("--out", required=True, help="JSON report path")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--no-baseline", action="store_true", help="skip the float perplexity")
    ap.add_argument("--asym", action="store_true", help="asymmetric (zero point) weights")
    # llm-compressor specifics
    ap.add_argument("--actorder", default="static", choices=["none", "static", "weight"],
                    help="GPTQ activation ordering (llmc; library default static; "
                         "0.14 rejects \"group\": 'Only weight and static are supported for GPTQ')")
    ap.add_argument("--llmc-batch-size", type=int, default=1,
                    help="calibration batch size (llmc; library default 1)")
    ap.add_argument("--dampening", type=float, default=0.01, help="GPTQ dampening_frac (llmc)")
    ap.add_argument("--indivisible", default="fallback", choices=["fallback", "error", "bypass"],
                    help="layers whose width the group does not divide: own config group with "
                         "gcd (fallback), or pass the group as is (error: llmc's check; bypass: skip it)")
    ap.add_argument("--llmc-pipeline", default="independent",
                    help="llm-compressor pipeline: independent|sequential|basic|datafree")
    ap.add_argument("--save-dir", help="llmc checkpoint dir (default: <out>-ckpt)")
    ap.add_argument("--torchao-intx", action="store_true",
                    help="torchao: use IntxWeightOnlyConfig even for 4-bit (no CPU int4 kernel)")
    args = ap.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    report = {"method": args.method, "bits": args.bits, "group_size": args.group_size,
              "asym": args.asym, "model": args.model, "argv": sys.argv[1:],
              "versions": versions(), "torch_threads": torch.get_num_threads()}
    evals = torch.load(args.eval)
    report["eval_shape"] = list(evals.shape)

    t0 = time.perf_counter()
    model = load_model(args.model)
    report["load_s"] = time.perf_counter() - t0
    tok = load_tokenizer(args.model)
    if not args.no_baseline:
        report["float"] = perplexity(model, evals)
        print(f"float ppl {report['float']['ppl']:.4f}", flush=True)
    report["rss_before_quant_mb"] = rss_mb()

    try:
        if args.method == "llmc-gptq":
            calib = torch.load(args.calib)
            report["calib_shape"] = list(calib.shape)
            report.update(run_llmc(args, model, tok, calib))
        elif args.method == "torchao-int4":
            report.update(run_torchao(args, model))
        else:
            report.update(run_hqq(args, model))
    except Exception as e:  # record the exact error, so a broken rival is still a result
        import traceback

        report["error"] = f"{type(e).__name__}: {e}"
        report["traceback"] = traceback.format_exc()[-6000:]
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2, default=str))
        print(report["traceback"], file=sys.stderr)
        sys.exit(1)

    print(f"quantized in {report['quant_s']:.2f}s", flush=True)
    report["quant"] = perplexity(model, evals)
    print(f"quantized ppl {report['quant']['ppl']:.4f}", flush=True)
    if args.method == "llmc-gptq":
        # The number that matters is the saved checkpoint, as a user would load it.
        del model
        reloaded = reload_llmc(report["checkpoint_dir"])
        report["reloaded_model_class_of_down_proj"] = type(reloaded.model.layers[0].mlp.down_proj).__name__
        report["reloaded"] = perplexity(reloaded, evals)
        print(f"reloaded checkpoint ppl {report['reloaded']['ppl']:.4f}", flush=True)
    report["peak_rss_mb"] = peak_rss_mb()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2, default=str))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
