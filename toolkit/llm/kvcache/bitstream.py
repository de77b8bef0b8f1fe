"""KV bitstreams, CacheGen-style: a prompt's KV cache as bytes, reloaded without a prefill.

CacheGen (Liu et al., SIGCOMM 2024) stores a context's KV cache instead of its
text, because loading and decoding a compact cache can be faster than
recomputing it. Here a cache becomes:

* per layer, kind (keys, values) and head, uniform codes around each
  channel's mean with one step for the head: ``key_step``/``value_step``
  times the RMS of its channels' standard deviations (the entropy coder makes
  the step, not a bit width, the knob);
* keys taken back before their rotary embedding, where a channel keeps one
  offset for all tokens instead of rotating with position (KVQuant's
  observation), and rotated again after decoding;
* outlying tokens in float16: the first ``sink_tokens`` and any token with a
  channel more than ``outlier_sd`` standard deviations from its mean
  (attention sinks: a document's first token, some punctuation), whose
  states would stretch every statistic;
* codes entropy-coded per (layer, kind, head) stream, by default with zstd's
  static Huffman literal coder (:func:`toolkit.entropy.encode_bytes`: about 2%
  above the entropy, and it decodes 50x faster than rANS, which is what makes
  a reload beat a prefill), or with one static rANS table per stream
  (:func:`toolkit.entropy.encode_iid`, ``coder="rans"``); where the measured entropy says so, a
  group of ``anchor_every`` tokens codes its first token as is and the others
  as deltas from it (CacheGen's token locality).

:func:`lossy` applies exactly the quantization to a cache, so a test can
check that a decoded bitstream continues generation with the same tokens as
the lossy cache. The cache must hold positions ``0..T-1`` (a prefill from the
start of a sequence).

Byte layout (integers little-endian; varints are LEB128)::

    magic b"TKKV" | version u8 = 1 | header length u32 | header JSON | sections
    section (per layer, keys before values):
        kept count varint | kept token gaps varint * count | kept float16[N, E, D]
        | mean float16[N, D] | step float16[N, D]
        per head n < N = batch * heads: 1 stream (plain) or 2 (anchors, deltas):
            zstd:  byte length varint | zstd frame of one byte per symbol
            rans:  alphabet varint | frequency varint * alphabet (sum 2**16) | byte length varint | ANS words

The header names the model by the SHA-256 of its weights; :func:`decode`
refuses a bitstream made with other weights.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass

import numpy as np
import torch
from transformers.cache_utils import Cache, DynamicCache

from toolkit.entropy import decode_bytes, decode_iid, encode_bytes, encode_iid
from toolkit.entropy.tables import from_counts
from toolkit.entropy.varint import read_varint, varint
from toolkit.errors import ConfigError, FormatError, ModelMismatchError
from toolkit.llm.kvcache.config import BitstreamConfig

__all__ = ["MAGIC", "decode", "encode", "lossy", "model_fingerprint"]

MAGIC = b"TKKV"
VERSION = 1
TABLE_BITS = 16
_MAX_HEADER = 1 << 20
_MAX_LAYERS = 1024
_MAX_TOKENS = 1 << 20
_MAX_HEADS = 1 << 12
_MAX_HEAD_DIM = 1 << 12
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


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


def _layers(cache: Cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    out = []
    for i, layer in enumerate(cache.layers):
        k, v = layer.keys, layer.values
        if not isinstance(k, torch.Tensor) or k.ndim != 4 or k.shape != v.shape:
            raise ConfigError(f"layer {i} of the cache holds no full-precision keys and values "
                              "(encode a DynamicCache from a prefill)")
        out.append((k, v))
    if not out:
        raise ConfigError("the cache is empty: run a prefill first")
    shape = out[0][0].shape
    for i, (k, _) in enumerate(out):
        if k.shape != shape:
            raise ConfigError(f"layer {i} has shape {tuple(k.shape)}, layer 0 {tuple(shape)}")
    return out


def _rotary(model: torch.nn.Module, t: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos, sin [1, T, D]`` of the model's rotary embedding at positions ``0..T-1``."""
    inner = getattr(model, "model", model)
    rope = getattr(inner, "rotary_emb", None)
    if rope is None:
        raise ConfigError("the model has no rotary_emb: encode with pre_rope=False")
    cos, sin = rope(like, torch.arange(t, device=like.device)[None])
    return cos.float(), sin.float()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat([-x[..., h:], x[..., :h]], dim=-1)


