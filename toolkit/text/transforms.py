"""Reversible text transforms that the LM codec applies before tokenizing.

Line wrapping. Prose, licences, man pages and mail are often hard-wrapped at
a fixed width: a line break falls wherever the next word would not fit. To a
language model over tokens such a break is costly twice: the break itself is
a guess (the model cannot count columns), and the word after it loses its
leading space, so it is tokenized unlike the same word mid-line (``"destroy"``
instead of ``" destroy"``) and the file's own statistics for it do not apply.

:func:`unwrap` joins wrapped lines: a break between two words, followed by
the line's indentation, becomes one space, if the next word would have
overflowed the wrap width ``L`` (found from the chunk itself) and it has a
letter or digit (a line that starts with bare punctuation, such as a
comment's ``*`` or a list's ``-``, starts something new). What the
decoder needs to put the breaks back is coded on the side: at each space
between two words where the next word overflows ``L`` and has a letter or
digit (the only places the encoder may have joined), one symbol says "a space", "a break with the
indent predicted" or "a break with this indent" (then the indent, in
spaces). Where the text was greedy-wrapped at ``L`` those symbols are nearly
certain, so they cost a few bytes per chunk; an adaptive model per context
(how far the word overflows, first line of a paragraph or not) learns the
file's habit otherwise. The predicted indent of a continuation line is that
of the line before, or for the second line of a paragraph the indent that
the last paragraph with the same first-line indent used (hanging indents,
numbered verses).

The encoder decides per chunk: the transform is used only where the side
symbols cost less than the breaks it removes would, at a conservative
estimate of what the model spends on each.

Wrap and indent symbols are range-coded with the same quantization as the
model's tables (:mod:`toolkit.entropy`); counts are small integers in
float64, so both sides compute identical probabilities.
"""

from __future__ import annotations

import re

import numpy as np

from toolkit import entropy
from toolkit.errors import FormatError
from toolkit.formats.binary import ByteReader, varint

__all__ = ["forward", "inverse", "unwrap", "rewrap", "choose_width", "line_break", "unnumber", "renumber"]

# per line-break style: a space between two words, or a line break (with the next line's indent in
# spaces) between two words; and a break alone
_CAND_ORIG = {b"\n": re.compile(rb"(?<=\S)(?: |\n( *))(?=\S)"), b"\r\n": re.compile(rb"(?<=\S)(?: |\r\n( *))(?=\S)")}
_BREAK = {b"\n": re.compile(rb"(?<=\S)\n( *)(?=\S)"), b"\r\n": re.compile(rb"(?<=\S)\r\n( *)(?=\S)")}
_CAND_TEXT = re.compile(rb"(?<=\S) (?=\S)")
_WORD = re.compile(rb"\S*")
# a word a wrapped line may start with; a line starting with bare punctuation (a comment's "*",
# a list's "-", a brace) starts something new
_JOINABLE = re.compile(rb"[0-9A-Za-z\x80-\xff]")
_SPACES = re.compile(rb" *")

#: overflow buckets 1..MAX_OVER (the word overflows the width by this much, capped) and 0 for a line
#: already longer than the width; times first-line-of-paragraph or not
MAX_OVER = 6
_CONTEXTS = 2 * (MAX_OVER + 1)
SPACE, BREAK_PRED, BREAK_INDENT = 0, 1, 2
MAX_INDENT = 255
MAX_WIDTH = 4096
#: narrower "wraps" are short lines of code or verse, whose breaks carry meaning the model reads
MIN_WIDTH = 40
#: what the encoder assumes the model spends on a break it removes, in bits (measured: 6-7 on wrapped
#: English prose and licences); the transform must save at least this much over its side symbols
SAVED_BITS_PER_BREAK = 4.0


class _Counts:
    """Adaptive symbol counts per context, turned into the coder's float64 rows."""

    def __init__(self, contexts: int, symbols: int, prior: float):
        self.c = np.full((contexts, symbols), prior, dtype=np.float64)

    def row(self, ctx: int) -> np.ndarray:
        c = self.c[ctx]
        return (c / c.sum())[None, :]

    def code(self, coder: entropy.RangeCoder, ctx: int, sym: int | None = None) -> int:
        """Code ``sym`` in context ``ctx`` (encoder) or decode one (decoder), then count it."""
        sym = coder.code(self.row(ctx), sym)
        self.c[ctx, sym] += 1.0
        return sym


