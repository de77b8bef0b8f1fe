"""Line-wrap transform: exact inverse on any bytes, and it joins what a greedy wrap broke."""

import textwrap

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from toolkit.codecs.textform import choose_width, rewrap, unwrap
from toolkit.errors import FormatError

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
