"""Offline text/code corpus for the LM codec, rebuilt from Debian packages.

Every byte comes from a package that installs from the Debian registry, so the
corpus can be rebuilt anywhere without a network beyond ``apt``. Two disjoint
parts are written:

* a TRAINING corpus (``train.txt``, ``val.bin``): Python docs and stdlib,
  dictionaries (GCIDE, WordNet, FOLDOC, Devil's Dictionary), man pages,
  fortunes, Debian Reference, and a sample of Linux C source and docs;
* a held-out EVAL set (``prose_*.txt``, ``technical_*.txt``, ``code_*.c``)
  from packages or subtrees the training corpus never reads: the King James
  Bible, the Jargon File, the licence texts in ``/usr/share/common-licenses``
  and the Linux ``fs/ext4`` subtree.

The split is enforced by construction (eval sources are never listed as
training sources, and the held-out Linux subtree is excluded when the Linux
sample is drawn) and checked at the end by looking for any shared 64-byte
chunk between eval files and the training text.

The ``build_corpus`` recipe writes both::

    python -m toolkit.recipes.build_corpus --out runs/corpus --eval-out runs/eval
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import random
import re
import subprocess
import tarfile
import warnings
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

#: Document separator in ``train.txt``: a form feed plus newline rarely occurs
#: inside sources, so a reader can split documents back apart if needed.
DOC_SEP = b"\n\x0c\n"

LINUX_TARBALL = Path("/usr/src/linux-source-6.1.tar.xz")
LINUX_PREFIX = "linux-source-6.1/"
#: Subtree the eval code file is drawn from.
LINUX_HELDOUT = "fs/ext4/"
#: Excluded from training as a whole: file systems copy code from each other
#: (ext2, buffer.c, f2fs, ufs share long runs with ext4), so holding out only
#: fs/ext4 would leak eval text into training.
LINUX_TRAIN_EXCLUDE = "fs/"
#: Training directories of the Linux tree (a sample; the tree is 1 GB).
LINUX_TRAIN_DIRS = (
    "kernel/", "mm/", "lib/", "block/", "ipc/", "init/", "security/",
    "net/core/", "net/ipv4/", "include/linux/", "drivers/char/",
    "Documentation/process/", "Documentation/admin-guide/", "Documentation/core-api/",
)
LINUX_SUFFIXES = (".c", ".h", ".rst", ".txt", "Kconfig", "Makefile")

DICTD = Path("/usr/share/dictd")
MIB = 1 << 20


@dataclass
class Source:
    """One corpus source: where it comes from and how to read it."""

    name: str
    package: str
    licence: str
    read: Callable[[], Iterator[tuple[str, bytes]]]
    cap_bytes: int | None = None
    version: str = ""
    files: int = 0
    bytes: int = 0
    sha256: str = ""
    extra: dict = field(default_factory=dict)


def package_version(package: str) -> str:
    """Installed version of a Debian package, or '' when it is missing."""
    try:
        out = subprocess.run(
            ["dpkg-query", "-W", "-f=${Version}", package],
            capture_output=True, text=True, check=False,
        )
    except FileNotFoundError:
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


def _files(root: Path, pattern: str, exclude: tuple[str, ...] = ()) -> Iterator[tuple[str, bytes]]:
    # Sorted so the corpus is byte-identical across rebuilds.
    for p in sorted(root.rglob(pattern)):
        rel = str(p.relative_to(root))
        if p.is_file() and not any(part in rel for part in exclude):
            yield rel, p.read_bytes()


def _dictd(name: str) -> Iterator[tuple[str, bytes]]:
    with gzip.open(DICTD / f"{name}.dict.dz", "rb") as f:
        yield f"{name}.dict", f.read()


def _python_docs() -> Iterator[tuple[str, bytes]]:
    yield from _files(Path("/usr/share/doc/python3.11/html/_sources"), "*.txt")


def _python_stdlib() -> Iterator[tuple[str, bytes]]:
    # Tests are skipped: they are large, repetitive and unlike user code.
    yield from _files(
        Path("/usr/lib/python3.11"), "*.py",
        exclude=("test/", "tests/", "idle_test/", "site-packages", "dist-packages"),
    )


def _manpages() -> Iterator[tuple[str, bytes]]:
    # groff source, as users would compress it; only files owned by the packages.
    listing = subprocess.run(
        ["dpkg-query", "-L", "manpages", "manpages-dev"], capture_output=True, text=True,
        check=False,
    ).stdout.split("\n")
    for line in sorted(set(listing)):
        p = Path(line)
        if "/man/man" in line and p.is_file() and not p.is_symlink() and p.suffix == ".gz":
            with gzip.open(p, "rb") as f:
                yield p.name, f.read()


def _fortunes() -> Iterator[tuple[str, bytes]]:
    root = Path("/usr/share/games/fortunes")
    for p in sorted(root.iterdir()):
        if p.is_file() and not p.is_symlink() and p.suffix not in (".dat", ".u8"):
            yield p.name, p.read_bytes()


AUSTEN = Path("/usr/lib/R/site-library/janeaustenr/data")
#: A chapter heading of the Austen novels: documents are chapters, so the validation split
#: takes a few chapters rather than one whole novel.
_CHAPTER = re.compile(rb"\n(?=(?:CHAPTER|Chapter) [0-9IVXLC]+\b)")


def _austen() -> Iterator[tuple[str, bytes]]:
    """Jane Austen's six novels (narrative prose), one document per chapter.

    The R package keeps them as character vectors (one line each) in a lazy-load
    database: ``Rdata.rdx`` indexes ``Rdata.rdb``, whose records are a 4-byte length
    and a zlib stream of R's serialization, which the ``rdata`` library parses.
    """
    import rdata  # the corpus extra: reads R's serialization format

    def load(blob: bytes):
        with warnings.catch_warnings():  # it warns that an in-memory blob has no file name to check
            warnings.simplefilter("ignore", UserWarning)
            return rdata.conversion.convert(rdata.parser.parse_data(blob))

    index = load(gzip.decompress((AUSTEN / "Rdata.rdx").read_bytes()))
    db = (AUSTEN / "Rdata.rdb").read_bytes()
    for name in sorted(index["variables"]):
        off, size = (int(x) for x in index["variables"][name])
        lines = load(zlib.decompress(db[off + 4 : off + size]))
        text = "\n".join(str(x) for x in lines).encode("utf-8") + b"\n"
        for k, chapter in enumerate(_CHAPTER.split(text)):
            yield f"{name}/{k:03d}", chapter


def _debian_reference() -> Iterator[tuple[str, bytes]]:
    # The package ships a plain-text rendering beside the HTML and PDF.
    p = Path("/usr/share/debian-reference/debian-reference.en.txt.gz")
    yield p.name, gzip.decompress(p.read_bytes())


def _linux_members(select: Callable[[str], bool], cache: Path) -> Iterator[tuple[str, bytes]]:
    """Files of the Linux tarball whose path (without prefix) passes ``select``.

    One pass over the 138 MB .xz (about a minute) extracts every file either
    split needs into ``cache``; later calls reuse it.
    """
    stamp = cache / ".complete"
    if not stamp.exists():
        cache.mkdir(parents=True, exist_ok=True)
        wanted = (*LINUX_TRAIN_DIRS, LINUX_HELDOUT)
        logger.info("extracting Linux sample from %s", LINUX_TARBALL)
        with tarfile.open(LINUX_TARBALL, "r:xz") as tar:
            for m in tar:
                if not m.isfile() or not m.name.startswith(LINUX_PREFIX):
                    continue
                rel = m.name[len(LINUX_PREFIX):]
                if rel.startswith(wanted) and rel.endswith(LINUX_SUFFIXES):
                    dst = cache / rel
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    fobj = tar.extractfile(m)
                    assert fobj is not None
                    dst.write_bytes(fobj.read())
        stamp.touch()
    for p in sorted(cache.rglob("*")):
        rel = str(p.relative_to(cache))
        if p.is_file() and rel != ".complete" and select(rel):
            yield rel, p.read_bytes()


def _linux_train(cache: Path) -> Callable[[], Iterator[tuple[str, bytes]]]:
    return lambda: _linux_members(
        lambda r: r.startswith(LINUX_TRAIN_DIRS) and not r.startswith(LINUX_TRAIN_EXCLUDE), cache
    )


def _kjv() -> Iterator[tuple[str, bytes]]:
    # The `bible` program decodes its own packed data file to plain verses.
    out = subprocess.run(["bible", "Ge1:1-Re22:21"], capture_output=True, check=True)
    yield "kjv.txt", out.stdout


def _licences() -> Iterator[tuple[str, bytes]]:
    root = Path("/usr/share/common-licenses")
    for p in sorted(root.iterdir()):
        # Unversioned names (GPL, LGPL, GFDL) are symlinks to versioned files.
        if p.is_file() and not p.is_symlink():
            yield p.name, p.read_bytes()


def training_sources(linux_cache: Path) -> list[Source]:
    """The training sources, in a fixed order, with per-source byte caps."""
    return [
        Source("python-docs", "python3.11-doc",
               "PSF-2.0 (docs; code samples Zero-Clause BSD)", _python_docs),
        Source("python-stdlib", "libpython3.11-stdlib", "PSF-2.0", _python_stdlib, 12 * MIB),
        Source("gcide", "dict-gcide", "GPL-2.0+ (GCIDE)", lambda: _dictd("gcide"), 12 * MIB),
        Source("wordnet", "dict-wn", "WordNet-3.0 (permissive, BSD-like)",
               lambda: _dictd("wn"), 6 * MIB),
        Source("foldoc", "dict-foldoc", "GFDL-1.1+ (FOLDOC)", lambda: _dictd("foldoc")),
        Source("devil", "dict-devil", "public domain", lambda: _dictd("devil")),
        Source("manpages", "manpages",
               "mixed free: BSD, Expat, GPL-1+, Linux-man-pages-copyleft", _manpages,
               10 * MIB, extra={"also": "manpages-dev"}),
        Source("fortunes", "fortunes", "BSD (package); quotations of various origin", _fortunes),
        Source("debian-reference", "debian-reference-en", "GPL-2.0+", _debian_reference),
        Source("austen", "r-cran-janeaustenr", "public domain text (package MIT)", _austen),
        Source("linux", "linux-source-6.1", "GPL-2.0 (some files dual BSD/MIT)",
               _linux_train(linux_cache), 20 * MIB,
               extra={"excluded_subtree": LINUX_TRAIN_EXCLUDE}),
    ]


def eval_sources(linux_cache: Path) -> dict[str, list[Source]]:
    """Held-out sources per category; none of these is ever a training source."""
    return {
        "prose": [Source("kjv", "bible-kjv-text", "public domain text (packaging GPL-2.0+)",
                         _kjv, 1 * MIB, extra={"reader": "bible-kjv"})],
        "technical": [
            Source("jargon", "dict-jargon", "public domain (Jargon File 4.4.7)",
                   lambda: _dictd("jargon"), 1 * MIB),
            Source("licences", "base-files",
                   "verbatim copying permitted, no changes (licence texts)", _licences,
                   512 * 1024),
        ],
        "code": [Source(
            "linux-ext4", "linux-source-6.1", "GPL-2.0",
            lambda: _linux_members(
                lambda r: r.startswith(LINUX_HELDOUT) and r.endswith((".c", ".h")), linux_cache
            ), 1 * MIB, extra={"subtree": LINUX_HELDOUT},
        )],
    }


def _sample_blocks(data: bytes, cap: int, block: int = 256 * 1024) -> bytes:
    """Keep ``cap`` bytes spread evenly over ``data`` in contiguous blocks.

    Evenly spaced blocks cover the whole alphabet of a dictionary (or every
    directory of a tree) instead of only its first letters.
    """
    if len(data) <= cap:
        return data
    nblocks = -(-len(data) // block)
    keep = max(1, cap // block)
    idx = sorted({int(i * nblocks / keep) for i in range(keep)})
    return b"".join(data[i * block:(i + 1) * block] for i in idx)[:cap]


def collect(source: Source) -> list[tuple[str, bytes]]:
    """Read a source's documents, applying its cap, and fill in its provenance."""
    docs = [(n, d) for n, d in source.read() if d]
    total = sum(len(d) for _, d in docs)
    if source.cap_bytes is not None and total > source.cap_bytes:
        if len(docs) == 1:
            docs = [(docs[0][0], _sample_blocks(docs[0][1], source.cap_bytes))]
        else:
            # Seeded file sample so the subset is reproducible.
            rng = random.Random(f"toolkit-corpus-{source.name}")
            order = list(range(len(docs)))
            rng.shuffle(order)
            kept, size = [], 0
            for i in order:
                if size >= source.cap_bytes:
                    break
                kept.append(i)
                size += len(docs[i][1])
            docs = [docs[i] for i in sorted(kept)]
    h = hashlib.sha256()
    for name, data in docs:
        h.update(name.encode() + b"\0" + data)
    source.version = package_version(source.package)
    source.files = len(docs)
    source.bytes = sum(len(d) for _, d in docs)
    source.sha256 = h.hexdigest()
    logger.info("%s: %d files, %d bytes", source.name, source.files, source.bytes)
    return docs


