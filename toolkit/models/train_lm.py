"""Train the LM codec's default model on the offline corpus, within a time budget.

    python -m toolkit.models.train_lm --corpus runs/corpus --out toolkit/assets/lm-default \\
        --run-dir runs/lm --minutes 75

Steps: train (or load) the ByteTokenizer, tokenise the corpus once into a
cached uint16 array, then AdamW with linear warmup and a cosine decay over
the WALL-CLOCK budget (progress = training seconds / budget, so a slower or
busier machine still ends its schedule at the deadline; this makes the number
of steps machine-dependent, which the manifest records). Validation
bits-per-byte is measured periodically; checkpoints are written regularly and
``--resume`` continues from the last one with its clock and schedule. At the
end the fp32 model, tokenizer and a manifest entry are written.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shlex
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from toolkit.data.corpus import DOC_SEP
from toolkit.data.recall import make_task, make_training_row
from toolkit.models.lm import (
    MANIFEST,
    WEIGHTS_FILE,
    LMShape,
    build_lm,
    count_parameters,
    load_lm,
    save_lm,
    weights_sha256,
)
from toolkit.models.store import file_sha256
from toolkit.models.tokenizer import ByteTokenizer, chunks, tokenizer_file_sha256, train

logger = logging.getLogger(__name__)

IGNORE = -100


def tokenize_file(tok: ByteTokenizer, path: Path, cache: Path) -> np.ndarray:
    """Token ids of a corpus file, documents separated by ``bos_id``; cached.

    The cache name carries the tokenizer digest so a new tokenizer never
    reuses stale ids.
    """
    if cache.exists():
        return np.load(cache)
    t0 = time.time()
    data = path.read_bytes()
    out: list[np.ndarray] = []
    for doc in data.split(DOC_SEP):
        out.append(np.array([tok.bos_id], dtype=np.uint16))
        pieces = list(chunks(doc, 1 << 16))
        for ids in tok.encode_batch(pieces):
            out.append(np.asarray(ids, dtype=np.uint16))
    arr = np.concatenate(out)
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.save(cache, arr)
    logger.info("tokenised %s: %d bytes -> %d tokens (%.3f B/tok) in %.0fs",
                path.name, len(data), len(arr), len(data) / len(arr), time.time() - t0)
    return arr


def lr_at(progress: float, step: int, warmup: int, lr: float, min_ratio: float) -> float:
    """Linear warmup over ``warmup`` steps, then cosine from ``lr`` to ``lr*min_ratio``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    p = min(1.0, max(0.0, progress))
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * p)))


def val_window_starts(n_tokens: int, seq_len: int, max_windows: int) -> list[int]:
    """Start offsets of up to ``max_windows`` evenly spaced, non-overlapping windows.

    ``val.bin`` is laid out source by source, so the first windows alone
    would measure only the first source; spreading them samples all of it.
    """
    total = (n_tokens - 1) // seq_len
    n = min(max_windows, total)
    return [int(i * total / n) * seq_len for i in range(n)] if n > 0 else []


@torch.no_grad()
def validation_bpb(
    model: torch.nn.Module, tok: ByteTokenizer, val: np.ndarray, seq_len: int,
    max_windows: int, batch: int = 8,
) -> float:
    """Bits per byte on ``max_windows`` non-overlapping val windows spread over ``val``.

    Sum of target-token cross-entropy (bits) divided by the bytes those
    targets decode to. ``bos`` targets are ignored: they cover no bytes and a
    single-file codec never codes them.
    """
    model.eval()
    lengths = np.array([len(tok.token_bytes(i)) if i != tok.bos_id else 0
                        for i in range(tok.vocab_size)], dtype=np.int64)
    starts = val_window_starts(len(val), seq_len, max_windows)
    total_bits = 0.0
    total_bytes = 0
    for s in range(0, len(starts), batch):
        rows = [val[i:i + seq_len + 1].astype(np.int64) for i in starts[s:s + batch]]
        x = torch.from_numpy(np.stack(rows))
        inp, tgt = x[:, :-1], x[:, 1:].clone()
        tgt[tgt == tok.bos_id] = IGNORE
        logits = model(input_ids=inp, use_cache=False).logits.float()
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1),
                             ignore_index=IGNORE, reduction="sum")
        total_bits += ce.item() / math.log(2)
        t = tgt.numpy()
        total_bytes += int(lengths[t[t != IGNORE]].sum())
    model.train()
    return total_bits / max(1, total_bytes)


