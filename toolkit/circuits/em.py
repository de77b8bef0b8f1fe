"""Mini-batch EM for circuits, with expected flows from autograd.

For a normalized log-parameter ``log theta`` of a sum unit (or an input
distribution), ``d/d(log theta) sum_n log p(x_n)`` is the expected number of
times that edge is used (its *flow*) in the batch. So one backward pass
through :func:`~toolkit.circuits.layers.upward_pass` gives every sufficient
statistic; the M-step normalizes flows plus a pseudocount, and mini-batch EM
moves part of the way there: ``theta <- (1 - s) theta + s theta_hat``.
With ``step_size=1`` and one batch holding all the data this is classic EM,
whose log-likelihood never decreases.
"""

from __future__ import annotations

import dataclasses
import logging
import math

import numpy as np
import torch

from toolkit.circuits.circuit import Circuit
from toolkit.circuits.layers import input_layer, upward_pass
from toolkit.config import Config, check
from toolkit.errors import ConfigError
from toolkit.progress import Progress, reporter

__all__ = ["EMConfig", "expected_flows", "em_update", "fit_em", "mean_log_likelihood"]

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class EMConfig(Config):
    """Settings of :func:`fit_em` (and of the EM in :func:`~toolkit.circuits.fit_hclt`)."""

    epochs: int = 20
    batch_size: int = 512
    #: mixing weight of the new estimate; annealed linearly to ``step_size_end`` (None: constant).
    step_size: float = 0.5
    step_size_end: float | None = 0.05
    #: added to every flow, spread evenly over a unit's children.
    pseudocount: float = 0.1
    #: the batch order's seed (and the initial parameters' in :func:`~toolkit.circuits.fit_hclt`)
    seed: int = 0

    def __post_init__(self):
        check(self.epochs >= 0, f"epochs must be an integer >= 0, got {self.epochs!r}")
        check(self.batch_size >= 1, f"batch_size must be an integer >= 1, got {self.batch_size!r}")
        for name in ("step_size", "step_size_end"):
            value = getattr(self, name)
            check((name == "step_size_end" and value is None) or 0 < value <= 1,
                  f"{name} must be in (0, 1], got {value!r}")
        check(math.isfinite(self.pseudocount) and self.pseudocount >= 0,
              f"pseudocount must be a finite number >= 0, got {self.pseudocount!r}")


def expected_flows(
    circuit: Circuit, x: torch.Tensor, missing: torch.Tensor | None = None
) -> tuple[float, dict[str, torch.Tensor]]:
    """Sum of log-likelihoods of ``x`` and the expected flows of every parameter."""
    xt = circuit._codes(x)
    miss = circuit._missing(xt, missing)
    params = {n: getattr(circuit, n).detach().clone().requires_grad_(True)
              for n in ("leaf_logp", "edge_logw", "root_logw")}
    with torch.enable_grad():
        lv = input_layer(params["leaf_logp"], xt, miss)
        ll, _, _ = upward_pass(circuit.plan, lv, params["edge_logw"], params["root_logw"])
        total = ll.sum()
        grads = torch.autograd.grad(total, list(params.values()))
    return float(total.detach()), dict(zip(params, grads, strict=True))


@torch.no_grad()
def em_update(
    circuit: Circuit, flows: dict[str, torch.Tensor], step_size: float, pseudocount: float
) -> None:
    """M-step: move each normalized parameter row towards its flow estimate."""
    for name, flow in flows.items():
        old = getattr(circuit, name)
        k = flow.shape[-1]
        f = flow.double().clamp_min(0.0) + pseudocount / k
        new = f / f.sum(-1, keepdim=True)
        mixed = (1.0 - step_size) * old.double().exp() + step_size * new
        mixed = mixed / mixed.sum(-1, keepdim=True)
        if name == "edge_logw":
            # The root has no incoming edge: keep its unused row fixed.
            mixed[circuit.structure.root] = old[circuit.structure.root].double().exp()
        old.copy_(mixed.log().to(old.dtype))


@torch.no_grad()
def mean_log_likelihood(
    circuit: Circuit, data: np.ndarray | torch.Tensor, batch_size: int = 1024
) -> float:
    """Average natural-log likelihood per record."""
    x = circuit._codes(data)
    total = sum(float(circuit.log_likelihood(x[i : i + batch_size]).sum())
                for i in range(0, x.shape[0], batch_size))
    return total / max(1, x.shape[0])


def fit_em(
    circuit: Circuit,
    config: EMConfig | None,
    data: np.ndarray | torch.Tensor,
    valid: np.ndarray | torch.Tensor | None = None,
    progress: Progress = False,
) -> list[dict]:
    """Train ``circuit`` in place on ``data[N, D]`` with ``config`` (None: the defaults); one dict per epoch.

    Each entry has the epoch's mean training log-likelihood (during the
    epoch, before the last update) and, with ``valid``, the held-out one,
    both also in bits per dimension. ``progress`` counts the EM steps.
    """
    cfg = config if config is not None else EMConfig()
    if not isinstance(cfg, EMConfig):
        raise ConfigError(f"config must be an EMConfig, got {type(cfg).__name__}")
    x = circuit._codes(data)
    n, d = x.shape
    gen = torch.Generator().manual_seed(cfg.seed)
    end = cfg.step_size if cfg.step_size_end is None else cfg.step_size_end
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    total_steps = max(1, cfg.epochs * steps_per_epoch - 1)
    report = reporter(progress, cfg.epochs * steps_per_epoch, "EM")
    history = []
    step = 0
    for epoch in range(cfg.epochs):
        perm = torch.randperm(n, generator=gen)
        ll_sum = 0.0
        for lo in range(0, n, cfg.batch_size):
            batch = x[perm[lo : lo + cfg.batch_size]]
            ll, flows = expected_flows(circuit, batch)
            ll_sum += ll
            s = cfg.step_size + (end - cfg.step_size) * step / total_steps
            em_update(circuit, flows, s, cfg.pseudocount)
            step += 1
            report(step, cfg.epochs * steps_per_epoch)
        rec = {"epoch": epoch, "train_ll": ll_sum / n,
               "train_bpd": -ll_sum / n / d / math.log(2)}
        if valid is not None:
            vll = mean_log_likelihood(circuit, valid)
            rec.update(valid_ll=vll, valid_bpd=-vll / d / math.log(2))
        log.info("EM epoch %d: %s", epoch, rec)
        history.append(rec)
    return history
