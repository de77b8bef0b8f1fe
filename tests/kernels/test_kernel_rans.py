import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from toolkit.errors import FormatError
from toolkit.kernels.testing import check_kernel

KERNEL = "toolkit.kernels.rans:decode_lanes_triton"
REFERENCE = "toolkit.kernels.rans:decode_lanes_reference"
INPUTS = "toolkit.kernels.rans:_example_inputs"


def test_reference_decodes_the_coded_symbols():
    from toolkit.entropy.lanes import decode_lanes as cpu_decode_lanes
    from toolkit.kernels.rans import _example_coded, decode_lanes, decode_lanes_reference

    (data, ctx, table, syms, lanes), sym = _example_coded(2001, 7, 4, 5)
    assert len(np.unique(sym)) > 10  # skewed, but not a trivial stream
    got = decode_lanes_reference(data, ctx, table, syms, lanes)
    assert got.dtype == syms.dtype and np.array_equal(got.numpy(), sym)
    # the public op on CPU tensors takes the reference path
    assert torch.equal(decode_lanes(data, ctx, table, syms, lanes), got)
    # and lanes.decode_lanes, given the frequencies (each symbol's slots in the table), agrees
    freq = np.stack([np.bincount(row >> 24, minlength=syms.shape[1]) for row in table.numpy()])
    assert np.array_equal(cpu_decode_lanes(data, ctx.numpy(), freq, syms.numpy(), lanes), sym)
    with pytest.raises(FormatError, match="damaged"):
        decode_lanes_reference(data[:-2] + bytes([data[-2] ^ 0x5A, data[-1]]), ctx, table, syms, lanes)


@pytest.mark.parametrize(
    "args",
    [[300, 1, 1, 0], [1201, 3, 4, 1], [2500, 64, 16, 2], [777, 64, 4, 3, "uint16"], [40, 64, 16, 4]],
)
def test_rans_kernel_matches_reference_under_interpreter(args):
    (report,) = check_kernel(KERNEL, REFERENCE, INPUTS, args)
    assert report["shape_ok"] and report["dtype"] == report["ref_dtype"]
    assert report["dtype"] == f"torch.{args[4] if len(args) > 4 else 'int32'}"
    assert report["max_abs_err"] == 0


def test_rans_kernel_decodes_a_batch_of_segments_in_one_launch():
    cases = [[700, 3, 4, 10], [5, 8, 1, 11], [2000, 64, 16, 12], [0, 2, 1, 13], [1000, 13, 4, 14]]
    report = check_kernel("toolkit.kernels.rans:decode_segments_triton", "toolkit.kernels.rans:decode_segments",
                          "toolkit.kernels.rans:_example_batch", [cases])
    assert len(report) == len(cases)
    for case, r in zip(cases, report, strict=True):
        assert r["shape_ok"] and r["dtype"] == r["ref_dtype"] == "torch.int32", case
        assert r["max_abs_err"] == 0, case


# Damaged streams, decoded by the kernel (interpreter) and the reference: each must raise FormatError
# with the given message, and never crash or hang. Prints one JSON line {case: [kernel msg, reference msg]}.
_DAMAGE = """
import json
import numpy as np
from toolkit.errors import FormatError
from toolkit.kernels.rans import _example_inputs, decode_lanes_reference, decode_lanes_triton

(data, ctx, table, syms, lanes), _ = _example_inputs(300, 5, 4, 7)
head = 4 * lanes
counts = np.frombuffer(data, "<u4", count=lanes).astype(np.int64)

def flip(pos):
    b = bytearray(data)
    b[pos] ^= 0x5A
    return bytes(b)

def recount(delta, body):
    c = counts.copy()
    c[-1] += delta
    return c.astype("<u4").tobytes() + body

cases = {
    "flip first word": (flip(head), ctx),
    "flip middle word": (flip(head + 2 * (int(counts.sum()) // 2)), ctx),
    "flip last word": (flip(len(data) - 1), ctx),
    "truncated header": (data[:head - 1], ctx),
    "dropped word": (data[:-2], ctx),
    "odd body": (data + b"x", ctx),
    # consistent header, but the last lane lacks a word: it must read 0, not past the buffer
    "short lane": (recount(-1, data[head:-2]), ctx),
    "extra word": (recount(1, data[head:] + b"\\x00\\x00"), ctx),
    "one lane empty": (recount(-int(counts[-1]), data[head:len(data) - 2 * int(counts[-1])]), ctx),
    "fewer symbols": (data, ctx[:-7]),
    "more symbols": (data, ctx.repeat(2)),
    "context outside tables": (data, ctx.clone().index_fill_(0, ctx.new_tensor([123]), table.shape[0])),
}
result = {}
for name, (d, c) in cases.items():
    outcome = []
    for fn, n_lanes in ((decode_lanes_triton, lanes), (decode_lanes_reference, lanes)):
        try:
            fn(d, c, table, syms, n_lanes)
            outcome.append("decoded")
        except FormatError as e:
            outcome.append(str(e))
    result[name] = outcome
for fn in (decode_lanes_triton, decode_lanes_reference):
    try:
        fn(data, ctx, table, syms, 0)
        result.setdefault("zero lanes", []).append("decoded")
    except FormatError as e:
        result.setdefault("zero lanes", []).append(str(e))
print("RESULT" + json.dumps(result))
"""

_EXPECTED = {
    "flip first word": "ANS-coded data is damaged",
    "flip middle word": "ANS-coded data is damaged",
    "flip last word": "ANS-coded data is damaged",
    "truncated header": "ANS lanes: truncated",
    "dropped word": "ANS lanes: word counts do not match the data",
    "odd body": "ANS lanes: word counts do not match the data",
    "short lane": "ANS-coded data is damaged",
    "extra word": "ANS-coded data is damaged",
    "one lane empty": "ANS-coded data is damaged",
    "fewer symbols": "ANS-coded data is damaged",
    "more symbols": "ANS-coded data is damaged",
    "context outside tables": "a value's context has no table",
    "zero lanes": "ANS lanes: 0 lanes",
}


def test_rans_kernel_reports_damage_under_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "-c", _DAMAGE], capture_output=True, text=True, env=env, timeout=300)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    result = json.loads(lines[0][len("RESULT"):])
    assert result == {name: [msg, msg] for name, msg in _EXPECTED.items()}


@pytest.mark.gpu
def test_rans_kernel_on_cuda():
    from toolkit.kernels.rans import _example_coded, decode_lanes, decode_segments_triton

    coded = [_example_coded(n, lanes, k, seed) for n, lanes, k, seed in
             [(200_000, 64, 16, 0), (50_000, 256, 4, 1), (3, 64, 1, 2), (100_000, 1024, 64, 3)]]
    outs = decode_segments_triton([seg for seg, _ in coded], "cuda")
    for out, (_, sym) in zip(outs, coded, strict=True):
        assert out.is_cuda and np.array_equal(out.cpu().numpy(), sym)
    (data, ctx, table, syms, lanes), sym = coded[0]
    assert np.array_equal(decode_lanes(data, ctx.cuda(), table.cuda(), syms.cuda(), lanes).cpu().numpy(), sym)
