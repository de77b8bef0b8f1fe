"""Layered tensor form of a tree-structured circuit (an HCLT), in log space.

Units of the circuit for a tree over D variables with M latent states:

- input units: ``leaf[v, m]`` = P(X_v = x_v | Z_v = m), one categorical per
  (variable, latent state); a missing variable's units are 1 (log 0), which
  marginalizes it out because each categorical is normalized;
- product units: ``prod[v, m] = leaf[v, m] * prod_{c child of v} sum[c, m]``;
- sum units on each tree edge: ``sum[c, m] = sum_m' W_c[m, m'] prod[c, m']``
  (mixing over the child's latent state given the parent's);
- the root sum: ``p(x) = sum_m w[m] prod[root, m]``.

Each product unit multiplies units over disjoint variable sets and each sum
unit mixes units over the same set, so the circuit is decomposable and
smooth: marginals with any variables missing come out of one upward pass.

Nodes of equal *height* (distance to their lowest leaf) do not depend on each
other, so one layer handles all of them at once: a single
:func:`~toolkit.kernels.sum_layer.sum_layer` call for their edge sums and one
``index_add`` into their parents' products. The batch dimension runs over
records.
"""

from __future__ import annotations

import dataclasses

import torch

from toolkit.circuits.structure import TreeStructure
from toolkit.kernels.sum_layer import sum_layer

__all__ = ["LevelPlan", "compile_levels", "input_layer", "upward_pass"]


@dataclasses.dataclass
class LevelPlan:
    """Index tensors for the layer-by-layer evaluation of a :class:`TreeStructure`."""

    #: ``nodes[h]``: the non-root nodes of height ``h``, in increasing order.
    nodes: list[torch.Tensor]
    #: ``parents[h]``: the parent of each of ``nodes[h]``.
    parents: list[torch.Tensor]
    #: ``by_depth[d]``: nodes at depth ``d`` (top-down order, for sampling).
    by_depth: list[torch.Tensor]
    root: int


def compile_levels(structure: TreeStructure) -> LevelPlan:
    """Group the non-root nodes by height (bottom-up) and all nodes by depth (top-down)."""
    height, depth = structure.height, structure.depth
    top = height[structure.root]
    nodes, parents = [], []
    for h in range(top):
        vs = [v for v in range(structure.num_vars) if height[v] == h and v != structure.root]
        nodes.append(torch.tensor(vs, dtype=torch.long))
        parents.append(torch.tensor([structure.parent[v] for v in vs], dtype=torch.long))
    by_depth = [
        torch.tensor([v for v in range(structure.num_vars) if depth[v] == d], dtype=torch.long)
        for d in range(max(depth) + 1)
    ]
    return LevelPlan(nodes, parents, by_depth, structure.root)


def input_layer(
    leaf_logp: torch.Tensor, x: torch.Tensor, missing: torch.Tensor | None = None
) -> torch.Tensor:
    """Log-values ``[B, D, M]`` of the input units for codes ``x[B, D]``.

    ``leaf_logp[D, M, K]`` holds log P(X_v = k | Z_v = m). Missing entries
    give exactly 0 (log of a normalized categorical summed over all k), not a
    computed log-sum-exp, so marginals do not pick up rounding noise.
    """
    d = leaf_logp.shape[0]
    k = leaf_logp.shape[2]
    idx = x.clamp(0, k - 1)
    vals = leaf_logp.transpose(1, 2)[torch.arange(d, device=x.device)[None, :], idx]  # [B, D, M]
    if missing is not None:
        vals = torch.where(missing[..., None], torch.zeros((), dtype=vals.dtype), vals)
    return vals


def upward_pass(
    plan: LevelPlan,
    leafval: torch.Tensor,
    edge_logw: torch.Tensor,
    root_logw: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Evaluate the circuit bottom-up.

    Returns ``(ll[B], prod[B, D, M], sums[B, D, M])``: the root's log-value
    and every product and edge-sum unit (the root's row of ``sums`` is 0).
    Differentiable, which is how EM gets its expected flows.
    """
    b, d, m = leafval.shape
    # prod accumulates children's sums into their parents level by level;
    # once a level is reached, all of its nodes' children have been added.
    prod = leafval.clone()
    sums = torch.zeros_like(leafval)
    dev = leafval.device
    for nodes, parents in zip(plan.nodes, plan.parents, strict=True):
        # index_add/index_copy want indices on the data's device.
        nodes, parents = nodes.to(dev), parents.to(dev)
        s = sum_layer(prod[:, nodes], edge_logw[nodes])  # [B, n_h, M]
        sums = sums.index_copy(1, nodes, s)
        prod = prod.index_add(1, parents, s)
    root_val = prod[:, plan.root : plan.root + 1]  # [B, 1, M]
    ll = sum_layer(root_val, root_logw.view(1, 1, m)).view(b)
    return ll, prod, sums
