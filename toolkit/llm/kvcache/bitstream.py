"""KV bitstreams, CacheGen-style: a prompt's quantized KV cache as a header and an entropy-coded payload.

:func:`encode` quantizes a prefill's cache (:mod:`toolkit.llm.kvcache.quantize`)
and codes it; it returns a :class:`Bitstream`, the :class:`KVHeader` a reader
needs and the payload bytes. The ``kv`` codec (:mod:`toolkit.codecs.kv`) writes
the two as one .tkz file; :func:`decode` gives the cache back from them.

The codes are entropy-coded per (layer, kind, head) stream, by default with
zstd's static Huffman literal coder (:func:`toolkit.entropy.encode_bytes`:
about 2% above the entropy, and it decodes 50x faster than rANS, which is what
makes a reload beat a prefill), or with one static rANS table per stream
(:func:`toolkit.entropy.encode_iid`, ``coder="rans"``). Where the measured
entropy says so, a group of ``anchor_every`` tokens codes its first token as
is and the others as deltas from it (CacheGen's token locality).

Payload layout (integers little-endian; varints are LEB128)::

    section (per layer, keys before values):
        kept count varint | kept token gaps varint * count | kept float16[N, E, D]
        | mean float16[N, D] | step float16[N, D]
        per head n < N = batch * heads: 1 stream (plain) or 2 (anchors, deltas):
            zstd:  byte length varint | zstd frame of one byte per symbol
            rans:  frequency table (toolkit.entropy.tables) | byte length varint | ANS words

The header names the model by the SHA-256 of its weights; :func:`decode`
refuses a bitstream made with other weights. The payload is read through a
bounded reader, every count checked against the header, so damage is an
error rather than an allocation; damage that stays in range (a flipped bit in
a float16 value) only the container's checksums can see.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import numpy as np
import torch
from transformers.cache_utils import Cache, DynamicCache

from toolkit.entropy import decode_bytes, decode_iid, encode_bytes, encode_iid
from toolkit.entropy.tables import from_bytes, from_counts, to_bytes
from toolkit.entropy.varint import varint
from toolkit.errors import ConfigError, FormatError, ModelMismatchError
from toolkit.formats.binary import ByteReader
from toolkit.llm.kvcache.config import BitstreamConfig
from toolkit.llm.kvcache.header import DTYPES, KVHeader
from toolkit.llm.kvcache.quantize import (
    QuantizedTensor,
    cache_shape,
    cache_tensors,
    dequantize,
    k_max,
    quantize,
    rebuild,
)

__all__ = ["Bitstream", "decode", "encode", "model_fingerprint", "read_payload"]

TABLE_BITS = 16


class Bitstream(NamedTuple):
    """A stored cache: what a reader needs to know (``header``) and the coded tensors (``payload``)."""

    header: KVHeader
    payload: bytes


def model_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 of a model's weights (state dict in name order; see :func:`toolkit.models.lm.weights_sha256`).

    Hashing takes longer than decoding a small cache, so the digest is kept on
    the model, keyed by every tensor's storage address and version counter:
    any in-place change or replacement of a weight changes the key.
    """
    from toolkit.models.lm import weights_sha256

    state = model.state_dict()
    key = tuple((name, t.data_ptr(), t._version, tuple(t.shape), str(t.dtype)) for name, t in state.items())
    memo = getattr(model, "_toolkit_fingerprint", None)
    if memo is not None and memo[0] == key:
        return memo[1]
    digest = weights_sha256(model)
    model._toolkit_fingerprint = (key, digest)
    return digest


# --- anchors and deltas ---------------------------------------------------------------
def _entropy_bits(symbols: np.ndarray, alphabet: int) -> float:
    c = np.bincount(symbols.reshape(-1), minlength=alphabet).astype(np.float64)
    p = c[c > 0] / c.sum()
    return float(-(c[c > 0] * np.log2(p)).sum() + 16 * (c > 0).sum())


