"""The learning-rate schedule every training loop in the toolkit follows: linear warmup, then a cosine.

Recipes (:mod:`toolkit.recipes.common` re-exports these) and the library
functions that train in place (SAM distillation and pruning, the small
language model of the notebooks) compute their rates here, so one formula
serves them all. The arithmetic is ordered so that a cosine to zero
(``min_ratio=0``) gives the same floats as ``lr * 0.5 * (1 + cos)``.
"""

from __future__ import annotations

import math

__all__ = ["lr_at", "step_progress"]


def lr_at(step: int, progress: float, *, lr: float, warmup: int, min_ratio: float = 0.0) -> float:
    """Linear warmup over ``warmup`` steps, then a cosine from ``lr`` to ``lr * min_ratio`` as
    ``progress`` (steps or seconds done after warmup, as a share of the total) goes from 0 to 1."""
    if step < warmup:
        return lr * (step + 1) / warmup
    p = min(1.0, max(0.0, progress))
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * p)))


def step_progress(step: int, total: int, warmup: int) -> float:
    """The cosine's progress at ``step`` of a ``total``-step run whose first ``warmup`` steps warm up."""
    return (step - warmup) / max(1, total - warmup)
