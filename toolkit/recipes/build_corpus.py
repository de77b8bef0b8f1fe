"""Build the LM codec's offline corpus from Debian packages: the training text and the held-out eval files.

    python -m toolkit.recipes.build_corpus --out runs/corpus --eval-out runs/eval

``--out`` gets ``train.txt``, ``val.bin`` and ``sources.json``; ``--eval-out``
gets the held-out files and ``eval_sources.json``, checked against the
training text for shared runs when both are built together. The sources,
their licences and the split are :mod:`toolkit.data.corpus`'s (see
toolkit/data/SOURCES.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from toolkit.config import Config, check
from toolkit.data.corpus import build_eval, build_training
from toolkit.recipes.common import cli

__all__ = ["BuildCorpusConfig", "run", "main"]


@dataclass(frozen=True)
class BuildCorpusConfig(Config):
    """Build the LM codec's training corpus, its held-out eval files, or both."""

    out: Path | None = field(default=None, metadata={"help": "training corpus directory"})
    eval_out: Path | None = field(default=None, metadata={"help": "held-out eval directory"})
    linux_cache: Path = field(default=Path("runs/linux-sample"), metadata={
        "help": "where the Linux source sample is extracted once"})
    val_fraction: float = field(default=0.01, metadata={"help": "share of every source held out for validation"})

    def __post_init__(self) -> None:
        check(self.out is not None or self.eval_out is not None, "give out, eval_out or both")
        check(0 < self.val_fraction < 1, f"val_fraction must be in 0..1, got {self.val_fraction}")


def run(config: BuildCorpusConfig) -> Path:
    """Write what ``config`` asks for; returns the training corpus directory, or the eval one alone."""
    if config.out is not None:
        build_training(config.out, config.linux_cache, config.val_fraction)
    if config.eval_out is not None:
        train_file = config.out / "train.txt" if config.out is not None else None
        build_eval(config.eval_out, config.linux_cache, train_file)
    return config.out if config.out is not None else config.eval_out  # type: ignore[return-value]


def main(argv: list[str] | None = None) -> int:
    return cli(BuildCorpusConfig, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
