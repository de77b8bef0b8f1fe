"""Codec registry: ``@register_codec("name")`` on a :class:`Codec` subclass.

A codec turns chunks of raw bytes into payloads and back. The container
(:mod:`toolkit.codecs.container`) owns framing, checksums, per-chunk fallback
to stored bytes and streaming; a codec only sees lists of chunks, so a codec
that codes many segments in parallel (one stream each) gets them together.

Coding state belongs to one file: the container opens an
:class:`EncodeSession` (or :class:`DecodeSession`) per file with
:meth:`Codec.open_encoder` and closes it at the end. A codec instance holds
only its settings and models, so one instance codes any number of files.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import types
import typing
from collections.abc import Callable, Iterator
from pathlib import PurePath
from typing import Any, BinaryIO, ClassVar

from toolkit.config import Config
from toolkit.errors import ConfigError, UnknownCodecError

__all__ = ["Codec", "EncodeSession", "DecodeSession", "SourceSession", "register_codec", "get_codec", "list_codecs",
           "codec_names", "parse_settings", "BUILTIN_CODECS"]

ProgressFn = Callable[[int], None]


@dataclasses.dataclass(frozen=True)
class NoConfig(Config):
    """Codecs without settings use this empty config."""

    versioned = False


class Codec:
    """Base class of every codec.

    Subclasses set ``name`` (by the decorator), ``version``, ``Config`` (a
    frozen :class:`~toolkit.config.Config` that is not ``versioned``: its
    ``to_dict`` is the header's ``config``, whose version is the codec's) and
    implement :meth:`encode_chunks` and :meth:`decode_chunks`. Everything the
    decoder needs must be in :meth:`header_fields` or derivable from the config.
    """

    name: ClassVar[str] = ""
    version: ClassVar[int] = 1
    #: older versions whose files this codec still decodes
    reads_versions: ClassVar[tuple[int, ...]] = ()
    description: ClassVar[str] = ""
    Config: ClassVar[type] = NoConfig
    #: raw bytes per chunk; the container never passes a longer chunk.
    chunk_size: int = 1 << 20
    #: how many chunks the container hands over at once (parallel streams).
    batch_chunks: int = 1
    #: settings a decoder may be given (``--set model_dir=...``): where to find things
    #: on this machine, never what changes the numbers.
    decode_settings: ClassVar[tuple[str, ...]] = ()
    #: the codec needs its whole input as one chunk (the container's largest, 64 MiB); the
    #: container refuses a larger input before any coding and ignores ``chunk_size``.
    whole_file: ClassVar[bool] = False
    #: the container may write a chunk as zstd or raw bytes where that is smaller than the
    #: codec's payload. False for codecs whose chunks are pieces of one running stream (the
    #: decoder needs every piece) and for ``store``, which exists to store.
    chunk_fallback: ClassVar[bool] = True
    #: a lossy codec reads its whole source through :meth:`open_source` and decodes to something
    #: else than its input (the container's digest then covers the payloads, not the output)
    lossy: ClassVar[bool] = False

    def __init__(self, config: Any | None = None):
        self.config = config if config is not None else self.Config()

    # --- construction -------------------------------------------------
    @classmethod
    def from_settings(cls, settings: dict[str, Any] | None = None) -> Codec:
        """Build from settings, typed values of the config's fields (``orders=(1, 2)``, ``level=3``); the
        command line's ``--set`` strings are typed by :func:`parse_settings` first."""
        return cls(cls.Config.from_dict(dict(settings or {})))

    @classmethod
    def from_header(cls, header: dict, local: dict[str, str] | None = None) -> Codec:
        """Rebuild the codec that wrote ``header``; check models and versions here.

        ``local`` holds decode-time settings (only the names in ``decode_settings``).
        """
        check_decode_settings(cls, local)
        return cls(cls.Config.from_dict(header.get("config", {})))

    def header_fields(self) -> dict:
        """Extra JSON fields for the file header (model name, weights hash, ...)."""
        return {}

    def config_dict(self) -> dict:
        """The header's ``config``."""
        return self.config.to_dict()

    def environment(self) -> dict:
        """What outside the header's config changes this codec's numbers (library versions,
        CPU capability, ...). Recorded in the header as ``env``; a decoder whose own
        environment differs refuses the file unless told to try anyway."""
        return {}

    def environment_note(self) -> str:
        """What to add, after a comma, when the environment differs (why the settings are machine-bound)."""
        return ""

    # --- sessions ---------------------------------------------------------
    def open_encoder(self, progress: ProgressFn | None = None) -> EncodeSession:
        """A fresh per-file encoder. ``progress(n)`` may be called with raw bytes done
        inside a batch; the container caps those reports at the batch's size."""
        return _StatelessEncoder(self)

    def open_decoder(self, progress: ProgressFn | None = None) -> DecodeSession:
        return _StatelessDecoder(self)

    def open_source(self, src: BinaryIO) -> SourceSession:
        """A lossy codec's encoder for one file: it reads ``src`` itself (a file it parses, not chunks
        of bytes) and refuses input it cannot code here, before anything is written."""
        raise NotImplementedError

    # --- coding (stateless codecs implement these; the default sessions call them) ---
    def encode_chunks(self, chunks: list[bytes]) -> list[bytes | None]:
        """Code a batch; a None (or a payload not smaller than the chunk) makes the
        container store that chunk with zstd or raw instead."""
        raise NotImplementedError

    def decode_chunks(
        self, payloads: list[bytes | None], sizes: list[int], known: list[bytes | None]
    ) -> list[bytes]:
        """Decode a batch. ``payloads[i]`` is None where the container stored chunk
        ``i`` another way; its bytes are then in ``known[i]``, so a codec that
        coded the batch as parallel streams can replay it exactly."""
        raise NotImplementedError

    # --- auto selection -------------------------------------------------
    @classmethod
    def estimate_bpb(cls, sample: bytes) -> float | None:
        """Estimated bits per byte on ``sample`` for ``--codec auto``; None opts out."""
        return None


