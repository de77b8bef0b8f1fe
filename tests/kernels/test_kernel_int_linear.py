"""The integer engine's int8 linear layer and row quantization: compiled CPU loops, torch reference and Triton
kernels (under the interpreter) give the same integers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from toolkit.kernels.int_linear import _example_inputs, _example_rows, int_linear_reference, quant_rows_reference
from toolkit.kernels.testing import check_kernel
from toolkit.text import intkernels as ik

SHAPES = [(1, 256, 768), (5, 704, 256), (19, 64, 33), (40, 100, 70)]


@pytest.mark.parametrize("rows,k,n", SHAPES)
def test_engine_loops_match_the_reference(rows, k, n):
    """Both CPU paths of the engine (int8 loop for few rows, float32 BLAS for more) equal the torch reference."""
    (q, r, w, m), _ = _example_inputs(rows, k, n)
    want = int_linear_reference(q, r, w, m).numpy()
    small = np.empty((rows, n), dtype=np.int64)
    ik.linear_small(q.numpy(), r.numpy(), w.numpy(), m.numpy(), small)
    blas = np.empty((rows, n), dtype=np.int64)
    ik.requant(q.numpy().astype(np.float32) @ w.numpy().astype(np.float32).T, r.numpy(), m.numpy(), blas)
    np.testing.assert_array_equal(small, want)
    np.testing.assert_array_equal(blas, want)


def test_engine_row_quantization_matches_the_reference():
    (x,), _ = _example_rows(37, 300)
    want_q, want_m = quant_rows_reference(x)
    q, m = np.empty(x.shape, dtype=np.int8), np.empty(x.shape[0], dtype=np.int64)
    ik.quant_rows(x.numpy(), q, m)
    np.testing.assert_array_equal(q, want_q.numpy())
    np.testing.assert_array_equal(m, want_m.numpy())
    assert int(want_m[0]) == 1 and not want_q[0].any()  # the zero row
    assert int(want_q.abs().max()) == 127


def test_reference_is_the_exact_product():
    """The reference's requantization is round(round(acc * m / 2**20) * r / 2**14) of the exact int8 product."""
    (q, r, w, m), _ = _example_inputs(3, 50, 7)
    acc = [[sum(int(a) * int(b) for a, b in zip(q[i], w[j], strict=True)) for j in range(7)] for i in range(3)]
    want = [[((((acc[i][j] * int(m[j])) + (1 << 19)) >> 20) * int(r[i]) + (1 << 13)) >> 14 for j in range(7)]
            for i in range(3)]
    assert int_linear_reference(q, r, w, m).tolist() == want


@pytest.mark.slow
def test_triton_int_linear_matches_under_interpreter():
    for shape in SHAPES[2:]:
        report = check_kernel("toolkit.kernels.int_linear:int_linear_triton",
                              "toolkit.kernels.int_linear:int_linear_reference",
                              "toolkit.kernels.int_linear:_example_inputs", list(shape))
        assert report[0]["shape_ok"] and report[0]["dtype"] == "torch.int64"
        assert report[0]["max_abs_err"] == 0.0, (shape, report)


@pytest.mark.slow
def test_triton_quant_rows_matches_under_interpreter():
    report = check_kernel("toolkit.kernels.int_linear:quant_rows_triton",
                          "toolkit.kernels.int_linear:quant_rows_reference",
                          "toolkit.kernels.int_linear:_example_rows", [37, 300])
    assert [r["dtype"] for r in report] == ["torch.int8", "torch.int64"]
    assert all(r["shape_ok"] and r["max_abs_err"] == 0.0 for r in report), report


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_kernels_match_the_cpu_engine():
    from toolkit.kernels.int_linear import int_linear, quant_rows

    for shape in SHAPES:
        (q, r, w, m), _ = _example_inputs(*shape)
        got = int_linear(q.cuda(), r.cuda(), w.cuda(), m.cuda()).cpu()
        assert torch.equal(got, int_linear_reference(q, r, w, m))
    (x,), _ = _example_rows(37, 300)
    gq, gm = quant_rows(x.cuda())
    wq, wm = quant_rows_reference(x)
    assert torch.equal(gq.cpu(), wq) and torch.equal(gm.cpu(), wm)
