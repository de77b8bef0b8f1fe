"""``random``: the baseline of token dropping, a uniform random subset of the vision tokens.

It drops before the language model, as VisionZip does, but looks at nothing:
every method that scores tokens must beat it to show that its scores matter.
"""

from __future__ import annotations

import torch

__all__ = ["choose"]


def choose(batch: int, n: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """(batch, k) vision-token indices, sorted, drawn uniformly without replacement for each row."""
    scores = torch.rand((batch, n), generator=generator)
    return scores.topk(k, dim=1).indices.sort(1).values
