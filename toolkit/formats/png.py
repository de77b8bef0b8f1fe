"""PNG files split into pixels and what rebuilds their exact bytes from them.

A learned image codec codes *pixels*, but ``decompress`` must return the
input *file*. :func:`parse_png` splits an 8-bit grey or RGB, non-interlaced
PNG into its pixels and a :class:`PngLayout`: the per-row filter types, the
zlib settings that reproduce its compressed stream (found by trial), the
IDAT chunk lengths, and every chunk before and after the image data,
verbatim. :func:`rebuild_png` re-filters the pixels, deflates them with
those settings and reassembles the file byte for byte. PNGs whose stream no
zlib setting reproduces (other deflate encoders, e.g. zopfli or zlib-ng) are
refused, and so is anything :func:`rebuild_png` would not give back exactly.

:meth:`PngLayout.to_bytes` / :meth:`PngLayout.from_bytes` serialize the
layout (docs/FORMAT.md, ``pc`` kind ``I``); reading one checks every count
against the bytes it came from before anything is allocated, so a damaged
layout cannot make a decoder work on a huge image.
"""

from __future__ import annotations

import dataclasses
import io
import struct
import zlib

import numpy as np

from toolkit.errors import FormatError, UnsupportedInputError
from toolkit.formats.binary import ByteReader

__all__ = [
    "PNG_SIGNATURE",
    "MAX_PIXELS",
    "MAX_INFLATE_RATIO",
    "PngLayout",
    "PngImage",
    "parse_png",
    "rebuild_png",
    "encode_png",
    "load_image_bytes",
]

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: refuse images whose pixel count could not have come from a sane file.
MAX_PIXELS = 1 << 28
#: deflate expands at most ~1032:1 (258-byte matches at about 2 bits each), so a stream of
#: L bytes holds at most this many times L bytes of scanlines.
MAX_INFLATE_RATIO = 1032
_LAYOUT_HEAD = struct.Struct("<IIBBBBbI")  # height, width, channels, level, memLevel, strategy, wbits, IDAT count
_U32 = struct.Struct("<I")


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
class PngLayout:
    """Everything of a PNG file but its pixels: what rebuilds its exact bytes around them."""

    height: int
    width: int
    channels: int  # 1 (grey) or 3 (RGB)
    filters: np.ndarray  # uint8 [height], PNG filter type per row
    level: int
    mem_level: int
    strategy: int
    wbits: int
    idat_lengths: list[int]
    prefix: bytes  # signature and every chunk before the first IDAT
    suffix: bytes  # every chunk after the last IDAT

    @property
    def file_size(self) -> int:
        """Bytes of the file this layout rebuilds (each IDAT chunk adds 12 bytes of framing)."""
        return len(self.prefix) + len(self.suffix) + sum(12 + n for n in self.idat_lengths)

    @property
    def pixel_shape(self) -> tuple[int, ...]:
        return (self.height, self.width) if self.channels == 1 else (self.height, self.width, 3)

    def to_bytes(self) -> bytes:
        """The layout serialized (docs/FORMAT.md, ``pc`` kind ``I``)."""
        n = len(self.idat_lengths)
        head = _LAYOUT_HEAD.pack(self.height, self.width, self.channels, self.level, self.mem_level,
                                 self.strategy, self.wbits, n)
        return b"".join([head, struct.pack(f"<{n}I", *self.idat_lengths),
                         self.filters.astype(np.uint8).tobytes(),
                         _U32.pack(len(self.prefix)), self.prefix,
                         _U32.pack(len(self.suffix)), self.suffix])

    @classmethod
    def from_bytes(cls, blob: bytes) -> PngLayout:
        """Parse :meth:`to_bytes` output; :class:`FormatError` unless every count fits ``blob``."""
        r = ByteReader(blob, "PNG layout")
        h, w, c, level, mem, strategy, wbits, n = _LAYOUT_HEAD.unpack(r.take(_LAYOUT_HEAD.size))
        if c not in (1, 3) or not 0 < h * w <= MAX_PIXELS:
            raise FormatError(f"bad image dimensions in PNG layout ({w}x{h}, {c} channels)")
        lengths = list(struct.unpack(f"<{n}I", r.take(4 * n)))  # taken (so bounded) before it is unpacked
        filters = np.frombuffer(r.take(h), dtype=np.uint8).copy()
        prefix = bytes(r.take(r.u32()))
        suffix = bytes(r.take(r.u32()))
        r.done()
        if filters.max(initial=0) > 4:
            raise FormatError("bad PNG layout: a row filter above 4")
        if h * (w * c + 1) > MAX_INFLATE_RATIO * sum(lengths):
            raise FormatError(f"a {w}x{h} image cannot come from {sum(lengths)} bytes of PNG image data")
        try:
            zlib.compressobj(level, zlib.DEFLATED, wbits, mem, strategy)
        except (ValueError, zlib.error) as exc:
            raise FormatError(f"bad zlib settings in PNG layout: {exc}") from None
        return cls(h, w, c, filters, level, mem, strategy, wbits, lengths, prefix, suffix)


@dataclasses.dataclass
class PngImage:
    """A PNG split into its pixels and what rebuilds its exact bytes from them."""

    pixels: np.ndarray  # uint8 [H, W] or [H, W, 3]
    layout: PngLayout


def parse_png(data: bytes) -> PngImage:
    """Split an 8-bit grey or RGB, non-interlaced PNG into pixels + layout.

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
    _, s, e = chunks[0]
    if e - s != 12 + 13:
        raise UnsupportedInputError("PNG header chunk has the wrong length")
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
    if h * (w * c + 1) > MAX_INFLATE_RATIO * len(stream):
        raise UnsupportedInputError(f"PNG image data ({len(stream)} bytes) is too short for a {w}x{h} image")
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
            "written with zlib); re-save it (toolkit.formats.encode_png or Pillow) and compress that")
    layout = PngLayout(h, w, c, filters, level, mem, strategy, wbits,
                       [b - a - 12 for _, a, b in (chunks[i] for i in idx)],
                       data[: chunks[idx[0]][1]], data[chunks[idx[-1]][2] :])
    img = PngImage(pixels, layout)
    if rebuild_png(img) != data:
        raise UnsupportedInputError("this PNG cannot be rebuilt bit-exactly from its pixels")
    return img


def rebuild_png(img: PngImage) -> bytes:
    """The exact PNG bytes that :func:`parse_png` split into ``img``."""
    lay = img.layout
    if img.pixels.shape != lay.pixel_shape or lay.filters.shape != (lay.height,):
        raise FormatError("pixels do not match the PNG layout")
    raw = _filter_rows(img.pixels, lay.filters)
    try:
        stream = _deflate(raw, lay.level, lay.mem_level, lay.strategy, lay.wbits)
    except (zlib.error, ValueError) as exc:
        raise FormatError(f"bad zlib settings in PNG layout: {exc}") from None
    assert stream is not None
    if sum(lay.idat_lengths) != len(stream):
        raise FormatError("rebuilt PNG data does not fit its chunk lengths")
    parts, pos = [lay.prefix], 0
    for n in lay.idat_lengths:
        body = b"IDAT" + stream[pos : pos + n]
        parts.append(struct.pack(">I", n) + body + struct.pack(">I", zlib.crc32(body)))
        pos += n
    parts.append(lay.suffix)
    return b"".join(parts)


def encode_png(pixels: np.ndarray, level: int = 9) -> bytes:
    """A PNG of ``uint8 [H, W]`` / ``[H, W, 3]`` pixels, written with zlib (so :func:`parse_png` takes it).

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