@dataclass
class _Quantized:
    """One section: float16 exception tokens, uniform codes of the others, per-channel statistics."""

    kept: np.ndarray  # int64 token indices stored in float16, ascending
    kept_values: torch.Tensor  # float16 [N, E, D]
    symbols: np.ndarray  # uint8 [N, T - E, D], in [0, 2K]
    mean: torch.Tensor  # float16 [N, D]
    step: torch.Tensor  # float16 [N, D]


def _quantize(x: torch.Tensor, ratio: float, cfg: BitstreamConfig) -> _Quantized:
    """``x[N, T, D]`` float32: outlying tokens apart, the rest on a uniform grid of ``ratio`` x the head's RMS std.

    A token is kept in float16 when it is one of the first ``sink_tokens`` or
    when any of its channels, in any head, lies more than ``outlier_sd``
    standard deviations from the channel's mean (attention sinks: a document's
    first token, some punctuation). The statistics are then taken without them.
    """
    n, t, d = x.shape
    k_max = _k_max(cfg)
    forced = torch.zeros(t, dtype=torch.bool)
    forced[:min(cfg.sink_tokens, t)] = True
    keep = forced.clone()
    if cfg.outlier_sd > 0 and t > 1:
        rest = x[:, ~keep]
        mu, sd = rest.mean(1, keepdim=True), rest.std(1, unbiased=False, keepdim=True).clamp_min(1e-12)
        z = ((x - mu) / sd).abs().amax(dim=(0, 2))
        keep |= z > cfg.outlier_sd
    body = x[:, ~keep]
    if body.shape[1]:
        mean = body.mean(1).to(torch.float16)
        # One step for all channels of a head: for a squared error summed over
        # channels, equal steps give the least error for the bits (high-rate
        # theory), where a step per channel would spend bits on quiet channels.
        sd = body.std(1, unbiased=False).pow(2).mean(1, keepdim=True).sqrt()
        step = (ratio * sd).expand(n, d).to(torch.float16)
    else:
        mean = torch.zeros(n, d, dtype=torch.float16)
        step = torch.ones(n, d, dtype=torch.float16)
    step = torch.where(step > 0, step, torch.ones_like(step))
    q = torch.round((body - mean.float()[:, None]) / step.float()[:, None]).clamp(-k_max, k_max)
    return _Quantized(kept=torch.nonzero(keep)[:, 0].numpy(), kept_values=x[:, keep].to(torch.float16),
                      symbols=(q + k_max).to(torch.uint8).numpy(), mean=mean, step=step)


def _dequantize(qz: _Quantized, t: int, k_max: int) -> torch.Tensor:
    n, _, d = qz.symbols.shape
    out = torch.empty(n, t, d, dtype=torch.float32)
    keep = torch.zeros(t, dtype=torch.bool)
    keep[torch.from_numpy(qz.kept)] = True
    out[:, ~keep] = ((torch.from_numpy(qz.symbols).to(torch.float32) - k_max) * qz.step.float()[:, None]
                     + qz.mean.float()[:, None])
    out[:, keep] = qz.kept_values.float()
    return out


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
        raise FormatError("KV bitstream is damaged: a delta leaves the code range")
    return out.astype(np.uint8)


def _code_stream(symbols: np.ndarray, alphabet: int, coder: str) -> bytes:
    if coder == "zstd":
        coded = encode_bytes(symbols)
        return varint(len(coded)) + coded
    counts = np.bincount(symbols.reshape(-1), minlength=alphabet)
    freqs = from_counts(counts, TABLE_BITS)
    coded = encode_iid(symbols.reshape(-1), freqs)
    return (varint(alphabet) + b"".join(varint(int(f)) for f in freqs)
            + varint(len(coded)) + coded)


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


def _tensors(cache: Cache, model: torch.nn.Module, cfg: BitstreamConfig):
    """(layer, kind, float32 tensor[N, T, D] as quantized, step ratio) over the cache, keys first."""
    layers = _layers(cache)
    b, h, t, d = layers[0][0].shape
    rope = _rotary(model, t, layers[0][0]) if cfg.pre_rope else None
    for i, (k, v) in enumerate(layers):
        kf = k.float()
        if rope is not None:  # undo k_rot = k cos + rotate_half(k) sin
            cos, sin = rope[0][:, None], rope[1][:, None]
            kf = kf * cos - _rotate_half(kf) * sin
        yield i, "k", kf.reshape(b * h, t, d), cfg.key_step
        yield i, "v", v.float().reshape(b * h, t, d), cfg.value_step


