"""SAM compression: the teacher, SlimSAM at about 50% and 25% of its encoder, and a MobileSAM student.

    python benchmarks/sam_compress.py --teacher runs/sam/model --out benchmarks/results/sam_compress.json

Compression data: the first ``--images`` images of the teacher's own training
stream (``toolkit.data.segments``, ``split="train"``, seeds 0 ..), at most 1% of
the images the teacher was trained on (``--teacher-images``, from its
``history.json`` where present); their masks are never read. Held-out data:
``--eval-images`` images of the ``test`` split, whose backgrounds and cut-outs
come from photographs no model here was trained or compressed on, and whose
seed stream is disjoint. Every model gets the same prompts: a tight box, one
interior point, and three interior points, for four objects an image.

Reported per model: mIoU per prompt kind against the true masks, the share of
the teacher's mIoU, mIoU against the teacher's own masks, and the image
encoder's parameters, MACs (one image) and CPU latency (batch 1, ``--threads``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from toolkit.data import segments  # noqa: E402
from toolkit.models.store import list_models, model_entry  # noqa: E402
from toolkit.recipes.ship_sam import ShipSamConfig, ship  # noqa: E402
from toolkit.vision import sam  # noqa: E402

KINDS = ("box", "point", "points")


def row(name: str, res: dict, teacher: dict | None, seconds: float | None) -> dict:
    out = {"model": name, **{k: res[k] for k in KINDS}, "encoder": res["encoder"], "compress_s": seconds}
    if teacher is not None:
        out["share_of_teacher"] = {k: res[k]["miou"] / teacher[k]["miou"] for k in KINDS}
        out["params_share"] = res["encoder"]["params"] / teacher["encoder"]["params"]
        out["macs_share"] = res["encoder"]["macs"] / teacher["encoder"]["macs"]
    return out


def table(rows: list[dict]) -> str:
    head = ("| model | encoder params | MACs | latency ms | mIoU box / 1 pt / 3 pt | % of teacher | "
            "mIoU vs teacher (box) |\n|---|---:|---:|---:|---|---|---:|\n")
    lines = []
    for r in rows:
        e = r["encoder"]
        share = r.get("share_of_teacher")
        pct = " / ".join(f"{100 * share[k]:.1f}" for k in KINDS) if share else "100"
        vs = r["box"].get("miou_vs_teacher")
        lines.append(f"| {r['model']} | {e['params'] / 1e6:.2f}M ({100 * r.get('params_share', 1):.0f}%) | "
                     f"{e['macs'] / 1e6:.0f}M ({100 * r.get('macs_share', 1):.0f}%) | {e['latency_ms']:.1f} | "
                     + " / ".join(f"{r[k]['miou']:.3f}" for k in KINDS) + f" | {pct} | "
                     + (f"{vs:.3f}" if vs is not None else "1") + " |")
    return head + "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", default="sam-shapes", help="a shipped name or a SamModel directory")
    ap.add_argument("--teacher-images", type=int, default=None,
                    help="images the teacher was trained on (default: from its history.json)")
    ap.add_argument("--images", type=int, default=None, help="compression images (default: 1%% of the teacher's)")
    ap.add_argument("--eval-images", type=int, default=500)
    ap.add_argument("--slim-steps", type=int, default=400)
    ap.add_argument("--distill-steps", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--save", type=Path, default=None, help="write each compressed model here")
    ap.add_argument("--ship", action="store_true",
                    help="store the compressed models as shipped assets (float16) with manifest entries")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/sam_compress.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.ship and args.teacher not in list_models():
        raise SystemExit("--ship names the models after a shipped teacher; give --teacher a shipped name")

    teacher = sam.load_sam(args.teacher)
    seen = args.teacher_images
    hist = Path(str(args.teacher)) / ".." / "history.json"
    if seen is None and args.teacher in list_models():
        seen = model_entry(args.teacher).get("images_seen")
    if seen is None and hist.exists():
        seen = next((h["images_seen"] for h in json.loads(hist.read_text()) if h.get("final")), None)
    if seen is None:
        raise SystemExit("give --teacher-images: how many images the teacher was trained on")
    n = args.images if args.images is not None else seen // 100
    if n > seen // 100:
        raise SystemExit(f"{n} compression images is more than 1% of the teacher's {seen}")
    size = teacher.config.vision_config.image_size
    train = segments.images(n, "train", size=size)
    held = segments.images(args.eval_images, "test", size=size)
    print(f"compression images: {len(train)} of the teacher's {seen}; held-out images: {len(held)}", flush=True)

    rows = []
    t_res = sam.evaluate(teacher, held)
    rows.append(row("teacher", t_res, None, None))
    runs = [
        ("SlimSAM 50%", "slim50", lambda: sam.slim(teacher, sam.SlimConfig(ratio=0.5, steps=args.slim_steps), train)),
        ("SlimSAM 25%", "slim25", lambda: sam.slim(teacher, sam.SlimConfig(ratio=0.25, steps=args.slim_steps), train)),
        ("MobileSAM student", "mobile",
         lambda: sam.distill(teacher, sam.student_config(teacher, hidden=96, layers=3, heads=3),
                             sam.DistillConfig(steps=args.distill_steps), train)),
    ]
    command = "python benchmarks/sam_compress.py " + " ".join(argv if argv is not None else sys.argv[1:])
    for name, suffix, make in runs:
        t = time.time()
        model = make()
        seconds = time.time() - t
        # Evaluated as it is stored (float16 weights, computed in float32), so the
        # table and a shipped model's manifest give the same figures.
        stored = sam.as_stored(model, torch.float16)
        res = sam.evaluate(stored, held, teacher=teacher)
        rows.append(row(name, res, t_res, seconds))
        print(json.dumps(rows[-1]), flush=True)
        if args.save is not None:
            model.save_pretrained(args.save / suffix)
        if args.ship:
            ship(model, ShipSamConfig(name=f"{args.teacher}-{suffix}", command=command, eval_images=len(held)),
                 figures=res,
                 extra={"teacher": str(args.teacher), "compression_images": len(train),
                        "compression_data": "toolkit.data.segments split='train' seeds 0.. (the teacher's own "
                                            "first training images; masks unused)",
                        "method": name, "compress_seconds": round(seconds, 1), "threads": args.threads,
                        "share_of_teacher": rows[-1]["share_of_teacher"]})
    result = {"teacher": str(args.teacher), "teacher_images": seen, "compression_images": len(train),
              "held_out_images": len(held), "threads": args.threads, "rows": rows,
              "machine": {"cores": os.cpu_count(), "torch": torch.__version__}, "command": command}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    md = table(rows)
    args.out.with_suffix(".md").write_text(f"# SAM compression\n\n`{result['command']}`\n\n"
                                           f"{len(train)} compression images ({len(train) / seen:.2%} of the "
                                           f"teacher's {seen}), {len(held)} held-out images; {os.cpu_count()} cores, "
                                           f"{args.threads} threads, torch {torch.__version__}.\n\n{md}")
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
