"""Byte-level parsing shared by all: the bounded reader, PNG images, ``.npy`` arrays, tar and safetensors.

Learned codecs code content (pixels, records, float values), but a decoder
must give back the input *file* byte for byte. Each format has one module
here: :mod:`~toolkit.formats.png` and :mod:`~toolkit.formats.npy` split a
file into its content and what rebuilds the exact bytes around it;
:mod:`~toolkit.formats.tar` tells an archive from its first block, walks its
headers and writes a directory as one; :mod:`~toolkit.formats.safetensors`
tells a checkpoint from its first bytes and frames its JSON header;
:mod:`~toolkit.formats.binary` is the one bounded reader of the toolkit's
own payloads. Nothing here is unpickled, and every length or count read
from a file is checked, with Python integers, against the bytes it came from
before any work. No torch: a codec can import these at module level.
"""

from toolkit._lazy import attach

__getattr__, __dir__, __all__ = attach(
    __name__,
    submodules=["binary", "npy", "png", "safetensors", "tar"],
    submod_attrs={
        "binary": ["ByteReader"],
        "npy": ["NPY_MAGIC", "NpyHeader", "check_uint8_records", "header_size", "npy_records", "read_npy_header",
            "rebuild_npy"],
        "png": ["MAX_INFLATE_RATIO", "MAX_PIXELS", "PNG_SIGNATURE", "PngImage", "PngLayout", "encode_png",
            "load_image_bytes", "parse_png", "rebuild_png"],
        "safetensors": ["is_safetensors"],
        "tar": ["DirectoryStream", "TarHeader", "is_tar", "read_header", "pax_size"],
    },
)