def _rebuild(parts: list[torch.Tensor], shape, dtype, model, cfg: BitstreamConfig) -> DynamicCache:
    """Decoded float32 ``[N, T, D]`` tensors (layer by layer, keys first) back into a cache."""
    b, h, t, d = shape
    rope = _rotary(model, t, parts[0]) if cfg.pre_rope else None
    out = DynamicCache()
    for i in range(len(parts) // 2):
        k = parts[2 * i].reshape(b, h, t, d)
        if rope is not None:
            cos, sin = rope[0][:, None], rope[1][:, None]
            k = k * cos + _rotate_half(k) * sin
        out.update(k.to(dtype), parts[2 * i + 1].reshape(b, h, t, d).to(dtype), i)
    return out


def _k_max(cfg: BitstreamConfig) -> int:
    return (1 << (cfg.code_bits - 1)) - 1


def lossy(cache: Cache, model: torch.nn.Module, config: BitstreamConfig | None = None) -> DynamicCache:
    """The cache that :func:`decode` of :func:`encode` gives back, without making the bytes."""
    cfg = config or BitstreamConfig()
    layers = _layers(cache)
    k_max, t = _k_max(cfg), layers[0][0].shape[2]
    parts = [_dequantize(_quantize(x, ratio, cfg), t, k_max) for _, _, x, ratio in _tensors(cache, model, cfg)]
    return _rebuild(parts, layers[0][0].shape, layers[0][0].dtype, model, cfg)


def encode(cache: Cache, model: torch.nn.Module, config: BitstreamConfig | None = None,
           model_sha256: str | None = None) -> bytes:
    """A prefill's cache (a transformers ``DynamicCache``) as a bitstream for ``model``.

    ``model_sha256``: the model's :func:`model_fingerprint`, when the caller has it already.
    """
    cfg = config or BitstreamConfig()
    sha = model_sha256 or model_fingerprint(model)
    layers = _layers(cache)
    b, h, t, d = layers[0][0].shape
    dtype = str(layers[0][0].dtype).removeprefix("torch.")
    if dtype not in _DTYPES:
        raise ConfigError(f"cache dtype {dtype} is not one of {sorted(_DTYPES)}")
    k_max = _k_max(cfg)
    alphabet = 2 * k_max + 1
    entries, sections = [], []
    for i, kind, x, ratio in _tensors(cache, model, cfg):
        qz = _quantize(x, ratio, cfg)
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
        entries.append({"layer": i, "kind": kind, "delta": delta})
        sections.append(b"".join(body))
    header = json.dumps({
        "model_sha256": sha, "layers": len(layers), "batch": b, "heads": h, "tokens": t,
        "head_dim": d, "dtype": dtype, "config": cfg.to_dict(), "entries": entries,
    }, separators=(",", ":")).encode()
    return MAGIC + bytes([VERSION]) + struct.pack("<I", len(header)) + header + b"".join(sections)


class _Reader:
    def __init__(self, data: bytes, pos: int) -> None:
        self.mv, self.pos = memoryview(data), pos

    def take(self, n: int, what: str) -> memoryview:
        if n < 0 or self.pos + n > len(self.mv):
            raise FormatError(f"KV bitstream is truncated ({what})")
        out = self.mv[self.pos:self.pos + n]
        self.pos += n
        return out

    def varint(self, what: str) -> int:
        value, used = read_varint(self.mv[self.pos:self.pos + 10], f"KV bitstream {what}")
        self.pos += used
        return value


def read_header(data: bytes) -> tuple[dict, int]:
    """The bitstream's header and where its sections start; validated before anything is allocated."""
    if len(data) < 9 or data[:4] != MAGIC:
        raise FormatError("not a KV bitstream (bad magic)")
    if data[4] != VERSION:
        raise FormatError(f"KV bitstream version {data[4]} is not supported (this reads {VERSION})")
    (n,) = struct.unpack_from("<I", data, 5)
    if n > _MAX_HEADER or 9 + n > len(data):
        raise FormatError("KV bitstream header length is out of range")
    try:
        head = json.loads(bytes(data[9:9 + n]))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"KV bitstream header is damaged ({e})") from None
    limits = {"layers": _MAX_LAYERS, "batch": _MAX_HEADS, "heads": _MAX_HEADS, "tokens": _MAX_TOKENS,
              "head_dim": _MAX_HEAD_DIM}
    if not isinstance(head, dict):
        raise FormatError("KV bitstream header is not an object")
    for key, top in limits.items():
        v = head.get(key)
        if not isinstance(v, int) or not 1 <= v <= top:
            raise FormatError(f"KV bitstream header field {key!r} is missing or out of range")
    if head.get("dtype") not in _DTYPES or not isinstance(head.get("model_sha256"), str):
        raise FormatError("KV bitstream header names no dtype or model")
    entries = head.get("entries")
    if not isinstance(entries, list) or len(entries) != 2 * head["layers"]:
        raise FormatError("KV bitstream header lists the wrong number of tensors")
    for j, e in enumerate(entries):
        if (not isinstance(e, dict) or e.get("layer") != j // 2 or e.get("kind") != "kv"[j % 2]
                or not isinstance(e.get("delta"), bool)):
            raise FormatError(f"KV bitstream header entry {j} is damaged")
    try:
        cfg = BitstreamConfig(**head.get("config", {}))
    except (TypeError, ConfigError) as e:
        raise FormatError(f"KV bitstream header config is damaged ({e})") from None
    head["config"] = cfg
    return head, 9 + n


