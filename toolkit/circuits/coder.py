"""Lossless coding of fixed-length records with a probabilistic circuit.

Every variable ``x_i`` (in the tree's depth-first order) is coded with the
conditional P(X_i = k | x_<i) = p(x_<i, X_i = k) / sum_k' p(x_<i, X_i = k'),
each term a marginal query with the variables after ``i`` missing.

Three ways to get those K joint values per variable (``method=``):

- **partial** (the paper's scheme): keep every edge-sum unit's value under the
  current evidence. Fixing ``x_i`` changes only the units whose scope holds
  X_i, i.e. the path from its tree node to the root. So for variable ``i``
  we put all K candidate values in the batch dimension at once and
  re-evaluate just that path (``depth(i)`` sum layers on ``[B*K, M]``); once
  the symbol is known, the path's values for it become the new cache. Work
  per record is ``sum_i depth(i)`` layers, O(log D) per variable on a
  balanced tree, instead of D layers.
- **context**: the same cache and the same path, but the K candidates are
  kept out of the path: a top-down pass computes the derivative of the root
  with respect to the variable's product units, and one ``M -> K`` layer
  gives all K joint values. Twice as many path steps, each K times smaller;
  faster when K is large.
- **naive**: a full upward pass over ``B*K`` records per variable, for speed
  comparison and as a cross-check.

All three compute the same numbers up to float rounding, but not bit for
bit, so the method is written into the stream and the decoder uses it.

Encoder and decoder run the identical computation (same method, same batch
composition, same shapes), so their float tables are bit-identical on the
same machine, build and device type (a CUDA circuit runs the Triton sum
layer, a CPU one the torch reference: decode where you encoded; on CPU,
1 and 2 torch threads were seen to agree); :func:`toolkit.entropy.logits_to_freqs` then
turns them into integer tables for the range coder. All records of a batch
share one range-coded stream, symbols interleaved variable-major, so the
decoder decodes one variable of the whole batch per call.

Stream layout (little-endian): magic ``PCR``, version u8, method u8,
total_bits u8, records u32, variables u16, categories u16, batch size u32,
then one u32 length per batch, then the batches' range-coded words.
"""

from __future__ import annotations

import math
import struct

import constriction
import numpy as np
import torch

from toolkit.circuits.circuit import Circuit
from toolkit.circuits.layers import input_layer, upward_pass
from toolkit.circuits.settings import MAX_BATCH, METHODS
from toolkit.entropy import (
    CATEGORICAL,
    DEFAULT_TOTAL_BITS,
    freqs_to_table,
    logits_to_freqs,
)
from toolkit.errors import ConfigError, FormatError, UnsupportedInputError
from toolkit.formats.binary import ByteReader
from toolkit.kernels.sum_layer import sum_layer

__all__ = ["encode_records", "decode_records", "model_bits", "METHODS"]

_MAGIC = b"PCR"
_VERSION = 1
_HEADER = struct.Struct("<3sBBBIHHI")


class _PartialState:
    """Cached edge-sum values of a batch under the evidence fixed so far."""

    def __init__(self, circuit: Circuit, batch: int, plan: list):
        s = circuit.structure
        d, m = s.num_vars, s.num_latents
        self.c, self.b = circuit, batch
        self.k, self.m = s.num_cats, m
        # Nothing observed yet: one record's values, copied to the batch, so
        # the cache does not depend on the batch size.
        lv0 = torch.zeros((1, d, m), dtype=torch.float32, device=circuit.leaf_logp.device)
        _, _, sums = upward_pass(circuit.plan, lv0, circuit.edge_logw, circuit.root_logw)
        self.sums = sums.expand(batch, d, m).clone()
        self.leafval = torch.zeros_like(self.sums)
        self.steps = plan
        self._path: list[tuple[int, torch.Tensor]] = []

    def logits(self, v: int) -> torch.Tensor:
        """``log p(x_<i, X_v = k)`` for all K candidates: ``[B, K]``."""
        b, k, m = self.b, self.k, self.m
        c = self.c
        kids, steps = self.steps[v]
        cur = c.leaf_logp[v].t()[None]  # [1, K, M]
        if kids.numel():
            cur = cur + self.sums[:, kids].sum(1)[:, None]
        cur = cur.expand(b, k, m)
        self._path = []
        below = v
        for a, others in steps:
            s = sum_layer(cur.reshape(b * k, 1, m), c.edge_logw[below : below + 1]).view(b, k, m)
            self._path.append((below, s))
            base = self.leafval[:, a]
            if others.numel():
                base = base + self.sums[:, others].sum(1)
            cur = base[:, None] + s
            below = a
        root = sum_layer(cur.reshape(b * k, 1, m), c.root_logw.view(1, 1, m))
        return root.view(b, k)

    def fix(self, v: int, sym: torch.Tensor) -> None:
        rows = torch.arange(self.b, device=sym.device)
        self.leafval[:, v] = self.c.leaf_logp[v][:, sym].t()
        for node, s in self._path:
            self.sums[:, node] = s[rows, sym]


