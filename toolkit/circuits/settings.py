"""The record coder's settings, kept free of torch so a codec's config can check them cheaply."""

__all__ = ["METHODS", "MAX_BATCH"]

#: ways to compute each variable's conditionals (see :mod:`toolkit.circuits.coder`); the
#: index of a method is what a record stream stores.
METHODS = ("partial", "naive", "context")
#: bounds the per-batch state a (possibly damaged) stream can make the decoder allocate.
MAX_BATCH = 1 << 16
