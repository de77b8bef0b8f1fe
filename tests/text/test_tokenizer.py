"""ByteTokenizer: any byte string must survive encode -> decode exactly."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from toolkit.models.lm import DEFAULT_LM_DIR
from toolkit.models.tokenizer import ByteTokenizer, chunks, tokenizer_file_sha256, train

TEXT = (
    b"The quick brown fox jumps over the lazy dog. It's the dog's day; they'll see.\n"
    b"def encode(self, data: bytes) -> list[int]:\n    return [b for b in data]\n"
    b"int main(void) { return 0; }\n\tindent\r\n  spaced   words  \n"
    + "caf\u00e9 na\u00efve \u2014 \u65e5\u672c\u8a9e \U0001f600\n".encode()
) * 40


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> ByteTokenizer:
    tok = train(chunks(TEXT, 512), vocab_size=330)
    path = tmp_path_factory.mktemp("tok")
    tok.save(path)
    # Round-trip through the file so the tests exercise the loading path too.
    return ByteTokenizer.load(path)


def test_tiny_vocab_and_merges(tiny: ByteTokenizer) -> None:
    assert tiny.vocab_size == 330
    assert tiny.bos_id == 329
    ids = tiny.encode(b"The quick brown fox")
    # Merges were learned: common words take far fewer tokens than bytes.
    assert len(ids) < len(b"The quick brown fox") / 2
    assert tiny.bos_id not in tiny.encode(TEXT)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_random_bytes_round_trip(tiny: ByteTokenizer, data: bytes) -> None:
    ids = tiny.encode(data)
    assert all(0 <= i < tiny.bos_id for i in ids)
    assert tiny.decode(ids) == data


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=300))
def test_unicode_text_round_trip(tiny: ByteTokenizer, text: str) -> None:
    data = text.encode("utf-8", errors="surrogatepass")
    assert tiny.decode(tiny.encode(data)) == data


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x00",
        b"\x00" * 1000,
        bytes(range(256)) * 3,
        b"\xff\xfe invalid \xc3\x28 utf8 \xed\xa0\x80",
        b" " * 5000 + b"\n" * 7,
        b"\r\n\r\n\t \x0c\x0b",
        TEXT,
    ],
)
def test_edge_cases_round_trip(tiny: ByteTokenizer, data: bytes) -> None:
    assert tiny.decode(tiny.encode(data)) == data


def test_every_token_has_nonempty_bytes(tiny: ByteTokenizer) -> None:
    # Each single byte is a token of its own, and no token is empty (an empty
    # token would make the codec's byte accounting wrong).
    for b in range(256):
        assert tiny.encode(bytes([b])) == [tiny.encode(bytes([b]))[0]]
        assert tiny.decode(tiny.encode(bytes([b]))) == bytes([b])
    assert all(tiny.token_bytes(i) for i in range(tiny.bos_id))


def test_decode_rejects_unknown_ids_and_skips_bos(tiny: ByteTokenizer) -> None:
    assert tiny.decode([tiny.bos_id, *tiny.encode(b"ab"), tiny.bos_id]) == b"ab"
    with pytest.raises(ValueError):
        tiny.decode([tiny.vocab_size])
    with pytest.raises(ValueError):
        tiny.decode([-1])


def test_save_load_hash_stable(tiny: ByteTokenizer, tmp_path) -> None:
    p1 = tiny.save(tmp_path / "a")
    again = ByteTokenizer.load(p1)
    p2 = again.save(tmp_path / "b")
    assert p1.read_bytes() == p2.read_bytes()
    assert tokenizer_file_sha256(p1) == tokenizer_file_sha256(tmp_path / "b") == tiny.sha256()
    assert again.encode(TEXT) == tiny.encode(TEXT)


def test_chunks_cover_input_exactly() -> None:
    data = b"line one\nline two\n" * 500 + b"no newline at end"
    parts = list(chunks(data, 100))
    assert b"".join(parts) == data
    assert all(len(p) <= 100 for p in parts)


shipped = pytest.mark.skipif(
    not (DEFAULT_LM_DIR / "tokenizer.json").exists(), reason="shipped tokenizer not built"
)


@shipped
@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=2000))
def test_shipped_tokenizer_random_bytes(data: bytes) -> None:
    tok = ByteTokenizer.load(DEFAULT_LM_DIR)
    assert tok.decode(tok.encode(data)) == data


@shipped
def test_shipped_tokenizer_text() -> None:
    tok = ByteTokenizer.load(DEFAULT_LM_DIR)
    assert tok.vocab_size == 4096
    text = (
        b"It was the best of times, it was the worst of times.\n"
        b"for (int i = 0; i < n; i++) { sum += a[i]; }\n"
        b"import os\nprint(os.path.join('a', 'b'))\n"
    ) * 20
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    # A trained 4k vocabulary covers English and code with multi-byte tokens (measured on the
    # held-out eval set: 2.32 bytes/token on C, 2.8 on prose; this mixed snippet gives 2.46).
    assert len(text) / len(ids) > 2.2
