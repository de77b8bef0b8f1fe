"""The log-space sum layer: torch reference vs naive logsumexp, and the Triton kernel under the interpreter."""

from __future__ import annotations

import pytest
import torch

from toolkit.kernels.sum_layer import example_inputs, sum_layer, sum_layer_reference
from toolkit.kernels.testing import check_kernel

KERNEL = "toolkit.kernels.sum_layer:sum_layer_triton"
REFERENCE = "toolkit.kernels.sum_layer:sum_layer_reference"
INPUTS = "toolkit.kernels.sum_layer:example_inputs"


def test_reference_matches_logsumexp() -> None:
    (x, logw), _ = example_inputs(9, 4, 5, 7)
    want = torch.logsumexp(logw[None] + x[:, :, None, :], dim=-1)
    assert torch.allclose(sum_layer_reference(x, logw), want, atol=1e-5)
    # The CPU dispatch takes the reference, with gradients for EM.
    x.requires_grad_(True)
    sum_layer(x, logw).sum().backward()
    assert torch.allclose(x.grad.sum(-1), torch.full((9, 4), 5.0), atol=1e-5)


def test_reference_handles_minus_infinity() -> None:
    x = torch.tensor([[[0.0, float("-inf")]]])
    logw = torch.log(torch.tensor([[[0.25, 0.75]]]))
    assert torch.allclose(sum_layer_reference(x, logw), torch.log(torch.tensor([[[0.25]]])))


@pytest.mark.parametrize(
    "args",
    [
        [37, 3, 20, 12, "float32"],  # no dimension a power of two: masked tiles
        [5, 2, 1, 3, "bfloat16"],  # the root-sum shape, bf16 loads
    ],
)
def test_triton_matches_reference_in_interpreter(args: list) -> None:
    (report,) = check_kernel(KERNEL, REFERENCE, INPUTS, args)
    assert report["shape_ok"]
    assert report["max_abs_err"] < 1e-4


@pytest.mark.gpu
def test_triton_on_cuda_matches_reference() -> None:
    from toolkit.kernels.sum_layer import sum_layer_triton

    for args in ([300, 5, 32, 32], [64, 1, 1, 7], [1000, 3, 16, 16, "bfloat16"]):
        (x, logw), _ = example_inputs(*args)
        x, logw = x.cuda(), logw.cuda()
        want = sum_layer_reference(x.cpu(), logw.cpu())
        got = sum_layer_triton(x, logw).cpu()
        assert torch.allclose(got, want, atol=1e-4)
        # No autograd needed: the public op takes the kernel on CUDA.
        assert torch.equal(sum_layer(x, logw).cpu(), got)