def _provenance(s: Source) -> dict:
    return {
        "name": s.name, "package": s.package, "version": s.version, "licence": s.licence,
        "files": s.files, "bytes": s.bytes, "sha256": s.sha256, "cap_bytes": s.cap_bytes,
        **s.extra,
    }


def build_training(out: Path, linux_cache: Path, val_fraction: float = 0.01) -> dict:
    """Write ``train.txt``, ``val.bin`` and ``sources.json`` into ``out``.

    The validation split takes whole documents (about ``val_fraction`` of every
    source's bytes, at least one document where a source has several), so
    validation text is never a neighbour window of a training window.
    """
    out.mkdir(parents=True, exist_ok=True)
    train_parts: list[bytes] = []
    val_parts: list[bytes] = []
    sources = training_sources(linux_cache)
    for s in sources:
        docs = collect(s)
        if len(docs) == 1:
            # A single big file (a dictionary): hold out its last slice.
            data = docs[0][1]
            cut = len(data) - max(1, int(len(data) * val_fraction))
            train_parts.append(data[:cut])
            val_parts.append(data[cut:])
            continue
        rng = random.Random(f"toolkit-val-{s.name}")
        target = max(1, int(s.bytes * val_fraction))
        val_idx: set[int] = set()
        size = 0
        for i in rng.sample(range(len(docs)), len(docs)):
            if size >= target:
                break
            val_idx.add(i)
            size += len(docs[i][1])
        for i, (_, data) in enumerate(docs):
            (val_parts if i in val_idx else train_parts).append(data)
    train = DOC_SEP.join(train_parts)
    val = DOC_SEP.join(val_parts)
    (out / "train.txt").write_bytes(train)
    (out / "val.bin").write_bytes(val)
    meta = {
        "train_bytes": len(train), "val_bytes": len(val),
        "train_sha256": hashlib.sha256(train).hexdigest(),
        "val_sha256": hashlib.sha256(val).hexdigest(),
        "val_fraction": val_fraction,
        "sources": [_provenance(s) for s in sources],
    }
    (out / "sources.json").write_text(json.dumps(meta, indent=2) + "\n")
    logger.info("train %d bytes, val %d bytes -> %s", len(train), len(val), out)
    return meta