def _split(q: np.ndarray, alphabet: int, anchor: int) -> tuple[np.ndarray, np.ndarray]:
    """Anchor rows (every ``anchor``-th token) and the others' offsets from their anchor (shifted to >= 0)."""
    t = q.shape[0]
    idx = np.arange(t)
    base = q[(idx // anchor) * anchor].astype(np.int16)
    is_anchor = idx % anchor == 0
    delta = q.astype(np.int16) - base + (alphabet - 1)
    return q[is_anchor], delta[~is_anchor].astype(np.uint16)


def _join(anchors: np.ndarray, deltas: np.ndarray, t: int, d: int, alphabet: int, anchor: int) -> np.ndarray:
    idx = np.arange(t)
    is_anchor = idx % anchor == 0
    out = np.empty((t, d), dtype=np.int16)
    out[is_anchor] = anchors.reshape(-1, d)
    base = out[(idx // anchor) * anchor][~is_anchor]
    out[~is_anchor] = base + deltas.reshape(-1, d).astype(np.int16) - (alphabet - 1)
    if out.size and (out.min() < 0 or out.max() >= alphabet):
        raise FormatError("KV payload is damaged: a delta leaves the code range")
    return out.astype(np.uint8)


def _plan(q_heads: np.ndarray, alphabet: int, anchor: int) -> bool:
    """True where anchor-plus-delta coding measures smaller than plain codes for this tensor."""
    if anchor <= 1 or q_heads.shape[1] <= anchor:
        return False
    plain = sum(_entropy_bits(q, alphabet) for q in q_heads)
    delta = 0.0
    for q in q_heads:
        a, dlt = _split(q, alphabet, anchor)
        delta += _entropy_bits(a, alphabet) + _entropy_bits(dlt, 2 * alphabet - 1)
    return delta < plain


# --- streams ----------------------------------------------------------------------------
def _code_stream(symbols: np.ndarray, alphabet: int, coder: str) -> bytes:
    if coder == "zstd":
        coded = encode_bytes(symbols)
        return varint(len(coded)) + coded
    freqs = from_counts(np.bincount(symbols.reshape(-1), minlength=alphabet), TABLE_BITS)
    coded = encode_iid(symbols.reshape(-1), freqs)
    return to_bytes(freqs) + varint(len(coded)) + coded


def _read_stream(r: ByteReader, count: int, alphabet: int, coder: str) -> np.ndarray:
    if coder == "zstd":
        sym = decode_bytes(bytes(r.blob()), count)
        if sym.size and sym.max() >= alphabet:
            raise FormatError(f"{r.what} is damaged: a symbol is outside the alphabet")
        return sym
    freqs = from_bytes(r, alphabet, TABLE_BITS)
    if freqs.size != alphabet:
        raise FormatError(f"{r.what} is damaged: a table of {freqs.size} symbols, expected {alphabet}")
    sym = decode_iid(bytes(r.blob()), freqs, count)
    if sym.size and (freqs[sym] == 0).any():
        raise FormatError(f"{r.what} is damaged: a symbol has frequency 0")
    return sym


# --- encode and decode --------------------------------------------------------------------
def encode(cache: Cache, model: torch.nn.Module, config: BitstreamConfig | None = None,
           model_sha256: str | None = None) -> Bitstream:
    """A prefill's cache (a transformers ``DynamicCache``) as a header and payload for ``model``.

    ``model_sha256``: the model's :func:`model_fingerprint`, when the caller has it already.
    """
    cfg = config or BitstreamConfig()
    sha = model_sha256 or model_fingerprint(model)
    (b, h, t, d), dtype, layers = cache_shape(cache)
    dtype_name = str(dtype).removeprefix("torch.")
    if dtype_name not in DTYPES:
        raise ConfigError(f"cache dtype {dtype_name} is not one of {DTYPES}")
    alphabet = 2 * k_max(cfg) + 1
    deltas, sections = [], []
    for _, _, x, ratio in cache_tensors(cache, model, cfg):
        qz = quantize(x, ratio, cfg)
        delta = _plan(qz.symbols, alphabet, cfg.anchor_every)
        gaps = np.diff(qz.kept, prepend=-1) - 1  # ascending indices as gaps: small varints
        body = [varint(len(qz.kept)), b"".join(varint(int(g)) for g in gaps),
                qz.kept_values.numpy().tobytes(), qz.mean.numpy().tobytes(), qz.step.numpy().tobytes()]
        for qh in qz.symbols:
            if delta:
                a, dl = _split(qh, alphabet, cfg.anchor_every)
                body += [_code_stream(a, alphabet, cfg.coder), _code_stream(dl, 2 * alphabet - 1, cfg.coder)]
            else:
                body.append(_code_stream(qh, alphabet, cfg.coder))
        deltas.append(delta)
        sections.append(b"".join(body))
    header = KVHeader(model_sha256=sha, layers=layers, batch=b, heads=h, tokens=t, head_dim=d, dtype=dtype_name,
                      bitstream=cfg, deltas=tuple(deltas))
    return Bitstream(header, b"".join(sections))


def read_payload(header: KVHeader, payload: bytes) -> Iterator[QuantizedTensor]:
    """The quantized tensors of ``payload``, layer by layer, keys first, read as ``header`` describes them.

    Needs no model: the ``kv`` codec checks a payload this way before it
    frames it. Every count is bounded by the header and every length by the
    bytes left; a payload that ends early or goes on is a :class:`FormatError`.
    """
    cfg = header.bitstream
    _, _, t, d = header.shape
    n = header.batch * header.heads
    alphabet = 2 * k_max(cfg) + 1
    anchor = cfg.anchor_every
    r = ByteReader(payload, "KV payload")
    for delta in header.deltas:
        n_kept = r.varint(t)
        kept = np.cumsum([r.varint(t) + 1 for _ in range(n_kept)], dtype=np.int64) - 1
        if n_kept and kept[-1] >= t:
            raise FormatError("KV payload is damaged: a kept token is out of range")
        kept_values = torch.frombuffer(bytearray(r.take(2 * n * n_kept * d)), dtype=torch.float16)
        mean = torch.frombuffer(bytearray(r.take(2 * n * d)), dtype=torch.float16).reshape(n, d)
        step = torch.frombuffer(bytearray(r.take(2 * n * d)), dtype=torch.float16).reshape(n, d)
        body_t = t - n_kept
        n_anchor = (body_t + anchor - 1) // anchor
        q = np.empty((n, body_t, d), dtype=np.uint8)
        for j in range(n):
            if delta:
                a = _read_stream(r, n_anchor * d, alphabet, cfg.coder)
                dl = _read_stream(r, (body_t - n_anchor) * d, 2 * alphabet - 1, cfg.coder)
                q[j] = _join(a, dl, body_t, d, alphabet, anchor)
            else:
                q[j] = _read_stream(r, body_t * d, alphabet, cfg.coder).reshape(body_t, d)
        yield QuantizedTensor(kept, kept_values.reshape(n, n_kept, d), q, mean, step)
    r.done()


def decode(bitstream: Bitstream, model: torch.nn.Module, model_sha256: str | None = None) -> DynamicCache:
    """The ``DynamicCache`` that :func:`encode` stored; refused for a model with other weights.

    ``model_sha256``: the model's :func:`model_fingerprint`, when the caller has it already.
    """
    header, payload = bitstream
    if header.layers == 0:
        raise FormatError("the KV header describes no cache")
    want = model_sha256 or model_fingerprint(model)
    if header.model_sha256 != want:
        raise ModelMismatchError(f"this KV cache was made by the model with weights "
                                 f"{header.model_sha256[:12]}..., not this one ({want[:12]}...)")
    top = k_max(header.bitstream)
    parts = [dequantize(qz, header.tokens, top) for qz in read_payload(header, payload)]
    return rebuild(parts, header.shape, getattr(torch, header.dtype), model, header.bitstream)
