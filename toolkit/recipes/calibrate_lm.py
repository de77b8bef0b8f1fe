"""Calibrate the integer engine's int8 weights on training text, and store them beside the float model.

Each output row of a linear layer is stored as int8 with one scale. The
scale of its largest weight wastes levels on one outlier; a smaller one
clips that outlier. Which is better depends on the inputs the row sees:
for each row, of clipping ratios from 1 down to 0.7, this keeps the one
whose error on the layer's output, ``dW H dW^T`` with ``H = X^T X`` over
calibration inputs ``X``, is least (the clipping search of AWQ and
OmniQuant, on the int8 grid). ``X`` comes from a float64 forward of the
model over calibration text drawn from its own training sources, never
from held-out text.

    python -m toolkit.recipes.calibrate_lm --model-dir toolkit/assets/lm-default --eval-dir runs/eval

compares plain max-abs scales with two clipping searches by the integer
engine's bits per token on held-back calibration sequences, writes
``integer.safetensors`` into the model directory only if the best saves
at least ``--min-gain`` of the bits, reports bits per byte on the held-out
files for the integer and float engines, and records all of it in the
manifest.
"""

from __future__ import annotations

import hashlib
import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from toolkit.codecs.lm import LMCodec, LMConfig
from toolkit.config import Config, check
from toolkit.data import corpus
from toolkit.errors import ConfigError
from toolkit.models.store import MANIFEST, read_manifest, update_manifest
from toolkit.models.tokenizer import ByteTokenizer
from toolkit.recipes.common import cli
from toolkit.text.integer import IntLlama, folded_linears, quantize
from toolkit.text.model import INTEGER_FILE, load_coding_model

__all__ = ["CalibrateLMConfig", "run", "main", "calibration_inputs", "choose_clips", "calibration_text"]

logger = logging.getLogger(__name__)

#: clipping ratios tried per row
RATIOS = np.linspace(1.0, 0.7, 16)
#: what the integer weights were before any calibration
PLAIN = "max-abs (no clipping)"


@dataclass(frozen=True)
class CalibrateLMConfig(Config):
    """Calibrate the integer engine's int8 weights of an lm model directory."""

    model_dir: Path = field(metadata={"help": "the model directory (toolkit/assets/lm-default)"})
    eval_dir: Path | None = field(default=None, metadata={"help": "held-out files to report bits per byte on"})
    eval_bytes: int = field(default=65536, metadata={"help": "first N bytes of each held-out file"})
    calib_bytes: int = field(default=800_000, metadata={"help": "bytes of calibration text"})
    seq: int = field(default=256, metadata={"help": "tokens per calibration sequence"})
    sequences: int = field(default=96, metadata={"help": "sequences to fit on, and as many to choose on"})
    min_gain: float = field(default=0.001, metadata={
        "help": "store calibrated weights only if they save this share of bits on the held-back sequences"})
    manifest_name: str = field(default="lm-default", metadata={"help": "the model's manifest entry"})
    manifest: Path = field(default=MANIFEST, metadata={"help": "the manifest that holds the entry"})

    def __post_init__(self) -> None:
        for name in ("eval_bytes", "calib_bytes", "sequences"):
            check(getattr(self, name) >= 1, f"{name} must be at least 1, got {getattr(self, name)}")
        check(self.seq >= 2, f"seq must be at least 2 tokens, got {self.seq}")
        check(0 <= self.min_gain < 1, f"min_gain must be in 0..1, got {self.min_gain}")


