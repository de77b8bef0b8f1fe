"""The integer engine's files decode anywhere: other thread counts, CPU kernels, processes and devices.

Each test changes one thing that moves a float forward's numbers (threads,
the BLAS kernel, numpy's SIMD dispatch, the compiled loops' target CPU,
torch's CPU capability, the device) and checks that the bytes do not move.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import toolkit
from toolkit.codecs.lm import LMCodec, LMConfig

SAMPLES = Path(__file__).parents[2] / "toolkit" / "assets" / "samples"
# small windows and many streams: the run crosses window restarts, the compiled int8 loop (few rows)
# and the float32 BLAS product (eight rows or more)
SETTINGS = dict(segment=2048, streams=16, window=48, keep=12, adapt_tokens=32)


@pytest.fixture(scope="module")
def text() -> bytes:
    return (SAMPLES / "prose.txt").read_bytes() + (SAMPLES / "code_sample.py").read_bytes()[:6000]


def _payloads(data: bytes, **settings) -> list[bytes | None]:
    codec = LMCodec(LMConfig(**{**SETTINGS, **settings}))
    chunks = [data[i : i + codec.chunk_size] for i in range(0, len(data), codec.chunk_size)]
    return codec.open_encoder().encode_chunks(chunks)


def test_thread_counts_give_the_same_payloads(text):
    """The rows split over 1, 2 or 3 threads: the same payload bytes."""
    one = _payloads(text, threads=1)
    assert all(p is not None for p in one)
    assert _payloads(text, threads=2) == one
    assert _payloads(text, threads=3) == one


def test_encode_on_one_thread_decode_on_two(text, tmp_path):
    """A file coded with one thread decodes with two, in another process, and the other way round."""
    for enc, dec in ((1, 2), (2, 1)):
        blob = toolkit.compress(text, codec="lm", threads=enc, **SETTINGS)
        path = tmp_path / f"t{enc}.tkz"
        path.write_bytes(blob)
        out = tmp_path / f"t{enc}.out"
        subprocess.run([sys.executable, "-m", "toolkit", "decompress", str(path), "-o", str(out), "-q",
                        "--set", f"threads={dec}"], check=True)
        assert out.read_bytes() == text


# What changes a float forward's numbers on this machine, one at a time: OpenBLAS's kernel (AVX2
# Haswell, SSE3 Prescott against the native one), numpy's dispatch without AVX-512, the compiled loops
# built for a generic x86-64 (no AVX), and torch's CPU capability (which the engine must not depend on).
ENVIRONMENTS = {
    "openblas-haswell": {"OPENBLAS_CORETYPE": "Haswell"},
    "openblas-prescott": {"OPENBLAS_CORETYPE": "Prescott"},
    "numpy-no-avx512": {"NPY_DISABLE_CPU_FEATURES": "AVX512F AVX512CD AVX512_SKX AVX512_CLX AVX512_CNL AVX512_ICL"},
    "numba-generic-cpu": {"NUMBA_CPU_NAME": "generic", "NUMBA_CACHE_DIR": "{tmp}/numba-generic"},
    "aten-default": {"ATEN_CPU_CAPABILITY": "default"},
    "aten-avx2": {"ATEN_CPU_CAPABILITY": "avx2"},
    "aten-avx512": {"ATEN_CPU_CAPABILITY": "avx512"},
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(ENVIRONMENTS))
def test_decodes_under_other_cpu_kernels(name, text, tmp_path):
    """Encoded here with the native kernels; decoded in a process that uses other ones: the same bytes."""
    data = text[:9000]
    blob = toolkit.compress(data, codec="lm", **SETTINGS)
    path, out = tmp_path / "f.tkz", tmp_path / "f.out"
    path.write_bytes(blob)
    env = {**os.environ, **{k: v.format(tmp=tmp_path) for k, v in ENVIRONMENTS[name].items()}}
    subprocess.run([sys.executable, "-m", "toolkit", "decompress", str(path), "-o", str(out), "-q"], check=True,
                   env=env)
    assert out.read_bytes() == data


def test_integer_header_records_no_machine(text):
    """Nothing about the machine goes into the header: no environment, so no decoder refuses the file."""
    header = toolkit.info(toolkit.compress(text[:3000], codec="lm", **SETTINGS))["header"]
    assert header["config"]["engine"] == "int" and not header.get("env")


def test_linear_layers_on_a_torch_device_give_the_same_bytes(text):
    """The device path (torch kernels; Triton on CUDA) decodes what the compiled CPU loops coded, and back."""
    data = text[:5000]
    blob = toolkit.compress(data, codec="lm", **SETTINGS)
    assert toolkit.decompress(blob, device="cpu") == data
    assert _payloads(data, device="cpu") == _payloads(data)


def test_float_engines_refuse_device_and_threads_at_decode(tiny_text=b"some text " * 60):
    from toolkit.errors import ConfigError

    with pytest.raises(ConfigError, match="integer engine"):
        toolkit.compress(tiny_text, codec="lm", engine="lean", device="cpu", **SETTINGS)
    blob = toolkit.compress(tiny_text, codec="lm", engine="lean", **SETTINGS)
    with pytest.raises(ConfigError, match="threads and device cannot be set"):
        toolkit.decompress(blob, threads=2)


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs CUDA")
def test_encode_on_cpu_decode_on_cuda_and_back(text):
    data = text[:20000]
    on_cpu = toolkit.compress(data, codec="lm", **SETTINGS)
    assert toolkit.decompress(on_cpu, device="cuda") == data
    on_cuda = toolkit.compress(data, codec="lm", device="cuda", **SETTINGS)
    assert toolkit.decompress(on_cuda) == data
    assert _payloads(data, device="cuda") == _payloads(data)


def test_manifest_records_the_integer_calibration():
    """The shipped model's entry says how its integer weights were chosen, and the choice is the one it measured."""
    import json

    from toolkit.models.store import model_entry

    entry = model_entry("lm-default")["integer"]
    bits = entry["bits_per_token_held_back"]
    assert entry["chosen"] == min(bits, key=bits.get) and len(bits) >= 2
    assert entry["calibration_data"]["sources"] and entry["heldout_payload_bits_per_byte"]["integer"]
    shipped = (SAMPLES.parent / "lm-default" / "integer.safetensors").exists()
    assert shipped == (entry["sha256"] is not None)
    header = toolkit.info(toolkit.compress(b"calibrated or not " * 40, codec="lm"))["header"]
    assert ("integer_sha256" in header["model"]) == shipped
    figures = entry["heldout_payload_bits_per_byte"]
    for name, bpb in figures["integer"].items():  # the integer engine within 2% of the float one
        assert bpb <= 1.02 * figures["lean_float32"][name], json.dumps(figures)
