"""The ``kv`` codec: a .tkz file around a KV-cache bitstream (:mod:`toolkit.llm.kvcache.bitstream`).

The bitstream is already quantized and range-coded by the library, so the
codec's payload is the bitstream itself; what the container adds is what a
stored cache needs besides: a header that ``codec info`` shows (the model's
weights SHA-256, tokens, layers, quantization steps), per-chunk CRCs and the content digest.
``toolkit.llm.kvcache.save``/``load`` write and read these files;
``codec decompress`` gives back the raw bitstream. Input that is not a KV
bitstream is refused.
"""

from __future__ import annotations

from dataclasses import dataclass

from toolkit.codecs.registry import Codec, register_codec
from toolkit.errors import FormatError, ModelMismatchError, UnsupportedInputError

__all__ = ["KVCodec", "KVConfig"]


@dataclass
class KVConfig:
    model_sha256: str = ""
    tokens: int = 0
    layers: int = 0
    key_step: float = 0.0
    value_step: float = 0.0


@register_codec("kv")
class KVCodec(Codec):
    description = "KV-cache bitstreams of toolkit.llm.kvcache (already coded: framed, checked)"
    version = 1
    Config = KVConfig
    whole_file = True
    chunk_fallback = False

    def header_fields(self) -> dict:
        return {"model_sha256": self.config.model_sha256}

    def _check(self, data: bytes) -> None:
        from toolkit.llm.kvcache.bitstream import read_header

        try:
            head, _ = read_header(data)
        except FormatError as e:
            raise UnsupportedInputError(f"the kv codec takes KV-cache bitstreams only: {e}") from None
        if self.config.model_sha256 and head["model_sha256"] != self.config.model_sha256:
            raise ModelMismatchError("the bitstream's model differs from the model_sha256 setting")

    def encode_chunks(self, chunks: list[bytes]) -> list[bytes | None]:
        for c in chunks:
            self._check(c)
        return list(chunks)

    def decode_chunks(self, payloads, sizes, known):
        out = []
        for p, k in zip(payloads, known, strict=True):
            data = p if p is not None else k
            if data is None:
                raise FormatError("kv chunk has no payload")
            out.append(data)
        return out
