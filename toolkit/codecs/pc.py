"""The ``pc`` codec: lossless coding with probabilistic circuits (PNG images and .npy record sets).

A thin adapter: it maps settings and payload bytes to the libraries that do
the work, :mod:`toolkit.formats` (the files) and :mod:`toolkit.circuits`
(the model and the record coder). Two inputs, told apart by their magic bytes:

- **dataset mode**, a ``.npy`` file of ``uint8`` records ``[N, D]`` (or
  ``[N, H, W, ...]``, flattened per record) coded with a circuit the user
  trained (:func:`toolkit.circuits.fit_hclt`, saved with ``Circuit.save``)
  and names with ``--set model=DIR``. The ``.npy`` header is parsed by
  :mod:`toolkit.formats.npy` (never unpickled) and kept verbatim.
- **image mode**, an 8-bit grey or RGB PNG coded patch by patch with the
  shipped patch model (``toolkit/assets/pc-patch``) or another one trained by
  :func:`toolkit.circuits.train_patch_model`. The codec's output is the
  pixels plus the PNG's layout, what rebuilds the exact file bytes from them
  (:mod:`toolkit.formats.png`), so ``decompress`` returns the input file.

Anything else is refused with :class:`~toolkit.errors.UnsupportedInputError`
rather than silently stored: asking for ``pc`` on a text file is a mistake a
user should hear about. The header records the model's SHA-256; decoding
with a different model raises :class:`~toolkit.errors.ModelMismatchError`.

Payload of the single chunk: kind byte ``N`` or ``I``, a u32 length, that
many bytes (the raw ``.npy`` header, or the zstd-compressed PNG layout),
then the record stream of :func:`toolkit.circuits.encode_records`. The
decoder checks every count in it (records, record width, image size,
patches) against the model and the chunk's size before any coding work.

Importing this module loads no torch (``codec list`` imports every codec);
the circuit libraries are imported when a file is coded.
"""

from __future__ import annotations

import contextlib
import logging
import struct
from dataclasses import dataclass

import zstandard

from toolkit.circuits.settings import MAX_BATCH, METHODS
from toolkit.codecs.registry import Codec, register_codec
from toolkit.config import Config, check
from toolkit.errors import FormatError, ModelMismatchError, UnsupportedInputError
from toolkit.formats.binary import ByteReader
from toolkit.formats.npy import NPY_MAGIC, check_uint8_records, npy_records, read_npy_header, rebuild_npy
from toolkit.formats.png import (
    MAX_INFLATE_RATIO,
    MAX_PIXELS,
    PNG_SIGNATURE,
    PngImage,
    PngLayout,
    parse_png,
    rebuild_png,
)
from toolkit.models import store
from toolkit.models.store import Located

__all__ = ["PCCodec", "PCConfig", "DEFAULT_PATCH_MODEL"]

logger = logging.getLogger(__name__)

_SHIPPED = "pc-patch"
DEFAULT_PATCH_MODEL = store.ASSETS / _SHIPPED
#: the whole file must be one container chunk (the container's largest).
_CHUNK = 64 << 20
_LEN = struct.Struct("<I")


@dataclass(frozen=True)
class PCConfig(Config):
    versioned = False  # a header's config: the codec's version is the header's

    #: a saved circuit (dataset mode) or patch-model directory (image mode); "": the shipped patch model.
    model: str = ""
    #: ``context``, ``partial`` or ``naive`` (same bits up to rounding; speed differs).
    method: str = "context"
    #: records per range-coded stream (changes the float computation, so it is recorded).
    batch: int = 1024

    def __post_init__(self):
        check(self.method in METHODS, f"pc method must be one of {METHODS}, got {self.method!r}")
        check(1 <= self.batch <= MAX_BATCH, f"pc batch must be in 1..{MAX_BATCH}")


def _load_model(where: Located) -> tuple:
    """A Circuit or PatchModel from a directory and its SHA-256 (of structure and parameters)."""
    from toolkit.circuits.circuit import Circuit
    from toolkit.circuits.images import PatchModel
    from toolkit.circuits.train import circuit_sha256

    path = str(where.path)
    try:
        if PatchModel.is_patch_model(path):
            m = PatchModel.load(path)
            return m, m.sha256()
        c = Circuit.load(path)
        return c, circuit_sha256(c)
    except FormatError as exc:
        raise ModelMismatchError(f"cannot load pc model {where.name!r}: {exc}") from None


