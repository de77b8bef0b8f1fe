"""The ``kv`` codec: a stored KV cache as one .tkz file, and :func:`save` / :func:`load` to write and read one.

:func:`toolkit.llm.kvcache.encode` gives a header (:class:`~toolkit.llm.kvcache.KVHeader`:
model, shape, dtype, settings) and a payload that is already quantized and
entropy-coded. The codec's config *is* that header, so it goes into the .tkz
header as JSON (``codec info`` shows it), and the payload is the file's one
chunk, under the container's CRC and content digest. The JSON header has no
checksum of its own in the container, so the codec adds ``config_crc32``: a
damaged header is refused instead of read as another cache.

``codec compress --codec kv`` takes a payload with its header as settings and
refuses anything else (the payload is parsed against the header first);
``codec decompress`` gives the payload back. Files of the codec's version 1
(a bitstream with its own header inside the payload) are refused with a
message that says to store the cache again.
"""

from __future__ import annotations

import io
import json
import os
import zlib
from pathlib import Path
from typing import TYPE_CHECKING

from toolkit.codecs.container import MAX_CHUNK, read_info, read_stream, write_stream
from toolkit.codecs.registry import Codec, check_decode_settings, register_codec
from toolkit.errors import ChecksumError, ConfigError, FormatError, InputError, UnsupportedInputError
from toolkit.llm.kvcache.config import BitstreamConfig
from toolkit.llm.kvcache.header import KVHeader

if TYPE_CHECKING:  # torch and transformers load only when a cache is saved or loaded
    import torch
    from transformers.cache_utils import Cache, DynamicCache

__all__ = ["KVCodec", "load", "save"]


def _config_crc32(config: dict) -> int:
    """CRC-32 of the header's config in the container's own JSON form (sorted keys, no spaces)."""
    return zlib.crc32(json.dumps(config, sort_keys=True, separators=(",", ":")).encode())


@register_codec("kv")
class KVCodec(Codec):
    description = "stored KV caches of toolkit.llm.kvcache (already coded: framed, checked)"
    version = 2
    reads_versions = (1,)  # only to refuse them with a message of their own
    Config = KVHeader
    whole_file = True
    chunk_fallback = False

    @classmethod
    def from_header(cls, header: dict, local: dict[str, str] | None = None) -> KVCodec:
        if header.get("codec_version") == 1:
            raise FormatError("this KV cache was stored by an older toolkit (kv codec version 1, its header inside "
                              "the payload); this build reads version 2: store the cache again")
        check_decode_settings(cls, local)
        if header["chunk_size"] != MAX_CHUNK or header["batch_chunks"] != 1:
            # a whole-file codec's framing is fixed: anything else is a damaged header
            raise FormatError(f"kv header: framing of {header['batch_chunks']} chunk(s) of {header['chunk_size']} "
                              f"bytes, where a stored cache is one chunk of at most {MAX_CHUNK}")
        config = header["config"]
        if header.get("config_crc32") != _config_crc32(config):
            raise ChecksumError("kv header: CRC mismatch (header damaged)")
        try:
            return cls(KVHeader.from_dict(config))
        except ConfigError as e:
            raise FormatError(f"kv header: {e}") from None

    def header_fields(self) -> dict:
        return {"config_crc32": _config_crc32(self.config_dict())}

    def encode_chunks(self, chunks: list[bytes]) -> list[bytes | None]:
        from toolkit.llm.kvcache.bitstream import read_payload

        for chunk in chunks:
            try:
                for _ in read_payload(self.config, chunk):
                    pass
            except FormatError as e:
                raise UnsupportedInputError(f"the kv codec takes the payload of a stored KV cache, with its "
                                            f"header as settings (toolkit.codecs.kv.save writes both): {e}") from None
        return list(chunks)

    def decode_chunks(self, payloads, sizes, known):
        # chunk_fallback is off, so every chunk is the codec's own payload, stored as it was given
        return list(payloads)


def save(cache: Cache, path: str | os.PathLike, model: torch.nn.Module, config: BitstreamConfig | None = None) -> int:
    """Store ``cache`` (a prefill's ``DynamicCache``) for ``model`` as a .tkz file; returns its size in bytes.

    ``config``: a :class:`~toolkit.llm.kvcache.BitstreamConfig` (its defaults
    when None). The file is written through a temporary name and renamed, so
    a failure leaves no half-written file.
    """
    from toolkit.llm.kvcache.bitstream import encode

    header, payload = encode(cache, model, config)
    out = io.BytesIO()
    write_stream(KVCodec(header), io.BytesIO(payload), out, size=len(payload))
    path = Path(path)
    tmp = path.with_name(path.name + ".part")
    tmp.write_bytes(out.getvalue())
    tmp.replace(path)
    return out.tell()


def load(path: str | os.PathLike, model: torch.nn.Module) -> DynamicCache:
    """The cache :func:`save` stored, as a ``DynamicCache`` for ``model`` (refused for other weights).

    A file of another codec, or a damaged one, raises :class:`~toolkit.errors.FormatError`
    (:class:`~toolkit.errors.ChecksumError` where a checksum finds the damage).
    """
    from toolkit.llm.kvcache.bitstream import Bitstream, decode

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    blob = path.read_bytes()
    codec = read_info(io.BytesIO(blob)).header["codec"]
    if codec != KVCodec.name:
        raise FormatError(f"{path} is a .tkz of the {codec!r} codec, not a stored KV cache")
    payload = io.BytesIO()
    header = read_stream(io.BytesIO(blob), payload)
    return decode(Bitstream(KVCodec.from_header(header).config, payload.getvalue()), model)
