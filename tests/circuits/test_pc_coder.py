"""The PC coder: exact round trips, partial vs naive evaluation, size bound, fresh-process decode."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from toolkit.circuits import (
    Circuit,
    TreeStructure,
    decode_records,
    encode_records,
    model_bits,
    random_tree,
)
from toolkit.circuits.coder import METHODS, _ContextState, _NaiveState, _PartialState, _path_plan
from toolkit.errors import FormatError, UnsupportedInputError


@pytest.fixture(scope="module")
def circuit() -> Circuit:
    return Circuit(random_tree(10, num_cats=6, num_latents=5, seed=4), seed=3)


@pytest.fixture(scope="module")
def tiny() -> Circuit:
    return Circuit(random_tree(4, num_cats=3, num_latents=3, seed=1), seed=1)


@pytest.mark.parametrize("method", ["partial", "naive", "context"])
def test_roundtrip_random_records(circuit: Circuit, method: str) -> None:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 6, size=(37, 10)).astype(np.uint8)
    blob = encode_records(circuit, x, batch_size=16, method=method)
    out = decode_records(circuit, blob, 37)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, x)


@pytest.mark.parametrize(
    "structure",
    [TreeStructure((-1,), 5, 1), TreeStructure((-1,), 3, 4), TreeStructure((-1, 0, 0), 2, 1)],
)
def test_roundtrip_degenerate_structures(structure: TreeStructure) -> None:
    c = Circuit(structure, seed=0)
    x = np.random.default_rng(0).integers(0, structure.num_cats, (7, structure.num_vars))
    for method in METHODS:
        blob = encode_records(c, x.astype(np.uint8), batch_size=3, method=method)
        np.testing.assert_array_equal(decode_records(c, blob, 7), x)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    x=arrays(np.uint8, st.tuples(st.integers(0, 6), st.just(4)), elements=st.integers(0, 2)),
    batch=st.integers(1, 4),
    method=st.sampled_from(METHODS),
)
def test_roundtrip_property(tiny: Circuit, x: np.ndarray, batch: int, method: str) -> None:
    blob = encode_records(tiny, x, batch_size=batch, method=method)
    np.testing.assert_array_equal(decode_records(tiny, blob, len(x)), x)


def test_partial_context_and_naive_agree(circuit: Circuit) -> None:
    rng = np.random.default_rng(1)
    x = torch.from_numpy(rng.integers(0, 6, size=(9, 10)))
    plan = _path_plan(circuit)
    states = [cls(circuit, 9, plan) for cls in (_PartialState, _ContextState, _NaiveState)]
    with torch.no_grad():
        for v in circuit.structure.order:
            a, c, b = (st.logits(v) for st in states)
            assert torch.allclose(a, b, atol=1e-4), v
            assert torch.allclose(c, b, atol=1e-4), v
            for st in states:
                st.fix(v, x[:, v])
        # After every variable is fixed, each candidate row holds the full joint.
        full = circuit.log_likelihood(x)
    last = circuit.structure.order[-1]
    assert torch.allclose(a[torch.arange(9), x[:, last]], full, atol=1e-4)
    data = circuit.sample(100, torch.Generator().manual_seed(5)).numpy().astype(np.uint8)
    sizes = []
    for method in METHODS:
        blob = encode_records(circuit, data, method=method)
        np.testing.assert_array_equal(decode_records(circuit, blob), data)
        sizes.append(len(blob))
    assert max(sizes) - min(sizes) <= max(4, 0.001 * min(sizes))


def test_coded_size_close_to_model_bits(circuit: Circuit) -> None:
    n = 400
    data = circuit.sample(n, torch.Generator().manual_seed(6)).numpy().astype(np.uint8)
    ideal = model_bits(circuit, data)
    bits = 8 * len(encode_records(circuit, data, batch_size=128))
    # Bound: 1% + 32 bits per record. In practice the overhead is the fixed
    # header (17 bytes), 4 bytes of length and <= 8 bytes of range-coder
    # flush per batch, and the 24-bit table quantization (well below 0.1%).
    assert bits <= 1.01 * ideal + 32 * n
    assert bits <= 1.002 * ideal + 8 * (17 + 12 * 4)


def test_decode_in_fresh_process(circuit: Circuit, tmp_path) -> None:
    rng = np.random.default_rng(2)
    x = rng.integers(0, 6, size=(25, 10)).astype(np.uint8)
    circuit.save(tmp_path / "pc")
    for method in ("partial", "context"):
        blob = encode_records(circuit, x, batch_size=8, method=method)
        (tmp_path / f"{method}.bin").write_bytes(blob)
    code = textwrap.dedent(
        f"""
        import numpy as np
        from toolkit.circuits import Circuit, decode_records
        c = Circuit.load({str(tmp_path / "pc")!r})
        for method in ("partial", "context"):
            blob = open({str(tmp_path)!r} + f"/{{method}}.bin", "rb").read()
            np.save({str(tmp_path)!r} + f"/{{method}}.npy", decode_records(c, blob, 25))
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    for method in ("partial", "context"):
        out = np.load(tmp_path / f"{method}.npy", allow_pickle=False)
        np.testing.assert_array_equal(out, x)


def test_empty_and_bad_streams(circuit: Circuit, tiny: Circuit) -> None:
    empty = np.zeros((0, 10), dtype=np.uint8)
    assert decode_records(circuit, encode_records(circuit, empty), 0).shape == (0, 10)
    blob = encode_records(circuit, np.ones((5, 10), dtype=np.uint8))
    for bad in (blob[:10], blob[:-4], b"XYZ" + blob[3:], blob + b"\0\0\0\0"):
        with pytest.raises(FormatError):
            decode_records(circuit, bad)
    with pytest.raises(FormatError):
        decode_records(circuit, blob, 6)
    with pytest.raises(FormatError):
        decode_records(tiny, blob)
    with pytest.raises(UnsupportedInputError):
        encode_records(circuit, np.full((2, 10), 6, dtype=np.uint8))


def test_encoder_holds_one_variables_tables_at_a_time() -> None:
    # A batch's [D*B, K] float64 tables were once built at once (1.6 GB for one
    # 1024-patch batch of the shipped RGB model); numpy's allocations show in
    # tracemalloc, so its peak tells whether they still are.
    import tracemalloc

    d, b, k = 64, 64, 256
    c = Circuit(random_tree(d, num_cats=k, num_latents=2, seed=0), seed=0)
    x = np.random.default_rng(0).integers(0, k, (b, d)).astype(np.uint8)
    tracemalloc.start()
    try:
        encode_records(c, x, batch_size=b)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    all_tables = d * b * k * 8
    assert peak < all_tables / 8, f"encoder peak {peak} bytes; all of a batch's tables are {all_tables}"


@pytest.mark.gpu
def test_roundtrip_on_cuda(circuit: Circuit) -> None:
    gpu = Circuit(circuit.structure, circuit.leaf_logp, circuit.edge_logw, circuit.root_logw).cuda()
    x = np.random.default_rng(3).integers(0, 6, size=(50, 10)).astype(np.uint8)
    for method in METHODS:
        blob = encode_records(gpu, x, batch_size=20, method=method)
        np.testing.assert_array_equal(decode_records(gpu, blob, 50), x)