def _model(config: PCConfig, model_dir: str | None = None) -> tuple:
    """The config's model (the shipped patch model when unset) and its hash, through the model store."""
    return store.load("pc", _load_model, config.model or _SHIPPED, model_dir=model_dir)


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


def _split_payload(payload: bytes) -> tuple[bytes, bytes, bytes]:
    """(kind, side data, record stream) of a payload; the side data's length is checked against what is left."""
    r = ByteReader(payload, "pc payload")
    kind = bytes(r.take(1))
    head = bytes(r.take(r.u32()))
    return kind, head, bytes(r.take(r.remaining))


def _layout_limit(size: int) -> int:
    """The largest serialized layout a PNG of ``size`` bytes can have.

    The layout is the file minus its image data, plus 29 bytes of fields and
    one filter byte per row; a row is at least 2 bytes of inflated data and
    deflate expands at most :data:`MAX_INFLATE_RATIO`-fold, so a file has at
    most ``MAX_INFLATE_RATIO / 2`` rows per byte (and at most MAX_PIXELS).
    """
    return size + 29 + min(MAX_PIXELS, MAX_INFLATE_RATIO // 2 * size)


def _read_layout(head: bytes, size: int) -> PngLayout:
    """The zstd-compressed PNG layout of a payload; its declared size is checked before it is allocated."""
    try:
        declared = zstandard.frame_content_size(head)
    except zstandard.ZstdError as exc:
        raise FormatError(f"damaged PNG layout in pc payload: {exc}") from None
    # the encoder always records the size; a frame without it could make zstd allocate the limit
    if declared < 0 or declared > _layout_limit(size):
        raise FormatError(f"the PNG layout in the pc payload cannot come from a {size}-byte PNG")
    try:
        blob = zstandard.ZstdDecompressor().decompress(head, max_output_size=declared)
    except zstandard.ZstdError as exc:
        raise FormatError(f"damaged PNG layout in pc payload: {exc}") from None
    return PngLayout.from_bytes(blob)


@register_codec("pc")
class PCCodec(Codec):
    """Probabilistic-circuit coding of PNG images (shipped patch model) and .npy record sets."""

    description = "probabilistic circuits: PNG images (patch model) or uint8 .npy records (set model=DIR)"
    version = 1
    Config = PCConfig
    chunk_size = _CHUNK
    batch_chunks = 1
    #: the whole input is one chunk: the container refuses larger files before any work.
    whole_file = True

    decode_settings = ("model_dir",)

    def __init__(self, config: PCConfig | None = None, model_dir: str | None = None):
        super().__init__(config)
        self.model_dir = model_dir

    def environment(self) -> dict:
        # The circuit's float arithmetic, and so the coded bits, follow the torch build and CPU kernels.
        import torch

        from toolkit.numerics import float_fingerprint

        return {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                "float_fingerprint": float_fingerprint()}

    def header_fields(self) -> dict:
        _, sha = _model(self.config, self.model_dir)
        return {"model": self.config.model or _SHIPPED, "model_sha256": sha}

    @classmethod
    def from_header(cls, header: dict, local: dict[str, str] | None = None) -> PCCodec:
        base = super().from_header(header, local)
        codec = cls(base.config, model_dir=(local or {}).get("model_dir"))
        _, sha = _model(codec.config, codec.model_dir)
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
        # A full chunk may be the start of a longer file, which one chunk cannot hold.
        if len(data) >= self.chunk_size:
            raise UnsupportedInputError(f"pc codes files smaller than {self.chunk_size >> 20} MiB")
        if data.startswith(NPY_MAGIC):
            return self._encode_npy(data)
        if data.startswith(PNG_SIGNATURE):
            return self._encode_png(data)
        raise UnsupportedInputError("pc codes PNG images and uint8 .npy record arrays; this input is neither")

    def _encode_npy(self, data: bytes) -> bytes:
        from toolkit.circuits.circuit import Circuit
        from toolkit.circuits.coder import encode_records

        model, _ = _model(self.config, self.model_dir)
        if not isinstance(model, Circuit):
            raise UnsupportedInputError(
                "dataset mode codes .npy records with your circuit: --set model=DIR (a saved Circuit)")
        try:
            header, x = npy_records(data, width=model.num_vars)
        except UnsupportedInputError as exc:
            raise UnsupportedInputError(f"{exc} (the circuit has {model.num_vars} variables)") from None
        if x.size and int(x.max()) >= model.num_cats:
            raise UnsupportedInputError(
                f"record values up to {int(x.max())} do not fit the circuit (values 0..{model.num_cats - 1})")
        stream = encode_records(model, x, batch_size=self.config.batch, method=self.config.method)
        return b"N" + _LEN.pack(header.length) + data[: header.length] + stream

    def _encode_png(self, data: bytes) -> bytes:
        from toolkit.circuits.coder import encode_records
        from toolkit.circuits.images import PatchModel, image_to_records

        model, _ = _model(self.config, self.model_dir)
        if not isinstance(model, PatchModel):
            raise UnsupportedInputError("image mode needs a patch model (leave model unset for the shipped one)")
        img = parse_png(data)
        circuit = model.circuits.get(img.layout.channels)
        if circuit is None:
            raise UnsupportedInputError(f"the patch model has no {img.layout.channels}-channel circuit")
        x = image_to_records(img.pixels, model.patch)
        stream = encode_records(circuit, x, batch_size=self.config.batch, method=self.config.method)
        layout = zstandard.ZstdCompressor(level=19).compress(img.layout.to_bytes())
        return b"I" + _LEN.pack(len(layout)) + layout + stream

    def decode_chunks(self, payloads, sizes, known):
        with _one_thread():
            return [k if p is None else self._decode(p, n) for p, n, k in zip(payloads, sizes, known, strict=True)]

    def _decode(self, payload: bytes, size: int) -> bytes:
        from toolkit.circuits.circuit import Circuit
        from toolkit.circuits.images import PatchModel

        kind, head, stream = _split_payload(payload)
        model, _ = _model(self.config, self.model_dir)
        if kind == b"N" and isinstance(model, Circuit):
            out = self._decode_npy(model, head, stream, size)
        elif kind == b"I" and isinstance(model, PatchModel):
            out = self._decode_png(model, head, stream, size)
        else:
            raise FormatError(f"pc payload kind {kind!r} does not fit the model")
        if len(out) != size:
            raise FormatError(f"pc chunk decoded to {len(out)} bytes, expected {size}")
        return out

    def _decode_npy(self, model, head: bytes, stream: bytes, size: int) -> bytes:
        from toolkit.circuits.coder import decode_records

        try:
            header = read_npy_header(head)
            check_uint8_records(header)
        except UnsupportedInputError as exc:
            raise FormatError(f"damaged .npy header in pc payload: {exc}") from None
        # exact integers: the records' bytes fill the chunk, and each record is one circuit's worth
        if header.length != len(head) or header.length + header.data_bytes != size:
            raise FormatError(f"the .npy header in the pc payload (shape {header.shape}) does not match "
                              f"the chunk size {size}")
        if header.record_width != model.num_vars:
            raise FormatError(f"the pc payload holds records of {header.record_width} values; "
                              f"the circuit has {model.num_vars} variables")
        records = decode_records(model, stream, header.records, self.config.method, self.config.batch)
        return rebuild_npy(head, header, records)

    def _decode_png(self, model, head: bytes, stream: bytes, size: int) -> bytes:
        from toolkit.circuits.coder import decode_records
        from toolkit.circuits.images import records_to_image

        layout = _read_layout(head, size)
        circuit = model.circuits.get(layout.channels)
        if circuit is None:
            raise FormatError(f"pc payload is a {layout.channels}-channel image; the model has no such circuit")
        if layout.file_size != size:
            raise FormatError(f"the PNG layout in the pc payload makes a {layout.file_size}-byte file, "
                              f"not the chunk's {size} bytes")
        p = model.patch
        patches = (-(-layout.height // p)) * (-(-layout.width // p))
        recs = decode_records(circuit, stream, patches, self.config.method, self.config.batch)
        pixels = records_to_image(recs, layout.height, layout.width, layout.channels, p)
        return rebuild_png(PngImage(pixels, layout))

    @classmethod
    def estimate_bpb(cls, sample: bytes) -> float | None:
        # ``auto`` sees only the first 64 KiB, which does not decode as an
        # image; running the circuit would cost more than auto may spend.
        return None
