"""Interleaved rANS decoding on the GPU: one lane per thread, many segments per launch.

The weights codec's "max" segments are coded by :mod:`toolkit.entropy.lanes`
(a tensor kept coded in GPU memory decodes through :func:`decode_segments`,
:mod:`toolkit.weights.device`):
symbol ``i`` belongs to lane ``i % lanes`` and every lane is an independent
rANS stream (32-bit state, 16-bit words, tables of ``2**12``) whose context
``ctx[i]`` picks the table of each symbol. The CPU decodes lanes one after
another; a GPU runs one lane per thread, so a model's segments decode in one
launch instead of shipping the symbols from the host. The kernel takes a
batch of lanes from any number of segments (each lane carries its word range,
its first symbol, its segment's lane count and where its segment's tables
live in the concatenated arrays) and decodes them round by round.

Damaged data must not crash or hang a decoder: a lane that runs past its
words reads 0 instead, a context outside its segment's tables stops its lane,
and every lane reports a status that the host turns into
:class:`~toolkit.errors.FormatError`, with the CPU decoder's messages.

The reference is the numba decoder of :mod:`toolkit.entropy.lanes`; both
produce the same symbols bit for bit. ``table`` is
:func:`toolkit.entropy.lanes.decode_table` of the segment's frequencies and
``syms`` has their shape (every context that ``ctx`` uses must have a
non-empty table, as the codec's side data guarantees).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from toolkit.entropy.lanes import PRECISION, TOTAL, decode_words, split_stream
from toolkit.errors import ConfigError, FormatError
from toolkit.kernels.backend import dispatch

__all__ = ["decode_lanes", "decode_lanes_reference", "decode_lanes_triton", "decode_segments", "decode_segments_triton"]

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton ships with torch on Linux
    triton = None

#: one segment: (stream bytes, ctx[n], table[contexts, 4096], syms[contexts, width], lanes)
Segment = tuple[bytes, torch.Tensor, torch.Tensor, torch.Tensor, int]

# lane statuses written by the kernel
_OK, _DAMAGED, _NO_TABLE = 0, 1, 2
# lanes per program: one lane per thread, four warps
_BLOCK = 128


if triton is not None:

    @triton.jit
    def _rans_kernel(
        words_ptr, ctx_ptr, table_ptr, syms_ptr, out_ptr, status_ptr,
        wstart_ptr, wend_ptr, first_ptr, stride_ptr, count_ptr,
        tbase_ptr, contexts_ptr, sbase_ptr, width_ptr, n_lanes,
        PREC: tl.constexpr, BLOCK: tl.constexpr,
    ):
        lane = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        live = lane < n_lanes
        # the lane's words are words[ptr:end]; its symbols are out[first + r * stride] for r < count
        ptr = tl.load(wstart_ptr + lane, mask=live, other=0)
        end = tl.load(wend_ptr + lane, mask=live, other=0)
        first = tl.load(first_ptr + lane, mask=live, other=0)
        stride = tl.load(stride_ptr + lane, mask=live, other=0)
        count = tl.load(count_ptr + lane, mask=live, other=0)
        # its segment's tables: table[tbase + c * 4096 + slot] and syms[sbase + c * width + k], c < contexts
        tbase = tl.load(tbase_ptr + lane, mask=live, other=0)
        contexts = tl.load(contexts_ptr + lane, mask=live, other=0)
        sbase = tl.load(sbase_ptr + lane, mask=live, other=0)
        width = tl.load(width_ptr + lane, mask=live, other=0)

        # the initial state is the lane's first two words, high then low; words are u16 stored as int16
        has_state = live & (ptr + 2 <= end)
        hi = tl.load(words_ptr + ptr, mask=has_state, other=0).to(tl.int32) & 0xFFFF
        lo = tl.load(words_ptr + ptr + 1, mask=has_state, other=0).to(tl.int32) & 0xFFFF
        x = (hi.to(tl.uint32) << 16) | lo.to(tl.uint32)
        ptr = tl.where(has_state, ptr + 2, ptr)
        status = tl.where(live & (has_state == 0), 1, 0)
        count = tl.where(has_state, count, 0)

        # Rounds: every lane decodes its r-th symbol. uint32 arithmetic as on the CPU:
        # freq * (x >> 12) + offset < 2**32 for any state and a valid table, so nothing wraps.
        for r in range(0, tl.max(count, axis=0)):
            act = r < count
            i = first + r * stride
            c = tl.load(ctx_ptr + i, mask=act, other=0)
            # a context outside the segment's tables would read another segment's (or no) memory
            no_table = act & ((c < 0) | (c >= contexts))
            status = tl.where(no_table, 2, status)
            count = tl.where(no_table, 0, count)
            act = act & (no_table == 0)
            c64 = c.to(tl.int64)
            slot = (x & ((1 << PREC) - 1)).to(tl.int64)
            e = tl.load(table_ptr + tbase + c64 * (1 << PREC) + slot, mask=act, other=0).to(tl.uint32, bitcast=True)
            s = (((e >> 12) & 0xFFF) + 1) * (x >> PREC) + (e & 0xFFF)
            # renormalize: below 2**16 the state takes the next word; past the lane's words it takes 0,
            # and the end check below reports the damage
            need = act & (s < 65536)
            w = tl.load(words_ptr + ptr, mask=need & (ptr < end), other=0).to(tl.int32) & 0xFFFF
            x = tl.where(act, tl.where(need, (s << 16) | w.to(tl.uint32), s), x)
            ptr = tl.where(need, ptr + 1, ptr)
            k = (e >> 24).to(tl.int64)
            sym = tl.load(syms_ptr + sbase + c64 * width + k, mask=act, other=0)
            tl.store(out_ptr + i, sym, mask=act)

        # every lane ends in the encoder's initial state (2**16) having read exactly its words
        wrong_end = live & (status == 0) & ((x != 65536) | (ptr != end))
        status = tl.where(wrong_end, 1, status)
        tl.store(status_ptr + lane, status, mask=live)


def _check_shapes(ctx: torch.Tensor, table: torch.Tensor, syms: torch.Tensor) -> None:
    if table.ndim != 2 or table.shape[1] != TOTAL or syms.ndim != 2 or syms.shape[0] != table.shape[0]:
        raise ConfigError(f"want table[contexts, {TOTAL}] and syms[contexts, symbols], got "
                          f"{tuple(table.shape)} and {tuple(syms.shape)}")
    if ctx.dtype.is_floating_point or ctx.dtype.is_complex or ctx.dtype == torch.bool:
        raise ConfigError(f"contexts must be integers, got {ctx.dtype}")


def decode_lanes_reference(data: bytes, ctx: torch.Tensor, table: torch.Tensor, syms: torch.Tensor,
                           lanes: int = 64) -> torch.Tensor:
    """CPU reference: the numba decoder of :mod:`toolkit.entropy.lanes`; returns ``syms.dtype[ctx.numel()]``."""
    ctx, table, syms = torch.as_tensor(ctx), torch.as_tensor(table), torch.as_tensor(syms)
    _check_shapes(ctx, table, syms)
    counts, words = split_stream(data, lanes)
    c = ctx.detach().reshape(-1).cpu().numpy().astype(np.int64)
    if c.size and (c.min() < 0 or c.max() >= table.shape[0]):
        raise FormatError("a value's context has no table")
    tab = np.ascontiguousarray(table.detach().cpu().numpy()).view(np.uint32)
    sym = np.ascontiguousarray(syms.detach().cpu().numpy())
    ends = np.cumsum(counts)
    out = np.empty(c.size, dtype=sym.dtype)
    # uint16 contexts: the type lanes.decode_lanes passes, so numba reuses its compiled decoder
    if decode_words(words, ends - counts, ends, c.astype(np.uint16), tab, sym, out):
        raise FormatError("ANS-coded data is damaged")
    return torch.from_numpy(out).to(ctx.device)


def decode_segments_triton(segments: Sequence[Segment], device: torch.device | str | None = None) -> list[torch.Tensor]:
    """Decode every segment in one launch; segment ``k``'s symbols come back as ``syms.dtype[ctx.numel()]``.

    ``device`` defaults to the first segment's ``ctx`` device; tensors elsewhere are copied there.
    """
    if triton is None:
        raise RuntimeError("triton is not installed")
    if not segments:
        return []
    device = torch.device(device) if device is not None else torch.as_tensor(segments[0][1]).device
    words, ctxs, tables, syms_flat, sizes, dtypes, lane_cols = [], [], [], [], [], [], []
    n_words = n_syms = n_rows = n_entries = 0
    for data, ctx, table, syms, lanes in segments:
        ctx, table, syms = torch.as_tensor(ctx), torch.as_tensor(table), torch.as_tensor(syms)
        _check_shapes(ctx, table, syms)
        counts, w = split_stream(data, lanes)
        n = ctx.numel()
        lane = np.arange(lanes, dtype=np.int64)
        ends = n_words + np.cumsum(counts)
        full = np.full(lanes, 1, dtype=np.int64)
        # one row per kernel argument: wstart, wend, first, stride, count, tbase, contexts, sbase, width
        lane_cols.append(np.stack([
            ends - counts, ends, n_syms + lane, full * lanes, (n - lane + lanes - 1) // lanes,
            full * n_rows * TOTAL, full * table.shape[0], full * n_entries, full * syms.shape[1],
        ]))
        words.append(w.view(np.int16))
        ctxs.append(ctx.detach().reshape(-1).to(device, torch.int32))
        # the table's u32 entries travel as int32 bits
        tables.append(table.detach().to(device).contiguous().view(torch.int32).reshape(-1))
        syms_flat.append(syms.detach().reshape(-1).to(device, torch.int32))
        sizes.append(n)
        dtypes.append(syms.dtype)
        n_words += w.size
        n_syms += n
        n_rows += table.shape[0]
        n_entries += syms.numel()

    # one trailing word so the words tensor is never empty (every load of it is masked anyway)
    words_t = torch.from_numpy(np.concatenate(words + [np.zeros(1, np.int16)])).to(device)
    meta = torch.from_numpy(np.concatenate(lane_cols, axis=1)).to(device)
    n_lanes = meta.shape[1]
    out = torch.empty(n_syms, dtype=torch.int32, device=device)
    status = torch.empty(n_lanes, dtype=torch.int32, device=device)
    grid = (triton.cdiv(n_lanes, _BLOCK),)
    _rans_kernel[grid](words_t, torch.cat(ctxs), torch.cat(tables), torch.cat(syms_flat), out, status,
                       *meta, n_lanes, PREC=PRECISION, BLOCK=_BLOCK)
    worst = int(status.max())
    if worst == _NO_TABLE:
        raise FormatError("a value's context has no table")
    if worst == _DAMAGED:
        raise FormatError("ANS-coded data is damaged")
    return [part.to(dtype) for part, dtype in zip(out.split(sizes), dtypes, strict=True)]


def decode_lanes_triton(data: bytes, ctx: torch.Tensor, table: torch.Tensor, syms: torch.Tensor,
                        lanes: int = 64) -> torch.Tensor:
    """Triton path for one segment, on ``ctx``'s device: same contract as the reference."""
    return decode_segments_triton([(data, ctx, table, syms, lanes)])[0]


