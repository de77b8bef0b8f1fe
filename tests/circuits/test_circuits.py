"""Probabilistic circuits: exact queries against brute force, EM, sampling, I/O."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from scipy.stats import chi2

from toolkit.circuits import (
    Circuit,
    EMConfig,
    TreeStructure,
    fit_em,
    learn_hclt,
    mean_log_likelihood,
    pairwise_mutual_information,
    random_tree,
)
from toolkit.errors import ConfigError, FormatError, UnsupportedInputError

STRUCTURES = [
    TreeStructure((-1, 0, 1, 2), num_cats=3, num_latents=3),  # chain
    TreeStructure((1, -1, 1, 1), num_cats=2, num_latents=4),  # star around variable 1
    random_tree(5, num_cats=3, num_latents=2, seed=3),
]


def all_assignments(s: TreeStructure) -> torch.Tensor:
    return torch.tensor(list(itertools.product(range(s.num_cats), repeat=s.num_vars)))


@pytest.mark.parametrize("s", STRUCTURES)
def test_likelihoods_sum_to_one(s: TreeStructure) -> None:
    c = Circuit(s, seed=1)
    total = c.log_likelihood(all_assignments(s)).double().exp().sum()
    assert abs(float(total) - 1.0) < 1e-5
    # Everything missing is the empty marginal: log 1.
    x = torch.zeros((1, s.num_vars), dtype=torch.long)
    assert abs(float(c.log_likelihood(x, torch.ones_like(x, dtype=torch.bool)))) < 1e-5


@pytest.mark.parametrize("s", STRUCTURES)
def test_marginals_match_brute_force(s: TreeStructure) -> None:
    c = Circuit(s, seed=2)
    xs = all_assignments(s)
    joint = c.log_likelihood(xs).double().exp()
    gen = torch.Generator().manual_seed(0)
    rows = xs[torch.randint(len(xs), (12,), generator=gen)]
    miss = torch.rand(rows.shape, generator=gen) < 0.5
    got = c.log_likelihood(rows, miss).double().exp()
    for r, m, g in zip(rows, miss, got, strict=True):
        agree = ((xs == r) | m).all(dim=1)
        assert float(g) == pytest.approx(float(joint[agree].sum()), rel=1e-4)


@pytest.mark.parametrize("s", STRUCTURES)
def test_conditionals_match_brute_force(s: TreeStructure) -> None:
    c = Circuit(s, seed=3)
    xs = all_assignments(s)
    joint = c.log_likelihood(xs).double().exp()
    evidence = xs[len(xs) // 3 : len(xs) // 3 + 1]
    miss = torch.zeros_like(evidence, dtype=torch.bool)
    miss[0, 0] = True  # a missing non-target variable is summed out too
    targets = [1, s.num_vars - 1]
    got = c.conditional(evidence, miss, targets)[0]
    # Brute force: sum the joint over assignments that agree with the
    # evidence on every observed, non-target variable.
    free = miss[0].clone()
    free[targets] = True
    sel = ((xs == evidence[0]) | free).all(dim=1)
    for t, row in zip(targets, got, strict=True):
        want = torch.stack([joint[sel & (xs[:, t] == k)].sum() for k in range(s.num_cats)])
        assert torch.allclose(row.double(), want / want.sum(), atol=1e-5)


def test_sampling_frequencies_match_probabilities() -> None:
    s = TreeStructure((-1, 0, 0), num_cats=3, num_latents=3)
    c = Circuit(s, seed=4)
    xs = all_assignments(s)
    p = c.log_likelihood(xs).double().exp().numpy()
    n = 20000
    draws = c.sample(n, torch.Generator().manual_seed(0)).numpy()
    codes = (draws * np.array([9, 3, 1])).sum(1)
    counts = np.bincount(codes, minlength=27)
    stat = float(((counts - n * p) ** 2 / (n * p)).sum())
    assert stat < chi2.ppf(0.999, df=26)


def test_conditional_sampling_keeps_evidence_and_matches_conditional() -> None:
    s = TreeStructure((-1, 0, 1), num_cats=3, num_latents=3)
    c = Circuit(s, seed=5)
    n = 6000
    x = torch.tensor([[2, 0, 1]]).repeat(n, 1)
    miss = torch.tensor([[False, True, False]]).repeat(n, 1)
    draws = c.sample(n, torch.Generator().manual_seed(1), x, miss)
    assert (draws[:, [0, 2]] == x[:, [0, 2]]).all()
    freq = torch.bincount(draws[:, 1], minlength=3).double() / n
    want = c.conditional(x[:1], miss[:1], [1])[0, 0].double()
    assert torch.allclose(freq, want, atol=0.03)


def test_em_improves_log_likelihood() -> None:
    truth = Circuit(random_tree(6, num_cats=4, num_latents=3, seed=1), seed=11)
    data = truth.sample(1500, torch.Generator().manual_seed(2)).numpy().astype(np.uint8)
    c = Circuit(learn_hclt(data, num_cats=4, num_latents=4), seed=0)
    before = mean_log_likelihood(c, data)
    hist = fit_em(c, EMConfig(epochs=8, batch_size=len(data), step_size=1.0, step_size_end=None,
                              pseudocount=0.01), data)
    lls = [h["train_ll"] for h in hist]
    # Full-batch EM: monotone up to the pseudocount's small pull.
    assert all(b >= a - 1e-3 for a, b in zip(lls, lls[1:], strict=False))
    after = mean_log_likelihood(c, data)
    assert after > before + 0.5
    # Mini-batch EM also improves on a fresh circuit.
    c2 = Circuit(c.structure, seed=1)
    b2 = mean_log_likelihood(c2, data)
    fit_em(c2, EMConfig(epochs=3, batch_size=256, step_size=0.3, step_size_end=None), data)
    assert mean_log_likelihood(c2, data) > b2 + 0.5


@pytest.mark.parametrize("bad", [{"epochs": -1}, {"batch_size": 0}, {"step_size": 0.0}, {"step_size": 1.5},
                                 {"step_size_end": 0.0}, {"pseudocount": -0.1}, {"pseudocount": float("nan")},
                                 {"seed": 0.5}, {"epochs": "3"}])
def test_em_settings_are_checked(bad) -> None:
    with pytest.raises(ConfigError):
        EMConfig(**bad)


def test_em_config_round_trips_and_fit_hclt_takes_it() -> None:
    from toolkit.circuits import fit_hclt

    cfg = EMConfig(epochs=2, step_size_end=None, seed=3)
    assert EMConfig.from_dict(cfg.to_dict()) == cfg
    data = np.random.default_rng(0).integers(0, 3, (200, 5)).astype(np.uint8)
    calls = []
    circuit, hist = fit_hclt(data, cfg, num_latents=2, progress=lambda done, total: calls.append((done, total)))
    assert len(hist) == 2 and calls[-1] == (2, 2) and circuit.num_vars == 5
    with pytest.raises(ConfigError):
        fit_hclt(data, {"epochs": 2})


def test_hclt_recovers_a_markov_chain() -> None:
    rng = np.random.default_rng(0)
    n, d = 4000, 7
    x = np.zeros((n, d), dtype=np.int64)
    x[:, 0] = rng.integers(0, 3, n)
    for v in range(1, d):
        keep = rng.random(n) < 0.8
        x[:, v] = np.where(keep, x[:, v - 1], rng.integers(0, 3, n))
    mi = pairwise_mutual_information(x, 3)
    assert np.allclose(mi, mi.T) and (mi >= -1e-9).all()
    s = learn_hclt(x, num_cats=3, num_latents=2)
    edges = {frozenset((v, p)) for v, p in enumerate(s.parent) if p >= 0}
    assert edges == {frozenset((v, v + 1)) for v in range(d - 1)}
    assert s.root == 3  # the centroid of a 7-chain
    assert sorted(s.order) == list(range(d))
    # Coarsened categories (6 -> 3 bins) keep the chain.
    s6 = learn_hclt(2 * x + rng.integers(0, 2, x.shape), num_cats=6, num_latents=2, mi_bins=3)
    assert s6.parent == s.parent


def test_save_load_roundtrip(tmp_path) -> None:
    c = Circuit(random_tree(6, num_cats=5, num_latents=3, seed=2), seed=7)
    x = torch.randint(0, 5, (20, 6), generator=torch.Generator().manual_seed(0))
    c.save(tmp_path / "pc")
    c2 = Circuit.load(tmp_path / "pc")
    assert c2.structure == c.structure
    assert torch.equal(c.log_likelihood(x), c2.log_likelihood(x))
    assert not list((tmp_path / "pc").glob("*.pt")) and not list((tmp_path / "pc").glob("*.pkl"))
    (tmp_path / "pc" / "circuit.safetensors").write_bytes(b"garbage")
    with pytest.raises(FormatError):
        Circuit.load(tmp_path / "pc")


def test_bad_inputs_raise_toolkit_errors() -> None:
    with pytest.raises(ConfigError):
        TreeStructure((-1, -1), num_cats=2, num_latents=2)
    with pytest.raises(ConfigError):
        TreeStructure((1, 0, -1), num_cats=2, num_latents=2)  # cycle 0 <-> 1
    c = Circuit(TreeStructure((-1, 0), num_cats=2, num_latents=2))
    with pytest.raises(UnsupportedInputError):
        c.log_likelihood(torch.tensor([[0, 2]]))
    with pytest.raises(UnsupportedInputError):
        c.log_likelihood(torch.tensor([[0, 1, 1]]))
    # A missing entry may hold anything.
    ll = c.log_likelihood(torch.tensor([[0, 7]]), torch.tensor([[False, True]]))
    assert math.isfinite(float(ll))


def test_patch_recipe_runs_from_its_config(tmp_path) -> None:
    """The shipped patch model's recipe on a tiny budget: its command line is its config, its result a model."""
    from toolkit.circuits import PatchModel
    from toolkit.recipes.common import parse_config
    from toolkit.recipes.train_patch import TrainPatchConfig, run

    cfg = parse_config(TrainPatchConfig, ["--out", str(tmp_path / "m"), "--patch", "2", "--latents", "2",
                                          "--epochs", "1", "--max-records", "300"])
    assert cfg == TrainPatchConfig(out=tmp_path / "m", patch=2, latents=2, epochs=1, max_records=300)
    with pytest.raises(ConfigError):
        TrainPatchConfig(out=tmp_path, patch=0)
    before = torch.get_num_threads()
    try:
        out = run(cfg)
    finally:
        torch.set_num_threads(before)
    model = PatchModel.load(out)
    assert model.patch == 2 and sorted(model.circuits) == [1, 3]
    assert set(model.meta["valid_bits_per_dim"]) == {"1", "3"} and model.meta["held_out"][0] == "coffee"
