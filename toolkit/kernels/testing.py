"""Test helper: run a Triton kernel under the CPU interpreter against its reference.

``triton.jit`` decides at decoration time whether it interprets, so the
check runs in a subprocess with ``TRITON_INTERPRET=1`` set before anything
imports Triton. The kernel and reference are named as ``module:function``;
the inputs are built in the child by a named factory, so nothing is pickled.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

__all__ = ["check_kernel"]

_CHILD = textwrap.dedent(
    """
    import importlib, json, sys
    import torch
    spec = json.loads(sys.argv[1])
    def load(name):
        mod, fn = name.split(":")
        return getattr(importlib.import_module(mod), fn)
    args, kwargs = load(spec["inputs"])(*spec.get("input_args", []))
    got = load(spec["kernel"])(*args, **kwargs)
    want = load(spec["reference"])(*args, **kwargs)
    if not isinstance(got, (tuple, list)):
        got, want = (got,), (want,)
    report = []
    for g, w in zip(got, want):
        g, w = g.detach().cpu(), w.detach().cpu()
        same_shape = list(g.shape) == list(w.shape)
        err = (g.double() - w.double()).abs().max().item() if same_shape and g.numel() else 0.0
        report.append({"shape_ok": same_shape, "max_abs_err": err,
                       "dtype": str(g.dtype), "ref_dtype": str(w.dtype)})
    print("RESULT" + json.dumps(report))
    """
)


def check_kernel(
    kernel: str,
    reference: str,
    inputs: str,
    input_args: list | None = None,
    timeout: float = 600,
) -> list[dict]:
    """Run ``kernel`` and ``reference`` on ``inputs()`` under TRITON_INTERPRET=1.

    Returns one dict per output: ``shape_ok`` and ``max_abs_err``. The caller
    asserts the tolerance that fits the op.
    """
    spec = {"kernel": kernel, "reference": reference, "inputs": inputs,
            "input_args": input_args or []}
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, json.dumps(spec)],
        capture_output=True, text=True, env=env, timeout=timeout,
    )
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT"):
            return json.loads(line[len("RESULT"):])
    raise RuntimeError(f"kernel check failed (rc={proc.returncode}):\n{proc.stderr[-4000:]}")
