"""``--codec auto``: pick a codec from cheap statistics, trial-coding only where they cannot decide.

The rule, in order:

1. An empty input is stored.
2. Magic bytes: a safetensors checkpoint (a JSON header length, then
   ``{``) goes to ``weights`` when its header parses (else the classic
   pick); so do a ``.npy`` file of floats and a tar archive whose sample
   holds float tensors of such files (a directory of shards); a PNG goes to
   ``pc`` (the shipped patch model; should ``pc`` refuse that PNG, the
   classic pick below codes it). Other ``.npy`` files are coded classically,
   with a hint on ``pc`` for records.
3. The classic codecs are measured on the sample (zstd -19, xz -9e, stored);
   the smallest is the classic pick. On a sample that is the whole input the
   sizes are exact.
4. Text (nearly UTF-8, at most 1% control bytes) may go to ``lm``, whose
   coder runs at about 8 KB/s each way on this project's 2-core machine.
   ``lm`` competes only where its estimated time, size / 8 KB/s, stays within
   a minute (about 480 KB), or with ``best``. The decision is made from the
   classic codecs' sizes alone, before any model loads: lm is picked where
   the classic pick needs ``LM_MIN_BPB`` bits/byte or more (prose, code,
   CSV: lm beat xz -9e by 20-35% on them in benchmarks/lossless_text);
   below that the text is so repetitive (logs) that a classic codec is as
   good and far faster. Longer or unsized text gets the classic pick and a hint
   saying how to ask for lm.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from toolkit.codecs.registry import get_codec
from toolkit.errors import ToolkitError
from toolkit.formats.npy import NPY_MAGIC
from toolkit.formats.png import PNG_SIGNATURE
from toolkit.formats.safetensors import SNIFF_BYTES, header_size, is_safetensors
from toolkit.formats.tar import is_tar
from toolkit.text.detect import looks_like_text  # the lm codec's own test: auto offers lm what lm codes

logger = logging.getLogger(__name__)

__all__ = ["Choice", "choose_codec", "LM_BYTES_PER_S", "LM_BUDGET_S"]

#: the lm codec's speed on the 2-core reference machine (each way), and what auto may spend on it
LM_BYTES_PER_S = 8_000
LM_BUDGET_S = 60
_LM_MIN_SAMPLE = 512  # lm's estimate needs this much text
#: classic bits per byte from which lm is picked for text: on 60 KB of dpkg.log xz -9e made 0.643 bits/byte
#: and lm 0.647 (its header included), so below this the classic codec is as small and far faster
LM_MIN_BPB = 0.8


@dataclass
class Choice:
    """What auto picked and why; ``fallback`` codes the input where ``codec`` refuses it."""

    codec: str
    reason: str
    hint: str | None = None  # one line for the user: how to ask for a stronger mode
    fallback: str | None = None


def _classic(sample: bytes) -> tuple[str, float]:
    """The smallest classic codec on ``sample`` and its bits per byte."""
    sizes = {"store": len(sample)}
    for name in ("zstd", "xz"):
        sizes[name] = len(get_codec(name)().compress_whole(sample))
    name = min(sizes, key=lambda k: (sizes[k], k != "zstd"))  # ties: the fastest that is not store
    return name, 8 * sizes[name] / len(sample)


def _float_share(sample: bytes) -> float:
    """The share of ``sample`` that the weights codec reads as float values (0 for other formats)."""
    from toolkit.weights.layout import Scanner

    try:
        spans = Scanner().feed(sample)
    except ToolkitError:
        return 0.0
    return sum(s.end - s.begin for s in spans if s.dtype) / max(len(sample), 1)


def choose_codec(sample: bytes, size: int | None = None, best: bool = False) -> Choice:
    """Pick a codec for an input that starts with ``sample`` and has ``size`` bytes (None: unknown).

    ``best`` lets ``lm`` compete on text of any length, however long it takes.
    """
    if not sample:
        return Choice("store", "empty input")
    classic, classic_bpb = _classic(sample)
    if sample.startswith(PNG_SIGNATURE):
        return Choice("pc", "a PNG image: probabilistic circuits", fallback=classic)
    # the sniffed bytes alone are too few for a safetensors file: the smallest JSON, "{}", ends a byte later
    if len(sample) > SNIFF_BYTES and is_safetensors(sample):
        try:
            from toolkit.weights.checkpoint import parse_header

            header = parse_header(sample, size) if len(sample) >= header_size(sample) else None
        except ToolkitError as e:
            return Choice(classic, f"a safetensors-like header that does not parse ({e}): {classic}")
        what = f"{len(header.tensors)} tensors" if header else "a header longer than the sample"
        return Choice("weights", f"a safetensors checkpoint ({what}): lossless weight coding")
    floats = _float_share(sample)
    if floats > 0.5 or (floats > 0 and is_tar(sample)):
        what = "a tar archive of checkpoints" if is_tar(sample) else "a .npy file of floats"
        return Choice("weights", f"{what} ({100 * floats:.0f}% of the sample float values): lossless weight coding")
    if sample.startswith(NPY_MAGIC):
        return Choice(classic, f"a .npy file: {classic} at {classic_bpb:.2f} bits/byte on the sample",
                      hint="for records coded with your circuit: --codec pc --set model=DIR")
    if not looks_like_text(sample):
        return Choice(classic, f"binary data: {classic} at {classic_bpb:.2f} bits/byte on the sample")
    seconds = None if size is None else size / LM_BYTES_PER_S
    if len(sample) < _LM_MIN_SAMPLE:
        return Choice(classic, f"short text: {classic} at {classic_bpb:.2f} bits/byte")
    if not best and (seconds is None or seconds > LM_BUDGET_S):
        took = "of unknown length" if seconds is None else f"of {size:,} bytes (lm: about {seconds / 60:.0f} min)"
        return Choice(classic, f"text {took}: {classic} at {classic_bpb:.2f} bits/byte on the sample",
                      hint="for the strongest (slow) mode add --best to codec compress, or use --codec lm")
    if classic_bpb >= LM_MIN_BPB:
        return Choice("lm", f"text: {classic} needs {classic_bpb:.2f} bits/byte, where lm does better")
    return Choice(classic, f"repetitive text: {classic} at {classic_bpb:.2f} bits/byte",
                  hint="lm may still be smaller, and much slower: --codec lm")
