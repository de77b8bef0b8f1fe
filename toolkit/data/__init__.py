"""Offline dataset and corpus builders with provenance (sources from package registries)."""

from toolkit._lazy import attach

__getattr__, __dir__, __all__ = attach(
    __name__,
    submodules=["audio", "corpus", "recall", "scenes", "segments"],
)