class _ContextState:
    """Partial evaluation through a downward *context* pass: K-free along the path.

    The root is linear in each product unit of a tree circuit, so
    ``p(x_<i, X_v = k) = sum_m ctx_v[m] * rest_v[m] * P(X_v = k | Z_v = m)``
    with ``ctx_v[m] = d root / d prod_v[m]`` and ``rest_v`` the product of
    v's children's sums. ``ctx_v`` comes from a top-down walk of the same
    path, each step a sum layer with the edge's transposed weights. So every
    path step works on ``[B, M]`` rather than ``[B*K, M]``: the K categories
    enter only in the last, ``M -> K``, layer. Fixing ``x_v`` then updates the
    path's edge sums bottom-up, like :class:`_PartialState`.
    """

    def __init__(self, circuit: Circuit, batch: int, plan: list):
        s = circuit.structure
        d, m = s.num_vars, s.num_latents
        self.c, self.b, self.m = circuit, batch, m
        lv0 = torch.zeros((1, d, m), dtype=torch.float32, device=circuit.leaf_logp.device)
        _, _, sums = upward_pass(circuit.plan, lv0, circuit.edge_logw, circuit.root_logw)
        self.sums = sums.expand(batch, d, m).clone()
        self.leafval = torch.zeros_like(self.sums)
        self.steps = plan
        # out[m'] = log sum_m W[m, m'] exp(in[m]): the sum layer with W transposed.
        self.edge_t = circuit.edge_logw.transpose(1, 2).contiguous()
        self.leaf_t = circuit.leaf_logp.transpose(1, 2).contiguous()  # [D, K, M]

    def _rest(self, nodes: torch.Tensor) -> torch.Tensor | None:
        return self.sums[:, nodes].sum(1) if nodes.numel() else None

    def logits(self, v: int) -> torch.Tensor:
        b, m = self.b, self.m
        kids, steps = self.steps[v]
        below = ([v] + [a for a, _ in steps])[: len(steps)]  # the child under each step
        ctx = self.c.root_logw.expand(b, m)
        for (a, others), c in zip(reversed(steps), reversed(below), strict=True):
            x = ctx + self.leafval[:, a]
            rest = self._rest(others)
            if rest is not None:
                x = x + rest
            ctx = sum_layer(x[:, None], self.edge_t[c : c + 1]).view(b, m)
        rest = self._rest(kids)
        x = ctx if rest is None else ctx + rest
        return sum_layer(x[:, None], self.leaf_t[v : v + 1]).view(b, -1)

    def fix(self, v: int, sym: torch.Tensor) -> None:
        b, m = self.b, self.m
        kids, steps = self.steps[v]
        self.leafval[:, v] = self.c.leaf_logp[v][:, sym].t()
        prod = self.leafval[:, v]
        rest = self._rest(kids)
        if rest is not None:
            prod = prod + rest
        below = v
        for a, others in steps:
            s = sum_layer(prod[:, None], self.c.edge_logw[below : below + 1]).view(b, m)
            self.sums[:, below] = s
            prod = self.leafval[:, a] + s
            rest = self._rest(others)
            if rest is not None:
                prod = prod + rest
            below = a


