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


#: name -> (settings, sha256 of the payload), recorded before the pc refactors.
CASES = {
    "grey.png": ({},
        "6f6f4f578e056e61c84549c21ce3159bf2cf6d46aa9b19af973d8fcf987cbde3"),
    "rgb.png": ({},
        "2243ad173b7657dcb15cd088b3654649861eb75bf15bea8c79d2eb6eb046084d"),
    "rgb.png partial": ({"method": "partial", "batch": 7},
        "74fa73d16ab549ca6101b5f64df62b11130420bdf98ff3091142dc8a782350f6"),
    "records.npy": ({"model": "circuit", "batch": 16},
        "c32d46f1c0fecdf023d2a278bd13e5936e4ea522d2804d8e54363a41cf1d1843"),
    "records.npy partial": ({"model": "circuit", "method": "partial"},
        "0aed328836d326d98a3995112797aa453fbfb1d4bedc9fe221c4cabd686134dd"),
    "records.npy naive": ({"model": "circuit", "method": "naive", "batch": 9},
        "b8c2e00eb090a427be48153b01dee1636b38e924966f7e4165070ab817784f27"),
    "fortran.npy": ({"model": "circuit", "batch": 5},
        "1648c50c4973ae4686047fb01ec6a0b467a8f199ebe33a8c2d70b88fb7e6b754"),
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
    settings, want = CASES[name]
    data = _input(name)
    codec = _codec(settings)
    (payload,) = codec.open_encoder().encode_chunks([data])
    assert hashlib.sha256(payload).hexdigest() == want
    assert codec.open_decoder().decode_chunks([payload], [len(data)], [None]) == [data]
