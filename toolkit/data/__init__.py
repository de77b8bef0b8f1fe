"""Offline dataset and corpus builders with provenance (sources from package registries)."""

__all__: list[str] = []
