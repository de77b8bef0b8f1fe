"""None"""

from toolkit._lazy import attach

__getattr__, __dir__, __all__ = attach(
    __name__,
    submodules=["audio", "auto", "classic", "container", "kv", "lm", "lzma_flush", "pc", "registry",
                "weights"],
    submod_attrs={
    },
)
