"""Line-wrap transform: exact inverse on any bytes, and it joins what a greedy wrap broke."""

import textwrap

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from toolkit.errors import FormatError
from toolkit.text.transforms import (
    choose_width,
    forward,
    inverse,
    line_break,
    renumber,
    rewrap,
    unnumber,
    unwrap,
)

PROSE = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in "
    "want of a wife. However little known the feelings or views of such a man may be on his first entering "
    "a neighbourhood, this truth is so well fixed in the minds of the surrounding families, that he is "
    "considered as the rightful property of some one or other of their daughters. "
)


def _wrapped(width: int, indent: str = "", hang: str = "") -> bytes:
    paras = [textwrap.fill(PROSE * (1 + k % 3), width, initial_indent=indent, subsequent_indent=hang)
             for k in range(6)]
    return ("\n\n".join(paras) + "\n").encode()


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=400), st.integers(0, 40))
def test_rewrap_inverts_unwrap_on_any_bytes(data, width):
    text, side = unwrap(data, width=width or None, saved_bits=0)
    assert rewrap(text, side) == data


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from([b"a", b"bc", b"defgh", b" ", b"  ", b"\n", b"\n ", b"\n   ", b"\t", b"\r\n"]),
                max_size=120), st.integers(1, 30))
def test_rewrap_inverts_unwrap_on_wordy_text(parts, width):
    # words, spaces, breaks and indents in every order: the cases the transform acts on
    data = b"".join(parts)
    text, side = unwrap(data, width=width, saved_bits=0)
    assert rewrap(text, side) == data


@pytest.mark.parametrize("width,indent,hang", [(79, "", ""), (72, "   ", "   "), (60, "  ", ""), (70, "", "    ")])
def test_greedy_wrapped_text_is_joined_for_a_few_bits_per_break(width, indent, hang):
    data = _wrapped(width, indent, hang)
    assert choose_width(data) == width
    text, side = unwrap(data)
    breaks = data.count(b"\n") - text.count(b"\n")
    # every break inside a paragraph is joined; the blank lines between paragraphs stay
    assert text.count(b"\n\n") == 5 and breaks == data.count(b"\n") - 11
    assert len(text) == len(data) - breaks * len(hang)
    assert 8 * len(side) < 1.5 * breaks
    assert rewrap(text, side) == data


def test_text_without_wrapped_lines_is_left_alone():
    code = b"int main(void)\n{\n\treturn 0;\n}\n" * 50
    assert unwrap(code) == (code, b"")
    one_line = PROSE.encode() * 3
    assert unwrap(one_line) == (one_line, b"")


def test_damaged_side_data_is_a_format_error():
    data = _wrapped(79)
    text, side = unwrap(data)
    with pytest.raises(FormatError):
        rewrap(text, b"\x00" + side[1:])  # width 0
    with pytest.raises(FormatError):
        rewrap(text, side[:-1])  # not whole 32-bit words


def _verses(chapters: int = 3, verses: int = 40) -> bytes:
    words = PROSE.split()
    out = []
    for c in range(1, chapters + 1):
        out.append(f"Chapter {c}\n")
        for v in range(1, verses + 1):
            out.append(f"  {v} " + " ".join(words[(c * v) % 50 : (c * v) % 50 + 12]) + "\n")
        out.append("\n")
    return "".join(out).encode()


def test_line_numbers_that_count_on_are_dropped_and_restored():
    data = _verses()
    text, side = unnumber(data)
    assert b"  7 " not in text and b"  1 " not in text and b"Chapter 2" in text
    assert len(data) - len(text) == sum(len(f"{v} ") for v in range(1, 41)) * 3
    assert 0 < 8 * len(side) < 0.5 * 120  # well under a bit per verse
    assert renumber(text, side) == data
    # numbers that do not count on stay where they are
    odd = b"".join(b"  %d text\n" % v for v in (5, 9, 3, 7, 4, 10) * 10)
    assert unnumber(odd) == (odd, b"")


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from([b"1", b"2", b"3", b"12", b"0", b"01", b" ", b"  ", b"\n", b"\n  ", b"a", b"bc"]),
                max_size=120))
def test_renumber_inverts_unnumber(parts):
    data = b"".join(parts)
    text, side = unnumber(data, saved_bits=0)
    assert renumber(text, side) == data


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_inverse_inverts_forward_on_any_bytes(data):
    text, side = forward(data)
    assert inverse(text, side) == data


def test_forward_composes_both_transforms():
    wrapped = b"\n".join(textwrap.fill(line, 60, subsequent_indent="").encode() for line in
                         _verses(2, 30).decode().replace(" \n", "\n").split("\n"))
    text, side = forward(wrapped)
    assert side and text.count(b"\n") < wrapped.count(b"\n") and b"  5 " not in text
    assert inverse(text, side) == wrapped
    assert forward(wrapped, wrap=False, numbers=False) == (wrapped, b"")
    with pytest.raises(FormatError):
        inverse(text, b"\x7f" + side[1:])  # a wrap part longer than the side data


def test_varints_round_trip_and_refuse_overlong_input():
    from toolkit.entropy.varint import read_varint, varint

    for n in (0, 1, 127, 128, 300, 1 << 35):
        assert read_varint(varint(n) + b"tail") == (n, len(varint(n)))
    with pytest.raises(FormatError, match="side data"):
        read_varint(b"\x80" * 11, "side data")
    with pytest.raises(FormatError):
        read_varint(b"")


def test_damaged_side_data_never_crashes():
    import random

    data = _verses(3, 30).replace(b"\n  ", b" ", 20)
    data = b"\n".join(textwrap.fill(p, 50).encode() for p in data.decode().split("\n"))
    text, side = forward(data)
    assert side
    rnd = random.Random(0)
    for _ in range(400):
        bad = bytearray(side)
        for _ in range(rnd.randint(1, 3)):
            bad[rnd.randrange(len(bad))] = rnd.randrange(256)
        try:
            inverse(text, bytes(bad[: rnd.randint(0, len(bad))] if rnd.random() < 0.3 else bad))
        except FormatError:
            pass  # any other exception fails the test


def test_crlf_wrapped_text_is_joined_and_restored_with_crlf():
    data = _wrapped(72, "  ", "  ").replace(b"\n", b"\r\n")
    assert line_break(data) == b"\r\n" and choose_width(data) == 72
    text, side = unwrap(data)
    assert text.count(b"\r\n") == 11 and 8 * len(side) < 1.5 * (data.count(b"\r\n") - 11)
    assert rewrap(text, side) == data
    # a few bare line feeds inside CRLF text stay as they are
    mixed = data.replace(b"\r\n", b"\n", 3)
    assert rewrap(*unwrap(mixed)) == mixed


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from([b"ab", b"cdefg", b" ", b"\r\n", b"\r\n  ", b"\n", b"\r"]), max_size=120),
       st.integers(1, 30))
def test_rewrap_inverts_unwrap_on_crlf_text(parts, width):
    data = b"".join(parts)
    text, side = unwrap(data, width=width, saved_bits=0)
    assert rewrap(text, side) == data
