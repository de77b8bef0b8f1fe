"""Ship a ``SamModel`` as a toolkit asset: half-precision weights, its processor and a manifest entry.

    python -m toolkit.vision.sam.ship runs/sam/model sam-shapes --history runs/sam/history.json \\
        --command "python -m toolkit.vision.sam.train --out runs/sam --steps 4200"

The weights are stored in float16 (``load_sam`` computes in float32). Before the
entry is written, the stored copy is checked against the float32 model on
held-out images (box prompts, test split seeds ``CHECK_START ..``): a copy that
loses more than ``max_loss`` mIoU is refused, and ``--dtype float32`` ships the
weights as they are. The manifest's figures are the stored copy's, on the first
``eval_images`` images of the test split, with every prompt kind.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

from toolkit.data import segments
from toolkit.vision.sam.metrics import evaluate
from toolkit.vision.sam.model import make_processor

__all__ = ["ship", "as_stored", "CHECK_START"]

CHECK_START = 10_000  # fp16 check images: test-split seeds past the figures' first images
_DTYPES = {"float16": torch.float16, "float32": torch.float32}
_DATA = {
    "generator": "toolkit.data.segments (objects pasted on scikit-image photographs and drawn textures; "
                 "every image has its true masks)",
    "train_photos": list(segments.PHOTOS["train"]),
    "held_out_photos": list(segments.PHOTOS["test"]),
    "held_out": "split='test' (other photographs, a disjoint seed stream)",
    "sources": "scikit-image sample data (see toolkit/data/SOURCES.md)",
}


def as_stored(model, dtype: torch.dtype):
    """``model`` as it loads after being stored in ``dtype``: the same values ``from_pretrained`` gives."""
    out = copy.deepcopy(model)
    with torch.no_grad():
        for p in out.parameters():
            p.copy_(p.to(dtype).float())
        for b in out.buffers():
            if b.is_floating_point():
                b.copy_(b.to(dtype).float())
    return out.eval()


def ship(model, name: str, command: str, extra: dict | None = None, figures: dict | None = None,
         dtype: str = "float16", eval_images: int = 500, check_images: int = 64, max_loss: float = 0.005,
         assets: Path | None = None, manifest: Path | None = None) -> dict:
    """Store ``model`` as ``assets/name`` and write its manifest entry; returns the entry.

    ``figures`` (an :func:`evaluate` result of the model as stored, e.g. from a
    benchmark that evaluated ``as_stored(model)``) spares a second evaluation.
    """
    from toolkit.models.store import ASSETS, file_sha256
    from toolkit.models.train_lm import update_manifest

    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, not {dtype!r}")
    assets = ASSETS if assets is None else Path(assets)
    manifest = assets / "MANIFEST.json" if manifest is None else Path(manifest)
    model = model.float().eval()
    stored = as_stored(model, _DTYPES[dtype])
    size = model.config.vision_config.image_size
    check = segments.images(check_images, "test", start=CHECK_START, size=size)
    before = evaluate(model, check, kinds=("box",), cost=False)["box"]["miou"]
    after = evaluate(stored, check, kinds=("box",), cost=False)["box"]["miou"]
    if before - after > max_loss:
        raise ValueError(f"{dtype} weights lose {before - after:.4f} box mIoU on {len(check)} check images "
                         f"(more than {max_loss}); ship with dtype='float32'")
    if figures is None:
        figures = evaluate(stored, segments.images(eval_images, "test", size=size))
    out = assets / name
    out.mkdir(parents=True, exist_ok=True)
    stored.to(_DTYPES[dtype]).save_pretrained(out)  # exact: ``stored`` holds values of that dtype
    make_processor(model).save_pretrained(out)
    vc = model.config.vision_config
    entry = {
        "name": name,
        "class": "transformers.SamModel",
        "path": f"toolkit/assets/{name}",
        "weights_file": "model.safetensors",
        "sha256": file_sha256(out / "model.safetensors"),
        "parameters": int(sum(p.numel() for p in model.parameters())),
        "encoder_parameters": int(sum(p.numel() for p in model.vision_encoder.parameters())),
        "encoder": {"hidden_size": vc.hidden_size, "mlp_dim": vc.mlp_dim, "layers": vc.num_hidden_layers,
                    "heads": vc.num_attention_heads, "image_size": size, "patch_size": vc.patch_size},
        "dtype": f"{dtype} (evaluated in float32, as load_sam loads it)",
        "dtype_check": {"images": len(check), "start_seed": CHECK_START, "box_miou_float32": before,
                        f"box_miou_{dtype}": after},
        "data": _DATA,
        "training_command": command,
        "figures": figures,
        "figures_images": eval_images,
        "torch": torch.__version__,
        **(extra or {}),
    }
    update_manifest(name, entry, manifest)
    return entry


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path, help="a saved SamModel directory")
    ap.add_argument("name", help="the asset's name")
    ap.add_argument("--command", required=True, help="the command that made the model, for the manifest")
    ap.add_argument("--history", type=Path, help="the trainer's history.json (images seen, wall time, curve)")
    ap.add_argument("--dtype", default="float16", choices=sorted(_DTYPES))
    ap.add_argument("--eval-images", type=int, default=500)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    from transformers import SamModel

    torch.set_num_threads(args.threads)
    model = SamModel.from_pretrained(str(args.model), dtype=torch.float32)
    extra = {}
    if args.history is not None:
        history = json.loads(args.history.read_text())
        final = next((h for h in history if h.get("final")), None)
        if final is None:
            raise SystemExit(f"{args.history} has no final entry: the run did not finish")
        minutes = final.get("minutes")
        ckpt = args.history.parent / "checkpoint.pt"
        if minutes is None and ckpt.exists():  # histories written before the final entry timed the run
            minutes = torch.load(ckpt, weights_only=False)["elapsed"] / 60
        extra = {"images_seen": final["images_seen"], "steps": final["step"],
                 "training_minutes": None if minutes is None else round(minutes, 1),
                 "curve": [{k: h[k] for k in ("step", "minutes", "loss", "box", "point", "points") if k in h}
                           for h in history if not h.get("final")]}
    entry = ship(model, args.name, args.command, extra, dtype=args.dtype, eval_images=args.eval_images)
    print(json.dumps({k: entry[k] for k in ("name", "sha256", "parameters", "dtype_check")}, indent=1))
    print(json.dumps({k: v["miou"] for k, v in entry["figures"].items() if "miou" in v}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
