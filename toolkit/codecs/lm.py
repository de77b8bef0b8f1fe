"""The ``lm`` codec: an adapter from settings, sessions and payload bytes to :mod:`toolkit.text`.

Each text chunk (a segment of ``segment`` bytes) passes through the exact
text transforms of :mod:`toolkit.text.transforms` (hard-wrapped lines
joined, line numbers that count on dropped; their side data leads the
payload), is tokenized, and becomes one or more token streams
(:func:`toolkit.text.plan.plan_pieces`). The streams of a batch are coded
in lockstep by :class:`toolkit.text.lockstep.Lockstep`, which holds the
file's n-gram counts and adapted head: one per file, in the codec's
encoder or decoder session.

Chunks the model cannot help (binary data, text the tokenizer cannot
reproduce) are declined, and the container stores them with zstd or raw,
as it does any chunk where that is smaller. The decoder recognises such
chunks from their bytes and replays them as known streams, so the batch it
runs is the encoder's batch.

The default engine is the integer one (:mod:`toolkit.text.integer`): it
computes every probability exactly in integer arithmetic, so a file decodes
on any machine, thread count or device, and it runs without torch. The
float engines (``lean``, ``hf``) are machine-bound: their header records,
as the environment, the library versions and CPU capability that change
their numbers, and a decoder elsewhere refuses such a file unless told to
try anyway.

Importing this module is cheap: the text library loads when a model is
first used, and torch only for a float engine.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from typing import Any

from toolkit.codecs.registry import Codec, DecodeSession, EncodeSession, ProgressFn, register_codec
from toolkit.config import Config, check
from toolkit.errors import ConfigError, FormatError, ModelMismatchError
from toolkit.formats.binary import ByteReader, varint
from toolkit.progress import Progress

__all__ = ["LMCodec", "LMConfig"]

DEFAULT_MODEL = "default"
_VERSION = 7
#: the KV cache of a batch may take at most this share of the machine's memory
_MEMORY_SHARE = 0.5


@dataclass(frozen=True)
class LMConfig(Config):
    """The lm codec's settings; the header records them resolved (:attr:`LMCodec.settings`).

    ``batch=0`` resolves here to the segments a batch takes (half of ``streams``, so that a long
    segment can take two); ``orders`` is kept sorted and without repeats. The header holds the fields
    alone (the codec's own version is the header's), so files keep the bytes they had before the configs
    shared a base.
    """

    versioned = False

    model: str = DEFAULT_MODEL
    window: int = 256
    keep: int = 64
    segment: int = 65536
    streams: int = 128
    batch: int = 0
    piece: int = 1024
    threads: int = 0
    engine: str = "auto"
    dtype: str = "auto"
    orders: tuple[int, ...] = (1, 2, 3, 4, 6)
    gamma: float = 8.0
    contexts: int = 1 << 19
    adapt: float = 0.03
    adapt_tokens: int = 128
    adapt_rows: int = 1
    unwrap: bool = True
    numbers: bool = True
    device: str = "auto"

    def __post_init__(self):
        check(16 <= self.window <= 1 << 16, f"window must be in 16..65536 tokens, got {self.window}")
        check(0 <= self.keep < self.window, f"keep must be in 0..window-1 tokens, got {self.keep}")
        check(256 <= self.segment <= 1 << 24, f"segment must be in 256..16777216 bytes, got {self.segment}")
        check(1 <= self.streams <= 1024, f"streams must be in 1..1024, got {self.streams}")
        check(0 <= self.piece <= 1 << 24,
              f"piece must be in 0..16777216 tokens (0: one stream per segment), got {self.piece}")
        if self.batch == 0:
            object.__setattr__(self, "batch", max(1, self.streams // 2) if self.piece else self.streams)
        check(1 <= self.batch <= self.streams,
              f"batch must be in 1..streams ({self.streams}) segments, got {self.batch}")
        check(0 <= self.threads <= 256, f"threads must be in 0..256, got {self.threads}")
        check(self.engine in ("auto", "int", "lean", "hf"),
              f"engine must be auto, int, lean or hf, got {self.engine!r}")
        check(all(1 <= k <= 32 for k in self.orders),
              f"orders must be a list of context lengths in 1..32, got {self.orders!r}")
        object.__setattr__(self, "orders", tuple(sorted(set(self.orders))))
        check(0.01 <= self.gamma <= 1000, f"gamma must be in 0.01..1000, got {self.gamma}")
        check(0 <= self.contexts <= 1 << 24, f"contexts must be in 0..16777216, got {self.contexts}")
        check(0 <= self.adapt <= 10,
              f"adapt must be a learning rate in 0..10 (0 turns adaptation off), got {self.adapt}")
        check(1 <= self.adapt_tokens <= 1 << 20,
              f"adapt_tokens must be in 1..1048576 (tokens per SGD step), got {self.adapt_tokens}")
        check(1 <= self.adapt_rows <= 64,
              f"adapt_rows must be in 1..64 (train on every n-th stream), got {self.adapt_rows}")
        check(self.device == "auto" or self.device.split(":")[0] in ("cpu", "cuda"),
              f"device must be auto, cpu or cuda[:N] (the integer engine's linear layers), got {self.device!r}")
        check(self.dtype in ("auto", "int8", "float32", "bfloat16"),
              f"dtype must be auto, int8, float32 or bfloat16, got {self.dtype!r}")


def _parse_threads(value: str | None) -> int:
    if value is None:
        return 0
    try:
        n = int(value)
    except ValueError:
        raise ConfigError(f"threads must be a whole number, got {value!r}") from None
    if not 1 <= n <= 256:
        raise ConfigError(f"threads must be in 1..256, got {n}")
    return n


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _memory_limit() -> int:
    try:
        return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") * _MEMORY_SHARE)
    except (ValueError, OSError, AttributeError):
        return 8 << 30


@register_codec("lm")
class LMCodec(Codec):
    """Range coding driven by a causal language model's next-token probabilities."""

    version = _VERSION
    # version 6 files (float engines only, every setting resolved in the header) decode unchanged
    reads_versions = (6,)
    description = "language-model coding of text (shipped model, or --set model=HF_ID_OR_PATH)"
    Config = LMConfig
    decode_settings = ("model_dir", "threads", "device")

    def __init__(self, config: LMConfig | None = None, threads: int | None = None, model_dir: str | None = None):
        super().__init__(config)
        self.chunk_size = self.config.segment
        self.batch_chunks = self.config.batch
        self.model_dir = model_dir
        self._threads = threads
        self._cm: Any = None
        self._settings: LMConfig | None = None

    @property
    def coding_model(self) -> Any:
        if self._cm is None:
            from toolkit.text.model import load_coding_model

            self._cm = load_coding_model(self.config.model, self.model_dir)
        return self._cm

    @property
    def settings(self) -> LMConfig:
        """The config with everything that depends on the model and machine resolved: the header records this.

        ``engine=auto`` is the integer engine where it runs the model (Llama family), else ``hf``;
        ``dtype=auto`` is int8 for the integer engine, bf16 for the lean engine on CPUs with bf16
        arithmetic (it measured the same bits per byte as fp32 on held-out text, 1.6x faster), fp32
        otherwise; ``threads=0`` is the machine's thread count (the integer engine's output does
        not depend on it); adaptation trains the head of the integer and lean engines, so it is 0
        for the ``hf`` engine. A decoder gets these values from the header and resolves nothing again.
        """
        if self._settings is None:
            cm = self.coding_model
            cfg = self.config
            engine = cm.engine_kind(cfg.engine)
            dtype = cm.dtype(cfg.dtype, engine)
            if engine == "int":
                threads = self._threads or cfg.threads or _cores()
            else:
                import torch

                threads = self._threads or cfg.threads or torch.get_num_threads()
            if engine != "int" and cfg.device != "auto":
                raise ConfigError(f"device={cfg.device} is the integer engine's; engine={engine} runs on the CPU")
            cfg = cfg.replace(engine=engine, dtype=dtype, threads=threads,
                              adapt=0.0 if engine == "hf" else cfg.adapt)
            _check_memory(cm, cfg)
            self._settings = cfg
        return self._settings

    def config_dict(self) -> dict:
        return self.settings.to_dict()

    def header_fields(self) -> dict:
        # the name as the user gave it (``default``), not where the store found it
        return {"model": {**self.coding_model.header(), "name": self.config.model}}

    def environment(self) -> dict:
        """Nothing for the integer engine (its numbers are the same everywhere); for a float engine, what
        changes its numbers."""
        if self.settings.engine == "int":
            return {}
        import torch

        from toolkit.numerics import float_fingerprint

        env = {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
               "float_fingerprint": float_fingerprint()}
        if self.settings.engine == "hf":
            import transformers

            env["transformers"] = transformers.__version__
        return env

    def environment_note(self) -> str:
        return (f": engine={self.settings.engine} computes in floats and is machine-bound; files coded with "
                "engine=int (the default) decode anywhere")

    @classmethod
    def from_header(cls, header: dict, local: dict[str, str] | None = None) -> LMCodec:
        base: LMCodec = super().from_header(header, local)  # type: ignore[assignment]
        local = local or {}
        config, threads = base.config, None
        if config.engine == "int":
            # the integer engine's output depends on neither: decode with this machine's threads and device
            threads = _parse_threads(local.get("threads")) or _cores()
            config = config.replace(device=local.get("device", "auto"))
        elif "threads" in local or "device" in local:
            raise ConfigError(f"engine={config.engine} must decode with the encoder's threads "
                              f"({config.threads}) on the CPU: threads and device cannot be set")
        codec = cls(config, threads=threads, model_dir=local.get("model_dir"))
        want = header.get("model")
        if not isinstance(want, dict):
            raise FormatError("LM header has no model record")
        have = codec.coding_model.header()
        if want.get("weights_sha256") != have["weights_sha256"] or \
                want.get("tokenizer_sha256") != have["tokenizer_sha256"]:
            raise ModelMismatchError(
                f"file was coded with model {want.get('name')!r} (weights {str(want.get('weights_sha256'))[:12]}); "
                f"the model found here has weights {have['weights_sha256'][:12]}"
            )
        if codec.config.engine == "auto" or codec.config.dtype == "auto" or not codec.config.threads:
            raise FormatError("LM header holds unresolved settings (engine, dtype or threads)")
        return codec

    # -- sessions ----------------------------------------------------------------
    def lockstep(self) -> Any:
        """A fresh lockstep coder: one file's n-gram counts and adapted head."""
        from toolkit.text.lockstep import Lockstep

        return Lockstep(self.coding_model, self.settings)

    def open_encoder(self, progress: ProgressFn | None = None) -> EncodeSession:
        return _LMEncoder(self, progress)

    def open_decoder(self, progress: ProgressFn | None = None) -> DecodeSession:
        return _LMDecoder(self)

    # -- tokens ----------------------------------------------------------------
    def tokens(self, chunks: list[bytes]) -> tuple[list[list[int] | None], list[bytes]]:
        """Each chunk's tokens (None: not text, or not codable) and its text-transform side data.

        Text chunks pass through :func:`toolkit.text.transforms.forward` first: wrapped lines
        joined (``unwrap``), line numbers that count on dropped (``numbers``); the model codes
        what is left and the side data restores the rest.
        """
        from toolkit.text import transforms
        from toolkit.text.detect import looks_like_text

        tok = self.coding_model.tokenizer
        texty = [looks_like_text(c) for c in chunks]
        sides = [b""] * len(chunks)
        texts = []
        for i, (c, t) in enumerate(zip(chunks, texty, strict=True)):
            if t:
                c, sides[i] = transforms.forward(c, self.config.unwrap, self.config.numbers)
                texts.append(c)
        encoded = tok.encode_batch(texts)
        it = iter(encoded)
        out = [next(it) if t else None for t in texty]
        # a token the coder's alphabet lacks (a special token) makes the chunk uncodable
        return [ids if ids is not None and all(0 <= x < tok.alphabet for x in ids) else None for ids in out], sides

    def pieces(self, lengths: dict[int, int]) -> list[tuple[int, int, int]]:
        """The streams of a batch as ``(segment, start, end)`` token ranges, in segment order."""
        from toolkit.text.plan import cuts, plan_pieces

        order = sorted(lengths)
        ks = plan_pieces([lengths[i] for i in order], self.settings.streams, self.settings.piece)
        return [(i, a, b) for i, k in zip(order, ks, strict=True) for a, b in cuts(lengths[i], k)]

    def token_costs(self, data: bytes) -> list[tuple[bytes, float]]:
        """Each token of ``data`` with the bits the codec spends on it (exact table costs).

        ``data`` is cut into segments and coded as the codec would code it, in a
        session of its own; binary segments (stored by the container) are left out.
        """
        from toolkit.text.lockstep import Stream

        chunks = [data[i : i + self.chunk_size] for i in range(0, len(data), self.chunk_size)]
        out: list[tuple[bytes, float]] = []
        tok = self.coding_model.tokenizer
        coder = self.lockstep()
        for b in range(0, len(chunks), self.batch_chunks):
            tokens = self.tokens(chunks[b : b + self.batch_chunks])[0]
            pieces = self.pieces({i: len(t) for i, t in enumerate(tokens) if t is not None})
            streams = [tokens[i][a:e] for i, a, e in pieces]  # type: ignore[index]
            costs: dict[int, list[float]] = {}
            coder.run([Stream(len(t), tokens=t) for t in streams], costs)
            for s, ids in enumerate(streams):
                out.extend((tok.decode([t]), c) for t, c in zip(ids, costs.get(s, []), strict=True))
        return out