def _decoder(words: bytes | memoryview, what: str) -> entropy.RangeCoder:
    if len(words) % 4:
        raise FormatError(f"{what} side data is not whole 32-bit words")
    return entropy.RangeCoder.decoder(words)


def _if_it_pays(data: bytes, out: list[bytes], last: int, side: bytes, removed: int,
                saved_bits: float, fixed_bits: int) -> tuple[bytes, bytes]:
    """``out`` + ``data[last:]`` and ``side``, if ``side`` (plus ``fixed_bits``) costs less than
    ``saved_bits`` per item ``removed``; else ``data`` as it is."""
    if not removed or (saved_bits and 8 * len(side) + fixed_bits >= saved_bits * removed):
        return data, b""
    out.append(data[last:])
    return b"".join(out), side


class _Lines:
    """What both sides know of the line being rebuilt: its indent, its paragraph's, first line or not."""

    def __init__(self, first_indent: int):
        self.hang: dict[int, int] = {}  # first-line indent -> indent the second line took last time
        self.new_paragraph(first_indent)

    def new_paragraph(self, indent: int) -> None:
        self.first, self.first_indent, self.indent = True, indent, indent

    def predicted(self) -> int:
        return self.hang.get(self.first_indent, self.first_indent) if self.first else self.indent

    def broke(self, indent: int) -> None:
        if self.first:
            self.hang[self.first_indent] = indent
        self.first, self.indent = False, indent


def _context(buf: bytes, start: int, col: int, width: int, first: bool) -> int | None:
    """The side symbol's context at a space before the word at ``buf[start:]``, or None where the
    encoder never joins (the word fits, or it is bare punctuation)."""
    end = _WORD.match(buf, start).end()
    over = col + 1 + end - start - width
    if over <= 0 or not _JOINABLE.search(buf, start, end):
        return None
    bucket = 0 if col >= width else min(over, MAX_OVER)
    return 2 * bucket + int(first)


def line_break(data: bytes) -> bytes:
    """The chunk's line-break style: CRLF where more than half its line feeds follow a CR."""
    return b"\r\n" if 2 * data.count(b"\r\n") > data.count(b"\n") else b"\n"


def choose_width(data: bytes, eol: bytes | None = None) -> int:
    """The wrap width most consistent with the chunk's breaks between words (0: none found).

    A break after a line of ``a`` bytes before a word of ``w`` bytes is a
    greedy wrap at any width in ``a .. a + w``; the width in ``MIN_WIDTH ..
    MAX_WIDTH`` inside the most such ranges wins (the smallest, on ties).
    """
    votes = np.zeros(MAX_WIDTH + 2, dtype=np.int64)
    found = False
    for m in _BREAK[eol or line_break(data)].finditer(data):
        p = m.start()
        a = p - (data.rfind(b"\n", 0, p) + 1)
        end = _WORD.match(data, m.end()).end()
        w = end - m.end()
        if a + w > MAX_WIDTH or a + w < MIN_WIDTH or not _JOINABLE.search(data, m.end(), end):
            continue
        votes[a] += 1
        votes[a + w + 1] -= 1
        found = True
    if not found:
        return 0
    return MIN_WIDTH + int(np.argmax(np.cumsum(votes)[MIN_WIDTH:]))


