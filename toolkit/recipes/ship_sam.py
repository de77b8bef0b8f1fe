"""Ship a ``SamModel`` as a toolkit asset: half-precision weights, its processor and a manifest entry.

    python -m toolkit.recipes.ship_sam --model runs/sam/model --name sam-shapes \\
        --history runs/sam/history.json --command "python -m toolkit.recipes.train_sam --out runs/sam --steps 4200"

The weights are stored in float16 (``load_sam`` computes in float32). Before the
entry is written, the stored copy is checked against the float32 model on
held-out images (box prompts, test split seeds ``CHECK_START ..``): a copy that
loses more than ``max_loss`` mIoU is refused, and ``--dtype float32`` ships the
weights as they are. The manifest's figures are the stored copy's, on the first
``eval_images`` images of the test split, with every prompt kind.

:func:`ship` stores a model held in memory (the SAM compression benchmark ships
what it has just evaluated); :func:`run` reads one from ``--model`` first.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from toolkit.config import Config, check
from toolkit.data import segments
from toolkit.errors import ConfigError, UnsupportedInputError
from toolkit.models.store import ASSETS, file_sha256, update_manifest
from toolkit.recipes.common import cli, load_checkpoint, set_threads
from toolkit.vision.sam.metrics import evaluate
from toolkit.vision.sam.model import as_stored, make_processor

__all__ = ["ShipSamConfig", "ship", "run", "main", "CHECK_START"]

CHECK_START = 10_000  # dtype check images: test-split seeds past the figures' first images
_DTYPES = {"float16": torch.float16, "float32": torch.float32}
_DATA = {
    "generator": "toolkit.data.segments (objects pasted on scikit-image photographs and drawn textures; "
                 "every image has its true masks)",
    "train_photos": list(segments.PHOTOS["train"]),
    "held_out_photos": list(segments.PHOTOS["test"]),
    "held_out": "split='test' (other photographs, a disjoint seed stream)",
    "sources": "scikit-image sample data (see toolkit/data/SOURCES.md)",
}


@dataclass(frozen=True)
class ShipSamConfig(Config):
    """Where and how a SAM is stored as an asset."""

    name: str = field(metadata={"help": "the asset's name"})
    command: str = field(metadata={"help": "the command that made the model, for the manifest"})
    model: Path | None = field(default=None, metadata={"help": "a saved SamModel directory (what run ships)"})
    history: Path | None = field(default=None, metadata={
        "help": "the trainer's history.json (images seen, wall time, curve)"})
    dtype: str = field(default="float16", metadata={"help": "float16 or float32"})
    eval_images: int = field(default=500, metadata={"help": "held-out images behind the manifest's figures"})
    check_images: int = field(default=64, metadata={"help": "held-out images of the dtype check"})
    max_loss: float = field(default=0.005, metadata={"help": "box mIoU the stored dtype may lose"})
    assets: Path | None = field(default=None, metadata={
        "help": "the assets directory (default: the toolkit's); its MANIFEST.json gets the entry"})
    threads: int = field(default=2, metadata={"help": "torch threads"})

    def __post_init__(self) -> None:
        check(self.dtype in _DTYPES, f"dtype must be one of {sorted(_DTYPES)}, not {self.dtype!r}")
        check(self.eval_images >= 1 and self.check_images >= 1, "eval_images and check_images must be >= 1")


def ship(model, config: ShipSamConfig, figures: dict | None = None, extra: dict | None = None) -> dict:
    """Store ``model`` as ``assets/<config.name>`` and write its manifest entry; returns the entry.

    ``figures`` (an :func:`~toolkit.vision.sam.evaluate` result of the model as
    stored, e.g. from a benchmark that evaluated ``as_stored(model)``) spares a
    second evaluation; ``extra`` joins the entry.
    """
    assets = ASSETS if config.assets is None else Path(config.assets)
    dtype = _DTYPES[config.dtype]
    model = model.float().eval()
    stored = as_stored(model, dtype)
    size = model.config.vision_config.image_size
    check_set = segments.images(config.check_images, "test", start=CHECK_START, size=size)
    before = evaluate(model, check_set, kinds=("box",), cost=False)["box"]["miou"]
    after = evaluate(stored, check_set, kinds=("box",), cost=False)["box"]["miou"]
    if before - after > config.max_loss:
        raise ConfigError(f"{config.dtype} weights lose {before - after:.4f} box mIoU on {len(check_set)} check "
                          f"images (more than {config.max_loss}); ship with dtype='float32'")
    if figures is None:
        figures = evaluate(stored, segments.images(config.eval_images, "test", size=size))
    out = assets / config.name
    out.mkdir(parents=True, exist_ok=True)
    stored.to(dtype).save_pretrained(out)  # exact: ``stored`` holds values of that dtype
    make_processor(model).save_pretrained(out)
    vc = model.config.vision_config
    entry = {
        "name": config.name,
        "class": "transformers.SamModel",
        "path": f"toolkit/assets/{config.name}",
        "weights_file": "model.safetensors",
        "sha256": file_sha256(out / "model.safetensors"),
        "parameters": int(sum(p.numel() for p in model.parameters())),
        "encoder_parameters": int(sum(p.numel() for p in model.vision_encoder.parameters())),
        "encoder": {"hidden_size": vc.hidden_size, "mlp_dim": vc.mlp_dim, "layers": vc.num_hidden_layers,
                    "heads": vc.num_attention_heads, "image_size": size, "patch_size": vc.patch_size},
        "dtype": f"{config.dtype} (evaluated in float32, as load_sam loads it)",
        "dtype_check": {"images": len(check_set), "start_seed": CHECK_START, "box_miou_float32": before,
                        f"box_miou_{config.dtype}": after},
        "data": _DATA,
        "training_command": config.command,
        "figures": figures,
        "figures_images": config.eval_images,
        "torch": torch.__version__,
        **(extra or {}),
    }
    update_manifest(config.name, entry, assets / "MANIFEST.json")
    return entry


def _training_record(history_path: Path) -> dict:
    """What the manifest keeps of a training run: images seen, steps, minutes and the curve."""
    history = json.loads(history_path.read_text())
    final = next((h for h in history if h.get("final")), None)
    if final is None:
        raise UnsupportedInputError(f"{history_path} has no final entry: the run did not finish")
    minutes = final.get("minutes")
    if minutes is None:  # histories written before the final entry timed the run
        state = load_checkpoint(history_path.parent / "checkpoint.pt")
        minutes = None if state is None else state["elapsed"] / 60
    return {"images_seen": final["images_seen"], "steps": final["step"],
            "training_minutes": None if minutes is None else round(minutes, 1),
            "curve": [{k: h[k] for k in ("step", "minutes", "loss", "box", "point", "points") if k in h}
                      for h in history if not h.get("final")]}


def run(config: ShipSamConfig) -> Path:
    """Ship the model saved at ``config.model``; returns the asset's directory."""
    from transformers import SamModel

    if config.model is None:
        raise ConfigError("give the saved SamModel directory to ship (model)")
    set_threads(config.threads)
    model = SamModel.from_pretrained(str(config.model), dtype=torch.float32)
    extra = _training_record(Path(config.history)) if config.history is not None else {}
    entry = ship(model, config, extra=extra)
    print(json.dumps({k: entry[k] for k in ("name", "sha256", "parameters", "dtype_check")}, indent=1))
    print(json.dumps({k: v["miou"] for k, v in entry["figures"].items() if "miou" in v}))
    assets = ASSETS if config.assets is None else Path(config.assets)
    return assets / config.name


def main(argv=None) -> int:
    return cli(ShipSamConfig, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