def _check_memory(cm: Any, cfg: LMConfig) -> None:
    """Refuse settings whose KV cache would not fit, before anything is allocated."""
    c = cm.config
    heads = c.num_attention_heads
    kv = getattr(c, "num_key_value_heads", None) or heads
    d = getattr(c, "head_dim", None) or c.hidden_size // heads
    width = 2 if cfg.dtype == "bfloat16" else 4  # int8: int8 values held in float32 for an exact GEMM
    need = 2 * c.num_hidden_layers * cfg.streams * kv * cfg.window * d * width
    limit = _memory_limit()
    if need > limit:
        raise ConfigError(f"window={cfg.window} x streams={cfg.streams} needs {need / 2**30:.1f} GiB of KV cache; "
                          f"at most {limit / 2**30:.1f} GiB (half this machine's memory) is allowed: "
                          "lower window or streams")


# payload of a coded segment: varint(side bytes) side varint(tokens) varint(pieces)
# varint(words of each piece but the last)
# then the range coder's 32-bit words of every piece, in order
class _LMEncoder(EncodeSession):
    def __init__(self, codec: LMCodec, progress: ProgressFn | None):
        self.codec, self.progress = codec, progress
        self.coder = codec.lockstep()

    def _bytes_done(self, size: int) -> Progress:
        """The lockstep coder's ``(tokens done, total)`` as the container's raw bytes done since the last report."""
        if self.progress is None:
            return False
        progress, reported = self.progress, 0

        def report(done: int, total: int) -> None:
            nonlocal reported
            now = size * done // total if total else size
            progress(now - reported)
            reported = now

        return report

    def encode_chunks(self, chunks: list[bytes]) -> list[bytes | None]:
        from toolkit.entropy import RangeCoder
        from toolkit.text.lockstep import Stream

        codec = self.codec
        tokens, sides = codec.tokens(chunks)
        pieces = codec.pieces({i: len(t) for i, t in enumerate(tokens) if t is not None})
        streams = [Stream(e - a, tokens=tokens[i][a:e], coder=RangeCoder.encoder())  # type: ignore[index]
                   for i, a, e in pieces]
        self.coder.run(streams, progress=self._bytes_done(sum(len(c) for c in chunks)))
        words: dict[int, list[bytes]] = {}
        for st, (i, _, _) in zip(streams, pieces, strict=True):
            words.setdefault(i, []).append(st.coder.finish())  # type: ignore[union-attr]
        out: list[bytes | None] = []
        for i in range(len(chunks)):
            if tokens[i] is None:
                out.append(None)
                continue
            parts = words[i]
            out.append(varint(len(sides[i])) + sides[i] + varint(len(tokens[i])) + varint(len(parts)) +
                       b"".join(varint(len(w) // 4) for w in parts[:-1]) + b"".join(parts))
        return out


class _LMDecoder(DecodeSession):
    def __init__(self, codec: LMCodec):
        self.codec = codec
        self.coder = codec.lockstep()

    def decode_chunks(self, payloads: list[bytes | None], sizes: list[int],
                      known: list[bytes | None]) -> list[bytes]:
        import numpy as np

        from toolkit.entropy import RangeCoder
        from toolkit.text import transforms
        from toolkit.text.lockstep import Stream

        codec = self.codec
        replay = codec.tokens([k if k is not None else b"" for k in known])[0]
        sides: dict[int, bytes] = {}
        lengths: dict[int, int] = {}
        parsed: dict[int, list[np.ndarray]] = {}
        for i, p in enumerate(payloads):
            if p is None:
                if replay[i] is not None:
                    lengths[i] = len(replay[i])
                continue
            r = ByteReader(p, "LM payload")
            sides[i] = bytes(r.blob())
            n = r.varint(sizes[i])  # a token holds at least one byte
            k = r.varint(max(1, n))
            if k < 1:
                raise FormatError("LM payload: a segment of no pieces")
            counts = [r.varint(r.remaining // 4) for _ in range(k - 1)]
            words = r.take(r.remaining)
            if len(words) % 4 or 4 * sum(counts) > len(words):
                raise FormatError("LM payload is not a whole number of 32-bit words per piece")
            arr = np.frombuffer(words, dtype=np.uint32)
            edges = np.cumsum([0, *counts, len(arr) - sum(counts)])
            parsed[i] = [arr[edges[j] : edges[j + 1]].copy() for j in range(k)]
            lengths[i] = n
        pieces = codec.pieces(lengths)
        planned = Counter(i for i, _, _ in pieces)
        for i, words_of in parsed.items():
            if len(words_of) != planned[i]:
                raise FormatError(f"LM payload has {len(words_of)} pieces where the plan has {planned[i]}")
        streams = []
        for i, a, e in pieces:
            if i not in parsed:
                streams.append(Stream(e - a, tokens=replay[i][a:e]))  # type: ignore[index]
            else:
                # pieces of a segment come in order: the first not yet taken is this one
                streams.append(Stream(e - a, coder=RangeCoder.decoder(parsed[i].pop(0))))
        decoded = self.coder.run(streams)
        ids: dict[int, list[int]] = {}
        for s, (i, _, _) in enumerate(pieces):
            if s in decoded:
                ids.setdefault(i, []).extend(decoded[s])
        tok = codec.coding_model.tokenizer
        return [known[i] if p is None else transforms.inverse(tok.decode(ids.get(i, [])), sides[i])  # type: ignore[misc]
                for i, p in enumerate(payloads)]