class _NaiveState:
    """A full marginal query over ``B*K`` records per variable."""

    def __init__(self, circuit: Circuit, batch: int, plan: list):
        d = circuit.num_vars
        dev = circuit.leaf_logp.device
        self.c, self.b, self.k = circuit, batch, circuit.num_cats
        self.x = torch.zeros((batch, d), dtype=torch.long, device=dev)
        self.miss = torch.ones((batch, d), dtype=torch.bool, device=dev)

    def logits(self, v: int) -> torch.Tensor:
        b, k, d = self.b, self.k, self.c.num_vars
        xk = self.x[:, None].repeat(1, k, 1)
        xk[:, :, v] = torch.arange(k, device=xk.device)
        mk = self.miss[:, None].repeat(1, k, 1)
        mk[:, :, v] = False
        lv = input_layer(self.c.leaf_logp, xk.view(b * k, d), mk.view(b * k, d))
        ll, _, _ = upward_pass(self.c.plan, lv, self.c.edge_logw, self.c.root_logw)
        return ll.view(b, k)

    def fix(self, v: int, sym: torch.Tensor) -> None:
        self.x[:, v] = sym
        self.miss[:, v] = False


def _path_plan(circuit: Circuit) -> list[tuple[torch.Tensor, list[tuple[int, torch.Tensor]]]]:
    """Per variable: its children, and for each ancestor the ancestor's other children."""
    s = circuit.structure
    dev = circuit.leaf_logp.device

    def idx(vs: list[int]) -> torch.Tensor:
        return torch.tensor(vs, dtype=torch.long, device=dev)

    plan = []
    for v in range(s.num_vars):
        steps = []
        below, a = v, s.parent[v]
        while a >= 0:
            steps.append((a, idx([c for c in s.children[a] if c != below])))
            below, a = a, s.parent[a]
        plan.append((idx(list(s.children[v])), steps))
    return plan


_STATES = {"partial": _PartialState, "naive": _NaiveState, "context": _ContextState}


def _table(state, v: int, total_bits: int) -> np.ndarray:
    """Variable ``v``'s coding tables for the batch, ``float64 [B, K]``: made one way for both sides.

    Exact in float64 (integers below 2**24 over a power-of-two total), so the
    decoder hands constriction the very probabilities the encoder did.
    """
    return freqs_to_table(logits_to_freqs(state.logits(v).cpu(), total_bits))


def _check_records(circuit: Circuit, records: np.ndarray | torch.Tensor) -> np.ndarray:
    x = records.cpu().numpy() if isinstance(records, torch.Tensor) else np.asarray(records)
    if x.ndim != 2 or x.shape[1] != circuit.num_vars:
        raise UnsupportedInputError(
            f"records must have shape [N, {circuit.num_vars}], got {tuple(x.shape)}"
        )
    if x.size and (x.min() < 0 or x.max() >= circuit.num_cats):
        raise UnsupportedInputError(f"record values must lie in 0..{circuit.num_cats - 1}")
    return x.astype(np.int64)


def _check_method(method: str) -> None:
    if method not in _STATES:
        raise ConfigError(f"method must be one of {METHODS}, got {method!r}")


@torch.no_grad()
def encode_records(
    circuit: Circuit,
    records: np.ndarray | torch.Tensor,
    batch_size: int = 256,
    method: str = "context",
    total_bits: int = DEFAULT_TOTAL_BITS,
) -> bytes:
    """Code ``records[N, D]`` (values in ``0..K-1``, e.g. uint8) into bytes.

    ``batch_size`` and ``method`` change the float computation, so they are
    written into the stream and the decoder uses them. ``context`` is the
    default: the fastest of the three (about 2x ``partial`` at K=17, and the
    gap grows with K), with the same path-only re-evaluation.
    """
    _check_method(method)
    if not 1 <= batch_size <= MAX_BATCH:
        raise ConfigError(f"batch_size must be in 1..{MAX_BATCH}")
    x = _check_records(circuit, records)
    n, d = x.shape
    if n >= 2**32 or d >= 2**16 or circuit.num_cats >= 2**16:
        raise UnsupportedInputError("too many records, variables or categories")
    order = circuit.structure.order
    dev = circuit.leaf_logp.device
    plan = _path_plan(circuit)
    blobs = []
    for lo in range(0, n, batch_size):
        xb = torch.from_numpy(x[lo : lo + batch_size]).to(dev)
        state = _STATES[method](circuit, xb.shape[0], plan)
        # One variable's tables at a time: the range coder's queue appends, so
        # coding variable by variable writes the same words as one call over
        # all D*B tables would, without holding those [D*B, K] tables at once.
        enc = constriction.stream.queue.RangeEncoder()
        for v in order:
            enc.encode(x[lo : lo + batch_size, v].astype(np.int32), CATEGORICAL, _table(state, v, total_bits))
            state.fix(v, xb[:, v])
        blobs.append(enc.get_compressed().tobytes())
    head = _HEADER.pack(_MAGIC, _VERSION, METHODS.index(method), total_bits, n, d,
                        circuit.num_cats, batch_size)
    lengths = struct.pack(f"<{len(blobs)}I", *(len(b) for b in blobs))
    return head + lengths + b"".join(blobs)