def _read_stream(r: _Reader, count: int, alphabet: int, coder: str) -> np.ndarray:
    if coder == "zstd":
        sym = decode_bytes(bytes(r.take(r.varint("stream length"), "stream")), count)
        if sym.size and sym.max() >= alphabet:
            raise FormatError("KV bitstream is damaged (a symbol is outside the alphabet)")
        return sym
    k = r.varint("alphabet")
    if k != alphabet:
        raise FormatError(f"KV bitstream is damaged (alphabet {k}, expected {alphabet})")
    freqs = np.array([r.varint("frequency") for _ in range(k)], dtype=np.int64)
    if freqs.sum() != 1 << TABLE_BITS:
        raise FormatError("KV bitstream is damaged (a frequency table does not sum to 2**16)")
    n = r.varint("stream length")
    blob = bytes(r.take(n, "stream"))
    sym = decode_iid(blob, freqs, count)
    if sym.size and (freqs[sym] == 0).any():
        raise FormatError("KV bitstream is damaged (a symbol has frequency 0)")
    return sym


def decode(data: bytes, model: torch.nn.Module, model_sha256: str | None = None) -> DynamicCache:
    """A ``DynamicCache`` from :func:`encode`'s bytes; refuses a bitstream of other weights.

    ``model_sha256``: the model's :func:`model_fingerprint`, when the caller has it already.
    """
    head, pos = read_header(data)
    want = model_sha256 or model_fingerprint(model)
    if head["model_sha256"] != want:
        raise ModelMismatchError(f"this KV bitstream was made by the model with weights "
                                 f"{head['model_sha256'][:12]}..., not this one ({want[:12]}...)")
    cfg: BitstreamConfig = head["config"]
    b, h, t, d = head["batch"], head["heads"], head["tokens"], head["head_dim"]
    n = b * h
    k_max = _k_max(cfg)
    alphabet = 2 * k_max + 1
    anchor = cfg.anchor_every
    r = _Reader(data, pos)
    parts: list[torch.Tensor] = []
    for e in head["entries"]:
        n_kept = r.varint("kept tokens")
        if n_kept > t:
            raise FormatError("KV bitstream is damaged (more kept tokens than tokens)")
        kept = np.cumsum([r.varint("kept token") + 1 for _ in range(n_kept)], dtype=np.int64) - 1
        if n_kept and kept[-1] >= t:
            raise FormatError("KV bitstream is damaged (a kept token is out of range)")
        kept_values = torch.frombuffer(bytearray(r.take(2 * n * n_kept * d, "kept tokens")),
                                       dtype=torch.float16).reshape(n, n_kept, d)
        body_t = t - n_kept
        n_anchor = (body_t + anchor - 1) // anchor
        mean = torch.frombuffer(bytearray(r.take(2 * n * d, "mean")), dtype=torch.float16).reshape(n, d)
        step = torch.frombuffer(bytearray(r.take(2 * n * d, "step")), dtype=torch.float16).reshape(n, d)
        q = np.empty((n, body_t, d), dtype=np.uint8)
        for j in range(n):
            if e["delta"]:
                a = _read_stream(r, n_anchor * d, alphabet, cfg.coder)
                dl = _read_stream(r, (body_t - n_anchor) * d, 2 * alphabet - 1, cfg.coder)
                q[j] = _join(a, dl, body_t, d, alphabet, anchor)
            else:
                q[j] = _read_stream(r, body_t * d, alphabet, cfg.coder).reshape(body_t, d)
        parts.append(_dequantize(_Quantized(kept, kept_values, q, mean, step), t, k_max))
    if r.pos != len(data):
        raise FormatError(f"KV bitstream has {len(data) - r.pos} trailing bytes")
    return _rebuild(parts, (b, h, t, d), _DTYPES[head["dtype"]], model, cfg)
