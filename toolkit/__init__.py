"""toolkit: compress models and media with learned models.

The public API is small and lazy: importing ``toolkit`` loads no torch, no
codec and no CUDA; names resolve on first use.

>>> import toolkit
>>> blob = toolkit.compress(b"hello hello hello", codec="zstd")
>>> toolkit.decompress(blob)
b'hello hello hello'
"""

from toolkit._lazy import attach

__version__ = "0.2.0"

__getattr__, __dir__, __all__ = attach(
    __name__,
    submodules=["api", "audio", "bench", "circuits", "codecs", "config", "data", "entropy", "errors",
                "formats", "kernels", "llm", "models", "notebook", "numerics", "progress", "schedule", "text",
                "vision", "weights"],
    submod_attrs={
        "api": ["compress", "decompress", "compress_stream", "decompress_stream", "info", "choose_codec",
            "Choice"],
        "codecs.registry": ["register_codec", "get_codec", "list_codecs", "Codec"],
        "errors": ["ToolkitError", "FormatError", "ChecksumError", "ModelMismatchError", "UnsupportedInputError",
            "DependencyError", "ConfigError"],
    },
)
__all__ += ["__version__"]
