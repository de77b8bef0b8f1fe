"""The ``pc`` codec: lossless coding with probabilistic circuits (PNG images and .npy record sets).

Two inputs, told apart by their magic bytes:

- **dataset mode**, a ``.npy`` file of ``uint8`` records ``[N, D]`` (or
  ``[N, H, W, ...]``, flattened per record) coded with a circuit the user
  trained (:func:`toolkit.circuits.fit_hclt`, saved with ``Circuit.save``)
  and names with ``--set model=DIR``. The ``.npy`` header is parsed with
  :mod:`numpy.lib.format` (never unpickled) and kept verbatim.
- **image mode**, an 8-bit grey or RGB PNG coded patch by patch with the
  shipped patch model (``toolkit/assets/pc-patch``) or another one trained by
  :func:`toolkit.circuits.train_patch_model`. The codec's output is the
  pixels plus what rebuilds the exact PNG bytes from them (see
  :mod:`toolkit.circuits.images`), so ``decompress`` returns the input file.

Anything else is refused with :class:`~toolkit.errors.UnsupportedInputError`
rather than silently stored: asking for ``pc`` on a text file is a mistake a
user should hear about. The header records the model's SHA-256; decoding
with a different model raises :class:`~toolkit.errors.ModelMismatchError`.

Payload of the single chunk: kind byte ``N`` or ``I``, a u32 length, that
many bytes (the raw ``.npy`` header, or the zstd-compressed PNG wrapper),
then the record stream of :func:`toolkit.circuits.encode_records`.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zstandard

from toolkit.codecs.registry import Codec, register_codec
from toolkit.errors import ConfigError, FormatError, ModelMismatchError, UnsupportedInputError

__all__ = ["PCCodec", "PCConfig", "DEFAULT_PATCH_MODEL", "NPY_MAGIC"]

logger = logging.getLogger(__name__)

DEFAULT_PATCH_MODEL = Path(__file__).resolve().parent.parent / "assets" / "pc-patch"
NPY_MAGIC = b"\x93NUMPY"
_PNG = b"\x89PNG\r\n\x1a\n"
#: the whole file must be one container chunk (the container's largest).
_CHUNK = 64 << 20
_LEN = struct.Struct("<I")


@dataclass
class PCConfig:
    #: a saved circuit (dataset mode) or patch-model directory (image mode); "": the shipped patch model.
    model: str = ""
    #: ``context``, ``partial`` or ``naive`` (same bits up to rounding; speed differs).
    method: str = "context"
    #: records per range-coded stream (changes the float computation, so it is recorded).
    batch: int = 1024

    def __post_init__(self):
        from toolkit.circuits.coder import MAX_BATCH, METHODS

        if self.method not in METHODS:
            raise ConfigError(f"pc method must be one of {METHODS}, got {self.method!r}")
        if not 1 <= self.batch <= MAX_BATCH:
            raise ConfigError(f"pc batch must be in 1..{MAX_BATCH}")


@functools.lru_cache(maxsize=8)
def _load_model(path: str, stamp: tuple):
    """A Circuit or PatchModel from ``path`` and its SHA-256; cached per file modification times."""
    from toolkit.circuits.circuit import Circuit
    from toolkit.circuits.images import PatchModel
    from toolkit.circuits.train import circuit_sha256

    if PatchModel.is_patch_model(path):
        m = PatchModel.load(path)
        return m, m.sha256()
    c = Circuit.load(path)
    return c, circuit_sha256(c)


def _model(config: PCConfig):
    path = Path(config.model) if config.model else DEFAULT_PATCH_MODEL
    if not path.is_dir():
        what = "the shipped patch model (toolkit/assets/pc-patch)" if not config.model else repr(str(path))
        raise ModelMismatchError(f"pc model {what} is not installed or not a directory")
    stamp = tuple(sorted((str(p), p.stat().st_mtime_ns, p.stat().st_size) for p in path.rglob("*") if p.is_file()))
    try:
        return _load_model(str(path.resolve()), stamp)
    except FormatError as exc:
        raise ModelMismatchError(f"cannot load pc model {str(path)!r}: {exc}") from None


@contextlib.contextmanager
def _one_thread():
    """Run the circuit on one torch thread, then restore the caller's setting.

    Its tensors are small (a batch of records by M latents), so extra threads
    gain little, and on a busy machine oversubscribed threads were seen to run
    several times slower; one thread also keeps the float results the same
    whatever the caller's setting.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _read_npy_header(data: bytes) -> tuple[int, tuple[int, ...], bool, np.dtype]:
    """(header length, shape, fortran order, dtype) of a .npy file, without unpickling anything."""
    f = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        elif version in ((2, 0), (3, 0)):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            raise ValueError(f"unknown .npy version {version}")
    except (ValueError, SyntaxError, TypeError, EOFError) as exc:
        raise UnsupportedInputError(f"bad .npy header: {exc}") from None
    return f.tell(), tuple(int(s) for s in shape), bool(fortran), np.dtype(dtype)


