"""KV-cache compression for Hugging Face causal LMs: quantized, corrected, merged and stored caches.

* :class:`KIVICache` (``KIVIConfig``): keys per channel, values per token,
  2/4/8-bit packed codes and a float16 window of recent tokens;
* :class:`GEARCache` (``GEARConfig``): KIVI plus sparse outliers and a
  low-rank correction of the quantization error;
* :class:`MiniCache` (``MiniCacheConfig``): adjacent layers from the middle
  down share one direction per token, with retained tokens;
* :func:`save` / :func:`load`: a prompt's cache as a CacheGen-style
  bitstream in a .tkz file, reloaded without recomputing the prefill.

Each cache plugs into ``model.generate(..., past_key_values=cache)``.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers.cache_utils import Cache, DynamicCache

from toolkit.errors import FormatError, InputError
from toolkit.llm.kvcache.bitstream import decode, encode, lossy, model_fingerprint
from toolkit.llm.kvcache.config import BitstreamConfig, GEARConfig, KIVIConfig, MiniCacheConfig
from toolkit.llm.kvcache.gear import GEARCache
from toolkit.llm.kvcache.kivi import KIVICache, cache_nbytes
from toolkit.llm.kvcache.minicache import MiniCache

__all__ = [
    "BitstreamConfig", "GEARCache", "GEARConfig", "KIVICache", "KIVIConfig", "MiniCache",
    "MiniCacheConfig", "cache_nbytes", "decode", "encode", "load", "lossy", "model_fingerprint",
    "save",
]


def save(cache: Cache, path: str | os.PathLike, model: torch.nn.Module,
         config: BitstreamConfig | None = None) -> int:
    """Write ``cache`` (a prefill's ``DynamicCache``) for ``model`` as a .tkz file; returns its size.

    The file is written through a temporary name and renamed, so a failure
    leaves no half-written file.
    """
    from toolkit.api import compress

    cfg = config or BitstreamConfig()
    sha = model_fingerprint(model)
    blob = encode(cache, model, cfg, model_sha256=sha)
    tkz = compress(blob, codec="kv", model_sha256=sha, tokens=cache.get_seq_length(), layers=len(cache.layers),
                   key_step=cfg.key_step, value_step=cfg.value_step)
    path = Path(path)
    tmp = path.with_name(path.name + ".part")
    tmp.write_bytes(tkz)
    tmp.replace(path)
    return len(tkz)


def load(path: str | os.PathLike, model: torch.nn.Module) -> DynamicCache:
    """The cache stored by :func:`save`, as a ``DynamicCache`` for ``model`` (refused for other weights)."""
    from toolkit.api import decompress, info

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    blob = path.read_bytes()
    codec = info(blob)["header"].get("codec")
    if codec != "kv":
        raise FormatError(f"{path} is a .tkz of the {codec!r} codec, not a stored KV cache")
    return decode(decompress(blob), model)
