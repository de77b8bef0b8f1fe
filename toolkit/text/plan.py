"""The lockstep coder's stream plan: how a batch's segments are cut into streams, from token counts alone."""

from __future__ import annotations

import math

__all__ = ["plan_pieces", "cuts"]


def plan_pieces(lengths: list[int], streams: int, piece: int, slack: float = 1.1) -> list[int]:
    """How many streams (pieces) each segment's tokens are cut into, from the token counts alone.

    The lockstep loop runs as many steps as its longest stream, so one
    segment with twice the tokens of the others (text the tokenizer splits
    finely) would leave most streams idle for half the run. Segments longer
    than ``slack`` times the mean are cut into near-equal pieces of at most
    that length, but never shorter than ``piece`` tokens (a piece starts
    with an empty window; 0 turns splitting off), and never into more than
    ``streams`` streams in all (the piece length grows until they fit).
    A batch of fewer than ``streams / 2`` segments is cut further, into
    pieces of ``2 * total / streams`` tokens, so that small files run a
    batch wide enough to be fast. The decoder knows every count before it
    starts (payloads carry theirs; declined segments are re-tokenized), so
    it derives the same plan.
    """
    if not lengths:
        return []
    if piece <= 0 or len(lengths) >= streams:
        return [1] * len(lengths)

    def ks(t: int) -> list[int]:
        return [max(1, -(-n // t)) for n in lengths]

    if 2 * len(lengths) >= streams:
        t = max(piece, math.ceil(slack * sum(lengths) / len(lengths)), 1)
    else:
        # a small batch (a small file, or a file's last batch): cut every segment so that
        # the batch fills half the streams, where pieces of ``piece`` tokens allow
        t = max(piece, math.ceil(2 * sum(lengths) / streams), 1)
    if sum(ks(t)) > streams:
        lo, hi = t, max(lengths)  # ks(max) is one piece each, which fits
        while lo < hi:
            mid = (lo + hi) // 2
            if sum(ks(mid)) <= streams:
                hi = mid
            else:
                lo = mid + 1
        t = lo
    return ks(t)


def cuts(n: int, k: int) -> list[tuple[int, int]]:
    """``k`` near-equal consecutive ranges covering ``0..n``."""
    edges = [n * p // k for p in range(k + 1)]
    return list(zip(edges[:-1], edges[1:], strict=True))