def unwrap(data: bytes, width: int | None = None,
           saved_bits: float = SAVED_BITS_PER_BREAK) -> tuple[bytes, bytes]:
    """``(text, side)``: ``data`` with its wrapped lines joined, and what :func:`rewrap` needs.

    Only breaks of the chunk's style (:func:`line_break`) are joined, and
    rebuilt as that style.
    ``width``: the wrap width (default: :func:`choose_width`). ``side`` is
    empty, and the text is ``data``, when joining does not pay: when the
    side data costs at least ``saved_bits`` per joined break (0: join
    whatever can be joined).
    """
    eol = line_break(data)
    if width is None:
        width = choose_width(data, eol)
    if not 1 <= width <= MAX_WIDTH:
        return data, b""
    wrap = _Counts(_CONTEXTS, 3, 0.4)
    indents = _Counts(1, MAX_INDENT + 1, 1.0 / 64)
    enc = entropy.RangeCoder.encoder()
    lines = _Lines(_SPACES.match(data, 0).end())
    line_start = 0
    out: list[bytes] = []
    last = 0  # data[last:] is not yet copied to out
    prev_end = 0
    joined = 0
    for m in _CAND_ORIG[eol].finditer(data):
        p = m.start()
        j = data.rfind(b"\n", prev_end, p)
        if j >= 0:  # a break the regex did not take: a new paragraph
            line_start = j + 1
            lines.new_paragraph(_SPACES.match(data, line_start).end() - line_start)
        prev_end = m.end()
        ctx = _context(data, m.end(), p - line_start, width, lines.first)
        indent = m.group(1)
        if indent is None:  # a space
            if ctx is not None:
                wrap.code(enc, ctx, SPACE)
            continue
        line_start = p + len(eol)
        if ctx is None or len(indent) > MAX_INDENT:  # a break kept as it is
            lines.new_paragraph(len(indent))
            continue
        sym = BREAK_PRED if len(indent) == lines.predicted() else BREAK_INDENT
        wrap.code(enc, ctx, sym)
        if sym == BREAK_INDENT:
            indents.code(enc, 0, len(indent))
        lines.broke(len(indent))
        out.append(data[last:p])
        out.append(b" ")
        last = m.end()
        joined += 1
    side = varint(2 * width + (eol == b"\r\n")) + enc.finish()
    return _if_it_pays(data, out, last, side, joined, saved_bits, 16)


def rewrap(text: bytes, side: bytes) -> bytes:
    """The inverse of :func:`unwrap`: ``rewrap(*unwrap(data)) == data`` for all bytes."""
    if not side:
        return text
    r = ByteReader(side, "line-wrap side data")
    code = r.varint(2 * MAX_WIDTH + 1)
    width, eol = code >> 1, b"\r\n" if code & 1 else b"\n"
    if not 1 <= width <= MAX_WIDTH:
        raise FormatError(f"line-wrap side data gives a width of {width}")
    dec = _decoder(r.take(r.remaining), "line-wrap")
    wrap = _Counts(_CONTEXTS, 3, 0.4)
    indents = _Counts(1, MAX_INDENT + 1, 1.0 / 64)
    lines = _Lines(_SPACES.match(text, 0).end())
    line_start, shift = 0, 0  # the rebuilt line's column at text position q is q - line_start + shift
    out: list[bytes] = []
    last = 0
    prev_end = 0
    try:
        for m in _CAND_TEXT.finditer(text):
            p = m.start()
            j = text.rfind(b"\n", prev_end, p)
            if j >= 0:
                line_start, shift = j + 1, 0
                lines.new_paragraph(_SPACES.match(text, line_start).end() - line_start)
            prev_end = m.end()
            ctx = _context(text, m.end(), p - line_start + shift, width, lines.first)
            if ctx is None:
                continue
            sym = wrap.code(dec, ctx)
            if sym == SPACE:
                continue
            if sym == BREAK_PRED:
                indent = lines.predicted()
            else:
                indent = indents.code(dec, 0)
            lines.broke(indent)
            out.append(text[last:p])
            out.append(eol + b" " * indent)
            last = m.end()
            line_start, shift = m.end(), indent
    except (ValueError, RuntimeError, AssertionError) as e:  # constriction on words no encoder wrote
        raise FormatError(f"line-wrap side data is damaged: {e}") from e
    out.append(text[last:])
    return b"".join(out)


