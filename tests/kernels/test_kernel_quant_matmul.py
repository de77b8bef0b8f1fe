"""Packed low-bit matmul: torch reference vs a slow loop, and the Triton kernel under the interpreter."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from toolkit.kernels.pack import pack_int32
from toolkit.kernels.qmatmul import _example_inputs, quant_matmul, quant_matmul_reference
from toolkit.kernels.testing import check_kernel

KERNEL = "toolkit.kernels.qmatmul:_cases_triton"
REFERENCE = "toolkit.kernels.qmatmul:_cases_reference"
INPUTS = "toolkit.kernels.qmatmul:_example_cases"

# _example_inputs(bits, zero, g_idx, dtype, m, n, k, group_size, scale_dtype)
FP32_CASES = [
    [2, "none", False, "float32", 3, 40, 96, 32],
    [3, "int", False, "float32", 3, 40, 96, 32],
    [4, "int", False, "float32", 3, 40, 96, 32],
    [8, "int", False, "float32", 3, 40, 96, 32],
    [4, "float", False, "float32", 5, 40, 100, 32, "float32"],  # K=100: last word half padding
    [3, "float", True, "float32", 17, 33, 61, 16],  # 3-bit padding, act-order groups, BLOCK_M 32
    [8, "none", True, "float32", 70, 40, 96, 32, "bfloat16"],  # two M tiles
    [2, "int", True, "float32", 4, 16, 80, 20],  # groups straddle the K tiles
    [4, "none", False, "float32", 2, 16, 80, -1],  # one group per row
]
HALF_CASES = [
    [4, "int", False, "float16", 3, 40, 96, 32, "float16"],
    [4, "int", True, "bfloat16", 3, 40, 96, 32, "bfloat16"],
    [8, "float", False, "bfloat16", 9, 24, 72, 24, "bfloat16"],
    [3, "none", False, "float16", 3, 40, 96, 32, "float32"],
    [2, "float", True, "bfloat16", 3, 40, 96, 32, "float16"],
]


def _tolerance(out: torch.Tensor) -> float:
    """fp32 out: 1e-5 of the largest value; 16-bit out: one ulp at the largest value."""
    top = out.double().abs().max().item()
    if out.dtype == torch.float32:
        return 1e-5 * top
    mantissa = {torch.float16: 10, torch.bfloat16: 7}[out.dtype]
    return 2.0 ** (math.floor(math.log2(top)) - mantissa)


@pytest.mark.parametrize("cases", [FP32_CASES, HALF_CASES], ids=["fp32", "16bit"])
def test_triton_matches_reference_in_interpreter(cases: list) -> None:
    report = check_kernel(KERNEL, REFERENCE, INPUTS, cases)
    assert len(report) == len(cases)
    for spec, rep in zip(cases, report, strict=True):
        args, kwargs = _example_inputs(*spec)
        want = quant_matmul_reference(*args, **kwargs)
        assert rep["shape_ok"] and rep["dtype"] == str(want.dtype), spec
        assert rep["max_abs_err"] <= _tolerance(want), (spec, rep)


def _slow_case(bits: int, zero: str, act_order: bool, m: int, n: int, k: int, group_size: int, seed: int):
    """Codes, packed words and W built with Python ints and floats, one element at a time."""
    gen = torch.Generator().manual_seed(seed)
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    groups = math.ceil(k / group_size)
    codes = torch.randint(lo, hi + 1, (n, k), generator=gen).tolist()
    scale = ((torch.rand(n, groups, generator=gen) + 0.5) / 8).to(torch.float16)
    if zero == "int":
        zp = torch.randint(lo, hi + 1, (n, groups), generator=gen, dtype=torch.int8)
    else:
        zp = (torch.rand(n, groups, generator=gen) * (hi - lo) + lo).to(torch.float16)
    col_group = [c // group_size for c in range(k)]
    if act_order:
        col_group = [col_group[i] for i in torch.randperm(k, generator=gen).tolist()]
    w = [[0.0] * k for _ in range(n)]
    streams = [0] * n
    for r in range(n):
        for c in range(k):
            # One bit stream per row: code c at bit c * bits.
            streams[r] |= (codes[r][c] - lo) << (c * bits)
            g = col_group[c]
            w[r][c] = (codes[r][c] - float(zp[r, g])) * float(scale[r, g])
    n_words = math.ceil(k * bits / 32)
    words = [[(stream >> (32 * j)) & 0xFFFFFFFF for j in range(n_words)] for stream in streams]
    words = [[v - (1 << 32) if v >= 1 << 31 else v for v in row] for row in words]
    packed = torch.tensor(words, dtype=torch.int32)
    x = torch.randn(m, k, generator=gen)
    g_idx = torch.tensor(col_group, dtype=torch.int32) if act_order else None
    return x, packed, scale, zp, g_idx, torch.tensor(codes), torch.tensor(w, dtype=torch.float64)


@pytest.mark.parametrize(
    "case",
    [
        (3, "int", True, 2, 5, 23, 8, 0),  # codes straddle words, padded row, shuffled groups
        (4, "float", False, 3, 4, 20, 8, 1),  # last group partial, last word half padding
        (8, "int", False, 2, 3, 9, 4, 2),  # codes reach bit 31: negative words
        (2, "float", True, 1, 6, 17, 5, 3),
    ],
)
def test_reference_matches_slow_loop(case: tuple) -> None:
    bits, _, _, _, _, k, group_size, _ = case
    x, packed, scale, zp, g_idx, codes, w = _slow_case(*case)
    # The hand-built words are the documented layout, and pack_int32 writes the same.
    assert torch.equal(pack_int32(codes, bits), packed)
    want = x.double() @ w.t()
    assert want.abs().max() > 0.1
    got = quant_matmul_reference(x, packed, scale, zp, bits, group_size, g_idx=g_idx)
    assert got.dtype == torch.float32
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def test_public_op_flattens_and_uses_reference_on_cpu(monkeypatch) -> None:
    from toolkit.kernels import qmatmul as module

    (x, packed, scale, zp, bits, gs), kw = _example_inputs(4, "int", True, "bfloat16", 6, 40, 96, 32, "bfloat16")
    monkeypatch.setattr(module, "quant_matmul_triton", lambda *a, **k: pytest.fail("kernel on CPU"))
    got = module.quant_matmul(x.reshape(2, 3, 96), packed, scale, zp, bits, gs, **kw)
    assert got.shape == (2, 3, 40) and got.dtype == torch.bfloat16
    assert torch.equal(got.reshape(6, 40), quant_matmul_reference(x, packed, scale, zp, bits, gs, **kw))


def test_lazy_export_is_the_function() -> None:
    # A fresh process, so the lazy lookup runs before anything imports the module.
    code = (
        "import importlib, sys\n"
        "import toolkit.kernels as k\n"
        "from toolkit.kernels import quant_matmul as a\n"
        "from toolkit.kernels import quant_matmul as b\n"
        "mod = importlib.import_module('toolkit.kernels.qmatmul')\n"
        "assert a is b is k.quant_matmul is mod.quant_matmul and callable(a)\n"
        "assert 'quant_matmul' in k.__all__\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)


def test_rejects_inconsistent_shapes() -> None:
    (x, packed, scale, zp, bits, gs), _ = _example_inputs(4, "int", False, "float32", 3, 40, 96, 32)
    with pytest.raises(ValueError, match="words"):
        quant_matmul_reference(x[:, :80], packed, scale, zp, bits, gs)
    with pytest.raises(ValueError, match="groups"):
        quant_matmul_reference(x, packed, scale[:, :2], zp[:, :2], bits, gs)
    with pytest.raises(ValueError, match="bits"):
        quant_matmul_reference(x, packed, scale, zp, 5, gs)


@pytest.mark.gpu
def test_triton_on_cuda_matches_reference() -> None:
    from toolkit.kernels.qmatmul import quant_matmul_triton

    for spec in (
        [4, "int", False, "float16", 1, 4096, 4096, 128, "float16"],  # W4A16 decode
        [4, "none", True, "bfloat16", 300, 1000, 2048, 128, "bfloat16"],
        [8, "none", False, "float16", 77, 512, 1024, -1, "float16"],  # W8A16, per-channel
        [3, "float", False, "float32", 33, 257, 1000, 64, "float32"],
        [2, "int", True, "bfloat16", 16, 384, 512, 32, "bfloat16"],
    ):
        args, kwargs = _example_inputs(*spec)
        want = quant_matmul_reference(*args, **kwargs)
        cuda = [a.cuda() if isinstance(a, torch.Tensor) else a for a in args]
        kw = {key: v.cuda() if isinstance(v, torch.Tensor) else v for key, v in kwargs.items()}
        got = quant_matmul_triton(*cuda, **kw).cpu()
        assert got.dtype == want.dtype and got.shape == want.shape
        # Larger K than the interpreter cases: allow a few ulps of accumulation-order drift.
        err = (got.double() - want.double()).abs().max().item()
        assert err <= 4 * _tolerance(want), (spec, err)
        assert torch.equal(quant_matmul(cuda[0], *cuda[1:], **kw).cpu(), got)
