"""Golden payloads: the lm codec's bytes for the shipped model are the bytes recorded before the refactors.

The integer engine's bytes hold on every machine, so its cases always run.
A float engine's numbers hold on the same torch build and CPU capability, so
such a case runs only where the recorded environment matches.
"""

import hashlib
import json
from pathlib import Path

import pytest

GOLDEN = Path(__file__).parents[1] / "golden"
SAMPLES = Path(__file__).parents[2] / "toolkit" / "assets" / "samples"


def _env() -> dict:
    import torch

    from toolkit.numerics import float_fingerprint
    from toolkit.text.engines import native_bf16

    return {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "native_bf16": native_bf16(), "float_fingerprint": float_fingerprint()}


LM = json.loads((GOLDEN / "lm_payloads.json").read_text())


def lm_payload_digest(case: dict) -> str:
    """SHA-256 over the lm codec's payloads of one case, each followed by ``|``."""
    from toolkit.codecs.lm import LMCodec, LMConfig

    data = (SAMPLES / case["sample"]).read_bytes()[: case["bytes"]]
    codec = LMCodec(LMConfig(**case["settings"]))
    chunks = [data[i : i + codec.chunk_size] for i in range(0, len(data), codec.chunk_size)]
    session = codec.open_encoder()
    h = hashlib.sha256()
    for b in range(0, len(chunks), codec.batch_chunks):
        for p in session.encode_chunks(chunks[b : b + codec.batch_chunks]):
            h.update((p or b"") + b"|")
    return h.hexdigest()


@pytest.mark.parametrize("case", LM["portable_cases"], ids=lambda c: f"{c['sample']}-int")
def test_integer_engine_payloads_are_the_same_everywhere(case):
    """Recorded once, on one machine: any other machine, thread count or CPU must give these bytes."""
    assert lm_payload_digest(case) == case["payloads_sha256"]


@pytest.mark.parametrize("index", range(len(LM["cases"])),
                         ids=[f"{c['sample']}-{c['settings']['dtype']}" for c in LM["cases"]])
@pytest.mark.slow
def test_lm_payloads_are_byte_identical(index):
    """Each machine's recording (by float fingerprint) holds on that machine."""
    env = _env()
    run = next((r for r in LM["runs"] if r["env"] == env), None)
    if run is None:
        pytest.skip(f"no payloads recorded for this machine's environment {env}")
    assert lm_payload_digest(LM["cases"][index]) == run["payloads_sha256"][index]


TKZ = json.loads((GOLDEN / "tkz_files.json").read_text())


@pytest.mark.parametrize("name", sorted(TKZ))
def test_committed_tkz_files_decode_byte_identically(name):
    """Files written by this format version keep decoding: classic ones anywhere, learned ones where their env is."""
    import toolkit

    blob = (GOLDEN / name).read_bytes()
    header = toolkit.info(blob)["header"]
    # Older files carry less env in their header than is known now (no float fingerprint);
    # the manifest adds where they were made.
    env = {**(header.get("env") or {}), **TKZ[name].get("env", {})}
    if env:
        from toolkit.codecs.registry import environment_mismatch, get_codec

        cls = get_codec(header["codec"])
        here = cls.from_header(header).environment()
        if environment_mismatch(env, here):
            pytest.skip(f"recorded where {env}; here {here}")
    data = toolkit.decompress(blob)
    assert len(data) == TKZ[name]["bytes"]
    assert hashlib.sha256(data).hexdigest() == TKZ[name]["original_sha256"]
