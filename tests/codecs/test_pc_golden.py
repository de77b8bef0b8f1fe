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
from toolkit.numerics import float_fingerprint

torch.set_num_threads(1)

DATA = Path(__file__).parents[1] / "data" / "pc"


def _fortran_records() -> bytes:
    x = np.load(DATA / "records.npy", allow_pickle=False)
    buf = io.BytesIO()
    np.save(buf, np.asfortranarray(x.reshape(len(x), -1)), allow_pickle=False)
    return buf.getvalue()


#: name -> (settings, {float fingerprint: sha256 of the payload}), keyed by
#: toolkit.numerics.float_fingerprint(): recorded on an AMD EPYC, where ATen's AVX2 and AVX-512
#: kernels give the same payloads (the AVX-512 payloads of an Intel machine, recorded before
#: fingerprints, are not kept: no fingerprint tells where they hold).
CASES = {
    "grey.png": ({}, {
        "42737d322101cf3c": "ca79b3df7f0395fe54cf4bcced052f6761d9067718650bc7a72caf1941cefe19",
        "e8161ef30269544f": "ca79b3df7f0395fe54cf4bcced052f6761d9067718650bc7a72caf1941cefe19"}),
    "rgb.png": ({}, {
        "42737d322101cf3c": "f985922d947fad133d2b4ed97ae09c664540f6b4785ae46252be1431721cb410",
        "e8161ef30269544f": "f985922d947fad133d2b4ed97ae09c664540f6b4785ae46252be1431721cb410"}),
    "rgb.png partial": ({"method": "partial", "batch": 7}, {
        "42737d322101cf3c": "6b261471cb038fb69bf68234c79815f75f9352f2265265630122f186272c9102",
        "e8161ef30269544f": "6b261471cb038fb69bf68234c79815f75f9352f2265265630122f186272c9102"}),
    "records.npy": ({"model": "circuit", "batch": 16}, {
        "42737d322101cf3c": "cc3b2124d13830af0819a1fa0c2b8f06e3dccbecd02ef64e7391baf494b6abdf",
        "e8161ef30269544f": "cc3b2124d13830af0819a1fa0c2b8f06e3dccbecd02ef64e7391baf494b6abdf"}),
    "records.npy partial": ({"model": "circuit", "method": "partial"}, {
        "42737d322101cf3c": "326003e31b55526557c82e3f5e222c416bdf1436ac62f313953256cb4cc8848e",
        "e8161ef30269544f": "326003e31b55526557c82e3f5e222c416bdf1436ac62f313953256cb4cc8848e"}),
    "records.npy naive": ({"model": "circuit", "method": "naive", "batch": 9}, {
        "42737d322101cf3c": "d4ca44316e0491bc902715ba059e953f3e79a3086072ea4ce830659a15fac996",
        "e8161ef30269544f": "d4ca44316e0491bc902715ba059e953f3e79a3086072ea4ce830659a15fac996"}),
    "fortran.npy": ({"model": "circuit", "batch": 5}, {
        "42737d322101cf3c": "ba528b225b837fa0d350e2c133ab74408eb42d3a4d7430b234034be3f36171bf",
        "e8161ef30269544f": "ba528b225b837fa0d350e2c133ab74408eb42d3a4d7430b234034be3f36171bf"}),
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
    fingerprint = float_fingerprint()
    if fingerprint not in hashes:
        pytest.skip(f"no payload recorded for this machine's float fingerprint {fingerprint}")
    data = _input(name)
    codec = _codec(settings)
    (payload,) = codec.open_encoder().encode_chunks([data])
    assert hashlib.sha256(payload).hexdigest() == hashes[fingerprint]
    assert codec.open_decoder().decode_chunks([payload], [len(data)], [None]) == [data]
