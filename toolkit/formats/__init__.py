"""Exact file-format parsing and rebuilding: PNG images and ``.npy`` arrays.

Learned codecs code content (pixels, records), but a decoder must give back
the input *file* byte for byte. Each module here splits one format into its
content and what rebuilds the exact bytes around it, and rebuilds the file
from the two. Nothing here is unpickled, and every length or count read from
a file is checked, with Python integers, against the bytes it came from
before any work. No torch: a codec can import these at module level.
"""

from toolkit._lazy import attach

__getattr__, __dir__, __all__ = attach(
    __name__,
    submodules=["binary", "npy", "png"],
    submod_attrs={
        "binary": ["ByteReader"],
        "npy": ["NPY_MAGIC", "NpyHeader", "check_uint8_records", "npy_records", "read_npy_header", "rebuild_npy"],
        "png": ["MAX_INFLATE_RATIO", "MAX_PIXELS", "PNG_SIGNATURE", "PngImage", "PngLayout", "encode_png",
            "load_image_bytes", "parse_png", "rebuild_png"],
    },
)
