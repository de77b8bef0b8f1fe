"""The ``codec`` command: compress, decompress, inspect and benchmark .tkz files.

Errors print one line on stderr and exit non-zero (``--debug`` shows the
traceback). Inputs are never modified; outputs go through a temporary file in
the target directory and a rename, so a failure leaves nothing half-written.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import logging
import os
import signal
import sys
import tempfile
from collections.abc import Iterator
from typing import Any, BinaryIO

from toolkit import __version__
from toolkit.errors import ConfigError, InputError, OutputError, ToolkitError

logger = logging.getLogger("toolkit.cli")

SUFFIX = ".tkz"


def _parse_sets(items: list[str] | None, codec: str | None = None) -> dict[str, Any]:
    """The ``--set key=value`` pairs. For compressing with a named ``codec`` they are typed by its config's
    fields (the Python API takes typed values only); decode-time settings (``model_dir``) stay strings, and
    with ``auto`` they are left for compress to refuse."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        out[key.strip()] = value
    if not out or codec in (None, "auto"):
        return out
    from toolkit.codecs.registry import get_codec, parse_settings

    return parse_settings(get_codec(codec).Config, out)


@contextlib.contextmanager
def _open_input(path: str) -> Iterator[tuple[BinaryIO, int | None]]:
    if path == "-":
        yield sys.stdin.buffer, None
        return
    if os.path.isdir(path):
        from toolkit.formats.tar import DirectoryStream

        # a directory of checkpoint shards compresses as one file: DIR.tar.tkz, which decompresses to DIR.tar
        tar = DirectoryStream(path)
        try:
            yield tar, None
        finally:
            tar.close()
        return
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed below
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a directory") from None
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror})") from None
    with f:
        try:
            size = os.fstat(f.fileno()).st_size
        except OSError:
            size = None
        yield f, size


class Terminated(BaseException):
    """SIGTERM arrived: unwinds like KeyboardInterrupt so that temporary files are removed."""


def _on_sigterm(signum, frame):
    raise Terminated


@contextlib.contextmanager
def _terminable() -> Iterator[None]:
    """Turn SIGTERM into an exception for the duration (the cleanup in ``finally`` blocks then runs)."""
    try:
        old = signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not the main thread: signals cannot be handled here
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _publish(tmp: str, path: str, force: bool) -> None:
    """Give the finished temporary file its name; without ``force`` never replace an existing file."""
    if force:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)  # fails if the name exists, atomically
    except FileExistsError:
        raise OutputError(f"{path}: exists (use -f to overwrite)") from None
    except OSError:
        # no hard links here (some network and FAT file systems): claim the name exclusively,
        # then move the finished file over that claim
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        except FileExistsError:
            raise OutputError(f"{path}: exists (use -f to overwrite)") from None
        os.replace(tmp, path)
        return
    os.unlink(tmp)


@contextlib.contextmanager
def _open_output(path: str, force: bool, src: str) -> Iterator[BinaryIO]:
    """Yield a file that becomes ``path`` only if the block succeeds."""
    if path == "-":
        yield sys.stdout.buffer
        sys.stdout.buffer.flush()
        return
    if src != "-" and os.path.exists(src) and os.path.exists(path) and os.path.samefile(src, path):
        raise OutputError(f"{path}: output would overwrite the input")
    if os.path.exists(path) and not force:
        raise OutputError(f"{path}: exists (use -f to overwrite)")
    if os.path.isdir(path):
        raise OutputError(f"{path}: is a directory")
    directory = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(prefix=".", suffix=".part", dir=directory)
    except FileNotFoundError:
        if os.path.isdir(directory):  # /proc, /sys: the directory is there but takes no new files
            raise OutputError(f"{path}: cannot create files in {directory}") from None
        raise OutputError(f"{path}: directory {directory} does not exist") from None
    except OSError as e:
        raise OutputError(f"{path}: cannot write ({e.strerror})") from None
    ok = False
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; an output gets the user's usual mode
        with os.fdopen(fd, "wb") as f:
            yield f
        _publish(tmp, path, force)
        ok = True
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise OutputError(f"{path}: disk full") from None
        raise OutputError(f"{path}: cannot write ({e.strerror or e})") from None
    finally:
        if not ok:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def _progress(total: int | None, quiet: bool, desc: str):
    if quiet:
        return contextlib.nullcontext(None)
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc=desc, file=sys.stderr,
                leave=False, disable=None)


def _to(bar):
    """The API's ``progress(done, total)`` drawn on a byte bar (False without one)."""
    return (lambda done, total: bar.update(done - bar.n)) if bar is not None else False