# --------------------------------------------------------------------------- numbered lines
# a line that starts (after its indent of spaces) with a number and one space before a word
_NUMBERED = re.compile(rb"( *)(0|[1-9][0-9]{0,8}) (?=\S)")
_LINE = re.compile(rb"( *)(?=\S)")
NO_NUMBER, NEXT_NUMBER, FIRST_NUMBER = 0, 1, 2
#: what the model spends on a line number that counts on, at the least (measured: 5.5 bits on KJV verses)
SAVED_BITS_PER_NUMBER = 3.0


def _line_starts(text: bytes) -> list[int]:
    starts = [0]
    i = text.find(b"\n")
    while i >= 0:
        starts.append(i + 1)
        i = text.find(b"\n", i + 1)
    return starts


def unnumber(data: bytes, saved_bits: float = SAVED_BITS_PER_NUMBER) -> tuple[bytes, bytes]:
    """``(text, side)``: ``data`` without the line numbers that count on, and what :func:`renumber` needs.

    Verses, numbered paragraphs and listings number their lines ``1, 2, 3,
    ...``: something a small model cannot count. Where a line (spaces, then
    a word) starts with the number one more than the last line number, or
    with 1, the number and the space after it are dropped. One symbol per
    line that starts with spaces and a word (no number, the next number, 1)
    tells the decoder, coded with adaptive counts in the context of the last
    such line's symbol and of whether the line is indented. ``side`` is
    empty, and ``text`` is ``data``, when that does not save ``saved_bits``
    per number dropped (0: drop whatever can be dropped).
    """
    counts = _Counts(6, 3, 0.4)
    enc = entropy.RangeCoder.encoder()
    out: list[bytes] = []
    last, prev, sym_before, dropped = 0, -1, 0, 0
    for a in _line_starts(data):
        m = _LINE.match(data, a)
        if m is None:
            continue
        ctx = 2 * sym_before + int(m.end() > a)
        num = _NUMBERED.match(data, a)
        sym = NO_NUMBER
        if num is not None:
            digits = num.group(2)
            if digits == b"%d" % (prev + 1):
                sym = NEXT_NUMBER
            elif digits == b"1":
                sym = FIRST_NUMBER
            prev = int(digits)
        counts.code(enc, ctx, sym)
        sym_before = sym
        if sym != NO_NUMBER:
            out.append(data[last : num.start(2)])
            last = num.end()
            dropped += 1
    return _if_it_pays(data, out, last, enc.finish(), dropped, saved_bits, 8)


def renumber(text: bytes, side: bytes) -> bytes:
    """The inverse of :func:`unnumber`."""
    if not side:
        return text
    dec = _decoder(side, "line-number")
    counts = _Counts(6, 3, 0.4)
    out: list[bytes] = []
    last, prev, sym_before = 0, -1, 0
    try:
        for a in _line_starts(text):
            m = _LINE.match(text, a)
            if m is None:
                continue
            ctx = 2 * sym_before + int(m.end() > a)
            sym = counts.code(dec, ctx)
            sym_before = sym
            if sym == NO_NUMBER:
                num = _NUMBERED.match(text, a)
                if num is not None:
                    prev = int(num.group(2))
                continue
            prev = prev + 1 if sym == NEXT_NUMBER else 1
            out.append(text[last : m.end()])
            out.append(b"%d " % prev)
            last = m.end()
    except (ValueError, RuntimeError, AssertionError) as e:
        raise FormatError(f"line-number side data is damaged: {e}") from e
    out.append(text[last:])
    return b"".join(out)


# --------------------------------------------------------------------------- both
def forward(data: bytes, wrap: bool = True, numbers: bool = True) -> tuple[bytes, bytes]:
    """``(text, side)``: :func:`unwrap`, then :func:`unnumber`; ``side`` is empty when neither applies."""
    text, w = unwrap(data) if wrap else (data, b"")
    text, n = unnumber(text) if numbers else (text, b"")
    if not w and not n:
        return data, b""
    return text, varint(len(w)) + w + n


def inverse(text: bytes, side: bytes) -> bytes:
    """The inverse of :func:`forward`."""
    if not side:
        return text
    r = ByteReader(side, "text-transform side data")
    w = bytes(r.blob())
    return rewrap(renumber(text, bytes(r.take(r.remaining))), w)
