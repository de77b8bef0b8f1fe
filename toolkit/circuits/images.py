"""Images as records for a circuit: a lossless transform, patches, and exact PNG rebuilding.

The image codec (``--codec pc``) codes an 8-bit grey or RGB image as
fixed-shape records for a *patch model* (one circuit per channel count):

1. colour images go through a reversible mod-256 colour transform
   (G, R-G+128, B-G+128), which removes most of the inter-channel redundancy;
2. each plane is replaced by its residual against the MED / LOCO-I
   predictor (median of left, up and left+up-upleft), mod 256: the residuals
   of natural images are peaked around 0, which is what the circuit models;
3. the residual planes are cut into ``p x p`` patches (the image padded with
   zero residuals up to a multiple of ``p``), one record of ``p*p*C`` values
   per patch, channel-interleaved so one circuit sees all colours of a patch.

Everything is integer arithmetic mod 256, so the inverse is exact. The
inverse of the predictor is sequential along rows, so it runs over
anti-diagonals: every pixel of a diagonal depends only on earlier ones.

:func:`parse_png` / :func:`rebuild_png` make the decoded *file* exact, not
just its pixels: a PNG's compressed stream is re-created from the pixels,
the per-row filter types and the zlib settings found by search; the chunks
around the image data are kept verbatim. PNGs whose stream no zlib setting
reproduces (other deflate encoders, e.g. zopfli or zlib-ng) are refused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import torch

from toolkit.circuits.circuit import Circuit
from toolkit.circuits.train import circuit_sha256, fit_hclt
from toolkit.errors import ConfigError, FormatError, UnsupportedInputError

__all__ = [
    "PNG_SIGNATURE",
    "PatchModel",
    "PngImage",
    "image_to_records",
    "records_to_image",
    "forward_transform",
    "inverse_transform",
    "parse_png",
    "rebuild_png",
    "encode_png",
    "train_patch_model",
    "load_image_bytes",
]

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: refuse images whose pixel count could not have come from a sane file.
MAX_PIXELS = 1 << 28
_PATCH_FORMAT = "toolkit.pc-patch"


# --------------------------------------------------------------------------- transform
def _med(left: np.ndarray, up: np.ndarray, upleft: np.ndarray) -> np.ndarray:
    lo, hi = np.minimum(left, up), np.maximum(left, up)
    return np.where(upleft >= hi, lo, np.where(upleft <= lo, hi, left + up - upleft))


def forward_transform(pixels: np.ndarray) -> np.ndarray:
    """``uint8 [H, W]`` or ``[H, W, 3]`` pixels -> ``uint8 [C, H, W]`` residual planes."""
    x = pixels.astype(np.int64)
    if x.ndim == 2:
        planes = x[None]
    else:
        g = x[..., 1]
        planes = np.stack([g, (x[..., 0] - g + 128) & 255, (x[..., 2] - g + 128) & 255])
    c, h, w = planes.shape
    pad = np.zeros((c, h + 1, w + 1), dtype=np.int64)  # zero border: row 0 predicts left, col 0 up
    pad[:, 1:, 1:] = planes
    pred = _med(pad[:, 1:, :-1], pad[:, :-1, 1:], pad[:, :-1, :-1])
    return ((planes - pred) & 255).astype(np.uint8)


def inverse_transform(residuals: np.ndarray) -> np.ndarray:
    """Exact inverse of :func:`forward_transform`."""
    r = residuals.astype(np.int64)
    c, h, w = r.shape
    pad = np.zeros((c, h + 1, w + 1), dtype=np.int64)
    for t in range(h + w - 1):
        i = np.arange(max(0, t - w + 1), min(h, t + 1))
        j = t - i
        pred = _med(pad[:, i + 1, j], pad[:, i, j + 1], pad[:, i, j])
        pad[:, i + 1, j + 1] = (r[:, i, j] + pred) & 255
    planes = pad[:, 1:, 1:]
    if c == 1:
        return planes[0].astype(np.uint8)
    g = planes[0]
    rgb = np.stack([(planes[1] + g - 128) & 255, g, (planes[2] + g - 128) & 255], axis=-1)
    return rgb.astype(np.uint8)


def image_to_records(pixels: np.ndarray, patch: int) -> np.ndarray:
    """Pixels -> ``uint8 [num_patches, patch*patch*C]`` records of transformed values."""
    res = forward_transform(pixels)
    c, h, w = res.shape
    hp, wp = -(-h // patch) * patch, -(-w // patch) * patch
    full = np.zeros((c, hp, wp), dtype=np.uint8)
    full[:, :h, :w] = res
    blocks = full.reshape(c, hp // patch, patch, wp // patch, patch).transpose(1, 3, 2, 4, 0)
    return np.ascontiguousarray(blocks.reshape(-1, patch * patch * c))


def records_to_image(records: np.ndarray, height: int, width: int, channels: int, patch: int) -> np.ndarray:
    """Inverse of :func:`image_to_records` for an image of the given size."""
    nh, nw = -(-height // patch), -(-width // patch)
    if records.shape != (nh * nw, patch * patch * channels):
        raise FormatError("patch records do not match the image size")
    full = records.reshape(nh, nw, patch, patch, channels).transpose(4, 0, 2, 1, 3)
    res = full.reshape(channels, nh * patch, nw * patch)[:, :height, :width]
    return inverse_transform(res)


# --------------------------------------------------------------------------- PNG
def _chunks(data: bytes) -> list[tuple[bytes, int, int]]:
    """``(type, start, end)`` of every chunk (start at its length field), CRCs checked."""
    out, pos = [], len(PNG_SIGNATURE)
    while pos < len(data):
        if pos + 12 > len(data):
            raise UnsupportedInputError("PNG ends inside a chunk header")
        (n,) = struct.unpack_from(">I", data, pos)
        ctype = data[pos + 4 : pos + 8]
        end = pos + 12 + n
        if n > len(data) or end > len(data):
            raise UnsupportedInputError("PNG chunk runs past the end of the file")
        if zlib.crc32(data[pos + 4 : end - 4]) != struct.unpack_from(">I", data, end - 4)[0]:
            raise UnsupportedInputError(f"PNG chunk {ctype!r} has a bad CRC")
        out.append((ctype, pos, end))
        pos = end
        if ctype == b"IEND":
            break
    return out


def _filter_rows(pixels: np.ndarray, filters: np.ndarray) -> bytes:
    """PNG scanlines (filter byte + filtered row) for the given per-row filter types."""
    h = pixels.shape[0]
    bpp = 1 if pixels.ndim == 2 else pixels.shape[2]
    x = pixels.reshape(h, -1).astype(np.int16)
    a = np.zeros_like(x)
    a[:, bpp:] = x[:, :-bpp]
    b = np.zeros_like(x)
    b[1:] = x[:-1]
    c = np.zeros_like(x)
    c[1:, bpp:] = x[:-1, :-bpp]
    p = a + b - c
    pa, pb, pc = np.abs(p - a), np.abs(p - b), np.abs(p - c)
    paeth = np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c))
    preds = np.stack([np.zeros_like(x), a, b, (a + b) >> 1, paeth])  # types 0..4
    pred = preds[filters.astype(np.int64), np.arange(h)]
    out = np.empty((h, x.shape[1] + 1), dtype=np.uint8)
    out[:, 0] = filters
    out[:, 1:] = ((x - pred) & 255).astype(np.uint8)
    return out.tobytes()


#: zlib settings tried when rebuilding a PNG's stream: (level, memLevel, strategy); the
#: common ones (libpng and Pillow defaults) first. A wrong guess fails at its first
#: output block, so the whole list is cheap even when nothing matches.
_ZLIB_TRIALS = [(lv, mem, st) for st in (zlib.Z_FILTERED, zlib.Z_DEFAULT_STRATEGY, zlib.Z_RLE, zlib.Z_HUFFMAN_ONLY)
                for lv in (6, 9, 1, 2, 3, 4, 5, 7, 8, 0) for mem in (9, 8)]


def _deflate(raw: bytes, level: int, mem: int, strategy: int, wbits: int, want: bytes | None = None) -> bytes | None:
    """zlib-compress ``raw``; with ``want``, stop (None) as soon as the output departs from it."""
    co = zlib.compressobj(level, zlib.DEFLATED, wbits, mem, strategy)
    out = bytearray()
    step = 1 << 16
    for lo in range(0, len(raw), step):
        out += co.compress(raw[lo : lo + step])
        if want is not None and out != want[: len(out)]:
            return None
    out += co.flush()
    if want is not None and out != want:
        return None
    return bytes(out)


@dataclasses.dataclass
class PngImage:
    """A PNG split into its pixels and what rebuilds its exact bytes from them."""

    pixels: np.ndarray  # uint8 [H, W] or [H, W, 3]
    filters: np.ndarray  # uint8 [H], PNG filter type per row
    level: int
    mem_level: int
    strategy: int
    wbits: int
    idat_lengths: list[int]
    prefix: bytes  # signature and every chunk before the first IDAT
    suffix: bytes  # every chunk after the last IDAT

    def wrapper(self) -> bytes:
        """Everything but the pixels, serialized (the codec stores it zstd-compressed)."""
        h, w = self.pixels.shape[:2]
        c = 1 if self.pixels.ndim == 2 else 3
        head = struct.pack("<IIBBBBbI", h, w, c, self.level, self.mem_level, self.strategy, self.wbits,
                           len(self.idat_lengths))
        return b"".join([head, struct.pack(f"<{len(self.idat_lengths)}I", *self.idat_lengths),
                         self.filters.astype(np.uint8).tobytes(),
                         struct.pack("<I", len(self.prefix)), self.prefix,
                         struct.pack("<I", len(self.suffix)), self.suffix])

    @staticmethod
    def read_wrapper(blob: bytes) -> tuple[dict, int, int, int]:
        """Parse :meth:`wrapper` output: (fields without pixels, height, width, channels)."""
        try:
            h, w, c, level, mem, strategy, wbits, n = struct.unpack_from("<IIBBBBbI", blob)
            pos = struct.calcsize("<IIBBBBbI")
            if c not in (1, 3) or h * w > MAX_PIXELS or n > len(blob):
                raise FormatError("bad image dimensions in PC stream")
            lengths = list(struct.unpack_from(f"<{n}I", blob, pos))
            pos += 4 * n
            filters = np.frombuffer(blob, dtype=np.uint8, count=h, offset=pos).copy()
            pos += h
            (np_,) = struct.unpack_from("<I", blob, pos)
            prefix = blob[pos + 4 : pos + 4 + np_]
            pos += 4 + np_
            (ns,) = struct.unpack_from("<I", blob, pos)
            suffix = blob[pos + 4 : pos + 4 + ns]
            if len(prefix) != np_ or len(suffix) != ns or pos + 4 + ns != len(blob) or filters.max(initial=0) > 4:
                raise FormatError("bad PNG wrapper in PC stream")
        except (struct.error, ValueError) as exc:
            raise FormatError(f"bad PNG wrapper in PC stream: {exc}") from None
        fields = dict(filters=filters, level=level, mem_level=mem, strategy=strategy, wbits=wbits,
                      idat_lengths=lengths, prefix=prefix, suffix=suffix)
        return fields, h, w, c


def parse_png(data: bytes) -> PngImage:
    """Split an 8-bit grey or RGB, non-interlaced PNG into pixels + rebuild recipe.

    Raises :class:`UnsupportedInputError` for other PNGs and for streams that
    cannot be rebuilt bit-exactly (checked here by rebuilding).
    """
    if not data.startswith(PNG_SIGNATURE):
        raise UnsupportedInputError("not a PNG file")
    chunks = _chunks(data)
    if not chunks or chunks[0][0] != b"IHDR" or chunks[-1][0] != b"IEND":
        raise UnsupportedInputError("PNG lacks IHDR or IEND")
    if chunks[-1][2] != len(data):
        raise UnsupportedInputError("PNG has data after IEND")
    _, s, _ = chunks[0]
    w, h, depth, ctype, _, _, interlace = struct.unpack_from(">IIBBBBB", data, s + 8)
    if depth != 8 or ctype not in (0, 2) or interlace != 0:
        raise UnsupportedInputError(
            "the pc codec takes 8-bit grey or RGB non-interlaced PNGs "
            f"(this one: depth {depth}, colour type {ctype}, interlace {interlace})")
    if not 0 < w * h <= MAX_PIXELS:
        raise UnsupportedInputError(f"PNG size {w}x{h} is out of range")
    idx = [i for i, (t, _, _) in enumerate(chunks) if t == b"IDAT"]
    if not idx or idx != list(range(idx[0], idx[-1] + 1)):
        raise UnsupportedInputError("PNG image data chunks are missing or not contiguous")
    stream = b"".join(data[a + 8 : b - 4] for _, a, b in (chunks[i] for i in idx))
    c = 1 if ctype == 0 else 3
    d = zlib.decompressobj()
    try:
        raw = d.decompress(stream, h * (w * c + 1) + 1)
    except zlib.error as exc:
        raise UnsupportedInputError(f"PNG image data is damaged: {exc}") from None
    if not d.eof or d.unused_data or d.unconsumed_tail or len(raw) != h * (w * c + 1):
        raise UnsupportedInputError("PNG image data has the wrong length")
    rows = np.frombuffer(raw, dtype=np.uint8).reshape(h, w * c + 1)
    filters = rows[:, 0].copy()
    if filters.max() > 4:
        raise UnsupportedInputError("PNG uses an unknown filter type")
    # Pillow undoes the filters (in C); re-filtering checks its pixels against the stream.
    pixels = load_image_bytes(data)
    if pixels.shape != ((h, w) if c == 1 else (h, w, 3)) or _filter_rows(pixels, filters) != raw:
        raise UnsupportedInputError("PNG pixels do not match its image data")
    cmf = stream[0]
    wbits = (cmf >> 4) + 8
    for level, mem, strategy in _ZLIB_TRIALS:
        if _deflate(raw, level, mem, strategy, wbits, want=stream) is not None:
            break
    else:
        raise UnsupportedInputError(
            "this PNG's compressed stream cannot be rebuilt bit-exactly from its pixels (it was not "
            "written with zlib); re-save it (toolkit.circuits.encode_png or Pillow) and compress that")
    img = PngImage(pixels, filters, level, mem, strategy, wbits,
                   [b - a - 12 for _, a, b in (chunks[i] for i in idx)],
                   data[: chunks[idx[0]][1]], data[chunks[idx[-1]][2] :])
    if rebuild_png(img) != data:
        raise UnsupportedInputError("this PNG cannot be rebuilt bit-exactly from its pixels")
    return img


def rebuild_png(img: PngImage) -> bytes:
    """The exact PNG bytes that :func:`parse_png` split into ``img``."""
    raw = _filter_rows(img.pixels, img.filters)
    try:
        stream = _deflate(raw, img.level, img.mem_level, img.strategy, img.wbits)
    except (zlib.error, ValueError) as exc:
        raise FormatError(f"bad zlib settings in PC stream: {exc}") from None
    assert stream is not None
    if sum(img.idat_lengths) != len(stream):
        raise FormatError("rebuilt PNG data does not fit its chunk lengths")
    parts, pos = [img.prefix], 0
    for n in img.idat_lengths:
        body = b"IDAT" + stream[pos : pos + n]
        parts.append(struct.pack(">I", n) + body + struct.pack(">I", zlib.crc32(body)))
        pos += n
    parts.append(img.suffix)
    return b"".join(parts)


def encode_png(pixels: np.ndarray, level: int = 9) -> bytes:
    """A PNG of ``uint8 [H, W]`` / ``[H, W, 3]`` pixels, written with zlib (so the pc codec takes it).

    Rows use the Paeth filter; one IDAT chunk. Deterministic.
    """
    px = np.ascontiguousarray(pixels, dtype=np.uint8)
    if px.ndim not in (2, 3) or (px.ndim == 3 and px.shape[2] != 3):
        raise UnsupportedInputError(f"pixels must be [H, W] or [H, W, 3], got {px.shape}")
    h, w = px.shape[:2]
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0 if px.ndim == 2 else 2, 0, 0, 0)

    def chunk(t: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + t + body + struct.pack(">I", zlib.crc32(t + body))

    stream = _deflate(_filter_rows(px, np.full(h, 4, dtype=np.uint8)), level, 8, zlib.Z_DEFAULT_STRATEGY, 15)
    assert stream is not None
    return PNG_SIGNATURE + chunk(b"IHDR", ihdr) + chunk(b"IDAT", stream) + chunk(b"IEND", b"")


# --------------------------------------------------------------------------- patch model
class PatchModel:
    """Circuits for ``patch x patch`` records of transformed images: one per channel count (1, 3)."""

    def __init__(self, circuits: dict[int, Circuit], patch: int, meta: dict | None = None):
        for ch, c in circuits.items():
            if c.num_vars != patch * patch * ch or c.num_cats != 256:
                raise ConfigError(f"{ch}-channel circuit does not fit {patch}x{patch} patches of bytes")
        self.circuits, self.patch, self.meta = circuits, patch, dict(meta or {})

    def sha256(self) -> str:
        h = hashlib.sha256(f"{_PATCH_FORMAT}:{self.patch}".encode())
        for ch in sorted(self.circuits):
            h.update(f"{ch}:{circuit_sha256(self.circuits[ch])}".encode())
        return h.hexdigest()

    def save(self, directory: str | Path) -> None:
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        for ch, c in self.circuits.items():
            c.save(path / f"c{ch}")
        cfg = {"format": _PATCH_FORMAT, "version": 1, "patch": self.patch,
               "channels": sorted(self.circuits), "transform": "rgb->G,R-G,B-G; MED residual mod 256",
               **self.meta}
        (path / "pcpatch.json").write_text(json.dumps(cfg, indent=1, sort_keys=True) + "\n")

    @classmethod
    def load(cls, directory: str | Path) -> PatchModel:
        path = Path(directory)
        try:
            cfg = json.loads((path / "pcpatch.json").read_text())
        except (OSError, ValueError) as exc:
            raise FormatError(f"{path} is not a PC patch model: {exc}") from None
        if cfg.get("format") != _PATCH_FORMAT or cfg.get("version") != 1:
            raise FormatError(f"{path} is not a version-1 PC patch model")
        circuits = {int(ch): Circuit.load(path / f"c{ch}") for ch in cfg["channels"]}
        meta = {k: v for k, v in cfg.items() if k not in ("format", "version", "patch", "channels", "transform")}
        return cls(circuits, int(cfg["patch"]), meta)

    @staticmethod
    def is_patch_model(directory: str | Path) -> bool:
        return (Path(directory) / "pcpatch.json").is_file()


def train_patch_model(
    images: list[np.ndarray],
    patch: int = 4,
    num_latents: int = 32,
    epochs: int = 10,
    max_records: int = 100_000,
    valid: list[np.ndarray] | None = None,
    seed: int = 0,
) -> tuple[PatchModel, dict[int, list[dict]]]:
    """Train grey (from every image's green-based planes as grey) and colour patch circuits.

    Grey training records come from the grey images plus the luminance-like
    green channel of the colour images, so both circuits see every photo.
    At most ``max_records`` records (a seeded random subset) per circuit.
    """
    rng = np.random.default_rng(seed)

    def collect(imgs: list[np.ndarray], ch: int) -> np.ndarray | None:
        recs = []
        for im in imgs:
            if ch == 1:
                recs.append(image_to_records(im if im.ndim == 2 else im[..., 1], patch))
            elif im.ndim == 3:
                recs.append(image_to_records(im, patch))
        if not recs:
            return None
        x = np.concatenate(recs)
        if len(x) > max_records:
            x = x[rng.choice(len(x), max_records, replace=False)]
        return x

    circuits, histories = {}, {}
    for ch in (1, 3):
        x = collect(images, ch)
        if x is None:
            continue
        v = collect(valid, ch) if valid else None
        torch.manual_seed(seed)
        c, hist = fit_hclt(x, num_latents=num_latents, epochs=epochs, num_cats=256, valid=v,
                           mi_bins=32, seed=seed)
        circuits[ch], histories[ch] = c, hist
    return PatchModel(circuits, patch), histories


def load_image_bytes(data: bytes) -> np.ndarray:
    """Pixels of any image Pillow reads, as ``uint8 [H, W]`` (grey) or ``[H, W, 3]``."""
    from PIL import Image

    try:
        im = Image.open(io.BytesIO(data))
        im.load()
    except Exception as exc:  # Pillow raises many types for bad files
        raise UnsupportedInputError(f"not an image Pillow can read: {exc}") from None
    im = im.convert("L") if im.mode in ("1", "L", "I;16") else im.convert("RGB")
    return np.asarray(im)