@torch.no_grad()
def decode_records(
    circuit: Circuit,
    data: bytes,
    n: int | None = None,
    method: str | None = None,
    batch_size: int | None = None,
) -> np.ndarray:
    """Decode what :func:`encode_records` wrote: ``uint8`` (or wider) array ``[N, D]``.

    ``n``, ``method`` and ``batch_size``, when given, must match the stream; a
    caller that knows them from a checked header should pass them, since a
    damaged range-coded stream still decodes (to wrong symbols), and a
    damaged method byte could turn a quick decode into a naive one.
    """
    r = ByteReader(data, "PC stream")
    magic, version, meth, total_bits, count, d, k, batch = _HEADER.unpack(r.take(_HEADER.size))
    if magic != _MAGIC or version != _VERSION:
        raise FormatError("not a version-1 PC record stream")
    if meth >= len(METHODS) or not 8 <= total_bits <= 24 or not 1 <= batch <= MAX_BATCH:
        raise FormatError("bad PC stream settings")
    if n is not None and n != count:
        raise FormatError(f"stream holds {count} records, {n} expected")
    if method is not None and method != METHODS[meth]:
        raise FormatError(f"stream was coded with method {METHODS[meth]!r}, {method!r} expected")
    if batch_size is not None and batch_size != batch:
        raise FormatError(f"stream was coded in batches of {batch}, {batch_size} expected")
    if d != circuit.num_vars or k != circuit.num_cats:
        raise FormatError(
            f"stream is for {d} variables x {k} categories, the circuit has "
            f"{circuit.num_vars} x {circuit.num_cats}"
        )
    # one u32 per batch: the reader refuses a table longer than the stream before it is unpacked
    nb = -(-count // batch)
    lengths = struct.unpack(f"<{nb}I", r.take(4 * nb))
    if sum(lengths) != r.remaining or any(ln % 4 for ln in lengths):
        raise FormatError("PC stream lengths do not match its size")
    # A batch of records always codes to at least one word; empty batches would let a
    # few bytes claim any number of records.
    if 0 in lengths:
        raise FormatError("PC stream has an empty batch")
    order = circuit.structure.order
    dev = circuit.leaf_logp.device
    dtype = np.uint8 if k <= 256 else np.int64
    plan = _path_plan(circuit)
    # Filled batch by batch, so memory follows decoding progress rather than
    # a count read from the stream.
    parts = []
    for j, ln in enumerate(lengths):
        lo = j * batch
        bsz = min(batch, count - lo)
        words = np.frombuffer(r.take(ln), dtype=np.uint32).copy()
        dec = constriction.stream.queue.RangeDecoder(words)
        state = _STATES[METHODS[meth]](circuit, bsz, plan)
        part = np.zeros((bsz, d), dtype=dtype)
        for v in order:
            try:
                sym = np.asarray(dec.decode(CATEGORICAL, _table(state, v, total_bits)), dtype=np.int64)
            except Exception as exc:  # constriction reports damage as its own errors
                raise FormatError(f"damaged PC stream in batch {j}: {exc}") from exc
            part[:, v] = sym
            state.fix(v, torch.from_numpy(sym).to(dev))
        parts.append(part)
    return np.concatenate(parts) if parts else np.zeros((0, d), dtype=dtype)


@torch.no_grad()
def model_bits(circuit: Circuit, records: np.ndarray | torch.Tensor, batch_size: int = 1024) -> float:
    """The model's ideal code length ``-log2 p(records)`` in bits, summed over records."""
    x = _check_records(circuit, records)
    total = 0.0
    for lo in range(0, x.shape[0], batch_size):
        total += float(circuit.log_likelihood(x[lo : lo + batch_size]).double().sum())
    return -total / math.log(2)
