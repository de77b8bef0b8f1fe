"""The pc codec's payloads stay byte-identical across refactors (same machine and build).

The inputs are committed under ``tests/data/pc``: two small PNG crops of
scikit-image photos (grey and RGB, sizes not multiples of the patch) coded
with the shipped patch model, and a ``.npy`` record set coded with a small
seeded circuit. The expected SHA-256s are of the codec payload (not of a
``.tkz`` file, whose container format may change). The learned coder's
floats are exact only on one machine and build, so a new platform may need
these hashes regenerated (each case also checks that its payload decodes).
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
import pytest
import torch

from toolkit.codecs.pc import PCCodec, PCConfig

torch.set_num_threads(1)

DATA = Path(__file__).parent / "data" / "pc"


def _fortran_records() -> bytes:
    x = np.load(DATA / "records.npy", allow_pickle=False)
    buf = io.BytesIO()
    np.save(buf, np.asfortranarray(x.reshape(len(x), -1)), allow_pickle=False)
    return buf.getvalue()


#: name -> (settings, {CPU capability: sha256 of the payload}); AVX512 recorded before the pc
#: refactors, AVX2 on an AMD EPYC machine with the same torch build.
CASES = {
    "grey.png": ({}, {
        "AVX512": "6f6f4f578e056e61c84549c21ce3159bf2cf6d46aa9b19af973d8fcf987cbde3",
        "AVX2": "ca79b3df7f0395fe54cf4bcced052f6761d9067718650bc7a72caf1941cefe19"}),
    "rgb.png": ({}, {
        "AVX512": "2243ad173b7657dcb15cd088b3654649861eb75bf15bea8c79d2eb6eb046084d",
        "AVX2": "f985922d947fad133d2b4ed97ae09c664540f6b4785ae46252be1431721cb410"}),
    "rgb.png partial": ({"method": "partial", "batch": 7}, {
        "AVX512": "74fa73d16ab549ca6101b5f64df62b11130420bdf98ff3091142dc8a782350f6",
        "AVX2": "6b261471cb038fb69bf68234c79815f75f9352f2265265630122f186272c9102"}),
    "records.npy": ({"model": "circuit", "batch": 16}, {
        "AVX512": "c32d46f1c0fecdf023d2a278bd13e5936e4ea522d2804d8e54363a41cf1d1843",
        "AVX2": "cc3b2124d13830af0819a1fa0c2b8f06e3dccbecd02ef64e7391baf494b6abdf"}),
    "records.npy partial": ({"model": "circuit", "method": "partial"}, {
        "AVX512": "0aed328836d326d98a3995112797aa453fbfb1d4bedc9fe221c4cabd686134dd",
        "AVX2": "326003e31b55526557c82e3f5e222c416bdf1436ac62f313953256cb4cc8848e"}),
    "records.npy naive": ({"model": "circuit", "method": "naive", "batch": 9}, {
        "AVX512": "b8c2e00eb090a427be48153b01dee1636b38e924966f7e4165070ab817784f27",
        "AVX2": "d4ca44316e0491bc902715ba059e953f3e79a3086072ea4ce830659a15fac996"}),
    "fortran.npy": ({"model": "circuit", "batch": 5}, {
        "AVX512": "1648c50c4973ae4686047fb01ec6a0b467a8f199ebe33a8c2d70b88fb7e6b754",
        "AVX2": "ba528b225b837fa0d350e2c133ab74408eb42d3a4d7430b234034be3f36171bf"}),
}


def _input(name: str) -> bytes:
    file = name.split()[0]
    return _fortran_records() if file == "fortran.npy" else (DATA / file).read_bytes()


def _codec(settings: dict) -> PCCodec:
    s = dict(settings)
    if "model" in s:
        s["model"] = str(DATA / s["model"])
    return PCCodec(PCConfig(**s))


@pytest.mark.parametrize("name", CASES)
def test_golden_payload(name):
    settings, hashes = CASES[name]
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in hashes:
        pytest.skip(f"no payload recorded for CPU capability {capability}")
    data = _input(name)
    codec = _codec(settings)
    (payload,) = codec.open_encoder().encode_chunks([data])
    assert hashlib.sha256(payload).hexdigest() == hashes[capability]
    assert codec.open_decoder().decode_chunks([payload], [len(data)], [None]) == [data]
