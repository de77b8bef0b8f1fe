"""Circuit structures: rooted trees over the variables, and HCLT learning.

A hidden Chow-Liu tree (HCLT, Liu & Van den Broeck 2021) is learned in two
steps: a Chow-Liu tree over the observed variables (the maximum spanning tree
of their pairwise mutual information), then every variable ``X_v`` gets a
latent ``Z_v`` with ``num_latents`` states that takes its place in the tree,
with ``X_v`` hanging off ``Z_v``. Compiled to a circuit
(:mod:`toolkit.circuits.layers`), each tree node becomes ``num_latents``
product units and each tree edge ``num_latents`` sum units, so the circuit is
smooth and decomposable by construction.

:class:`TreeStructure` is only the tree (a parent array) plus the sizes; it
serializes to JSON and is what a saved circuit stores next to its weights.
"""

from __future__ import annotations

import dataclasses
import json
from functools import cached_property

import numpy as np
import torch
from scipy.sparse.csgraph import minimum_spanning_tree, shortest_path

from toolkit.errors import ConfigError, UnsupportedInputError

__all__ = [
    "TreeStructure",
    "pairwise_mutual_information",
    "chow_liu_tree",
    "learn_hclt",
    "random_tree",
]


@dataclasses.dataclass(frozen=True)
class TreeStructure:
    """A rooted tree over ``len(parent)`` categorical variables.

    ``parent[v]`` is the parent of variable ``v`` (``-1`` for the single
    root). Every variable has ``num_cats`` categories and every latent
    ``num_latents`` states.
    """

    parent: tuple[int, ...]
    num_cats: int
    num_latents: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "parent", tuple(int(p) for p in self.parent))
        d = len(self.parent)
        if d < 1:
            raise ConfigError("a structure needs at least one variable")
        if self.num_cats < 2 or self.num_latents < 1:
            raise ConfigError("num_cats must be >= 2 and num_latents >= 1")
        roots = [v for v, p in enumerate(self.parent) if p == -1]
        if len(roots) != 1:
            raise ConfigError(f"a tree has exactly one root, got {len(roots)}")
        if any(not -1 <= p < d or p == v for v, p in enumerate(self.parent)):
            raise ConfigError("parent indices out of range")
        if len(self.order) != d:
            raise ConfigError("parent array has a cycle")

    @property
    def num_vars(self) -> int:
        return len(self.parent)

    @cached_property
    def root(self) -> int:
        return self.parent.index(-1)

    @cached_property
    def children(self) -> tuple[tuple[int, ...], ...]:
        kids: list[list[int]] = [[] for _ in self.parent]
        for v, p in enumerate(self.parent):
            if p >= 0:
                kids[p].append(v)
        return tuple(tuple(k) for k in kids)

    @cached_property
    def order(self) -> tuple[int, ...]:
        """Depth-first pre-order from the root: the coder's variable order."""
        out: list[int] = []
        stack = [self.root]
        seen = set()
        while stack:
            v = stack.pop()
            if v in seen:  # only possible with a malformed parent array
                break
            seen.add(v)
            out.append(v)
            stack.extend(reversed(self.children[v]))
        return tuple(out)

    @cached_property
    def depth(self) -> tuple[int, ...]:
        dep = [0] * self.num_vars
        for v in self.order:
            if self.parent[v] >= 0:
                dep[v] = dep[self.parent[v]] + 1
        return tuple(dep)

    @cached_property
    def height(self) -> tuple[int, ...]:
        """Longest distance down to a leaf: nodes of equal height are evaluated together."""
        h = [0] * self.num_vars
        for v in reversed(self.order):
            p = self.parent[v]
            if p >= 0:
                h[p] = max(h[p], h[v] + 1)
        return tuple(h)

    def to_json(self) -> str:
        return json.dumps(
            {"kind": "tree", "parent": list(self.parent), "num_cats": self.num_cats,
             "num_latents": self.num_latents}
        )

    @classmethod
    def from_json(cls, text: str) -> TreeStructure:
        try:
            obj = json.loads(text)
            if obj.get("kind") != "tree":
                raise ConfigError(f"unknown structure kind {obj.get('kind')!r}")
            return cls(tuple(obj["parent"]), int(obj["num_cats"]), int(obj["num_latents"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"bad structure JSON: {exc}") from exc


def _as_codes(data: np.ndarray | torch.Tensor, num_cats: int) -> np.ndarray:
    x = data.cpu().numpy() if isinstance(data, torch.Tensor) else np.asarray(data)
    if x.ndim != 2:
        raise UnsupportedInputError(f"data must be [records, variables], got shape {x.shape}")
    if x.size and (x.min() < 0 or x.max() >= num_cats):
        raise UnsupportedInputError(f"data values must lie in 0..{num_cats - 1}")
    return x.astype(np.int64)


def pairwise_mutual_information(
    data: np.ndarray | torch.Tensor,
    num_cats: int,
    alpha: float = 0.01,
    max_block_bytes: int = 1 << 27,
) -> np.ndarray:
    """Mutual information (nats) between every pair of columns of ``data[N, D]``.

    Joint counts get a pseudocount ``alpha`` per cell so that unseen pairs do
    not give log(0). Counts are accumulated over blocks of variables and of
    records so that no intermediate exceeds about ``max_block_bytes``.
    """
    x = torch.from_numpy(_as_codes(data, num_cats))
    n, d = x.shape
    k = num_cats
    counts = torch.zeros((d, k), dtype=torch.float64)
    counts.scatter_add_(1, x.t(), torch.ones((d, n), dtype=torch.float64))
    marg = (counts + alpha * k) / (n + alpha * k * k)
    mi = np.zeros((d, d))
    var_block = max(1, max_block_bytes // (4 * d * k * k))
    rec_block = max(1, max_block_bytes // (4 * d * k))
    for lo in range(0, d, var_block):
        hi = min(d, lo + var_block)
        # float32 counts are exact below 2**24 records per cell.
        joint = torch.zeros((hi - lo, d, k, k), dtype=torch.float32)
        for r in range(0, n, rec_block):
            oh = torch.nn.functional.one_hot(x[r : r + rec_block], k).to(torch.float32)
            joint += torch.einsum("nik,njl->ijkl", oh[:, lo:hi], oh)
        pj = (joint.double() + alpha) / (n + alpha * k * k)
        indep = marg[lo:hi, None, :, None] * marg[None, :, None, :]
        mi[lo:hi] = (pj * (pj.log() - indep.log())).sum(dim=(-1, -2)).numpy()
    np.fill_diagonal(mi, 0.0)
    return mi


def chow_liu_tree(mi: np.ndarray, root: int | str = "centroid") -> tuple[int, ...]:
    """Maximum spanning tree of ``mi[D, D]`` as a parent array.

    ``root="centroid"`` roots the tree at the variable with the smallest total
    distance to all others: the coder re-evaluates a variable's ancestors for
    each variable, so the sum of depths is its cost.
    """
    d = mi.shape[0]
    if d == 1:
        return (-1,)
    # scipy finds a *minimum* spanning tree and treats 0 as "no edge", so
    # flip the weights into strictly positive costs; every spanning tree has
    # D-1 edges, so minimizing (c - mi) maximizes mi.
    cost = (mi.max() + 1.0) - mi
    np.fill_diagonal(cost, 0.0)
    tree = minimum_spanning_tree(cost)
    tree = ((tree + tree.T) > 0).astype(np.float64)
    dist = shortest_path(tree, unweighted=True, directed=False)
    if root == "centroid":
        r = int(np.argmin(dist.sum(1)))
    elif isinstance(root, int) and 0 <= root < d:
        r = root
    else:
        raise ConfigError(f"root must be 'centroid' or a variable index, got {root!r}")
    if not np.isfinite(dist[r]).all():
        raise ConfigError("mutual-information graph is not connected")
    # Parent of v is its neighbour one step closer to the root.
    adj = tree.tocsr()
    parent = [-1] * d
    for v in range(d):
        if v == r:
            continue
        nbrs = adj.indices[adj.indptr[v] : adj.indptr[v + 1]]
        parent[v] = int(next(u for u in nbrs if dist[r, u] == dist[r, v] - 1))
    return tuple(parent)


def learn_hclt(
    data: np.ndarray | torch.Tensor,
    num_cats: int,
    num_latents: int,
    mi_bins: int | None = None,
    alpha: float = 0.01,
    root: int | str = "centroid",
) -> TreeStructure:
    """Learn an HCLT structure from ``data[N, D]`` (integer codes in ``0..num_cats-1``).

    ``mi_bins`` coarsens the categories before estimating mutual information
    (as pyjuice's ``num_bins`` does): with many categories the ``K x K``
    joint tables are large and noisy. Default: ``min(num_cats, 32)``.
    """
    x = _as_codes(data, num_cats)
    bins = min(num_cats, 32) if mi_bins is None else int(mi_bins)
    if not 2 <= bins <= num_cats:
        raise ConfigError(f"mi_bins must be in 2..{num_cats}")
    if bins < num_cats:
        x = x * bins // num_cats
    mi = pairwise_mutual_information(x, bins, alpha=alpha)
    return TreeStructure(chow_liu_tree(mi, root=root), num_cats, num_latents)


def random_tree(num_vars: int, num_cats: int, num_latents: int, seed: int = 0) -> TreeStructure:
    """A random recursive tree (each variable's parent is an earlier one); for tests."""
    rng = np.random.default_rng(seed)
    parent = [-1] + [int(rng.integers(0, v)) for v in range(1, num_vars)]
    return TreeStructure(tuple(parent), num_cats, num_latents)
