"""A compiled tree-structured probabilistic circuit: parameters, queries, sampling, I/O.

:class:`Circuit` holds three parameter tensors, all normalized log-probabilities:

- ``leaf_logp[D, M, K]``: log P(X_v = k | Z_v = m);
- ``edge_logw[D, M, M]``: log P(Z_c = m' | Z_parent(c) = m), indexed
  ``[c, m, m']`` (the root's row is unused and kept uniform);
- ``root_logw[M]``: log P(Z_root = m).

Queries take integer codes ``x[B, D]`` and an optional boolean ``missing[B, D]``
(True = marginalize that variable). Saving writes a JSON structure file and a
safetensors weights file, never a pickle.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from toolkit.circuits.layers import compile_levels, input_layer, upward_pass
from toolkit.circuits.structure import TreeStructure
from toolkit.errors import ConfigError, FormatError, UnsupportedInputError

__all__ = ["Circuit"]

_FORMAT = "toolkit.circuit"
_FORMAT_VERSION = 1


def _random_logp(shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    # Dirichlet(1)-like rows from exponential draws: strong enough to break
    # the symmetry between latent states, which EM cannot do on its own.
    e = -torch.log(torch.rand(shape, generator=gen, dtype=torch.float64).clamp_min(1e-12))
    e = e + 0.1
    return torch.log(e / e.sum(-1, keepdim=True)).to(torch.float32)


class Circuit(torch.nn.Module):
    """Smooth, decomposable circuit over categorical variables on a latent tree (HCLT)."""

    def __init__(
        self,
        structure: TreeStructure,
        leaf_logp: torch.Tensor | None = None,
        edge_logw: torch.Tensor | None = None,
        root_logw: torch.Tensor | None = None,
        seed: int = 0,
    ):
        super().__init__()
        self.structure = structure
        self.plan = compile_levels(structure)
        d, k, m = structure.num_vars, structure.num_cats, structure.num_latents
        gen = torch.Generator().manual_seed(seed)
        if leaf_logp is None:
            leaf_logp = _random_logp((d, m, k), gen)
        if edge_logw is None:
            edge_logw = _random_logp((d, m, m), gen)
            edge_logw[structure.root] = -math.log(m)
        if root_logw is None:
            root_logw = _random_logp((m,), gen)
        for name, t, shape in (
            ("leaf_logp", leaf_logp, (d, m, k)),
            ("edge_logw", edge_logw, (d, m, m)),
            ("root_logw", root_logw, (m,)),
        ):
            if tuple(t.shape) != shape:
                raise ConfigError(f"{name} has shape {tuple(t.shape)}, expected {shape}")
            self.register_buffer(name, t.detach().to(torch.float32).contiguous())

    # --- sizes ----------------------------------------------------------
    @property
    def num_vars(self) -> int:
        return self.structure.num_vars

    @property
    def num_cats(self) -> int:
        return self.structure.num_cats

    @property
    def num_latents(self) -> int:
        return self.structure.num_latents

    def num_parameters(self) -> int:
        """Free parameters (each normalized row counts one less than its length)."""
        d, k, m = self.num_vars, self.num_cats, self.num_latents
        return d * m * (k - 1) + (d - 1) * m * (m - 1) + (m - 1)

    def extra_repr(self) -> str:
        s = self.structure
        return f"vars={s.num_vars}, cats={s.num_cats}, latents={s.num_latents}"

    # --- input handling -------------------------------------------------
    def _codes(self, x: torch.Tensor | np.ndarray) -> torch.Tensor:
        t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
        if t.ndim != 2 or t.shape[1] != self.num_vars:
            raise UnsupportedInputError(
                f"expected codes of shape [records, {self.num_vars}], got {tuple(t.shape)}"
            )
        t = t.to(device=self.leaf_logp.device, dtype=torch.long)
        return t

    def _missing(self, x: torch.Tensor, missing: torch.Tensor | np.ndarray | None) -> torch.Tensor:
        if missing is None:
            miss = torch.zeros_like(x, dtype=torch.bool)
        else:
            miss = torch.as_tensor(missing, dtype=torch.bool, device=x.device)
            if miss.shape != x.shape:
                raise UnsupportedInputError("missing mask must have the shape of x")
        bad = (~miss) & ((x < 0) | (x >= self.num_cats))
        if bool(bad.any()):
            raise UnsupportedInputError(f"observed codes must lie in 0..{self.num_cats - 1}")
        return miss

    # --- queries --------------------------------------------------------
    def leaf_values(
        self, x: torch.Tensor | np.ndarray, missing: torch.Tensor | np.ndarray | None = None
    ) -> torch.Tensor:
        """Input-unit log-values ``[B, D, M]`` for evidence ``x`` / ``missing``."""
        xt = self._codes(x)
        return input_layer(self.leaf_logp, xt, self._missing(xt, missing))

    def log_likelihood(
        self, x: torch.Tensor | np.ndarray, missing: torch.Tensor | np.ndarray | None = None
    ) -> torch.Tensor:
        """Natural-log marginal ``log p(x_observed)`` per record, shape ``[B]``.

        With ``missing`` given, the masked variables are summed out exactly
        (one upward pass, thanks to smoothness and decomposability).
        """
        ll, _, _ = upward_pass(
            self.plan, self.leaf_values(x, missing), self.edge_logw, self.root_logw
        )
        return ll

    log_marginal = log_likelihood

    def conditional(
        self,
        x: torch.Tensor | np.ndarray,
        missing: torch.Tensor | np.ndarray | None = None,
        target_vars: list[int] | None = None,
    ) -> torch.Tensor:
        """P(X_t = k | observed variables) for each target ``t``: ``[B, T, K]``.

        Targets are treated as missing whatever ``x`` holds. One upward and
        one backward pass: the gradient of ``log p(e)`` with respect to a
        missing variable's input units is the posterior of its latent,
        P(Z_t = m | e), and X_t depends on the rest only through Z_t.
        """
        xt = self._codes(x)
        miss = self._missing(xt, missing).clone()
        targets = list(range(self.num_vars)) if target_vars is None else list(target_vars)
        tidx = torch.tensor(targets, dtype=torch.long, device=xt.device)
        miss[:, tidx] = True
        with torch.enable_grad():
            lv = input_layer(self.leaf_logp, xt, miss).detach().requires_grad_(True)
            ll, _, _ = upward_pass(self.plan, lv, self.edge_logw, self.root_logw)
            (post,) = torch.autograd.grad(ll.sum(), lv)
        post = post[:, tidx]  # [B, T, M]
        probs = torch.einsum("btm,tmk->btk", post, self.leaf_logp[tidx].exp())
        return probs / probs.sum(-1, keepdim=True)

    @torch.no_grad()
    def sample(
        self,
        num: int,
        generator: torch.Generator | None = None,
        x: torch.Tensor | np.ndarray | None = None,
        missing: torch.Tensor | np.ndarray | None = None,
    ) -> torch.Tensor:
        """Draw ``num`` records ``[num, D]``; with evidence, from p(missing | observed).

        Top-down ancestral sampling. Under evidence, each latent's choice is
        weighted by its product unit's upward value, which is p(evidence
        below | latent state), so the draws are exact conditional samples.
        ``x``/``missing``, when given, have ``num`` rows.
        """
        d = self.num_vars
        dev = self.leaf_logp.device
        if x is None:
            xt = torch.zeros((num, d), dtype=torch.long, device=dev)
            miss = torch.ones((num, d), dtype=torch.bool, device=dev)
        else:
            xt = self._codes(x)
            miss = self._missing(xt, missing)
            if xt.shape[0] != num:
                raise ConfigError("evidence must have one row per sample")
        lv = input_layer(self.leaf_logp, xt, miss)
        _, prod, _ = upward_pass(self.plan, lv, self.edge_logw, self.root_logw)

        def draw(logits: torch.Tensor) -> torch.Tensor:
            p = torch.softmax(logits.reshape(-1, logits.shape[-1]).double(), -1)
            return torch.multinomial(p, 1, generator=generator).view(logits.shape[:-1])

        z = torch.zeros((num, d), dtype=torch.long, device=dev)
        root = self.plan.root
        z[:, root] = draw(self.root_logw[None] + prod[:, root])
        for nodes in self.plan.by_depth[1:]:
            par = torch.tensor([self.structure.parent[v] for v in nodes.tolist()], device=dev)
            nodes = nodes.to(dev)
            w = self.edge_logw[nodes[None, :], z[:, par]]  # [num, n, M]: rows W_c[z_parent, :]
            z[:, nodes] = draw(w + prod[:, nodes])
        leaf = self.leaf_logp[torch.arange(d, device=dev)[None, :], z]  # [num, D, K]
        out = draw(leaf)
        return torch.where(miss, out, xt)

    # --- I/O --------------------------------------------------------------
    def save(self, directory: str | Path) -> None:
        """Write ``circuit.json`` (structure) and ``circuit.safetensors`` (weights)."""
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        meta = {"format": _FORMAT, "version": _FORMAT_VERSION,
                "structure": json.loads(self.structure.to_json())}
        (path / "circuit.json").write_text(json.dumps(meta, indent=1))
        tensors = {n: getattr(self, n).detach().cpu().contiguous()
                   for n in ("leaf_logp", "edge_logw", "root_logw")}
        save_file(tensors, str(path / "circuit.safetensors"), metadata={"format": _FORMAT})

    @classmethod
    def load(cls, directory: str | Path) -> Circuit:
        """Load a circuit written by :meth:`save`."""
        path = Path(directory)
        try:
            meta = json.loads((path / "circuit.json").read_text())
        except (OSError, ValueError) as exc:
            raise FormatError(f"cannot read circuit structure in {path}: {exc}") from exc
        if meta.get("format") != _FORMAT or meta.get("version") != _FORMAT_VERSION:
            raise FormatError(f"{path} is not a version-{_FORMAT_VERSION} circuit")
        try:
            structure = TreeStructure.from_json(json.dumps(meta["structure"]))
        except (ConfigError, KeyError) as exc:
            raise FormatError(f"bad circuit structure in {path}: {exc}") from exc
        try:
            t = load_file(str(path / "circuit.safetensors"))
        except Exception as exc:  # safetensors raises its own error types
            raise FormatError(f"cannot read circuit weights in {path}: {exc}") from exc
        missing = {"leaf_logp", "edge_logw", "root_logw"} - set(t)
        if missing:
            raise FormatError(f"circuit weights lack {sorted(missing)}")
        try:
            return cls(structure, t["leaf_logp"], t["edge_logw"], t["root_logw"])
        except ConfigError as exc:
            raise FormatError(f"circuit weights in {path} do not fit its structure: {exc}") from exc