def _default_compress_out(inp: str) -> str:
    if inp == "-":
        return "-"
    return os.path.normpath(inp) + ".tar" + SUFFIX if os.path.isdir(inp) else inp + SUFFIX


def _default_decompress_out(inp: str) -> str:
    if inp == "-":
        return "-"
    if not inp.endswith(SUFFIX):
        raise ConfigError(f"{inp}: name does not end in {SUFFIX}; give the output with -o")
    return inp[: -len(SUFFIX)]


# ------------------------------------------------------------------ commands
def cmd_compress(args: argparse.Namespace) -> int:
    from toolkit.api import compress_stream

    out = args.output or _default_compress_out(args.input)
    if args.best and args.codec != "auto":
        raise ConfigError("--best is for --codec auto (it lets lm compete on long text)")
    settings = _parse_sets(args.set, args.codec)
    with _open_input(args.input) as (src, size):
        with _open_output(out, args.force, args.input) as dst, _progress(size, args.quiet, "compress") as bar:
            summary = compress_stream(src, dst, codec=args.codec, settings=settings, size=size,
                                      progress=_to(bar), best=args.best)
    if args.quiet:
        return 0
    if out != "-":
        n, m = summary["in_bytes"], summary["out_bytes"]
        bpb = f"{8 * m / n:.3f} bits/byte" if n else "empty input"
        if summary.get("seconds"):  # lossy audio: the rate is what matters
            bpb = f"{summary['seconds']:.1f} s at {8 * m / summary['seconds'] / 1000:.2f} kbps"
        why = f"; auto: {summary['auto']}" if summary.get("auto") else ""
        print(f"{args.input} -> {out}: {n} -> {m} bytes ({bpb}, codec {summary['codec']}{why})", file=sys.stderr)
    if summary.get("hint"):
        print(f"codec: hint: {summary['hint']}", file=sys.stderr)
    return 0