def build_eval(
    out: Path, linux_cache: Path, train_file: Path | None = None, max_overlap: float = 0.01
) -> dict:
    """Write the held-out eval files ``<category>_<source>.<ext>`` into ``out``.

    When ``train_file`` is given, measures shared runs with the training text
    (``check_overlap``) and fails if more than ``max_overlap`` of any eval
    file's bytes are covered by them.
    """
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for category, sources in eval_sources(linux_cache).items():
        for s in sources:
            data = DOC_SEP.join(d for _, d in collect(s)) if category != "code" else \
                b"\n".join(d for _, d in collect(s))
            ext = "c" if category == "code" else "txt"
            path = out / f"{category}_{s.name}.{ext}"
            path.write_bytes(data)
            files.append({"file": path.name, "category": category, "bytes": len(data),
                          "sha256": hashlib.sha256(data).hexdigest(), **_provenance(s)})
    meta: dict = {"files": files}
    if train_file is not None:
        # Short shared runs are expected (GPL notices in source headers, quoted
        # definitions); whole leaked documents would show as a large fraction.
        hits = check_overlap(out, train_file)
        sizes = {f["file"]: f["bytes"] for f in files}
        frac = {name: round(n * 64 / sizes[name], 5) for name, n in hits.items()}
        meta["overlap_64B_chunks"] = hits
        meta["overlap_fraction"] = frac
        logger.info("eval/train overlap (fraction of eval bytes): %s", frac)
        bad = {k: v for k, v in frac.items() if v > max_overlap}
        if bad:
            raise RuntimeError(f"eval files overlap training text: {bad}")
    (out / "eval_sources.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def check_overlap(eval_dir: Path, train_file: Path, chunk: int = 64) -> dict[str, int]:
    """Count training chunks that also occur in each eval file.

    Every ``chunk``-byte substring of the eval files (at every offset) goes in
    a set; the training text is then probed at a stride of ``chunk``, so any
    shared run of ``2 * chunk - 1`` bytes or more is found in one pass.
    Chunks that are mostly not letters (comment rulers, blank runs) are
    skipped: they recur everywhere and say nothing about leaked documents.
    """
    owner: dict[bytes, str] = {}
    for p in sorted(eval_dir.iterdir()):
        if p.suffix in (".txt", ".c"):
            data = p.read_bytes()
            for i in range(len(data) - chunk + 1):
                owner.setdefault(data[i:i + chunk], p.name)
    train = train_file.read_bytes()
    counts: dict[str, int] = {}
    for i in range(0, len(train) - chunk + 1, chunk):
        piece = train[i:i + chunk]
        name = owner.get(piece)
        if name is not None and sum(c.isalpha() for c in piece.decode("latin-1")) >= chunk // 2:
            counts[name] = counts.get(name, 0) + 1
    return counts
