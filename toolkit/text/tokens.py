"""Tokenizers as the lm coder sees them: bytes in, ids out, and back, with an alphabet and a digest.

``ByteTokens`` wraps the toolkit's :class:`~toolkit.models.tokenizer.ByteTokenizer`,
on which every byte string round-trips; ``HFTokens`` wraps a Hugging Face
tokenizer, where a chunk is coded only if its text round-trips exactly.
``alphabet`` is the number of ids the coder may code, ``bos`` the id that
starts every stream, ``digest`` what the file header records.
"""

from __future__ import annotations

import hashlib
from typing import Any

__all__ = ["ByteTokens", "HFTokens"]


class ByteTokens:
    """The toolkit's ByteTokenizer: every byte string round-trips."""

    def __init__(self, tok: Any):
        self.tok = tok
        self.alphabet = tok.bos_id  # BOS is the last id and never coded
        self.bos = tok.bos_id
        self.digest = tok.sha256()

    def encode_batch(self, chunks: list[bytes]) -> list[list[int]]:
        return self.tok.encode_batch(chunks)

    def decode(self, ids: list[int]) -> bytes:
        return self.tok.decode(ids)


class HFTokens:
    """A Hugging Face tokenizer; a chunk is coded only if its text round-trips exactly."""

    def __init__(self, tok: Any):
        self.tok = tok
        self.alphabet = len(tok)
        bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        self.bos = int(bos) if bos is not None else 0
        self.digest = hashlib.sha256(tok.backend_tokenizer.to_str().encode()).hexdigest() \
            if getattr(tok, "backend_tokenizer", None) is not None else hashlib.sha256(
                repr(sorted(tok.get_vocab().items())).encode()).hexdigest()

    def encode_batch(self, chunks: list[bytes]) -> list[list[int] | None]:
        out: list[list[int] | None] = []
        for c in chunks:
            try:
                text = c.decode("utf-8")
            except UnicodeDecodeError:
                out.append(None)
                continue
            ids = self.tok(text, add_special_tokens=False)["input_ids"]
            back = self.tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
            out.append(list(ids) if back == text else None)
        return out

    def decode(self, ids: list[int]) -> bytes:
        return self.tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False).encode("utf-8")