@torch.no_grad()
def recall_accuracy(model: torch.nn.Module, tok: ByteTokenizer, val: np.ndarray, seq_len: int,
                    n_tasks: int, n_facts: int, seed: int = 1234) -> float:
    """Share of recall tasks (context of ``seq_len`` minus the question) answered exactly.

    Teacher-forced: every answer token must be the argmax, which equals
    greedy generation of the answer.
    """
    model.eval()
    rng = np.random.default_rng(seed)
    hits = 0
    for _ in range(n_tasks):
        # A query and its answer take well under 48 tokens.
        task = make_task(tok, val, rng, context_len=seq_len - 48, n_facts=n_facts)
        ids = task.context + task.query + task.answer
        x = torch.tensor([ids[:-1]])
        pred = model(input_ids=x, use_cache=False).logits[0, -len(task.answer):].argmax(-1)
        hits += int(pred.tolist() == task.answer)
    model.train()
    return hits / max(1, n_tasks)


def save_checkpoint(path: Path, model, opt, step: int, elapsed: float, tokens: int,
                    gen: torch.Generator, history: list, np_rng: np.random.Generator) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step,
                "elapsed": elapsed, "tokens": tokens, "rng": gen.get_state(),
                "np_rng": json.dumps(np_rng.bit_generator.state),
                "history": json.dumps(history)}, tmp)
    tmp.replace(path)  # atomic: a kill mid-write keeps the previous checkpoint


def update_manifest(name: str, entry: dict, manifest: Path = MANIFEST) -> None:
    """Insert or replace ``name`` in the assets manifest (a JSON dict by name)."""
    data = json.loads(manifest.read_text()) if manifest.exists() else {}
    data[name] = entry
    manifest.parent.mkdir(parents=True, exist_ok=True)
    manifest.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


