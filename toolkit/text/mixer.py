"""Token n-gram counts of the file so far, mixed into the model's next-token distribution."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

__all__ = ["NgramMixer", "TABLE_BITS"]

#: integer tables sum to 2**TABLE_BITS (the entropy core's default total)
TABLE_BITS = 24
#: fixed-point bits of the integer mixing weights
_W = 30

logger = logging.getLogger(__name__)


class NgramMixer:
    """Token n-gram statistics of the file so far, mixed into the model's prediction.

    A small pretrained model knows language in general but not this file;
    counts of what followed each recent context in the file so far supply the
    file's own habits (its vocabulary, its repeated phrases). Starting from the
    model's distribution, each order ``k`` (ascending) interpolates
    ``p <- (1 - l) p + l * counts / n`` with ``l = n / (n + gamma * u)``
    (Witten-Bell weights, softened by ``gamma``), where ``n`` and ``u`` are the
    context's total and distinct continuations. All streams of the file share
    one table, read before and updated after each lockstep step, so encoder
    and decoder see identical counts; the table stops taking new contexts at
    ``contexts`` entries, which bounds memory whatever the file size.

    :meth:`mix` mixes float probabilities (the float engines); :meth:`mix_int`
    mixes the integer engine's probabilities in integer arithmetic, with the
    same weights in Q30 (``gamma`` in Q8), and returns the integer table.
    """

    #: order-1 counts live in a dense [V, V] table when the alphabet is this small: the
    #: previous token alone has hundreds of continuations, too many for per-entry Python work.
    DENSE_LIMIT = 8192

    def __init__(self, orders: list[int], gamma: float, max_contexts: int, alphabet: int = 0):
        self.gamma, self.max_contexts = gamma, max_contexts
        self.dense1 = 1 in orders and 0 < alphabet <= self.DENSE_LIMIT
        self.orders = [k for k in orders if not (k == 1 and self.dense1)]
        self.table: dict[tuple, list] = {}
        self._found: list[list[tuple[tuple, list | None]]] = []
        self.gamma_q = max(1, round(gamma * 256))
        if self.dense1:
            self.c1 = np.zeros((alphabet, alphabet), dtype=np.int32)
            self.n1 = np.zeros(alphabet, dtype=np.int64)
            self.u1 = np.zeros(alphabet, dtype=np.int64)

    def _walk(self, history: list[list[int]], active: list[bool], one: Any, weigh: Any) -> tuple[list, tuple]:
        """Each active stream's contexts, highest order first, with their weights.

        ``weigh(w, n, u)`` gives a context's weight per count and what weight is left for the lower
        orders and the model. Returns the model's share per stream and, per context found, its row,
        weight per count and number of continuations, with the continuations and their counts in flat
        lists (filled at C speed: no per-count Python work). The contexts looked up are kept for
        :meth:`update`, which counts into them after coding.
        """
        scale = [one] * len(history)
        rows: list[int] = []
        coefs: list = []
        sizes: list[int] = []
        cols: list[int] = []
        cnts: list[int] = []
        table = self.table
        self._found = found = []
        for j, h in enumerate(history):
            here: list[tuple[tuple, list | None]] = []
            found.append(here)
            if not active[j]:
                continue
            w = one
            for k in reversed(self.orders):  # highest order first: it keeps the most weight
                if len(h) < k:
                    continue
                key = (k, *h[-k:])
                entry = table.get(key)
                here.append((key, entry))
                if entry is None:
                    continue
                n, counts = entry
                coef, w = weigh(w, n, len(counts))
                rows.append(j)
                coefs.append(coef)
                sizes.append(len(counts))
                cols.extend(counts)
                cnts.extend(counts.values())
            scale[j] = w
        return scale, (rows, coefs, sizes, cols, cnts)

    def mix(self, probs: Any, history: list[list[int]], active: list[bool]) -> Any:
        # The chain p <- (1 - l_k) p + l_k c_k over ascending k unrolls to
        # a * p_model + sum_k w_k c_k with a = prod(1 - l_k) and w_k = l_k prod_{k' > k}(1 - l_k'),
        # so all orders land in one sparse scatter instead of one dense pass each.
        import torch

        s, v = probs.shape
        gamma = self.gamma

        def weigh(w: float, n: int, u: int) -> tuple[float, float]:
            lam = n / (n + gamma * u)
            return w * lam / n, w * (1.0 - lam)

        scale, (rows, coefs, sizes, cols, cnts) = self._walk(history, active, 1.0, weigh)
        w = torch.tensor(scale, dtype=torch.float32)
        dense = None
        if self.dense1:
            # order 1 is the lowest order: it takes its share of what the higher orders left (w)
            ok = [active[j] and len(history[j]) >= 1 for j in range(s)]
            prev = torch.tensor([history[j][-1] if ok[j] else 0 for j in range(s)], dtype=torch.long)
            n = torch.from_numpy(self.n1)[prev].to(torch.float32)
            u = torch.from_numpy(self.u1)[prev].to(torch.float32)
            use = torch.tensor(ok) & (n > 0)
            lam = torch.where(use, n / (n + gamma * u).clamp_min(1e-30), torch.zeros_like(n))
            dense = (w * lam / n.clamp_min(1.0))[:, None] * torch.from_numpy(self.c1)[prev].to(torch.float32)
            w = w * (1 - lam)
        out = probs * w[:, None]
        if rows:
            reps = np.array(sizes, dtype=np.int64)
            # coef * count in float64, then rounded to float32: what a float32 tensor of the products holds
            vals = (np.repeat(np.array(coefs, dtype=np.float64), reps) *
                    np.array(cnts, dtype=np.float64)).astype(np.float32)
            r = torch.from_numpy(np.repeat(np.array(rows, dtype=np.int64), reps))
            c = torch.from_numpy(np.array(cols, dtype=np.int64))
            out.index_put_((r, c), torch.from_numpy(vals), accumulate=True)
        return out if dense is None else out + dense

    def mix_int(self, probs: np.ndarray, history: list[list[int]], active: list[bool]) -> np.ndarray:
        """The integer table (int64 ``[S, V]``, rows summing to ``2**TABLE_BITS``, every entry >= 1).

        ``probs``: the model's probabilities in Q30, rows summing to about 2**30.
        The weights follow :meth:`mix` (Witten-Bell, highest order first), with
        ``lam = n / (n + gamma * u)`` in Q30 from one integer division; each
        division by a count is a multiplication by a Q24 reciprocal.
        """
        s, v = probs.shape
        one, gq = 1 << _W, self.gamma_q

        def weigh(w: int, n: int, u: int) -> tuple[int, int]:
            lam = (n << (_W + 8)) // (n * 256 + gq * u)
            return ((w * lam) >> _W << 24) // n, (w * (one - lam)) >> _W  # the weight per count in Q54

        scale, (rows, coefs, sizes, cols, cnts) = self._walk(history, active, one, weigh)
        w = np.array(scale, dtype=np.int64)
        out = None
        if self.dense1:
            ok = np.array([active[j] and len(history[j]) >= 1 for j in range(s)])
            prev = np.array([history[j][-1] if ok[j] else 0 for j in range(s)], dtype=np.int64)
            n, u = self.n1[prev], self.u1[prev]
            use = ok & (n > 0)
            lam = np.where(use, (n << (_W + 8)) // np.maximum(n * 256 + gq * u, 1), 0)
            per = (((w * lam) >> _W) << 24) // np.maximum(n, 1)
            out = (self.c1[prev] * per[:, None]) >> 24  # counts <= n keep the product below 2**54
            w = (w * (one - lam)) >> _W
        # the model's share: probs (rows >= 2**30 at their peak) times w / sum, through a Q32 reciprocal
        model = (probs * ((w << 32) // np.maximum(probs.sum(axis=-1), 1))[:, None]) >> 32
        out = model if out is None else out + model
        if rows:
            reps = np.array(sizes, dtype=np.int64)
            vals = (np.repeat(np.array(coefs, dtype=np.int64), reps) * np.array(cnts, dtype=np.int64)) >> 24
            np.add.at(out, (np.repeat(np.array(rows, dtype=np.int64), reps), np.array(cols, dtype=np.int64)), vals)
        return mass_to_table(out)

    def update(self, history: list[list[int]], tokens: list[int], active: list[bool]) -> None:
        if self.dense1:
            # a few dozen scalar updates: numpy views of the tables beat torch's per-op overhead
            c1, n1, u1 = self.c1, self.n1, self.u1
            for j, tok in enumerate(tokens):
                if active[j] and history[j]:
                    prev = history[j][-1]
                    if c1[prev, tok] == 0:
                        u1[prev] += 1
                    c1[prev, tok] += 1
                    n1[prev] += 1
        table, room = self.table, len(self.table) < self.max_contexts
        found = self._found
        self._found = []
        for j, tok in enumerate(tokens):
            if not active[j]:
                continue
            h = history[j]
            for key, entry in found[j]:
                if entry is None:
                    # another stream may have added this context in this very step
                    entry = table.get(key)
                    if entry is None:
                        if not room:
                            continue
                        entry = table[key] = [0, {}]
                entry[0] += 1
                counts = entry[1]
                counts[tok] = counts.get(tok, 0) + 1
            h.append(tok)
            if len(h) > 64:
                del h[:-32]
        if room and len(table) >= self.max_contexts:
            logger.info("n-gram table full at %d contexts", len(table))


def mass_to_table(mass: np.ndarray) -> np.ndarray:
    """Non-negative integer masses ``[S, V]`` (rows below 2**32) as frequencies summing to ``2**TABLE_BITS``.

    As :func:`toolkit.entropy.probs_to_freqs` does with floats: each symbol
    gets ``1 + floor(mass * (T - V) / sum)``, the remainder goes to the
    largest; the division is a Q32 reciprocal per row. A row of zeros is uniform.
    """
    s, v = mass.shape
    spare = (1 << TABLE_BITS) - v
    total = mass.sum(axis=-1)
    zero = total == 0
    if zero.any():
        mass = np.where(zero[:, None], 1, mass)
        total = np.where(zero, v, total)
    f = ((mass * ((spare << 32) // total)[:, None]) >> 32) + 1
    top = f.argmax(axis=-1)
    f[np.arange(s), top] += (1 << TABLE_BITS) - f.sum(axis=-1)
    return f