def cmd_decompress(args: argparse.Namespace) -> int:
    from toolkit.api import decompress_stream

    out = args.output or _default_decompress_out(args.input)
    with _open_input(args.input) as (src, _size):
        with _open_output(out, args.force, args.input) as dst, _progress(None, args.quiet, "decompress") as bar:
            decompress_stream(src, dst, progress=_to(bar),
                              settings=_parse_sets(args.set), allow_mismatch=args.allow_mismatch)
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from toolkit.api import info

    with _open_input(args.input) as (src, _size):
        data = info(src)
    if args.json:
        print(json.dumps(data, indent=2, sort_keys=True))
        return 0
    h = data["header"]
    print(f"file:        {args.input}")
    print(f"codec:       {h['codec']} (version {h['codec_version']})")
    print(f"config:      {json.dumps(h['config'], sort_keys=True)}")
    for key in sorted(set(h) - {"codec", "codec_version", "config", "chunk_size", "batch_chunks", "size"}):
        print(f"{key + ':':<13}{json.dumps(h[key], sort_keys=True)}")
    print(f"chunks:      {data['chunks']} of up to {h['chunk_size']} bytes "
          f"({', '.join(f'{k} {v}' for k, v in data['methods'].items() if v) or 'none'})")
    print(f"size:        {data['raw_bytes']} -> {data['file_bytes']} bytes")
    if data["bits_per_byte"] is not None:
        print(f"bits/byte:   {data['bits_per_byte']:.4f}")
    print(f"sha256:      {data['sha256']}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from toolkit.codecs.registry import list_codecs
    from toolkit.models.store import list_models

    print("codecs:")
    for name, cls in list_codecs().items():
        print(f"  {name:<8} v{cls.version}  {cls.description}")
    print("  auto     picks per input from cheap statistics, lm only where it takes about a minute (the default)")
    models = list_models()
    print("shipped models:" if models else "shipped models: none")
    for name, entry in models.items():
        fig = dict(entry.get("figures", {}))
        if isinstance(entry.get("validation"), dict) and "bpb" in entry["validation"]:
            fig.setdefault("validation bpb", round(entry["validation"]["bpb"], 4))
        figs = ", ".join(f"{k} {v}" for k, v in fig.items())
        params = entry.get("parameters", entry.get("params", "?"))
        print(f"  {name:<16} {params} params  {figs}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from toolkit.bench import format_table, run_bench

    rows = run_bench(args.files, codecs=args.codec, rivals=not args.no_rivals, progress=not args.quiet)
    print(format_table(rows))
    if args.json:
        from toolkit.bench import write_json

        write_json(args.json, rows)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from toolkit.bench import demo

    print(demo(progress=not args.quiet))
    return 0


# ------------------------------------------------------------------ parser
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="codec", description="Compress files with learned models (.tkz).")
    p.add_argument("--version", action="version", version=f"codec (toolkit) {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    c = sub.add_parser("compress", help="compress a file, a directory (as tar), or - for stdin")
    c.add_argument("input")
    c.add_argument("-o", "--output", help="output path (default INPUT.tkz; - for stdout)")
    c.add_argument("--codec", default="auto", help="codec name, or auto (default)")
    c.add_argument("--set", action="append", metavar="KEY=VALUE", help="codec setting (repeatable)")
    c.add_argument("--best", action="store_true",
                   help="with auto: let the lm codec compete on text of any length (about 8 KB/s)")
    c.add_argument("-f", "--force", action="store_true", help="overwrite the output")
    c.add_argument("-q", "--quiet", action="store_true", help="no progress bar or summary")
    c.set_defaults(func=cmd_compress)

    d = sub.add_parser("decompress", help="decompress a .tkz file (or - for stdin)")
    d.add_argument("input")
    d.add_argument("-o", "--output", help="output path (default: INPUT without .tkz; - for stdout)")
    d.add_argument("-f", "--force", action="store_true", help="overwrite the output")
    d.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    d.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="decode-time setting, such as model_dir=DIR (repeatable)")
    d.add_argument("--allow-mismatch", action="store_true",
                   help="decode a file recorded with other library versions or CPU; the SHA-256 check decides")
    d.set_defaults(func=cmd_decompress)

    i = sub.add_parser("info", help="show a .tkz file's header and framing")
    i.add_argument("input")
    i.add_argument("--json", action="store_true", help="machine-readable output")
    i.set_defaults(func=cmd_info)

    ls = sub.add_parser("list", help="list codecs and shipped models")
    ls.set_defaults(func=cmd_list)

    b = sub.add_parser("bench", help="compare codecs and classic tools on files, in one run")
    b.add_argument("files", nargs="+")
    b.add_argument("--codec", action="append", help="registered codec to include (repeatable; default all but store)")
    b.add_argument("--no-rivals", action="store_true", help="skip zstd/xz/brotli/bzip2/PPMd baselines")
    b.add_argument("--json", help="also write the rows as JSON to this path")
    b.add_argument("-q", "--quiet", action="store_true")
    b.set_defaults(func=cmd_bench)

    dm = sub.add_parser("demo", help="compress the shipped samples, verify, and compare with zstd and xz")
    dm.add_argument("-q", "--quiet", action="store_true")
    dm.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        with _terminable():
            return args.func(args)
    except ToolkitError as e:
        if args.debug:
            raise
        print(f"codec: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("codec: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print("codec: terminated", file=sys.stderr)
        return 143
    except ModuleNotFoundError as e:
        if args.debug:
            raise
        print(f"codec: error: {_missing_module(e.name or str(e))}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # the reader went away (e.g. `| head`); nothing useful to report
        with contextlib.suppress(OSError):
            sys.stderr.close()
        return 141
    except OSError as e:
        if args.debug:
            raise
        print(f"codec: error: {e.strerror or e}" + (f": {e.filename}" if e.filename else ""), file=sys.stderr)
        return 1
    except MemoryError:
        print("codec: error: out of memory (try a smaller --set batch= or chunk, or free memory)", file=sys.stderr)
        return 1
    except Exception as e:
        out_of = _out_of_memory(e)
        if out_of is None or args.debug:
            raise
        print(f"codec: error: {out_of}", file=sys.stderr)
        return 1


#: importable name -> the extra that installs it (`pip install "toolkit[EXTRA]"`)
_EXTRAS = {"papermill": "notebooks", "nbformat": "notebooks", "ipykernel": "notebooks", "jupyterlab": "notebooks",
           "rdata": "corpus", "hypothesis": "test", "pytest": "test", "sklearn": "test", "skimage": "test"}


def _missing_module(name: str) -> str:
    top = name.split(".")[0]
    if top in _EXTRAS:
        return f"this needs {top}, which is optional: pip install 'toolkit[{_EXTRAS[top]}]'"
    return f"this needs {top}, which is not installed: reinstall toolkit (pip install -e .) to get its dependencies"


def _out_of_memory(e: BaseException) -> str | None:
    """A message for the allocator errors of the libraries that are loaded (torch is never imported for it)."""
    torch = sys.modules.get("torch")
    oom = getattr(torch, "OutOfMemoryError", None) if torch is not None else None
    if oom is not None and isinstance(e, oom):
        return "out of GPU memory (torch): try a smaller --set batch= or free the device"
    return None


if __name__ == "__main__":
    sys.exit(main())
