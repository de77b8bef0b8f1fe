"""Train the LM codec's default model on the offline corpus, within a time budget.

    python -m toolkit.recipes.train_lm --corpus runs/corpus --out toolkit/assets/lm-default \\
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

import json
import logging
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from toolkit.config import Config, check
from toolkit.data.corpus import DOC_SEP
from toolkit.data.recall import make_task, make_training_row
from toolkit.errors import ConfigError
from toolkit.models.lm import (
    WEIGHTS_FILE,
    LMShape,
    build_lm,
    count_parameters,
    load_lm,
    save_lm,
    weights_sha256,
)
from toolkit.models.store import MANIFEST, file_sha256, update_manifest
from toolkit.models.tokenizer import ByteTokenizer, chunks, tokenizer_file_sha256, train
from toolkit.recipes.common import TimeBudget, cli, load_checkpoint, lr_at, save_checkpoint, set_threads

__all__ = ["TrainLMConfig", "run", "main", "tokenize_file", "validation_bpb", "val_window_starts",
           "recall_accuracy"]

logger = logging.getLogger(__name__)

IGNORE = -100


@dataclass(frozen=True)
class TrainLMConfig(Config):
    """Train the LM codec's model on a corpus within a wall-clock budget."""

    corpus: Path = field(metadata={"help": "dir with train.txt, val.bin and sources.json "
                                           "(python -m toolkit.recipes.build_corpus)"})
    out: Path = field(metadata={"help": "asset dir for the final model"})
    minutes: float = field(metadata={"help": "training wall-clock budget"})
    run_dir: Path = field(default=Path("runs/lm"), metadata={"help": "tokenizer, token caches and checkpoint"})
    name: str = field(default="lm-default", metadata={"help": "manifest key"})
    manifest: Path = field(default=MANIFEST, metadata={"help": "the manifest the model's entry goes into"})
    tokenizer: Path | None = field(default=None, metadata={"help": "existing tokenizer.json (else trained)"})
    vocab: int = field(default=4096, metadata={"help": "vocabulary of a trained tokenizer"})
    tokenizer_sample_mb: int = field(default=24, metadata={"help": "MiB of train.txt the tokenizer learns from"})
    hidden: int = field(default=256, metadata={"help": "hidden size"})
    layers: int = field(default=4, metadata={"help": "decoder layers"})
    heads: int = field(default=4, metadata={"help": "attention heads"})
    intermediate: int = field(default=704, metadata={"help": "MLP width"})
    seq_len: int = field(default=512, metadata={"help": "tokens per training row (the model's context)"})
    batch: int = field(default=8, metadata={"help": "rows per step"})
    lr: float = field(default=2e-3, metadata={"help": "peak learning rate"})
    min_lr_ratio: float = field(default=0.1, metadata={"help": "the cosine ends at lr times this"})
    warmup: int = field(default=150, metadata={"help": "linear warmup steps"})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay of the matrices"})
    bf16: bool = field(default=False, metadata={"help": "bf16 autocast (fp32 master weights)"})
    threads: tuple[int, ...] = field(default=(1, 2), metadata={
        "help": "thread counts to choose between while training (the first is the initial one)"})
    eval_minutes: float = field(default=6.0, metadata={"help": "training minutes between validations"})
    ckpt_minutes: float = field(default=5.0, metadata={"help": "training minutes between checkpoints"})
    val_windows: int = field(default=48, metadata={"help": "validation windows during training"})
    final_val_windows: int = field(default=256, metadata={"help": "validation windows of the final figure"})
    seed: int = field(default=0, metadata={"help": "initialisation and batch seed"})
    log_every: int = field(default=25, metadata={"help": "steps between log lines"})
    resume: bool = field(default=False, metadata={"help": "continue from the run dir's checkpoint"})
    recall_fraction: float = field(default=0.0, metadata={
        "help": "share of batch rows that are synthetic key-value recall sequences (toolkit.data.recall); "
                "0 trains on text only"})
    answer_weight: float = field(default=4.0, metadata={
        "help": "loss weight of recall answer tokens relative to text tokens"})
    max_facts: int = field(default=16, metadata={"help": "most facts in a recall row"})
    init: Path | None = field(default=None, metadata={
        "help": "start from this model directory's weights (fresh optimizer and schedule); "
                "its tokenizer is used unless --tokenizer is given"})

    def __post_init__(self) -> None:
        check(self.minutes > 0, f"minutes must be positive, got {self.minutes}")
        check(self.vocab > 257, f"vocab must leave room for 256 bytes and bos, got {self.vocab}")
        check(self.tokenizer_sample_mb >= 1, f"tokenizer_sample_mb must be at least 1, got {self.tokenizer_sample_mb}")
        for name in ("hidden", "layers", "heads", "intermediate", "seq_len", "batch", "val_windows",
                     "final_val_windows", "log_every", "max_facts"):
            check(getattr(self, name) >= 1, f"{name} must be at least 1, got {getattr(self, name)}")
        check(self.hidden % self.heads == 0, f"hidden {self.hidden} must be a multiple of heads {self.heads}")
        check(self.lr > 0, f"lr must be positive, got {self.lr}")
        check(0 <= self.min_lr_ratio <= 1, f"min_lr_ratio must be in 0..1, got {self.min_lr_ratio}")
        check(self.warmup >= 0, f"warmup must be at least 0, got {self.warmup}")
        check(self.weight_decay >= 0, f"weight_decay must be at least 0, got {self.weight_decay}")
        check(len(self.threads) >= 1 and all(t >= 1 for t in self.threads),
              f"threads must be one or more counts of at least 1, got {self.threads}")
        check(self.eval_minutes > 0 and self.ckpt_minutes > 0,
              f"eval_minutes and ckpt_minutes must be positive, got {self.eval_minutes}, {self.ckpt_minutes}")
        check(0 <= self.recall_fraction <= 1, f"recall_fraction must be in 0..1, got {self.recall_fraction}")
        check(self.answer_weight >= 0, f"answer_weight must be at least 0, got {self.answer_weight}")


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
        set_threads(self.current)

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
            set_threads(self._trial)
            self._t0 = time.time()
        elif phase == 0 and self._trial is not None:
            trial_rate = self.probe / max(1e-9, time.time() - self._t0)
            if trial_rate > self._base_rate:
                logger.info("threads %d -> %d (%.2f vs %.2f steps/s)",
                            self.current, self._trial, trial_rate, self._base_rate)
                self.current = self._trial
            set_threads(self.current)
            self._trial = None


