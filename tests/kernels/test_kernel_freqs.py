import os
import subprocess
import sys

import pytest
import torch

from toolkit.kernels.testing import check_kernel


@pytest.mark.parametrize(
    "args", [[7, 300, 0, "float32"], [3, 5000, 1, "bfloat16"], [2, 2, 2, "float32"], [1, 4097, 4, "float32"]]
)
def test_freqs_kernel_matches_reference_under_interpreter(args):
    report = check_kernel(
        "toolkit.kernels.freqs:logits_to_freqs_triton",
        "toolkit.kernels.freqs:logits_to_freqs_reference",
        "toolkit.kernels.freqs:_example_inputs",
        args,
    )
    assert report[0]["shape_ok"] and report[0]["dtype"] == "torch.int64"
    # counts of 2**20: at most a couple of counts apart (exp rounding), usually identical
    assert report[0]["max_abs_err"] <= 2


def test_freqs_kernel_invariants_under_interpreter():
    code = (
        "import torch\n"
        "from toolkit.kernels.freqs import logits_to_freqs_triton, _example_inputs\n"
        "(x,), kw = _example_inputs(9, 4100, 3)\n"
        "f = logits_to_freqs_triton(x, 18)\n"
        "print(int(f.min()), sorted(set(f.sum(-1).tolist())))\n"
    )
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip().split(maxsplit=1) == ["1", str([2**18])]


def test_dispatch_uses_reference_on_cpu(monkeypatch):
    from toolkit.kernels import freqs

    called = []
    monkeypatch.setattr(freqs, "logits_to_freqs_triton", lambda *a, **k: called.append(1))
    f = freqs.logits_to_freqs(torch.randn(4, 10), 16)
    assert not called and torch.all(f.sum(-1) == 2**16)


@pytest.mark.gpu
def test_freqs_kernel_on_cuda():
    from toolkit.kernels.freqs import logits_to_freqs, logits_to_freqs_reference

    x = torch.randn(64, 4096) * 3
    got = logits_to_freqs(x.cuda()).cpu()
    want = logits_to_freqs_reference(x)
    assert torch.all(got.sum(-1) == 2**24) and int(got.min()) >= 1
    assert int((got - want).abs().max()) <= 4
