"""KV-cache compression for Hugging Face causal LMs: quantized, corrected, merged and stored caches.

* :class:`KIVICache` (``KIVIConfig``): keys per channel, values per token,
  2/4/8-bit packed codes and a float16 window of recent tokens;
* :class:`GEARCache` (``GEARConfig``): KIVI plus sparse outliers and a
  low-rank correction of the quantization error;
* :class:`MiniCache` (``MiniCacheConfig``): adjacent layers from the middle
  down share one direction per token, with retained tokens;
* :func:`encode` / :func:`decode` (``BitstreamConfig``): a prompt's cache as a
  CacheGen-style :class:`Bitstream`, a :class:`KVHeader` and a payload, reloaded
  without recomputing the prefill; :func:`lossy` is the cache a decode gives.
  ``toolkit.codecs.kv.save`` / ``load`` store one as a .tkz file.

Each cache plugs into ``model.generate(..., past_key_values=cache)``.
"""

from toolkit._lazy import attach

__getattr__, __dir__, __all__ = attach(
    __name__,
    submodules=["bitstream", "config", "evaluate", "gear", "header", "kivi", "minicache", "quantize"],
    submod_attrs={
        "bitstream": ["Bitstream", "decode", "encode", "model_fingerprint"],
        "config": ["BitstreamConfig", "GEARConfig", "KIVIConfig", "MiniCacheConfig"],
        "gear": ["GEARCache"],
        "header": ["KVHeader"],
        "kivi": ["KIVICache", "cache_nbytes"],
        "minicache": ["MiniCache"],
        "quantize": ["lossy"],
    },
)
