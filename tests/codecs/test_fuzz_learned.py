"""Damaged lm and pc files with valid framing: the mutation passes every CRC and reaches the payload parsers."""

import random
from pathlib import Path

import pytest
from conftest import TINY_CORPUS
from tkz_tools import mutate_payloads

import toolkit
from toolkit.errors import ToolkitError

PNG = Path(__file__).parents[1] / "data" / "pc" / "grey.png"


def _mutator(rng: random.Random):
    def mutate(index: int, payload: bytes) -> bytes:
        p = bytearray(payload)
        kind = rng.randrange(3)
        if kind == 0 and p:
            for _ in range(rng.randint(1, 3)):
                p[rng.randrange(len(p))] ^= 1 << rng.randrange(8)
        elif kind == 1:
            p = p[: rng.randrange(len(p) + 1)]
        else:
            p[rng.randrange(len(p) + 1) : 0] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 5)))
        return bytes(p)

    return mutate


@pytest.mark.parametrize("kind", ["lm", "pc"])
def test_damaged_payloads_behind_valid_crcs_give_toolkit_errors(kind, tiny_lm):
    if kind == "lm":
        data = TINY_CORPUS * 3
        blob = toolkit.compress(data, codec="lm", model=str(tiny_lm), segment=256, streams=3, window=24, keep=8)
    else:
        data = PNG.read_bytes()
        blob = toolkit.compress(data, codec="pc")
    rng = random.Random(1)
    caught = 0
    for _ in range(25):
        damaged = mutate_payloads(blob, _mutator(rng))
        if damaged == blob:
            continue
        try:
            out = toolkit.decompress(damaged)
        except ToolkitError:
            caught += 1
            continue
        assert out == data  # anything that decodes passed the content digest
    assert caught > 0