class EncodeSession:
    """One file's encoder: batches of chunks in file order, :meth:`finish`, then :meth:`close`."""

    def encode_chunks(self, chunks: list[bytes]) -> list[bytes | None]:
        raise NotImplementedError

    def finish(self) -> None:
        """Called once after the last batch, before the file is complete: a codec that can only
        tell at the end that its input was invalid (a truncated checkpoint) raises here."""

    def close(self) -> None:
        """Release the file's state (the container calls it once, also after an error)."""


class SourceSession:
    """A lossy codec's encoder for one file (:meth:`Codec.open_source`)."""

    #: bytes of the source read (for the summary)
    bytes_read: int = 0

    def header_fields(self) -> dict:
        """What the decoder must know about this source (JSON), added to the header."""
        return {}

    def notes(self) -> list[str]:
        """What was changed in the input to code it (resampled, downmixed, ...), for the user."""
        return []

    def summary(self) -> dict:
        """Fields for the compress summary (an audio codec gives ``seconds``, so the command shows kbps)."""
        return {}

    def payloads(self, progress: ProgressFn | None = None) -> Iterator[tuple[int, bytes]]:
        """``(decoded length, payload)`` of every chunk, in order; ``progress(n)``: source bytes done."""
        raise NotImplementedError

    def close(self) -> None:
        """Release the source (the container calls it once, also after an error)."""


class DecodeSession:
    """One file's decoder: batches in file order, then :meth:`close`."""

    def decode_chunks(
        self, payloads: list[bytes | None], sizes: list[int], known: list[bytes | None]
    ) -> list[bytes]:
        raise NotImplementedError

    def close(self) -> None:
        """Release the file's state (the container calls it once, also after an error)."""


class _StatelessEncoder(EncodeSession):
    def __init__(self, codec: Codec):
        self.codec = codec

    def encode_chunks(self, chunks: list[bytes]) -> list[bytes | None]:
        return self.codec.encode_chunks(chunks)


class _StatelessDecoder(DecodeSession):
    def __init__(self, codec: Codec):
        self.codec = codec

    def decode_chunks(self, payloads, sizes, known):
        return self.codec.decode_chunks(payloads, sizes, known)


_REGISTRY: dict[str, type[Codec]] = {}