def _npy_records(data: bytes) -> tuple[int, np.ndarray]:
    hlen, shape, fortran, dtype = _read_npy_header(data)
    if dtype.hasobject:
        raise UnsupportedInputError(".npy holds Python objects (a pickle); the pc codec never unpickles")
    if dtype != np.uint8:
        raise UnsupportedInputError(f"pc codes uint8 records; this .npy holds {dtype}")
    if len(shape) < 2:
        raise UnsupportedInputError(f"pc codes records [N, D] or [N, H, W]; this .npy has shape {shape}")
    n = int(np.prod(shape))
    if len(data) - hlen != n:
        raise UnsupportedInputError(f".npy holds {len(data) - hlen} data bytes, its shape {shape} needs {n}")
    arr = np.frombuffer(data, dtype=np.uint8, offset=hlen).reshape(shape, order="F" if fortran else "C")
    return hlen, np.ascontiguousarray(arr).reshape(shape[0], -1)


@register_codec("pc")
class PCCodec(Codec):
    """Probabilistic-circuit coding of PNG images (shipped patch model) and .npy record sets."""

    description = "probabilistic circuits: PNG images (patch model) or uint8 .npy records (set model=DIR)"
    version = 1
    Config = PCConfig
    chunk_size = _CHUNK
    batch_chunks = 1

    def header_fields(self) -> dict:
        _, sha = _model(self.config)
        return {"model": self.config.model or "pc-patch", "model_sha256": sha}

    @classmethod
    def from_header(cls, header: dict, local: dict[str, str] | None = None) -> PCCodec:
        codec = super().from_header(header, local)
        _, sha = _model(codec.config)
        want = header.get("model_sha256")
        if want != sha:
            raise ModelMismatchError(
                f"file was coded with pc model {header.get('model')!r} (sha256 {str(want)[:12]}); "
                f"the model found here has sha256 {sha[:12]}")
        return codec

    # --- coding ---------------------------------------------------------
    def encode_chunks(self, chunks: list[bytes]) -> list[bytes | None]:
        with _one_thread():
            return [self._encode(c) for c in chunks]

    def _encode(self, data: bytes) -> bytes:
        from toolkit.circuits.circuit import Circuit
        from toolkit.circuits.coder import encode_records
        from toolkit.circuits.images import PatchModel, image_to_records, parse_png

        model, _ = _model(self.config)
        cfg = self.config
        if data.startswith(NPY_MAGIC):
            if not isinstance(model, Circuit):
                raise UnsupportedInputError(
                    "dataset mode codes .npy records with your circuit: --set model=DIR (a saved Circuit)")
            hlen, x = _npy_records(data)
            if x.shape[1] != model.num_vars or (x.size and int(x.max()) >= model.num_cats):
                raise UnsupportedInputError(
                    f"records of {x.shape[1]} values up to {int(x.max()) if x.size else 0} do not fit the "
                    f"circuit ({model.num_vars} variables, values 0..{model.num_cats - 1})")
            stream = encode_records(model, x, batch_size=cfg.batch, method=cfg.method)
            return b"N" + _LEN.pack(hlen) + data[:hlen] + stream
        if data.startswith(_PNG):
            if not isinstance(model, PatchModel):
                raise UnsupportedInputError("image mode needs a patch model (leave model unset for the shipped one)")
            img = parse_png(data)
            ch = 1 if img.pixels.ndim == 2 else 3
            if ch not in model.circuits:
                raise UnsupportedInputError(f"the patch model has no {ch}-channel circuit")
            x = image_to_records(img.pixels, model.patch)
            stream = encode_records(model.circuits[ch], x, batch_size=cfg.batch, method=cfg.method)
            wrapper = zstandard.ZstdCompressor(level=19).compress(img.wrapper())
            return b"I" + _LEN.pack(len(wrapper)) + wrapper + stream
        if len(data) == self.chunk_size:
            raise UnsupportedInputError("pc codes files of at most 64 MiB")
        raise UnsupportedInputError("pc codes PNG images and uint8 .npy record arrays; this input is neither")

    def decode_chunks(self, payloads, sizes, known):
        with _one_thread():
            return [k if p is None else self._decode(p, n) for p, n, k in zip(payloads, sizes, known, strict=True)]

    def _decode(self, payload: bytes, size: int) -> bytes:
        from toolkit.circuits.circuit import Circuit
        from toolkit.circuits.coder import decode_records
        from toolkit.circuits.images import PatchModel, PngImage, rebuild_png, records_to_image

        if len(payload) < 1 + _LEN.size:
            raise FormatError("pc payload too short")
        kind = payload[:1]
        (n,) = _LEN.unpack_from(payload, 1)
        head = payload[5 : 5 + n]
        stream = payload[5 + n :]
        if len(head) != n:
            raise FormatError("pc payload truncated")
        model, _ = _model(self.config)
        if kind == b"N" and isinstance(model, Circuit):
            try:
                hlen, shape, fortran, dtype = _read_npy_header(head)
            except UnsupportedInputError as exc:
                raise FormatError(f"damaged .npy header in pc payload: {exc}") from None
            if hlen != n or dtype != np.uint8 or len(shape) < 2 or n + int(np.prod(shape)) != size:
                raise FormatError("the .npy header in the pc payload does not match the chunk size")
            x = decode_records(model, stream, shape[0])
            arr = x.astype(np.uint8).reshape(shape)
            out = head + arr.tobytes(order="F" if fortran else "C")
        elif kind == b"I" and isinstance(model, PatchModel):
            try:
                wrapper = zstandard.ZstdDecompressor().decompress(head, max_output_size=max(size, 1 << 16) + 4096)
            except zstandard.ZstdError as exc:
                raise FormatError(f"damaged PNG wrapper in pc payload: {exc}") from None
            fields, h, w, ch = PngImage.read_wrapper(wrapper)
            if ch not in model.circuits:
                raise FormatError(f"pc payload is a {ch}-channel image; the model has no such circuit")
            # deflate shrinks at most ~1032:1, so a PNG of `size` bytes cannot hold more pixels:
            # a damaged or forged header must not make the decoder run over a huge image.
            if h * (w * ch + 1) > 1032 * size:
                raise FormatError(f"a {w}x{h} image cannot come from a PNG of {size} bytes")
            p = model.patch
            recs = decode_records(model.circuits[ch], stream, (-(-h // p)) * (-(-w // p)))
            pixels = records_to_image(recs, h, w, ch, p)
            out = rebuild_png(PngImage(pixels=pixels, **fields))
        else:
            raise FormatError(f"pc payload kind {kind!r} does not fit the model")
        if len(out) != size:
            raise FormatError(f"pc chunk decoded to {len(out)} bytes, expected {size}")
        return out

    @classmethod
    def estimate_bpb(cls, sample: bytes) -> float | None:
        # ``auto`` sees only the first 64 KiB, which does not decode as an
        # image; running the circuit would cost more than auto may spend.
        return None
