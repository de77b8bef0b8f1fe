"""Exact file-format parsing and rebuilding: PNG images and ``.npy`` arrays.

Learned codecs code content (pixels, records), but a decoder must give back
the input *file* byte for byte. Each module here splits one format into its
content and what rebuilds the exact bytes around it, and rebuilds the file
from the two. Nothing here is unpickled, and every length or count read from
a file is checked, with Python integers, against the bytes it came from
before any work. No torch: a codec can import these at module level.
"""

from toolkit.formats.npy import NPY_MAGIC, NpyHeader, check_uint8_records, npy_records, read_npy_header, rebuild_npy
from toolkit.formats.png import (
    MAX_INFLATE_RATIO,
    MAX_PIXELS,
    PNG_SIGNATURE,
    PngImage,
    PngLayout,
    encode_png,
    load_image_bytes,
    parse_png,
    rebuild_png,
)

__all__ = [
    "MAX_INFLATE_RATIO",
    "MAX_PIXELS",
    "NPY_MAGIC",
    "PNG_SIGNATURE",
    "NpyHeader",
    "PngImage",
    "PngLayout",
    "check_uint8_records",
    "encode_png",
    "load_image_bytes",
    "npy_records",
    "parse_png",
    "read_npy_header",
    "rebuild_npy",
    "rebuild_png",
]
