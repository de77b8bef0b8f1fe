"""Byte-exact BPE tokenizer for the LM codec.

A lossless codec must turn ANY byte string into tokens and back to the same
bytes: invalid UTF-8, NUL, control bytes, random binary. Text tokenizers do
not promise that (normalizers, unknown tokens, decode-time cleanup), so this
one is built to make it true by construction:

* input bytes are decoded as latin-1, which maps each byte 0..255 to exactly
  one code point U+0000..U+00FF and back, with no failure case;
* the Hugging Face ``tokenizers`` BPE model is trained with all 256 of those
  characters in its initial alphabet, so no character is ever unknown (BPE
  silently drops characters it has no token for) and no normalizer is set;
* a GPT-2-style regex splits words, numbers, punctuation runs and whitespace
  before merging, so merges do not straddle word boundaries;
* decoding never goes through ``Tokenizer.decode`` (its decoders may alter
  text); it concatenates each token's own byte string from a table built from
  the vocabulary (the token's characters encoded back to latin-1).

The ByteLevel pre-tokenizer was avoided on purpose: applied to latin-1 text it
re-encodes bytes >= 0x80 as two UTF-8 bytes first, doubling the cost of every
non-ASCII byte before BPE sees it.

One id past the BPE vocabulary is reserved as ``bos_id``: it marks the start
of a document for the model and can never be produced by ``encode`` (it is not
in the ``tokenizers`` vocabulary, so no input text can match it).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

logger = logging.getLogger(__name__)

TOKENIZER_FILE = "tokenizer.json"
#: beside tokenizer.json: names it a ByteTokenizer, so loaders never guess a tokenizer from file names
MARKER_FILE = "toolkit.json"

#: GPT-2's split pattern (contractions, letter runs, digit runs, other runs,
#: whitespace) with an optional leading space kept on the following word.
SPLIT_PATTERN = (
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
)

#: Every byte as its latin-1 character: the BPE initial alphabet.
BYTE_ALPHABET = [chr(b) for b in range(256)]


class ByteTokenizer:
    """Maps any ``bytes`` to token ids and back, exactly.

    ``vocab_size`` counts the BPE tokens plus the reserved ``bos_id`` (the
    last id), so it is the size a model's embedding needs.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tok = tokenizer
        vocab = tokenizer.get_vocab()
        n = len(vocab)
        if sorted(vocab.values()) != list(range(n)):
            raise ValueError("tokenizer ids are not contiguous from 0")
        table: list[bytes] = [b""] * n
        for token, idx in vocab.items():
            table[idx] = token.encode("latin-1")
        missing = [b for b in range(256) if bytes([b]).decode("latin-1") not in vocab]
        if missing:
            raise ValueError(f"tokenizer cannot represent bytes {missing[:8]}...")
        self._table = table
        self.bos_id = n
        self.vocab_size = n + 1

    # -- coding ---------------------------------------------------------------
    def encode(self, data: bytes) -> list[int]:
        """Token ids of ``data`` (never containing ``bos_id``)."""
        if not data:
            return []
        return self._tok.encode(data.decode("latin-1"), add_special_tokens=False).ids

    def encode_batch(self, items: Sequence[bytes]) -> list[list[int]]:
        """``encode`` over many inputs, using the library's thread pool."""
        texts = [d.decode("latin-1") for d in items]
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> bytes:
        """Bytes of ``ids``; ``bos_id`` decodes to nothing, other unknown ids raise."""
        table = self._table
        out = []
        for i in ids:
            i = int(i)
            if i == self.bos_id:
                continue
            if not 0 <= i < len(table):
                raise ValueError(f"token id {i} outside vocabulary of {self.vocab_size}")
            out.append(table[i])
        return b"".join(out)

    def token_bytes(self, idx: int) -> bytes:
        """The byte string one token stands for."""
        return self._table[idx]

    # -- files ----------------------------------------------------------------
    def to_json(self) -> str:
        return self._tok.to_str()

    def save(self, directory: str | Path) -> Path:
        """Write ``tokenizer.json`` and the marker naming it a ByteTokenizer into ``directory``."""
        path = Path(directory) / TOKENIZER_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_json(), encoding="utf-8")
        (path.parent / MARKER_FILE).write_text(json.dumps({"tokenizer": "ByteTokenizer"}) + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: str | Path) -> ByteTokenizer:
        """Load from a directory holding ``tokenizer.json`` or from the file itself."""
        path = Path(path)
        if path.is_dir():
            path = path / TOKENIZER_FILE
        return cls(Tokenizer.from_file(str(path)))

    def sha256(self) -> str:
        """Digest of the canonical JSON text (what ``save`` writes), for headers."""
        return hashlib.sha256(self.to_json().encode("utf-8")).hexdigest()


def has_byte_tokenizer(directory: str | Path) -> bool:
    """True where ``directory``'s marker names its ``tokenizer.json`` a ByteTokenizer (loaders never guess)."""
    path = Path(directory) / MARKER_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("tokenizer") == "ByteTokenizer"
    except (OSError, ValueError, AttributeError):
        return False


def tokenizer_file_sha256(path: str | Path) -> str:
    """sha256 of a saved tokenizer file's bytes (a directory means its tokenizer.json)."""
    path = Path(path)
    if path.is_dir():
        path = path / TOKENIZER_FILE
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _empty_bpe() -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated")
    return tok


def train(
    texts: Iterable[bytes], vocab_size: int = 4096, min_frequency: int = 2
) -> ByteTokenizer:
    """Train a tokenizer whose ``vocab_size`` (BPE tokens + bos) is as given.

    ``texts`` are byte strings (documents or chunks of them); each is decoded
    as latin-1 so the merges are learned on exactly what ``encode`` will see.
    """
    if vocab_size < 258:
        raise ValueError("vocab_size must leave room for 256 bytes and bos")
    tok = _empty_bpe()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - 1,
        min_frequency=min_frequency,
        initial_alphabet=BYTE_ALPHABET,
        special_tokens=[],
        show_progress=False,
    )

    def as_text() -> Iterator[str]:
        for t in texts:
            yield t.decode("latin-1")

    tok.train_from_iterator(as_text(), trainer=trainer)
    bt = ByteTokenizer(tok)
    logger.info("trained tokenizer: %d ids (incl. bos)", bt.vocab_size)
    return bt


def chunks(data: bytes, size: int = 1 << 16) -> Iterator[bytes]:
    """Split ``data`` into pieces of about ``size`` bytes, cut after a newline.

    Cutting at line ends keeps the pre-tokenizer's word splits intact, so a
    chunked encode matches a whole-file encode except at rare long lines.
    """
    start = 0
    n = len(data)
    while start < n:
        end = min(n, start + size)
        if end < n:
            nl = data.rfind(b"\n", start, end)
            if nl > start:
                end = nl + 1
        yield data[start:end]
        start = end
