"""Train the scene VQA model: ``python -m toolkit.recipes.train_vlm --out runs/vlm --minutes 60``.

One stage, end to end: the CLIP tower and projector start fresh, the
language model starts from ``lm-default``; all of it trains. The loss is the
answer's tokens (teacher-forced after the prompt) plus two auxiliary losses
on the vision tower, which a tower this small needs to learn quickly what a
pretrained CLIP would bring:

* a per-patch label (the colour and shape of the object covering the patch
  centre, or background) from a linear head on the patch tokens;
* per-colour and per-shape object counts from a linear head on [CLS].

The second makes [CLS] attend to the objects, which is what VisionZip's
[CLS]-attention scoring assumes of a CLIP tower. The heads are not part of
the shipped model.

Fine-tuning: ``--init vlm-scenes --steps 600 --seed 1`` starts from a
trained model instead (answer loss only: the auxiliary heads are not
shipped), and ``--mod '{"mean": 0.4}'`` first converts it to Mixture-of-Depths
(:func:`toolkit.vision.mod.convert_`, routers at ``--router-lr-scale`` times
the learning rate). A dense and a MoD run with the same ``--steps`` and
``--seed`` see the same batches in the same order.

Checkpoints go to ``OUT/checkpoint.pt`` every ``--checkpoint-every``
seconds and resume with ``--resume``; the losses and held-out accuracy
(``split="test"`` scenes) are logged to ``OUT/history.json``; the final
model is written with ``save_vlm`` to ``OUT/model``, the path ``run`` returns.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from toolkit.config import Config, check
from toolkit.data import scenes
from toolkit.numerics import cpu_has_bf16
from toolkit.recipes.common import TimeBudget, cli, load_checkpoint, lr_at, save_checkpoint, set_threads
from toolkit.vision import mod as mod_lib
from toolkit.vision.vlm import VLMSpec, build_vlm, evaluate_vqa, read_vlm, save_vlm

__all__ = ["TrainVLMConfig", "run", "main"]

_LABELS = [(c, s) for c in scenes.COLOURS for s in scenes.SHAPES]
_WARMUP = 50
_MIN_LR = 0.1  # the cosine ends at this share of the learning rate


@dataclass(frozen=True)
class TrainVLMConfig(Config):
    """Training or fine-tuning of the scene VQA model."""

    out: Path = field(metadata={"help": "run directory: checkpoint, history.json and the final model/"})
    minutes: float = field(default=60.0, metadata={"help": "train this long (ignored with --steps)"})
    steps: int | None = field(default=None, metadata={"help": "train this many steps (overrides --minutes)"})
    init: str | None = field(default=None,
                             metadata={"help": "fine-tune this trained model (a shipped name or directory)"})
    mod: mod_lib.MoDConfig | None = field(default=None, metadata={
        "help": "convert to Mixture-of-Depths first, with this MoDConfig (on the command line, its fields as "
                "JSON: '{\"mean\": 0.4}')"})
    router_lr_scale: float = field(default=10.0, metadata={"help": "learning-rate factor for the MoD routers"})
    batch: int = field(default=32, metadata={"help": "questions per step"})
    lr: float = field(default=5e-4, metadata={"help": "peak learning rate"})
    lm_lr_scale: float = field(default=0.4, metadata={"help": "learning-rate factor for the pretrained LM"})
    aux_weight: float = field(default=0.5, metadata={"help": "weight of the tower's auxiliary losses "
                                                             "(0 when fine-tuning)"})
    eval_every: int = field(default=200, metadata={"help": "steps between held-out evaluations"})
    eval_items: int = field(default=256, metadata={"help": "held-out questions per evaluation"})
    final_items: int = field(default=1000, metadata={"help": "held-out questions for the final figure"})
    checkpoint_every: float = field(default=300.0, metadata={"help": "seconds between checkpoints"})
    threads: int = field(default=2, metadata={"help": "torch threads"})
    seed: int = field(default=0, metadata={"help": "seed of the weights and of the batch stream"})
    resume: bool = field(default=False, metadata={"help": "continue from OUT/checkpoint.pt"})
    precision: str = field(default="auto", metadata={
        "help": "bf16 (autocast) or fp32; auto: bf16 where the CPU has bfloat16 instructions"})

    def __post_init__(self) -> None:
        check(self.precision in ("auto", "bf16", "fp32"),
              f"precision must be auto, bf16 or fp32, got {self.precision!r}")
        check(self.minutes > 0, f"minutes must be positive, got {self.minutes}")
        check(self.steps is None or self.steps >= 0, f"steps must be >= 0, got {self.steps}")
        check(self.batch >= 1 and self.eval_every >= 1, "batch and eval_every must be >= 1")


def patch_labels(objs, size: int, patch: int) -> np.ndarray:
    """The label of each patch: 1 + the (colour, shape) index of the object covering its centre, 0 background."""
    grid = size // patch
    centres = (np.arange(grid) + 0.5) * patch
    yy, xx = np.meshgrid(centres, centres, indexing="ij")
    lab = np.zeros((grid, grid), dtype=np.int64)
    for o in objs:
        m = scenes.shape_mask(o.shape, o.x, o.y, o.r, size)
        hit = m[yy.astype(int), xx.astype(int)]
        lab[hit] = 1 + _LABELS.index((o.colour, o.shape))
    return lab.reshape(-1)


def count_targets(objs) -> np.ndarray:
    """How many objects of each colour and each shape (capped at 6)."""
    keys = list(scenes.COLOURS) + list(scenes.SHAPES)
    return np.array([min(6, sum(o.colour == k or o.shape == k for o in objs)) for k in keys], dtype=np.int64)


def make_batch(processor, seeds, spec: VLMSpec):
    """Teacher-forced rows (left-padded), answer targets, pixels, patch labels and counts for training ``seeds``."""
    its = [scenes.make_item(int(s), "train", spec.image_size) for s in seeds]
    rows, targets = [], []
    for it in its:
        prompt, ans = processor.prompt_ids(it.question), processor.answer_ids(it.answer)
        rows.append(prompt + ans[:-1])
        targets.append([-100] * (len(prompt) - 1) + ans)
    width = max(len(r) for r in rows)
    pad = processor.config.pad_token_id
    ids = torch.full((len(rows), width), pad)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    tgt = torch.full((len(rows), width), -100)
    for i, (r, t) in enumerate(zip(rows, targets, strict=True)):
        ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
        tgt[i, width - len(t):] = torch.tensor(t)
    pix = processor.pixel_values([it.image for it in its])
    plab = torch.from_numpy(np.stack([patch_labels(it.objects, spec.image_size, spec.patch_size) for it in its]))
    cnt = torch.from_numpy(np.stack([count_targets(it.objects) for it in its]))
    return ids, mask, tgt, pix, plab, cnt


def run(config: TrainVLMConfig) -> Path:
    """Train as ``config`` says; returns the directory of the final model."""
    from toolkit.models import locate

    set_threads(config.threads)
    torch.manual_seed(config.seed)
    bf16 = config.precision == "bf16" or (config.precision == "auto" and cpu_has_bf16())
    print(f"precision: {'bf16 autocast' if bf16 else 'float32'}", flush=True)
    spec = VLMSpec()
    aux_weight = config.aux_weight
    if config.init is not None:
        model, processor = read_vlm(locate(config.init).path)
        spec = VLMSpec(image_size=processor.config.image_size)
        aux_weight = 0.0
    else:
        model, processor = build_vlm(spec)
    if config.mod is not None:
        mod_lib.convert_(model, config.mod)
    width = model.config.vision_config.hidden_size
    heads = torch.nn.ModuleDict({"patch": torch.nn.Linear(width, 1 + len(_LABELS)),
                                 "count": torch.nn.Linear(width, 8 * 7)})
    routers = mod_lib.router_parameters(model)
    router_ids = {id(p) for p in routers}
    lm_params = [p for p in model.model.language_model.parameters() if id(p) not in router_ids]
    skip = {id(p) for p in lm_params} | router_ids
    other = [p for p in model.parameters() if id(p) not in skip] + list(heads.parameters())
    groups = [{"params": other, "scale": 1.0}, {"params": lm_params, "scale": config.lm_lr_scale}]
    if routers:
        groups.append({"params": routers, "scale": config.router_lr_scale, "weight_decay": 0.0})
    opt = torch.optim.AdamW(groups, lr=config.lr, weight_decay=0.01)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = out / "checkpoint.pt"
    step, elapsed, history = 0, 0.0, []
    state = load_checkpoint(ckpt) if config.resume else None
    if state is not None:
        model.load_state_dict(state["model"])
        heads.load_state_dict(state["heads"])
        opt.load_state_dict(state["opt"])
        step, elapsed, history = state["step"], state["elapsed"], json.loads(state["history"])
        print(f"resumed at step {step}, {elapsed / 60:.1f} min", flush=True)
    budget = TimeBudget(config.minutes * 60 if config.steps is None else math.inf, elapsed)
    # The schedule's length is estimated from the measured step time and fixed
    # once (at step 20) so that a resumed run keeps the same schedule.
    total = history[0]["total_steps"] if history and "total_steps" in history[0] else None
    if config.steps is not None and total is None:
        total = config.steps
        history.insert(0, {"total_steps": total})
    held_out = scenes.items(config.eval_items, "test", spec.image_size)

    def save() -> None:
        save_checkpoint(ckpt, {"model": model.state_dict(), "heads": heads.state_dict(), "opt": opt.state_dict(),
                               "step": step, "elapsed": budget.elapsed, "history": json.dumps(history)})

    model.train()
    last_ckpt = budget.elapsed
    running = []
    while not budget.exhausted and (config.steps is None or step < config.steps):
        seeds = np.arange(step * config.batch, (step + 1) * config.batch) + config.seed * 10_000_000
        ids, mask, tgt, pix, plab, cnt = make_batch(processor, seeds, spec)
        lr = lr_at(step, step / max(1, total or 10_000), lr=config.lr, warmup=_WARMUP, min_ratio=_MIN_LR)
        for g in opt.param_groups:
            g["lr"] = lr * g["scale"]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            hidden = model.model(input_ids=ids, attention_mask=mask, pixel_values=pix, use_cache=False)
            sel = tgt != -100  # the LM head runs on the answer positions only
            logits = model.lm_head(hidden.last_hidden_state[sel]).float()
            tokens = hidden.image_outputs.last_hidden_state
            pooled = model.model.vision_tower.post_layernorm(tokens[:, 0])
            patch_logits = heads["patch"](tokens[:, 1:]).float()
            count_logits = heads["count"](pooled).float()
        loss_ans = F.cross_entropy(logits, tgt[sel])
        loss_patch = F.cross_entropy(patch_logits.reshape(-1, 1 + len(_LABELS)), plab.reshape(-1))
        loss_cnt = F.cross_entropy(count_logits.reshape(-1, 7), cnt.reshape(-1))
        loss = loss_ans + aux_weight * (loss_patch + loss_cnt) if aux_weight else loss_ans
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        running.append((loss_ans.item(), loss_patch.item(), loss_cnt.item()))
        if step == 20 and total is None:
            per_step = budget.elapsed / step
            total = int(budget.seconds / per_step)
            history.insert(0, {"total_steps": total})
        if step % 20 == 0:
            a, p, c = np.mean(running, axis=0)
            running = []
            history.append({"step": step, "minutes": budget.elapsed / 60, "loss_answer": float(a)})
            print(f"step {step} min {budget.elapsed / 60:.1f} lr {lr:.2e} answer {a:.3f} patch {p:.3f} "
                  f"count {c:.3f}", flush=True)
        if step % config.eval_every == 0:
            model.eval()
            ev = evaluate_vqa(model, processor, held_out)
            model.train()
            history.append({"step": step, "minutes": budget.elapsed / 60, **ev})
            print(f"eval step {step}: accuracy {ev['accuracy']:.3f} {ev['by_kind']}", flush=True)
        if budget.elapsed - last_ckpt > config.checkpoint_every:
            save()
            last_ckpt = budget.elapsed
    save()
    model.eval()
    ev = evaluate_vqa(model, processor, scenes.items(config.final_items, "test", spec.image_size))
    history.append({"step": step, "final": True, **ev})
    print(f"final held-out accuracy {ev['accuracy']:.3f} {ev['by_kind']}", flush=True)
    save_vlm(model, processor, out / "model")
    (out / "history.json").write_text(json.dumps(history, indent=1) + "\n")
    return out / "model"


def main(argv=None) -> int:
    return cli(TrainVLMConfig, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