def _rms(x: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt((x * x).mean(axis=-1, keepdims=True) + eps)


def calibration_inputs(cfg: Any, w: dict[str, np.ndarray], sequences: list[list[int]]) -> dict[str, np.ndarray]:
    """``X^T X`` of every linear layer's input over ``sequences`` (float64; norm gains folded, as quantize does)."""
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    theta = getattr(cfg, "rope_theta", None) or cfg.rope_parameters["rope_theta"]
    f = {k: np.asarray(v, dtype=np.float64) for k, v in w.items()}
    gram: dict[str, np.ndarray] = {}

    def add(name: str, x: np.ndarray) -> None:
        gram[name] = gram.get(name, 0) + x.T @ x

    for seq in sequences:
        n = len(seq)
        inv = 1.0 / theta ** (np.arange(0, d, 2) / d)
        ang = np.arange(n)[:, None] * inv[None, :]
        cos, sin = np.concatenate([np.cos(ang)] * 2, 1), np.concatenate([np.sin(ang)] * 2, 1)

        def rope(t: np.ndarray, cos: np.ndarray = cos, sin: np.ndarray = sin) -> np.ndarray:
            return t * cos + np.concatenate([-t[..., d // 2 :], t[..., : d // 2]], -1) * sin

        x = f["model.embed_tokens.weight"][seq]
        for i in range(cfg.num_hidden_layers):
            p = f"model.layers.{i}."
            xn = _rms(x, cfg.rms_norm_eps)
            add(f"{i}.qkv", xn)
            xn = xn * f[p + "input_layernorm.weight"]
            q = rope((xn @ f[p + "self_attn.q_proj.weight"].T).reshape(n, heads, d).transpose(1, 0, 2))
            k = rope((xn @ f[p + "self_attn.k_proj.weight"].T).reshape(n, kv, d).transpose(1, 0, 2))
            v = (xn @ f[p + "self_attn.v_proj.weight"].T).reshape(n, kv, d).transpose(1, 0, 2)
            k, v = np.repeat(k, heads // kv, 0), np.repeat(v, heads // kv, 0)
            s = q @ k.transpose(0, 2, 1) / np.sqrt(d) + np.triu(np.full((n, n), -np.inf), 1)
            a = np.exp(s - s.max(-1, keepdims=True))
            o = ((a / a.sum(-1, keepdims=True)) @ v).transpose(1, 0, 2).reshape(n, heads * d)
            add(f"{i}.o", o)
            x = x + o @ f[p + "self_attn.o_proj.weight"].T
            xn = _rms(x, cfg.rms_norm_eps)
            add(f"{i}.gu", xn)
            xn = xn * f[p + "post_attention_layernorm.weight"]
            g, u = xn @ f[p + "mlp.gate_proj.weight"].T, xn @ f[p + "mlp.up_proj.weight"].T
            h = g / (1 + np.exp(-g)) * u
            add(f"{i}.down", h)
            x = x + h @ f[p + "mlp.down_proj.weight"].T
    return gram


def choose_clips(cfg: Any, w: dict[str, np.ndarray], gram: dict[str, np.ndarray], ratios: np.ndarray = RATIOS
                 ) -> tuple[dict, dict]:
    """Per layer, each row's clipping level (largest magnitude kept, from ``ratios`` of the largest) and the
    output error it saves."""
    clips, report = {}, {}
    for name, mat in folded_linears(cfg, w).items():
        h = gram[name]
        amax = np.abs(mat).max(axis=1)
        errs = []
        for ratio in ratios:
            scale = np.maximum(amax * ratio, 1e-12)[:, None] / 127
            dw = mat - np.clip(np.rint(mat / scale), -127, 127) * scale
            errs.append(((dw @ h) * dw).sum(axis=1))
        errs = np.stack(errs)  # [ratios, rows]
        best = errs.argmin(axis=0)
        clips[name] = amax * ratios[best]
        report[name] = {"error_ratio": float(errs[best, np.arange(len(best))].sum() / errs[0].sum()),
                        "rows_clipped": int((best > 0).sum()), "rows": len(best)}
    return clips, report


def calibration_text(nbytes: int, seed: int = 0) -> tuple[bytes, list[dict]]:
    """A seeded sample of documents from the model's training sources installed here (python stdlib, man pages)."""
    wanted = {"python-stdlib", "manpages"}
    docs, provenance = [], []
    for src in corpus.training_sources(Path("runs/linux-sample")):
        if src.name not in wanted:
            continue
        got = corpus.collect(src)
        rng = random.Random(f"toolkit-calibration-{seed}-{src.name}")
        rng.shuffle(got)
        take, size = [], 0
        for name, data in got:
            if size >= nbytes // len(wanted):
                break
            take.append((name, data[:16384]))
            size += len(take[-1][1])
        docs += take
        digest = hashlib.sha256(b"".join(n.encode() + b"\0" + d for n, d in take)).hexdigest()
        provenance.append({"name": src.name, "package": src.package, "version": src.version, "documents": len(take),
                           "bytes": size, "sha256": digest})
    return b"\n".join(d for _, d in docs), provenance


def cross_entropy(cfg: Any, q: dict[str, np.ndarray], sequences: list[list[int]], bos: int) -> float:
    """Bits per token of the integer engine (no adaptation, no n-grams) over equal-length ``sequences``."""
    n = len(sequences[0])
    engine = IntLlama(cfg, q, max(n, 16), 0)
    engine.reset(len(sequences))
    head = engine.new_head(0.0, 1, 1)
    toks = np.array(sequences)
    cur = np.full(len(sequences), bos)
    bits = 0.0
    for t in range(n):
        p = engine.step(cur, head, bos)
        bits -= float(np.log2(p[np.arange(len(toks)), toks[:, t]] / p.sum(axis=-1)).sum())
        cur = toks[:, t]
    return bits / toks.size


def _bpb(model_dir: Path, files: list[Path], max_bytes: int, **settings: Any) -> dict[str, float]:
    """Bits per byte of the lm codec's payloads (the header's few hundred bytes left out) on each file."""
    out = {}
    for p in files:
        data = p.read_bytes()[:max_bytes]
        codec = LMCodec(LMConfig(model=str(model_dir), **settings))
        chunks = [data[i : i + codec.chunk_size] for i in range(0, len(data), codec.chunk_size)]
        size = sum(len(x) for x in codec.open_encoder().encode_chunks(chunks))
        out[p.name] = round(8 * size / len(data), 4)
    return out


def run(config: CalibrateLMConfig) -> Path:
    """Calibrate, store the integer weights where they pay, record it all in the manifest; returns the model dir."""
    from safetensors.numpy import save_file

    entry = read_manifest(config.manifest).get(config.manifest_name)
    if entry is None:
        raise ConfigError(f"{config.manifest} has no entry {config.manifest_name!r} to record the calibration in")
    t0 = time.time()
    model = load_coding_model(str(config.model_dir))
    cfg, w = model.config, model.float_weights()
    text, provenance = calibration_text(config.calib_bytes)
    tok = ByteTokenizer.load(config.model_dir)
    ids = tok.encode_batch([text])[0]
    seqs = [ids[a : a + config.seq] for a in range(0, len(ids) - config.seq, config.seq)][: 2 * config.sequences]
    fit, held = seqs[0::2], seqs[1::2]
    logger.info("fitting on %d sequences of %d tokens, choosing on %d", len(fit), config.seq, len(held))
    gram = calibration_inputs(cfg, w, fit)
    variants: dict[str, tuple[dict, dict]] = {PLAIN: ({}, {})}
    for lo in (0.9, 0.7):
        variants[f"clipping search 1.0..{lo}"] = choose_clips(cfg, w, gram, np.linspace(1.0, lo, 11))
    bits = {name: round(cross_entropy(cfg, quantize(cfg, w, clips), held, tok.bos_id), 5)
            for name, (clips, _) in variants.items()}
    for name, b in bits.items():
        logger.info("%s: %.5f bits/token on the held-back calibration sequences", name, b)
    best = min(bits, key=bits.get)
    target = config.model_dir / INTEGER_FILE
    target.unlink(missing_ok=True)
    stored = best != PLAIN and bits[best] <= bits[PLAIN] * (1 - config.min_gain)
    if stored:
        save_file(quantize(cfg, w, variants[best][0]), str(target))
    figures = {}
    if config.eval_dir:
        files = sorted(p for p in config.eval_dir.iterdir() if p.suffix in (".txt", ".c"))
        figures = {"integer": _bpb(config.model_dir, files, config.eval_bytes),
                   "lean_float32": _bpb(config.model_dir, files, config.eval_bytes, engine="lean", dtype="float32"),
                   "lean_bfloat16": _bpb(config.model_dir, files, config.eval_bytes, engine="lean", dtype="bfloat16")}
        for k, v in figures.items():
            logger.info("%s: %s", k, v)
    entry["integer"] = {
        "weights": INTEGER_FILE if stored else "quantized from the float weights as the model loads",
        "sha256": hashlib.sha256(target.read_bytes()).hexdigest() if stored else None,
        "method": "int8 per output row with norm gains folded; calibration compared per-row clipping levels chosen "
                  "by least output error dW H dW^T on calibration inputs against plain max-abs scales, by the "
                  "integer engine's bits per token on held-back calibration sequences",
        "recipe": "toolkit.recipes.calibrate_lm",
        "config": config.to_dict(),  # CalibrateLMConfig.from_dict reruns it
        "calibration_data": {"sources": provenance, "fit_sequences": len(fit), "held_back_sequences": len(held),
                             "tokens_per_sequence": config.seq},
        "bits_per_token_held_back": bits,
        "chosen": best if stored else PLAIN,
        "layers_of_chosen": variants[best][1] if stored else None,
        "heldout_payload_bits_per_byte": {"files": f"first {config.eval_bytes} bytes of each file in {config.eval_dir}",
                                          **figures} if figures else None,
        "seconds": round(time.time() - t0, 1),
    }
    update_manifest(config.manifest_name, entry, config.manifest)
    return config.model_dir


def main(argv: list[str] | None = None) -> int:
    return cli(CalibrateLMConfig, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
