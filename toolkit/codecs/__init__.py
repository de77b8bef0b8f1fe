"""Codecs: bytes to .tkz files and back, and nothing else.

:mod:`~toolkit.codecs.container` frames every file (header, chunks with CRCs,
content digest, streaming); :mod:`~toolkit.codecs.registry` names the codecs;
:mod:`~toolkit.codecs.classic` holds ``store``, ``zstd`` and ``xz``;
:mod:`~toolkit.codecs.auto` picks one per input. Each learned codec is one thin
adapter over its library: ``lm`` (:mod:`toolkit.text`), ``pc``
(:mod:`toolkit.circuits`), ``weights`` (:mod:`toolkit.weights`), ``audio``
(:mod:`toolkit.audio`) and ``kv`` (:mod:`toolkit.llm.kvcache`). A codec
module is imported only when its codec is asked for.
"""

from toolkit._lazy import attach

__getattr__, __dir__, __all__ = attach(
    __name__,
    submodules=["audio", "auto", "classic", "container", "kv", "lm", "lzma_flush", "pc", "registry", "weights"],
)