def register_codec(name: str) -> Callable[[type[Codec]], type[Codec]]:
    """Class decorator that registers a codec under ``name`` (a duplicate is an error)."""

    def deco(cls: type[Codec]) -> type[Codec]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"codec {name!r} is already registered")
        if not (dataclasses.is_dataclass(cls.Config) and issubclass(cls.Config, Config)) or cls.Config.versioned:
            raise TypeError(f"{cls.__name__}.Config must be a Config dataclass with versioned = False "
                            "(the header's codec_version versions it)")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


#: built-in codec name -> the module that registers it; a module is imported only when its
#: codec is asked for, so decoding a zstd file never imports torch. Later codecs add themselves.
BUILTIN_CODECS: dict[str, str] = {
    "store": "toolkit.codecs.classic",
    "zstd": "toolkit.codecs.classic",
    "xz": "toolkit.codecs.classic",
    "lm": "toolkit.codecs.lm",
    "pc": "toolkit.codecs.pc",
    "weights": "toolkit.codecs.weights",
    "kv": "toolkit.codecs.kv",
    "audio": "toolkit.codecs.audio",
}


def codec_names() -> list[str]:
    """Every codec name that :func:`get_codec` accepts, without importing any codec."""
    return sorted(set(_REGISTRY) | set(BUILTIN_CODECS))


def get_codec(name: str) -> type[Codec]:
    """The codec class registered as ``name``, importing only the module that defines it."""
    if name not in _REGISTRY and name in BUILTIN_CODECS:
        importlib.import_module(BUILTIN_CODECS[name])
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownCodecError(f"unknown codec {name!r} (known: {', '.join(codec_names())})") from None


def list_codecs() -> dict[str, type[Codec]]:
    """Every codec, built-in ones imported (learned codecs may import their libraries)."""
    for module in sorted(set(BUILTIN_CODECS.values())):
        importlib.import_module(module)
    return dict(sorted(_REGISTRY.items()))


# --- config helpers -------------------------------------------------------
def check_decode_settings(cls: type[Codec], local: dict[str, str] | None) -> None:
    """Refuse decode-time settings that ``cls`` does not take."""
    unknown = sorted(set(local or {}) - set(cls.decode_settings))
    if unknown:
        allowed = ", ".join(cls.decode_settings) or "none"
        raise ConfigError(f"codec {cls.name} takes no decode setting {', '.join(unknown)} (allowed: {allowed})")


def environment_mismatch(recorded: dict, here: dict) -> list[str]:
    """What differs between the environment a file records and this one, one phrase per item.

    Only what the file records is compared: a file written before a key was
    recorded (``float_fingerprint``) decodes as before, its content digest
    being the check that catches different floats.
    """
    out = []
    for key in sorted(recorded):
        if recorded.get(key) != here.get(key):
            out.append(f"{key} {recorded.get(key)!r} in the file, {here.get(key)!r} here")
    return out


_TYPE_WORDS = {bool: "true or false", int: "an integer", float: "a number"}


def _from_string(key: str, text: str, tp: Any) -> Any:
    """One ``--set`` value as its field's type; a type other than bool, int, float, str or a path is JSON."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) < len(typing.get_args(tp)) and text.lower() in ("none", "null", ""):
            return None
        tp = args[0] if len(args) == 1 else Any
    try:
        if tp is bool:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(text)
        if tp is int:
            return int(text, 0)
        if tp is float:
            return float(text)
        if tp is str or (isinstance(tp, type) and issubclass(tp, PurePath)):
            return text
        return json.loads(text)
    except ValueError:  # json.JSONDecodeError is one
        raise ConfigError(f"setting {key}={text!r} is not {_TYPE_WORDS.get(tp, 'valid JSON')}") from None


def parse_settings(config_cls: type[Config], strings: dict[str, str]) -> dict[str, Any]:
    """The command line's ``--set key=value`` strings as typed values of ``config_cls``'s fields (what
    :meth:`Codec.from_settings` takes); an unknown key is a ConfigError. Only the command line gives strings:
    the Python API takes typed values, where a string for an integer is an error, not a number."""
    hints = typing.get_type_hints(config_cls)
    fields = {f.name for f in dataclasses.fields(config_cls) if f.init}  # type: ignore[arg-type]
    out = {}
    for key, text in strings.items():
        if key not in fields:
            raise ConfigError(f"unknown setting {key!r} (allowed: {', '.join(sorted(fields)) or 'none'})")
        out[key] = _from_string(key, text, hints[key])
    return out
