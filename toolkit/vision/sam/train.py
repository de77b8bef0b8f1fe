"""Train the small SAM (``sam-shapes``) on images with known masks.

``python -m toolkit.vision.sam.train --out runs/sam --minutes 60``

Every step draws fresh images (:mod:`toolkit.data.segments`, ``split="train"``,
seeds ``step * batch ..``), so the number of distinct training images is
``steps * batch``; compression later uses at most 1% of that. One prompt kind
per step (box, one point, several points, as SAM mixes them), four objects an
image. The loss is cross-entropy plus dice on the mask upsampled to the input
size (SAM uses focal plus dice; see ``mask_loss``), taking for a one-point
prompt only the best of its three masks, plus the squared error of the
predicted IoU against the real one. Checkpoints
every few minutes; ``--resume`` continues one; the end writes the model (a plain
``SamModel`` directory with its ``SamProcessor``) and a held-out evaluation.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from toolkit.numerics import cpu_has_bf16
from toolkit.vision.sam.model import build_sam, decode, make_processor, sam_config
from toolkit.vision.sam.prompts import KINDS, make_batch

__all__ = ["mask_loss", "main"]

_KIND_P = (0.4, 0.3, 0.3)


def _bce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits, target, reduction="none").flatten(-2).mean(-1)


def _dice(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    p = torch.sigmoid(logits).flatten(-2)
    t = target.flatten(-2)
    return 1 - (2 * (p * t).sum(-1) + 1) / (p.sum(-1) + t.sum(-1) + 1)


def mask_loss(logits: torch.Tensor, iou_pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """SAM's loss for (B, P, K, h, w) mask logits against (B, P, H, W) boolean masks."""
    b, p, k, h, w = logits.shape
    size = target.shape[-1]
    up = F.interpolate(logits.reshape(b * p, k, h, w).float(), size=(size, size), mode="bilinear",
                       align_corners=False).reshape(b, p, k, size, size)
    tgt = target[:, :, None].float().expand_as(up)
    # SAM weights a focal loss 20:1 against dice. From random initialisation that
    # drives every mask to background for hundreds of steps before the decoder
    # starts to read the prompt (measured on a batch it should overfit); plain
    # cross-entropy plus dice leaves that regime several times sooner.
    per = _bce(up, tgt) + _dice(up, tgt)  # (B, P, K)
    best = per.min(dim=2).values
    with torch.no_grad():
        pred = up > 0
        inter = (pred & target[:, :, None]).flatten(-2).sum(-1).float()
        union = (pred | target[:, :, None]).flatten(-2).sum(-1).float().clamp(min=1)
        iou = inter / union
    return best.mean() + F.mse_loss(iou_pred.float(), iou)


class _Batches(torch.utils.data.IterableDataset):
    """Training batches rendered in a worker process; batch ``s`` is a pure function of ``s``."""

    def __init__(self, start: int, steps: int, batch: int, per_image: int, size: int):
        self.start, self.steps, self.batch, self.per_image, self.size = start, steps, batch, per_image, size

    def __iter__(self):
        from toolkit.data.segments import make_image

        for step in range(self.start, self.steps):
            rng = np.random.default_rng([step, 11])
            items = [make_image(step * self.batch + i, "train", self.size) for i in range(self.batch)]
            items = [it for it in items if len(it.masks)] or [make_image(0, "train", self.size)]
            kind = KINDS[rng.choice(len(KINDS), p=_KIND_P)]
            yield step, kind, make_batch(items, kind, self.per_image, rng, train=True)


def _lr(step: int, total: int, warmup: int, lr: float) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    return lr * 0.5 * (1 + np.cos(np.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def _save(path: Path, model, opt, step: int, elapsed: float, history: list) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step, "elapsed": elapsed,
                "history": history}, tmp)
    tmp.replace(path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=8000, help="total steps (the learning-rate schedule's length)")
    ap.add_argument("--minutes", type=float, default=None, help="stop (and save) after this long")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--per-image", type=int, default=4, help="prompted objects per image")
    ap.add_argument("--lr", type=float, default=8e-4)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--eval-every", type=int, default=1000)
    ap.add_argument("--eval-images", type=int, default=128)
    ap.add_argument("--final-images", type=int, default=500)
    ap.add_argument("--checkpoint-every", type=float, default=300.0, help="seconds")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True,
                    help="bfloat16 autocast (float32 weights); only where the CPU has bf16 instructions")
    ap.add_argument("--resume", action="store_true")
    args = ap.parse_args(argv)

    from tqdm import tqdm

    from toolkit.data.segments import images
    from toolkit.vision.sam.metrics import evaluate

    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    ckpt = args.out / "checkpoint.pt"
    model = build_sam(sam_config()).train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    step, elapsed, history = 0, 0.0, []
    if args.resume and ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step, elapsed, history = state["step"], state["elapsed"], state["history"]
        print(f"resumed at step {step} ({elapsed / 60:.1f} min)", flush=True)
    bf16 = args.bf16 and cpu_has_bf16()
    held_out = images(args.eval_images, "test")
    loader = torch.utils.data.DataLoader(_Batches(step, args.steps, args.batch, args.per_image,
                                                  model.config.vision_config.image_size),
                                         batch_size=None, num_workers=1, prefetch_factor=4)
    t0, last_ckpt = time.time() - elapsed, time.time()
    bar = tqdm(total=args.steps, initial=step, desc="sam", mininterval=10)
    run = 0.0
    for step, kind, (pixels, prompts, target) in loader:
        for g in opt.param_groups:
            g["lr"] = _lr(step, args.steps, args.warmup, args.lr)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            emb = model.vision_encoder(pixels).last_hidden_state
            logits, iou = decode(model, emb, prompts)
        loss = mask_loss(logits, iou, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        value = loss.item()
        run = 0.98 * run + 0.02 * value if step else value
        bar.update(1)
        bar.set_postfix(loss=f"{run:.3f}", kind=kind, refresh=False)
        step += 1
        if step % args.eval_every == 0:
            ev = evaluate(model, held_out, cost=False)
            history.append({"step": step, "minutes": (time.time() - t0) / 60, "loss": run,
                            **{k: v["miou"] for k, v in ev.items()}})
            print(json.dumps(history[-1]), flush=True)
            model.train()
        if time.time() - last_ckpt > args.checkpoint_every:
            _save(ckpt, model, opt, step, time.time() - t0, history)
            last_ckpt = time.time()
        if args.minutes is not None and time.time() - t0 > args.minutes * 60:
            break
    bar.close()
    _save(ckpt, model, opt, step, time.time() - t0, history)
    model.eval()
    final = evaluate(model, images(args.final_images, "test"))
    history.append({"step": step, "final": True, "minutes": (time.time() - t0) / 60,
                    "images_seen": step * args.batch, **final})
    print(json.dumps(history[-1]), flush=True)
    model.save_pretrained(args.out / "model")
    make_processor(model).save_pretrained(args.out / "model")
    (args.out / "history.json").write_text(json.dumps(history, indent=1) + "\n")
    return 0



if __name__ == "__main__":
    raise SystemExit(main())