def decode_lanes(data: bytes, ctx: torch.Tensor, table: torch.Tensor, syms: torch.Tensor,
                 lanes: int = 64) -> torch.Tensor:
    """Decode ``ctx.numel()`` symbols of one segment: Triton for CUDA ``ctx``, the numba reference elsewhere."""
    # dispatch passes the tensor it decides on first; the stream bytes are not a tensor
    return dispatch(lambda c: decode_lanes_reference(data, c, table, syms, lanes),
                    lambda c: decode_lanes_triton(data, c, table, syms, lanes), ctx)


def decode_segments(segments: Sequence[Segment], device: torch.device | str | None = None) -> list[torch.Tensor]:
    """Decode every segment onto ``device`` (default: the first segment's ``ctx`` device): one Triton
    launch on CUDA, the numba reference segment by segment elsewhere."""
    if not segments:
        return []
    device = torch.device(device) if device is not None else torch.as_tensor(segments[0][1]).device
    if device.type == "cuda" and triton is not None:
        return decode_segments_triton(segments, device)
    return [decode_lanes_reference(data, torch.as_tensor(ctx).to(device), table, syms, lanes)
            for data, ctx, table, syms, lanes in segments]


# --- inputs for the interpreter tests (built in the child process by name) ---

def _example_coded(n: int, lanes: int, contexts: int, seed: int, dtype: str = "int32") -> tuple[Segment, np.ndarray]:
    """A segment coded as the weights codec codes one, and its symbols: skewed values, one table per context."""
    from toolkit.entropy.lanes import context_tables, decode_table, encode_lanes, symbol_index

    rng = np.random.default_rng(seed)
    alphabet = 40
    ctx = rng.integers(0, contexts, n).astype(np.uint16)
    # every context its own skewed (geometric) distribution over its own permutation of the alphabet
    sym = np.empty(n, dtype=np.int64)
    for c in range(contexts):
        at = ctx == c
        ranks = np.minimum(rng.geometric(0.15 + 0.5 * c / contexts, int(at.sum())) - 1, alphabet - 1)
        sym[at] = rng.permutation(alphabet)[ranks]
    counts = np.stack([np.bincount(sym[ctx == c], minlength=alphabet) for c in range(contexts)])
    counts[:, rng.integers(0, alphabet)] += 1  # no context without a table
    freq, syms = context_tables(counts)
    index = symbol_index(freq, syms, alphabet)
    data = encode_lanes(index[ctx, sym], ctx, freq, lanes)
    segment = (data, torch.from_numpy(ctx.astype(np.int64)), torch.from_numpy(decode_table(freq)),
               torch.from_numpy(syms.astype(np.int64)).to(getattr(torch, dtype)), lanes)
    return segment, sym


def _example_inputs(n: int = 1000, lanes: int = 3, contexts: int = 4, seed: int = 0, dtype: str = "int32"):
    return _example_coded(n, lanes, contexts, seed, dtype)[0], {}


def _example_batch(cases: list[list[int]]):
    """Several segments, each ``[n, lanes, contexts, seed]``, for the batched kernel and per-segment reference."""
    return ([_example_coded(*case)[0] for case in cases],), {}
