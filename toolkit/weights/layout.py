"""Where the floats are in a checkpoint's bytes: safetensors, ``.npy``, and tar archives of them.

A :class:`Scanner` reads a file front to back, in pieces of any size, and
returns *spans* that cover every byte exactly once: runs of one tensor's
float values (with the dtype, the offset of the tensor's first value and
its row length, which the coder's contexts need) and runs of other bytes
(headers, integer and bool tensors, files in an archive that are not
checkpoints). Which span a byte falls in depends only on the bytes before
it, so the scanner never looks ahead or holds more than one header.

The top-level file must be a safetensors file, a ``.npy`` file, or a tar
archive; anything else, and a top-level header that lies (offsets out of
range, overlapping tensors, unknown dtypes, a file that ends early or goes
on after its data), is refused with :class:`~toolkit.errors.UnsupportedInputError`.
Inside a tar archive the scanner is lenient instead: a member that is not a
valid checkpoint is simply other bytes, since every span is coded
losslessly whatever it holds.

Tar: 512-byte headers (ustar, with base-256 sizes and pax ``size``
records), member data padded to 512 bytes, and anything after the
end-of-archive blocks as other bytes. ``.npy``: versions 1 to 3; little-endian
``f2``/``f4``/``f8`` data in C or Fortran order are floats (a Fortran-order
array's rows run along its first axis).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from toolkit.errors import UnsupportedInputError
from toolkit.formats import npy, tar
from toolkit.formats.safetensors import SNIFF_BYTES, header_size, is_safetensors
from toolkit.weights.checkpoint import DTYPE_BYTES, FLOAT_DTYPES, parse_header, row_length

__all__ = ["Span", "Scanner", "NPY_FLOATS"]

#: ``.npy`` descriptors coded as floats, by the safetensors name of their dtype
NPY_FLOATS = {"<f2": "F16", "<f4": "F32", "<f8": "F64"}
_SNIFF = SNIFF_BYTES  # a safetensors length and its "{"; also holds the npy magic and version


@dataclass(frozen=True)
class Span:
    """File bytes ``[begin, end)``: one float tensor's values (``dtype`` set) or other bytes (``dtype`` None)."""

    begin: int
    end: int
    dtype: str | None = None
    first: int = 0  # file offset of the tensor's first value
    row: int = 1  # values per row of the tensor

    @property
    def first_value(self) -> int:
        """Index in its tensor of the first whole value at or after ``begin``."""
        return -(-(self.begin - self.first) // DTYPE_BYTES[self.dtype])


# ----------------------------------------------------------------- states
# The scanner keeps a queue of what the coming bytes are. A _Collect state
# gathers a header (its bytes are other bytes as well) and, once complete,
# replaces itself with what the header announces.
@dataclass
class _Raw:
    end: int | None  # None: to the end of the file


@dataclass
class _Floats:
    end: int
    dtype: str
    first: int
    row: int


@dataclass
class _Collect:
    limit: int | None  # the header cannot run past this offset (its archive member's end)
    need: int
    done: Callable[[bytes, bool], list | int]  # (bytes, more may follow) -> states, or a larger need
    buf: bytearray


@dataclass
class _End:
    """Top level: no byte may follow."""

    what: str


class Scanner:
    """Spans of a checkpoint's bytes, fed in order (see the module docstring)."""

    def __init__(self):
        self.pos = 0
        self.archive = False  # a tar archive: lenient about where it ends
        self.queue: list = [_Collect(None, _SNIFF, self._top, bytearray())]

    # -------------------------------------------------------------- driving
    def feed(self, data: bytes) -> list[Span]:
        """The spans of the next ``len(data)`` bytes of the file."""
        out: list[Span] = []
        view = memoryview(data)
        at = 0
        while at < len(view):
            if not self.queue:
                self.queue.append(_Raw(None))
            state = self.queue[0]
            if isinstance(state, _End):
                raise UnsupportedInputError(f"invalid {state.what}: {len(view) - at:,} bytes after its data")
            if isinstance(state, _Collect):
                take = min(len(view) - at, state.need - len(state.buf))
                state.buf += view[at:at + take]
                self._emit(out, Span(self.pos, self.pos + take))
                at, self.pos = at + take, self.pos + take
                if len(state.buf) >= state.need:
                    self._complete(state, True)
                continue
            end = state.end if state.end is not None else self.pos + len(view) - at
            take = min(len(view) - at, end - self.pos)
            if take > 0:
                span = Span(self.pos, self.pos + take) if isinstance(state, _Raw) else \
                    Span(self.pos, self.pos + take, state.dtype, state.first, state.row)
                self._emit(out, span)
                at, self.pos = at + take, self.pos + take
            if state.end is not None and self.pos >= end:
                self.queue.pop(0)
        self._settle()
        return out

    def finish(self) -> None:
        """The file ended here: refuse a top-level checkpoint cut short (an archive may end anywhere)."""
        if self.pos == 0:
            return
        while self.queue:
            state = self.queue[0]
            if isinstance(state, _Collect):
                self._complete(state, False)
                continue
            if not self.archive and isinstance(state, _Raw | _Floats) and state.end is not None \
                    and state.end > self.pos:
                raise UnsupportedInputError(f"invalid checkpoint: its data runs to byte {state.end:,}, "
                                            f"the file ends at {self.pos:,}")
            self.queue.pop(0)

    @staticmethod
    def _emit(out: list[Span], span: Span) -> None:
        if span.end <= span.begin:
            return
        last = out[-1] if out else None
        if last is not None and last.dtype is None and span.dtype is None and last.end == span.begin:
            out[-1] = Span(last.begin, span.end)
        else:
            out.append(span)

    def _complete(self, state: _Collect, more: bool) -> None:
        """Hand a gathered header on; ``more``: bytes may still follow it."""
        got = state.done(bytes(state.buf), more)
        if isinstance(got, int):  # the header is longer than first thought
            begin = self.pos - len(state.buf)
            if state.limit is not None:
                got = min(got, state.limit - begin)
            if more and got > len(state.buf):
                state.need = got
                return
            got = state.done(bytes(state.buf), False)
        self.queue[0:1] = got

    def _settle(self) -> None:
        """Drop spans of zero bytes at the head of the queue (empty tensors)."""
        while self.queue:
            state = self.queue[0]
            if isinstance(state, _Raw | _Floats) and state.end is not None and state.end <= self.pos:
                self.queue.pop(0)
            else:
                return

    # -------------------------------------------------------------- formats
    def _top(self, head: bytes, more: bool) -> list | int:
        start = self.pos - len(head)
        if head.startswith(npy.NPY_MAGIC):
            return self._npy(head, more, start, None)
        if is_safetensors(head):
            return self._safetensors(head, more, start, None)
        if len(head) < tar.BLOCK and not more:
            raise UnsupportedInputError("not a safetensors, .npy or tar file")
        if len(head) < tar.BLOCK:
            return tar.BLOCK
        if not tar.is_tar(head):
            raise UnsupportedInputError("not a safetensors, .npy or tar file")
        # the first block is the archive's first member header: hand it to the tar reader
        self.archive = True
        return self._tar_header(head, True, start)

    def _safetensors(self, head: bytes, more: bool, start: int, end: int | None) -> list | int:
        strict = end is None
        try:
            need = header_size(head)
            if len(head) < need:
                if more:
                    return need
                raise UnsupportedInputError("not a safetensors file: it ends inside its header")
            header = parse_header(head[:need], None if strict else end - start)
        except UnsupportedInputError:
            if strict:
                raise
            return [_Raw(end)]
        states: list = []
        for t in header.tensors:
            b, e = start + t.begin, start + t.end
            states.append(_Floats(e, t.dtype, b, t.row) if t.dtype in FLOAT_DTYPES else _Raw(e))
        return states + [_End("safetensors file")] if strict else states + [_Raw(end)]

    def _npy(self, head: bytes, more: bool, start: int, end: int | None) -> list | int:
        strict = end is None
        try:
            states = self._npy_states(head, more, start)
        except UnsupportedInputError:
            if strict:
                raise
            return [_Raw(end)]
        if isinstance(states, int):
            return states
        if strict:
            return states + [_End(".npy file")]
        if any(st.end is None or st.end > end for st in states):
            return [_Raw(end)]  # an archive member cut short, or a header that lies: other bytes
        return states + [_Raw(end)]

    @staticmethod
    def _npy_states(head: bytes, more: bool, start: int) -> list | int:
        need = npy.header_size(head)
        if len(head) < need and more:
            return need
        header = npy.read_npy_header(head)
        data_start = start + header.length
        if header.dtype is None or header.dtype.hasobject:
            return [_Raw(None)]  # a structured dtype or pickled objects: other bytes to the end
        data_end = data_start + header.data_bytes
        dtype = NPY_FLOATS.get(header.descr)
        if dtype is None:
            return [_Raw(data_end)]
        shape = header.shape
        return [_Floats(data_end, dtype, data_start, row_length(shape[::-1] if header.fortran else shape))]

    # -------------------------------------------------------------- tar
    def _next_tar_header(self, at: int, pax_size: int | None = None) -> _Collect:
        return _Collect(None, tar.BLOCK, lambda b, c: self._tar_header(b, c, at, pax_size), bytearray())

    def _tar_header(self, block: bytes, more: bool, at: int, pax_size: int | None = None) -> list:
        header = tar.read_header(block)
        if header is None:
            return [_Raw(None)]  # the end-of-archive blocks (or a damaged archive): the rest as it is
        size = header.size if pax_size is None else pax_size
        data, padded = at + tar.BLOCK, at + tar.BLOCK + -(-size // tar.BLOCK) * tar.BLOCK
        after = self._next_tar_header(padded)
        if header.kind == b"x":  # a pax header for the next member, which may give its size
            def pax(raw: bytes, more: bool) -> list:
                return [_Raw(padded), self._next_tar_header(padded, tar.pax_size(raw))]
            return [_Collect(data + size, size, pax, bytearray())] if size else [after]
        if header.kind not in (b"0", b"\0", b"7") or size == 0:
            return [_Raw(padded), after]
        member_end = data + size
        sniff = _Collect(member_end, min(_SNIFF, size), lambda b, c: self._member(b, c, data, member_end),
                         bytearray())
        return [sniff, _Raw(padded), after]

    def _member(self, head: bytes, more: bool, start: int, end: int) -> list | int:
        if head.startswith(npy.NPY_MAGIC):
            return self._npy(head, more, start, end)
        if is_safetensors(head):
            return self._safetensors(head, more, start, end)
        return [_Raw(end)]