def _tokenizer(config: TrainLMConfig) -> tuple[ByteTokenizer, Path]:
    """The given tokenizer, the init model's, or one trained once per run dir (so --resume reuses it)."""
    path = config.tokenizer or (config.init / "tokenizer.json" if config.init else config.run_dir / "tokenizer.json")
    if path.exists():
        return ByteTokenizer.load(path), path
    data = (config.corpus / "train.txt").read_bytes()
    # Evenly spaced 1 MiB slices cover every source in its corpus share.
    step = max(1 << 20, len(data) // config.tokenizer_sample_mb)
    sample = b"".join(data[i:i + (1 << 20)] for i in range(0, len(data), step))
    tok = train(chunks(sample), vocab_size=config.vocab)
    tok.save(config.run_dir)
    return tok, config.run_dir / "tokenizer.json"


def run(config: TrainLMConfig) -> Path:
    """Train, write the model into ``config.out`` and its entry into the manifest; returns ``config.out``."""
    config.run_dir.mkdir(parents=True, exist_ok=True)
    threads = ThreadChooser(config.threads)
    wall0 = time.time()

    tok, tok_path = _tokenizer(config)
    tok_digest = tokenizer_file_sha256(tok_path)[:16]
    train_ids = tokenize_file(tok, config.corpus / "train.txt", config.run_dir / f"train-{tok_digest}.npy")
    val_ids = tokenize_file(tok, config.corpus / "val.bin", config.run_dir / f"val-{tok_digest}.npy")
    bytes_per_token = (config.corpus / "train.txt").stat().st_size / len(train_ids)

    shape = LMShape(vocab_size=tok.vocab_size, hidden_size=config.hidden, num_layers=config.layers,
                    num_heads=config.heads, intermediate_size=config.intermediate, max_positions=config.seq_len)
    model = build_lm(shape, seed=config.seed)
    if config.init:
        init_model, _ = load_lm(config.init)
        if init_model.config.vocab_size != shape.vocab_size or \
                init_model.config.hidden_size != shape.hidden_size or \
                init_model.config.num_hidden_layers != shape.num_layers:
            raise ConfigError(f"--init model {config.init} does not have the shape {shape.to_dict()}")
        model.load_state_dict(init_model.state_dict())
        logger.info("initialised from %s (%s)", config.init, weights_sha256(model)[:12])
    model.train()
    n_params = count_parameters(model)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr, betas=(0.9, 0.95), eps=1e-8,
    )
    gen = torch.Generator().manual_seed(config.seed)
    np_rng = np.random.default_rng(config.seed)
    step, elapsed, tokens_seen, history = 0, 0.0, 0, []
    ckpt = config.run_dir / "ckpt.pt"
    state = load_checkpoint(ckpt) if config.resume else None
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        gen.set_state(state["rng"])
        step, elapsed, tokens_seen = state["step"], state["elapsed"], state["tokens"]
        history = json.loads(state["history"])
        if "np_rng" in state:
            np_rng.bit_generator.state = json.loads(state["np_rng"])
        logger.info("resumed at step %d, %.1f min trained", step, elapsed / 60)
    logger.info("model %s: %d params; %d train tokens (%.3f B/tok), %d val tokens",
                json.dumps(shape.to_dict()), n_params, len(train_ids), bytes_per_token, len(val_ids))

    def checkpoint() -> None:
        save_checkpoint(ckpt, {"model": model.state_dict(), "opt": opt.state_dict(), "step": step,
                               "elapsed": elapsed, "tokens": tokens_seen, "rng": gen.get_state(),
                               "np_rng": json.dumps(np_rng.bit_generator.state),
                               "history": json.dumps(history)})

    clock = TimeBudget(config.minutes * 60.0, elapsed)
    train_t = torch.from_numpy(train_ids.astype(np.int64))
    max_start = len(train_t) - config.seq_len - 1
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if config.bf16 else nullcontext()
    last_eval = last_ckpt = elapsed
    loss_acc, loss_n, log_mark = 0.0, 0, elapsed
    while not clock.exhausted:
        threads.before_step(step)
        lr = lr_at(step, clock.progress, lr=config.lr, warmup=config.warmup, min_ratio=config.min_lr_ratio)
        for g in opt.param_groups:
            g["lr"] = lr
        starts = torch.randint(0, max_start, (config.batch,), generator=gen)
        x = torch.stack([train_t[s:s + config.seq_len + 1] for s in starts.tolist()])
        weight = torch.ones(config.batch, config.seq_len)
        n_recall = int(round(config.recall_fraction * config.batch))
        for r in range(n_recall):
            ids, kind = make_training_row(tok, train_ids, np_rng, config.seq_len, config.max_facts)
            x[r] = torch.from_numpy(ids)
            k = torch.from_numpy(kind.astype(np.int64))
            weight[r] = torch.where(k == 1, config.answer_weight, torch.where(k < 0, 0.0, 1.0))
        inp, tgt = x[:, :-1], x[:, 1:].clone()
        weight[tgt == tok.bos_id] = 0.0
        with autocast:
            # No KV cache in training: HF would otherwise build one every step.
            logits = model(input_ids=inp, use_cache=False).logits
        ce = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), tgt.reshape(-1), reduction="none")
        loss = (ce * weight.reshape(-1)).sum() / weight.sum().clamp_min(1.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        tokens_seen += inp.numel()
        loss_acc += loss.item()
        loss_n += 1
        elapsed = clock.elapsed
        if step % config.log_every == 0:
            rate = loss_n * inp.numel() / max(1e-9, elapsed - log_mark)
            logger.info("step %d  loss %.4f (%.3f bpb)  lr %.2e  %.1f/%.0f min  %.0fk tok  "
                        "%.0f tok/s  %d thr", step, loss_acc / loss_n,
                        loss_acc / loss_n / math.log(2) / bytes_per_token,
                        lr, elapsed / 60, config.minutes, tokens_seen / 1e3, rate, threads.current)
            loss_acc, loss_n, log_mark = 0.0, 0, elapsed
        if elapsed - last_eval >= config.eval_minutes * 60:
            bpb = validation_bpb(model, tok, val_ids, config.seq_len, config.val_windows)
            point = {"step": step, "minutes": round(elapsed / 60, 2), "val_bpb": bpb, "tokens": tokens_seen}
            if config.recall_fraction > 0:
                point["recall"] = recall_accuracy(model, tok, val_ids, config.seq_len, 32, 8)
            history.append(point)
            logger.info("step %d  val %.4f bpb  recall %s", step, bpb, point.get("recall"))
            last_eval = elapsed
            clock = TimeBudget(clock.seconds, elapsed)  # validation time is not training time
        if elapsed - last_ckpt >= config.ckpt_minutes * 60:
            checkpoint()
            logger.info("checkpoint step %d -> %s", step, ckpt)
            last_ckpt = elapsed
            clock = TimeBudget(clock.seconds, elapsed)

    checkpoint()
    model.eval()
    final_bpb = validation_bpb(model, tok, val_ids, config.seq_len, config.final_val_windows)
    val_tokens = len(val_window_starts(len(val_ids), config.seq_len, config.final_val_windows)) * config.seq_len
    logger.info("final: step %d, %d tokens, val %.4f bpb (%d of %d val tokens)",
                step, tokens_seen, final_bpb, val_tokens, len(val_ids))
    final_recall = (recall_accuracy(model, tok, val_ids, config.seq_len, 200, 8)
                    if config.recall_fraction > 0 else None)
    if final_recall is not None:
        logger.info("final recall accuracy (8 facts, %d-token rows): %.3f", config.seq_len, final_recall)
    save_lm(model, tok, config.out)
    sources = json.loads((config.corpus / "sources.json").read_text())
    entry = {
        "name": config.name,
        "path": str(config.out),
        "class": "transformers.LlamaForCausalLM",
        "weights_file": WEIGHTS_FILE,
        "sha256": file_sha256(config.out / WEIGHTS_FILE),
        "weights_sha256": weights_sha256(model),
        "weights_sha256_method": "toolkit.models.lm.weights_sha256 (state dict, sorted names)",
        "tokenizer_sha256": tokenizer_file_sha256(config.out),
        "dtype": "float32",
        "parameters": n_params,
        "shape": shape.to_dict(),
        "recipe": "toolkit.recipes.train_lm",
        "config": config.to_dict(),  # TrainLMConfig.from_dict reruns it
        "initialised_from": str(config.init) if config.init else None,
        "training": {
            "steps": step, "tokens_seen": tokens_seen,
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
                 "sources": [{k: s[k] for k in ("name", "package", "version", "licence", "bytes", "sha256")}
                             for s in sources["sources"]]},
    }
    update_manifest(config.name, entry, config.manifest)
    logger.info("saved %s (%s) and manifest entry %s", config.out, entry["sha256"][:12], config.name)
    return config.out


def main(argv: list[str] | None = None) -> int:
    return cli(TrainLMConfig, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