class ThreadChooser:
    """Re-picks the torch thread count while training on a shared machine.

    Measured here: with other CPU-bound jobs on a 2-core box, 2 intra-op
    threads ran 3-4x SLOWER than 1 (each parallel region waits for its
    descheduled straggler), while on an idle box 2 threads are faster. So
    every ``every`` steps it times ``probe`` steps with the other count and
    keeps whichever ran faster.
    """

    def __init__(self, choices: tuple[int, ...], every: int = 200, probe: int = 10) -> None:
        self.choices = choices
        self.current = choices[0]
        self.every = every
        self.probe = probe
        self._trial: int | None = None
        self._t0 = 0.0
        self._base_rate = 0.0
        self._base_t0 = 0.0
        torch.set_num_threads(self.current)

    def before_step(self, step: int) -> None:
        if len(self.choices) < 2:
            return
        phase = step % self.every
        if phase == self.every - 2 * self.probe:
            self._base_t0 = time.time()
        elif phase == self.every - self.probe:
            self._base_rate = self.probe / max(1e-9, time.time() - self._base_t0)
            others = [c for c in self.choices if c != self.current]
            self._trial = others[(step // self.every) % len(others)]
            torch.set_num_threads(self._trial)
            self._t0 = time.time()
        elif phase == 0 and self._trial is not None:
            trial_rate = self.probe / max(1e-9, time.time() - self._t0)
            if trial_rate > self._base_rate:
                logger.info("threads %d -> %d (%.2f vs %.2f steps/s)",
                            self.current, self._trial, trial_rate, self._base_rate)
                self.current = self._trial
            torch.set_num_threads(self.current)
            self._trial = None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="train the LM codec's model")
    ap.add_argument("--corpus", type=Path, required=True, help="dir with train.txt, val.bin")
    ap.add_argument("--out", type=Path, required=True, help="asset dir for the final model")
    ap.add_argument("--run-dir", type=Path, default=Path("runs/lm"))
    ap.add_argument("--name", default="lm-default", help="manifest key")
    ap.add_argument("--manifest", type=Path, default=MANIFEST)
    ap.add_argument("--minutes", type=float, required=True, help="training wall-clock budget")
    ap.add_argument("--tokenizer", type=Path, help="existing tokenizer.json (else trained)")
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--tokenizer-sample-mb", type=int, default=24)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--intermediate", type=int, default=704)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--min-lr-ratio", type=float, default=0.1)
    ap.add_argument("--warmup", type=int, default=150)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast (fp32 master weights)")
    ap.add_argument("--threads", default="1,2",
                    help="thread counts to choose between while training (first is initial)")
    ap.add_argument("--eval-minutes", type=float, default=6.0)
    ap.add_argument("--ckpt-minutes", type=float, default=5.0)
    ap.add_argument("--val-windows", type=int, default=48)
    ap.add_argument("--final-val-windows", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--log-every", type=int, default=25)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--recall-fraction", type=float, default=0.0,
                    help="share of batch rows that are synthetic key-value recall sequences "
                         "(toolkit.data.recall); 0 trains on text only")
    ap.add_argument("--answer-weight", type=float, default=4.0,
                    help="loss weight of recall answer tokens relative to text tokens")
    ap.add_argument("--max-facts", type=int, default=16)
    ap.add_argument("--init", type=Path,
                    help="start from this model directory's weights (fresh optimizer and schedule); "
                         "its tokenizer is used unless --tokenizer is given")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.run_dir.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    threads = ThreadChooser(tuple(int(t) for t in args.threads.split(",")))
    command = "python -m toolkit.models.train_lm " + shlex.join(
        sys.argv[1:] if argv is None else argv)
    wall0 = time.time()

    # Tokenizer: trained once per run dir (or given), so --resume reuses it.
    tok_path = args.tokenizer or (args.init / "tokenizer.json" if args.init else args.run_dir / "tokenizer.json")
    if tok_path.exists():
        tok = ByteTokenizer.load(tok_path)
    else:
        data = (args.corpus / "train.txt").read_bytes()
        # Evenly spaced 1 MiB slices cover every source in its corpus share.
        n = max(1, args.tokenizer_sample_mb)
        step = max(1 << 20, len(data) // n)
        sample = b"".join(data[i:i + (1 << 20)] for i in range(0, len(data), step))
        tok = train(chunks(sample), vocab_size=args.vocab)
        tok.save(args.run_dir)
        tok_path = args.run_dir / "tokenizer.json"
    tok_digest = tokenizer_file_sha256(tok_path)[:16]
    train_ids = tokenize_file(tok, args.corpus / "train.txt",
                              args.run_dir / f"train-{tok_digest}.npy")
    val_ids = tokenize_file(tok, args.corpus / "val.bin", args.run_dir / f"val-{tok_digest}.npy")
    bytes_per_token = (args.corpus / "train.txt").stat().st_size / len(train_ids)

    shape = LMShape(vocab_size=tok.vocab_size, hidden_size=args.hidden,
                    num_layers=args.layers, num_heads=args.heads,
                    intermediate_size=args.intermediate, max_positions=args.seq_len)
    model = build_lm(shape, seed=args.seed)
    if args.init:
        init_model, _ = load_lm(args.init)
        if init_model.config.vocab_size != shape.vocab_size or \
                init_model.config.hidden_size != shape.hidden_size or \
                init_model.config.num_hidden_layers != shape.num_layers:
            raise SystemExit(f"--init model {args.init} does not have the shape {shape.to_dict()}")
        model.load_state_dict(init_model.state_dict())
        logger.info("initialised from %s (%s)", args.init, weights_sha256(model)[:12])
    model.train()
    n_params = count_parameters(model)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95), eps=1e-8,
    )
    gen = torch.Generator().manual_seed(args.seed)
    np_rng = np.random.default_rng(args.seed)
    step, elapsed, tokens_seen, history = 0, 0.0, 0, []
    ckpt = args.run_dir / "ckpt.pt"
    if args.resume and ckpt.exists():
        state = torch.load(ckpt, weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        gen.set_state(state["rng"])
        step, elapsed, tokens_seen = state["step"], state["elapsed"], state["tokens"]
        history = json.loads(state["history"])
        if "np_rng" in state:
            np_rng.bit_generator.state = json.loads(state["np_rng"])
        logger.info("resumed at step %d, %.1f min trained", step, elapsed / 60)
    logger.info("model %s: %d params; %d train tokens (%.3f B/tok), %d val tokens",
                json.dumps(shape.to_dict()), n_params, len(train_ids), bytes_per_token,
                len(val_ids))

    budget = args.minutes * 60.0
    train_t = torch.from_numpy(train_ids.astype(np.int64))
    max_start = len(train_t) - args.seq_len - 1
    autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if args.bf16 else nullcontext())
    last_eval = last_ckpt = elapsed
    t_mark = time.time()
    loss_acc, loss_n, log_mark = 0.0, 0, elapsed
    while elapsed < budget:
        threads.before_step(step)
        lr = lr_at(elapsed / budget, step, args.warmup, args.lr, args.min_lr_ratio)
        for g in opt.param_groups:
            g["lr"] = lr
        starts = torch.randint(0, max_start, (args.batch,), generator=gen)
        x = torch.stack([train_t[s:s + args.seq_len + 1] for s in starts.tolist()])
        weight = torch.ones(args.batch, args.seq_len)
        n_recall = int(round(args.recall_fraction * args.batch))
        for r in range(n_recall):
            ids, kind = make_training_row(tok, train_ids, np_rng, args.seq_len, args.max_facts)
            x[r] = torch.from_numpy(ids)
            k = torch.from_numpy(kind.astype(np.int64))
            weight[r] = torch.where(k == 1, args.answer_weight, torch.where(k < 0, 0.0, 1.0))
        inp, tgt = x[:, :-1], x[:, 1:].clone()
        weight[tgt == tok.bos_id] = 0.0
        with autocast:
            # No KV cache in training: HF would otherwise build one every step.
            logits = model(input_ids=inp, use_cache=False).logits
        ce = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), tgt.reshape(-1),
                             reduction="none")
        loss = (ce * weight.reshape(-1)).sum() / weight.sum().clamp_min(1.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        tokens_seen += inp.numel()
        loss_acc += loss.item()
        loss_n += 1
        now = time.time()
        elapsed += now - t_mark
        t_mark = now
        if step % args.log_every == 0:
            rate = loss_n * inp.numel() / max(1e-9, elapsed - log_mark)
            logger.info("step %d  loss %.4f (%.3f bpb)  lr %.2e  %.1f/%.0f min  %.0fk tok  "
                        "%.0f tok/s  %d thr", step, loss_acc / loss_n,
                        loss_acc / loss_n / math.log(2) / bytes_per_token,
                        lr, elapsed / 60, args.minutes, tokens_seen / 1e3, rate, threads.current)
            loss_acc, loss_n, log_mark = 0.0, 0, elapsed
        if elapsed - last_eval >= args.eval_minutes * 60:
            bpb = validation_bpb(model, tok, val_ids, args.seq_len, args.val_windows)
            point = {"step": step, "minutes": round(elapsed / 60, 2), "val_bpb": bpb,
                     "tokens": tokens_seen}
            if args.recall_fraction > 0:
                point["recall"] = recall_accuracy(model, tok, val_ids, args.seq_len, 32, 8)
            history.append(point)
            logger.info("step %d  val %.4f bpb  recall %s", step, bpb, point.get("recall"))
            last_eval = elapsed
            t_mark = time.time()  # validation time is not training time
        if elapsed - last_ckpt >= args.ckpt_minutes * 60:
            save_checkpoint(ckpt, model, opt, step, elapsed, tokens_seen, gen, history, np_rng)
            logger.info("checkpoint step %d -> %s", step, ckpt)
            last_ckpt = elapsed
            t_mark = time.time()

    save_checkpoint(ckpt, model, opt, step, elapsed, tokens_seen, gen, history, np_rng)
    model.eval()
    final_bpb = validation_bpb(model, tok, val_ids, args.seq_len, args.final_val_windows)
    val_tokens = len(val_window_starts(len(val_ids), args.seq_len, args.final_val_windows)) \
        * args.seq_len
    logger.info("final: step %d, %d tokens, val %.4f bpb (%d of %d val tokens)",
                step, tokens_seen, final_bpb, val_tokens, len(val_ids))
    final_recall = (recall_accuracy(model, tok, val_ids, args.seq_len, 200, 8)
                    if args.recall_fraction > 0 else None)
    if final_recall is not None:
        logger.info("final recall accuracy (8 facts, %d-token rows): %.3f", args.seq_len, final_recall)
    save_lm(model, tok, args.out)
    sources = json.loads((args.corpus / "sources.json").read_text())
    entry = {
        "name": args.name,
        "path": str(args.out),
        "class": "transformers.LlamaForCausalLM",
        "weights_file": WEIGHTS_FILE,
        "sha256": file_sha256(args.out / WEIGHTS_FILE),
        "weights_sha256": weights_sha256(model),
        "weights_sha256_method": "toolkit.models.lm.weights_sha256 (state dict, sorted names)",
        "tokenizer_sha256": tokenizer_file_sha256(args.out),
        "dtype": "float32",
        "parameters": n_params,
        "shape": shape.to_dict(),
        "training_command": command,
        "initialised_from": str(args.init) if args.init else None,
        "training": {
            "steps": step, "tokens_seen": tokens_seen, "seq_len": args.seq_len,
            "batch": args.batch, "lr": args.lr, "warmup": args.warmup,
            "min_lr_ratio": args.min_lr_ratio, "weight_decay": args.weight_decay,
            "bf16_autocast": args.bf16, "threads": args.threads, "seed": args.seed,
            "recall_fraction": args.recall_fraction, "answer_weight": args.answer_weight,
            "max_facts": args.max_facts,
            "train_minutes": round(elapsed / 60, 2),
            "wall_minutes": round((time.time() - wall0) / 60, 2),
            "torch": torch.__version__,
        },
        "validation": {"bpb": final_bpb, "val_tokens": val_tokens,
                       "recall_accuracy_8_facts": final_recall,
                       "val_file_bytes": sources["val_bytes"],
                       "history": history},
        "train_bytes_per_token": bytes_per_token,
        "data": {"train_bytes": sources["train_bytes"], "train_sha256": sources["train_sha256"],
                 "sources": [{k: s[k] for k in ("name", "package", "version", "licence",
                                                "bytes", "sha256")}
                             for s in sources["sources"]]},
    }
    update_manifest(args.name, entry, args.manifest)
    logger.info("saved %s (%s) and manifest entry %s", args.out, entry["sha256"][:12], args.name)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
