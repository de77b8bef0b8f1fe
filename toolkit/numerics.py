"""What this machine's torch computes: a fingerprint of its float kernels, for learned-codec headers.

A learned codec decodes exactly only where the decoder computes the encoder's
floats bit for bit. The torch build and ATen's CPU capability (AVX2, AVX-512)
do not settle that: the BLAS behind a matmul picks its own code path by CPU
vendor and model (seen here: on an AMD EPYC with AVX-512, MKL computes what an
AVX2 machine does, not what an Intel AVX-512 machine does). So the codecs also
record this digest of a fixed probe through the kind of ops they run (float32
and bfloat16 matmuls of a few shapes, softmax, log-softmax, exp, sigmoid,
SiLU, RMS norm) on fixed inputs. Equal fingerprints do not prove equal
numbers for every shape, but a different one shows that the floats differ.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

__all__ = ["cpu_has_bf16", "float_fingerprint"]


@functools.lru_cache(maxsize=1)
def float_fingerprint() -> str:
    """16 hex digits: SHA-256 of the probe's output bytes, computed once per process."""
    import torch

    gen = torch.Generator().manual_seed(1234)
    h = hashlib.sha256()
    with torch.no_grad():
        for m, k, n in ((1, 256, 4096), (8, 256, 704), (64, 704, 256), (33, 64, 65)):
            a = torch.randn(m, k, generator=gen)
            b = torch.randn(k, n, generator=gen) / k**0.5
            y = a @ b
            outs = [y, (a.bfloat16() @ b.bfloat16()).float(), torch.softmax(y, -1), torch.log_softmax(y, -1),
                    torch.exp(y.clamp(-30, 30)), torch.sigmoid(y), torch.nn.functional.silu(y),
                    y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + 1e-5)]
            for t in outs:
                h.update(t.contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def cpu_has_bf16() -> bool:
    """Whether the CPU has bfloat16 instructions (AVX512-BF16 or AMX).

    With them, bf16 autocast (float32 master weights) trains 1.7x faster per
    step at batch 32; without them (AVX2 only) torch emulates bfloat16 and a
    step is about 15x slower than in float32.
    """
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags
