"""Train the scene VQA model: ``python -m toolkit.vision.train_vlm --out runs/vlm --minutes 60``.

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
(:mod:`toolkit.vision.mod`, routers at ``--router-lr-scale`` times the
learning rate). A dense and a MoD run with the same ``--steps`` and
``--seed`` see the same batches in the same order.

Checkpoints go to ``OUT/checkpoint.pt`` every ``--checkpoint-every``
seconds and resume with ``--resume``; the losses and held-out accuracy
(``split="test"`` scenes) are logged to ``OUT/history.json``; the final
model is written with ``save_vlm``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from toolkit.data import scenes
from toolkit.numerics import cpu_has_bf16
from toolkit.vision import mod as mod_lib
from toolkit.vision.vlm import VLMSpec, _load, build_vlm, evaluate_vqa, save_vlm

_LABELS = [(c, s) for c in scenes.COLOURS for s in scenes.SHAPES]


def patch_labels(objs, size: int, patch: int) -> np.ndarray:
    grid = size // patch
    centres = (np.arange(grid) + 0.5) * patch
    yy, xx = np.meshgrid(centres, centres, indexing="ij")
    lab = np.zeros((grid, grid), dtype=np.int64)
    for o in objs:
        m = scenes._mask(o.shape, o.x, o.y, o.r, size)
        hit = m[yy.astype(int), xx.astype(int)]
        lab[hit] = 1 + _LABELS.index((o.colour, o.shape))
    return lab.reshape(-1)


def count_targets(objs) -> np.ndarray:
    keys = list(scenes.COLOURS) + list(scenes.SHAPES)
    return np.array([min(6, sum(o.colour == k or o.shape == k for o in objs)) for k in keys], dtype=np.int64)


def make_batch(processor, seeds, spec: VLMSpec):
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


def lr_at(step: int, total: int, warmup: int, lr: float) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, step / max(1, total)))))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--minutes", type=float, default=60.0)
    ap.add_argument("--steps", type=int, default=None, help="train this many steps (overrides --minutes)")
    ap.add_argument("--init", default=None, help="fine-tune this trained model (a shipped name or directory)")
    ap.add_argument("--mod", default=None, help="convert to Mixture-of-Depths first: MoDConfig fields as JSON")
    ap.add_argument("--router-lr-scale", type=float, default=10.0)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--lm-lr-scale", type=float, default=0.4, help="learning-rate factor for the pretrained LM")
    ap.add_argument("--aux-weight", type=float, default=0.5)
    ap.add_argument("--eval-every", type=int, default=200)
    ap.add_argument("--eval-items", type=int, default=256)
    ap.add_argument("--final-items", type=int, default=1000, help="held-out questions for the final figure")
    ap.add_argument("--checkpoint-every", type=float, default=300.0, help="seconds")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                    help="bf16 autocast or float32; auto: bf16 where the CPU has bfloat16 instructions")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    bf16 = args.precision == "bf16" or (args.precision == "auto" and cpu_has_bf16())
    print(f"precision: {'bf16 autocast' if bf16 else 'float32'}", flush=True)
    spec = VLMSpec()
    if args.init is not None:
        from toolkit.models import locate
        model, processor = _load(locate(args.init))
        spec = VLMSpec(image_size=processor.config.image_size)
        args.aux_weight = 0.0
    else:
        model, processor = build_vlm(spec)
    if args.mod is not None:
        mod_lib.convert(model, mod_lib.MoDConfig(**json.loads(args.mod)))
    width = model.config.vision_config.hidden_size
    heads = torch.nn.ModuleDict({"patch": torch.nn.Linear(width, 1 + len(_LABELS)),
                                 "count": torch.nn.Linear(width, 8 * 7)})
    routers = mod_lib.router_parameters(model)
    router_ids = {id(p) for p in routers}
    lm_params = [p for p in model.model.language_model.parameters() if id(p) not in router_ids]
    skip = {id(p) for p in lm_params} | router_ids
    other = [p for p in model.parameters() if id(p) not in skip] + list(heads.parameters())
    groups = [{"params": other, "scale": 1.0}, {"params": lm_params, "scale": args.lm_lr_scale}]
    if routers:
        groups.append({"params": routers, "scale": args.router_lr_scale, "weight_decay": 0.0})
    opt = torch.optim.AdamW(groups, lr=args.lr, weight_decay=0.01)
    args.out.mkdir(parents=True, exist_ok=True)
    ckpt = args.out / "checkpoint.pt"
    step, elapsed, history = 0, 0.0, []
    if args.resume and ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        model.load_state_dict(state["model"])
        heads.load_state_dict(state["heads"])
        opt.load_state_dict(state["opt"])
        step, elapsed, history = state["step"], state["elapsed"], json.loads(state["history"])
        print(f"resumed at step {step}, {elapsed / 60:.1f} min", flush=True)
    budget = args.minutes * 60 if args.steps is None else float("inf")
    # The schedule's length is estimated from the measured step time and fixed
    # once (at step 20) so that a resumed run keeps the same schedule.
    total = history[0]["total_steps"] if history and "total_steps" in history[0] else None
    if args.steps is not None and total is None:
        total = args.steps
        history.insert(0, {"total_steps": total})
    held_out = scenes.items(args.eval_items, "test", spec.image_size)
    model.train()
    t0, last_ckpt = time.time() - elapsed, time.time()
    running = []
    while time.time() - t0 < budget and (args.steps is None or step < args.steps):
        seeds = np.arange(step * args.batch, (step + 1) * args.batch) + args.seed * 10_000_000
        ids, mask, tgt, pix, plab, cnt = make_batch(processor, seeds, spec)
        lr = lr_at(step, total or 10_000, 50, args.lr)
        for g in opt.param_groups:
            g["lr"] = lr * g["scale"]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model.model(input_ids=ids, attention_mask=mask, pixel_values=pix, use_cache=False)
            sel = tgt != -100  # the LM head runs on the answer positions only
            logits = model.lm_head(out.last_hidden_state[sel]).float()
            tokens = out.image_outputs.last_hidden_state
            pooled = model.model.vision_tower.post_layernorm(tokens[:, 0])
            patch_logits = heads["patch"](tokens[:, 1:]).float()
            count_logits = heads["count"](pooled).float()
        loss_ans = F.cross_entropy(logits, tgt[sel])
        loss_patch = F.cross_entropy(patch_logits.reshape(-1, 1 + len(_LABELS)), plab.reshape(-1))
        loss_cnt = F.cross_entropy(count_logits.reshape(-1, 7), cnt.reshape(-1))
        loss = loss_ans + args.aux_weight * (loss_patch + loss_cnt) if args.aux_weight else loss_ans
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        running.append((loss_ans.item(), loss_patch.item(), loss_cnt.item()))
        if step == 20 and total is None:
            per_step = (time.time() - t0) / step
            total = int(budget / per_step)
            history.insert(0, {"total_steps": total})
        if step % 20 == 0:
            a, p, c = np.mean(running, axis=0)
            running = []
            history.append({"step": step, "minutes": (time.time() - t0) / 60, "loss_answer": float(a)})
            print(f"step {step} min {(time.time() - t0) / 60:.1f} lr {lr:.2e} answer {a:.3f} patch {p:.3f} "
                  f"count {c:.3f}", flush=True)
        if step % args.eval_every == 0:
            model.eval()
            ev = evaluate_vqa(model, processor, held_out)
            model.train()
            history.append({"step": step, "minutes": (time.time() - t0) / 60, **ev})
            print(f"eval step {step}: accuracy {ev['accuracy']:.3f} {ev['by_kind']}", flush=True)
        if time.time() - last_ckpt > args.checkpoint_every:
            _save(ckpt, model, heads, opt, step, time.time() - t0, history)
            last_ckpt = time.time()
    _save(ckpt, model, heads, opt, step, time.time() - t0, history)
    model.eval()
    ev = evaluate_vqa(model, processor, scenes.items(args.final_items, "test", spec.image_size))
    history.append({"step": step, "final": True, **ev})
    print(f"final held-out accuracy {ev['accuracy']:.3f} {ev['by_kind']}", flush=True)
    save_vlm(model, processor, args.out / "model")
    (args.out / "history.json").write_text(json.dumps(history, indent=1) + "\n")
    return 0



def _save(path: Path, model, heads, opt, step, elapsed, history) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save({"model": model.state_dict(), "heads": heads.state_dict(), "opt": opt.state_dict(),
                "step": step, "elapsed": elapsed, "history": json.dumps(history)}, tmp)
    tmp.replace(path)


if __name__ == "__main__":
    raise SystemExit(main())
