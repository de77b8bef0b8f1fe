import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from toolkit import entropy as E
from toolkit.errors import ConfigError


@pytest.mark.parametrize("total_bits", [12, 16, 24])
def test_freqs_fixed_total_and_floor(total_bits):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 300, generator=g) * 6
    logits[0] = -1e9  # degenerate but finite: every symbol tiny
    logits[1, 3] = 1e4  # one symbol takes everything
    f = E.logits_to_freqs(logits, total_bits)
    assert f.dtype == torch.int64
    assert torch.all(f.sum(-1) == 2**total_bits)
    assert int(f.min()) >= 1
    again = E.logits_to_freqs(logits.clone(), total_bits)
    assert torch.equal(f, again)


def test_probs_to_freqs_unnormalized_and_zero_rows():
    p = torch.tensor([[2.0, 2.0, 4.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    f = E.probs_to_freqs(p, 16)
    assert f.sum(-1).tolist() == [65536] * 3
    assert f[1].tolist() == sorted(f[1].tolist(), reverse=True)  # uniform; remainder to the first max
    assert int(f[1].max() - f[1].min()) <= 3
    assert f[2, 1] == 1 and f[2, 2] == 1
    assert abs(int(f[0, 2]) / 65536 - 0.5) < 1e-3


def test_freqs_rejects_bad_totals():
    with pytest.raises(ConfigError):
        E.logits_to_freqs(torch.zeros(2, 4), 30)
    with pytest.raises(ConfigError):
        E.logits_to_freqs(torch.zeros(2, 5000), 12)


def test_overhead_bound_against_ideal_cross_entropy():
    """Stated bound: coded size <= ideal cross-entropy * (1 + 0.5%) + 64 bits.

    The ideal is computed from the float probabilities; the loss comes from
    the 24-bit tables (floor of 1, rounding) and the coder's final flush.
    """
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(20000, 256, generator=g) * 2.5
    p = torch.softmax(logits, -1)
    sym = torch.multinomial(p, 1, generator=g).squeeze(-1)
    f = E.logits_to_freqs(logits)
    blob = E.encode_symbols(sym.numpy(), f)
    ideal = E.ideal_bits(p, sym)
    assert 8 * len(blob) <= ideal * 1.005 + 64
    assert 8 * len(blob) >= ideal * 0.98  # sanity: nothing beats the model by much
    assert np.array_equal(E.decode_symbols(blob, f), sym.numpy())


@settings(max_examples=40, deadline=None)
@given(
    k=st.integers(2, 40),
    n=st.integers(0, 60),
    seed=st.integers(0, 2**31 - 1),
    bits=st.sampled_from([10, 16, 24]),
)
def test_roundtrip_property(k, n, seed, bits):
    rng = np.random.default_rng(seed)
    logits = torch.from_numpy(rng.normal(size=(n, k)).astype(np.float32) * rng.uniform(0.1, 10))
    sym = rng.integers(0, k, size=n)
    f = E.logits_to_freqs(logits, bits)
    blob = E.encode_symbols(sym, f)
    assert np.array_equal(E.decode_symbols(blob, f), sym)


def test_many_streams_in_lockstep():
    g = torch.Generator().manual_seed(2)
    streams, lengths, k = 5, [0, 1, 17, 40, 33], 50
    syms, tables = [], []
    for n in lengths:
        lg = torch.randn(n, k, generator=g)
        tables.append(E.logits_to_freqs(lg))
        syms.append(torch.multinomial(torch.softmax(lg, -1), 1, generator=g).squeeze(-1).numpy()
                    if n else np.zeros(0, dtype=np.int64))
    blobs = E.encode_streams(syms, tables)
    dec = E.StreamDecoder(blobs)
    got = [[] for _ in range(streams)]
    for t in range(max(lengths)):
        active = [t < n for n in lengths]
        batch = torch.stack([tables[i][t] if active[i] else E.probs_to_freqs(torch.ones(k))
                             for i in range(streams)])
        out = dec.step(batch, active)
        for i in range(streams):
            if active[i]:
                got[i].append(int(out[i]))
            else:
                assert out[i] == -1
    for i in range(streams):
        assert got[i] == list(syms[i])


def test_symbol_out_of_range_is_an_error():
    f = E.probs_to_freqs(torch.ones(3, 4))
    with pytest.raises(ConfigError):
        E.encode_symbols([0, 4, 1], f)


def test_ideal_bits_matches_log2():
    p = torch.tensor([[0.5, 0.25, 0.25], [0.5, 0.25, 0.25]])
    assert math.isclose(E.ideal_bits(p, torch.tensor([0, 2])), 3.0)


def test_probs_to_table_equals_the_general_path():
    from toolkit.entropy import freqs_to_table, probs_to_freqs, probs_to_table

    g = torch.Generator().manual_seed(0)
    clean = torch.softmax(torch.randn(16, 4096, generator=g) * 6, dim=-1)
    clean[3] = 0.0
    clean[3, 7] = 1.0  # one certain symbol: the remainder lands on it
    clean[5] *= 3.0  # rows need not be normalised
    dirty = clean.clone()
    dirty[2, 11] = float("nan")
    dirty[4] = 0.0  # all zero: uniform
    dirty[6, 0] = -1.0
    for probs in (clean, dirty):
        want = freqs_to_table(probs_to_freqs(probs), 24)
        got = probs_to_table(probs)
        assert got.dtype == np.float64 and np.array_equal(got, want)
        assert np.allclose(got.sum(axis=-1), 1.0, atol=0)


def test_range_coder_is_one_interface_for_both_sides():
    """One loop, written once, encodes with an encoder and decodes the same symbols with a decoder."""
    rng = np.random.default_rng(0)
    freqs = E.probs_to_freqs(torch.rand(50, 7))
    tables = E.freqs_to_table(freqs, E.DEFAULT_TOTAL_BITS)
    symbols = rng.integers(0, 7, 50).tolist()

    def loop(coder, known):
        return [coder.code(tables[i : i + 1], None if known is None else known[i]) for i in range(len(tables))]

    enc = E.RangeCoder.encoder()
    assert loop(enc, symbols) == symbols
    data = enc.finish()
    dec = E.RangeCoder.decoder(data)
    assert loop(dec, None) == symbols
    assert data == E.encode_symbols(symbols, freqs)  # the same bytes as the one-shot encoder
    with pytest.raises(ConfigError):
        dec.finish()


def test_tables_accept_numpy_arrays():
    logits = np.array([[0.0, 1.0, 2.0], [3.0, 0.0, -1.0]], dtype=np.float32)
    assert torch.equal(E.logits_to_freqs(logits), E.logits_to_freqs(torch.from_numpy(logits)))
    assert torch.equal(E.probs_to_freqs(np.array([0.2, 0.8])), E.probs_to_freqs(torch.tensor([0.2, 0.8])))
    with pytest.raises(ConfigError):
        E.logits_to_freqs(np.array("not numbers"))
