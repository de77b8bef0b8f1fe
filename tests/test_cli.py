import errno
import os
import subprocess
import sys

import pytest

from toolkit.cli import main

TEXT = ("Compression is prediction. " * 200).encode()


@pytest.fixture
def sample(tmp_path):
    p = tmp_path / "notes.txt"
    p.write_bytes(TEXT)
    return p


def test_compress_decompress_keeps_input(sample, tmp_path):
    assert main(["compress", str(sample), "-q"]) == 0
    tkz = tmp_path / "notes.txt.tkz"
    assert tkz.exists() and sample.read_bytes() == TEXT
    sample.rename(tmp_path / "orig.txt")
    assert main(["decompress", str(tkz), "-q"]) == 0
    assert (tmp_path / "notes.txt").read_bytes() == TEXT
    assert tkz.exists()
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".part")]


def test_refuses_overwrite_without_force(sample, tmp_path, capsys):
    out = tmp_path / "o.tkz"
    out.write_bytes(b"precious")
    assert main(["compress", str(sample), "-o", str(out), "-q"]) != 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "exists" in err
    assert out.read_bytes() == b"precious"
    assert main(["compress", str(sample), "-o", str(out), "-f", "-q"]) == 0
    assert out.read_bytes()[:4] == b"\x89TKZ"


def test_missing_input_and_bad_names(tmp_path, capsys):
    assert main(["compress", str(tmp_path / "nope.txt")]) == 2
    assert "no such file" in capsys.readouterr().err
    (tmp_path / "x.bin").write_bytes(b"abc")
    assert main(["decompress", str(tmp_path / "x.bin")]) != 0
    assert "-o" in capsys.readouterr().err
    assert main(["compress", str(tmp_path / "x.bin"), "--set", "oops"]) == 2
    assert main(["compress", str(tmp_path / "x.bin"), "--codec", "zstd", "--set", "level=99", "-q"]) == 2
    assert main(["compress", str(tmp_path / "x.bin"), "--codec", "nope", "-q"]) == 2


def test_unwritable_output_leaves_nothing(sample, tmp_path, capsys):
    missing_dir = tmp_path / "no" / "such" / "dir" / "f.tkz"
    assert main(["compress", str(sample), "-o", str(missing_dir), "-q"]) != 0
    assert "directory" in capsys.readouterr().err
    if os.geteuid() != 0:  # root ignores permission bits
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        assert main(["compress", str(sample), "-o", str(ro / "f.tkz"), "-q"]) != 0
        assert os.listdir(ro) == []


def test_disk_full_is_one_line_and_no_partial_file(sample, tmp_path, capsys, monkeypatch):
    import toolkit.codecs.container as c

    real = c.write_stream

    def full_disk(codec, src, dst, **kw):
        class Full:
            def write(self, b):
                raise OSError(errno.ENOSPC, "No space left on device")

        return real(codec, src, Full(), **kw)

    monkeypatch.setattr(c, "write_stream", full_disk)
    out = tmp_path / "full.tkz"
    assert main(["compress", str(sample), "-o", str(out), "-q"]) == 6
    err = capsys.readouterr().err
    assert "disk full" in err and err.count("\n") == 1
    assert not out.exists()
    assert sorted(os.listdir(tmp_path)) == ["notes.txt"]


def test_damaged_file_gives_clean_error_and_no_output(sample, tmp_path, capsys):
    assert main(["compress", str(sample), "--codec", "xz", "-q"]) == 0
    tkz = tmp_path / "notes.txt.tkz"
    blob = bytearray(tkz.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    tkz.write_bytes(bytes(blob))
    out = tmp_path / "restored.txt"
    rc = main(["decompress", str(tkz), "-o", str(out)])
    err = capsys.readouterr().err
    assert rc != 0 and err.startswith("codec: error:") and err.count("\n") == 1
    assert not out.exists()


def test_info_and_list(sample, tmp_path, capsys):
    main(["compress", str(sample), "--codec", "xz", "-q"])
    capsys.readouterr()
    assert main(["info", str(tmp_path / "notes.txt.tkz")]) == 0
    out = capsys.readouterr().out
    assert "codec:       xz" in out and "bits/byte" in out
    assert main(["info", str(tmp_path / "notes.txt.tkz"), "--json"]) == 0
    import json

    assert json.loads(capsys.readouterr().out)["raw_bytes"] == len(TEXT)
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "zstd" in out and "xz" in out and "store" in out


def test_bench_table(sample, tmp_path, capsys):
    js = tmp_path / "b.json"
    assert main(["bench", str(sample), "--codec", "zstd", "--json", str(js)]) == 0
    out = capsys.readouterr().out
    for name in ["zstd -19", "xz -9e", "brotli -q11", "bzip2 -9", "ppmd"]:
        assert name in out
    import json

    rows = json.loads(js.read_text())["rows"]
    assert all(r["out_bytes"] > 0 for r in rows)


@pytest.mark.slow
def test_demo_verifies_samples(capsys):
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    assert "every round trip verified" in out and "prose.txt" in out


def test_stdin_stdout_subprocess(tmp_path):
    data = os.urandom(3000) + TEXT
    enc = subprocess.run([sys.executable, "-m", "toolkit", "compress", "-", "--codec", "zstd", "-q"],
                         input=data, capture_output=True, check=True).stdout
    assert enc[:4] == b"\x89TKZ"
    dec = subprocess.run([sys.executable, "-m", "toolkit", "decompress", "-", "-q"],
                         input=enc, capture_output=True, check=True).stdout
    assert dec == data
    bad = subprocess.run([sys.executable, "-m", "toolkit", "decompress", "-", "-q"],
                         input=b"garbage", capture_output=True)
    assert bad.returncode != 0 and b"Traceback" not in bad.stderr
    assert bad.stderr.decode().count("\n") == 1


def test_streaming_memory_is_bounded(tmp_path):
    """64 MiB through stdin with small chunks: peak RSS grows far less than the input."""
    script = (
        "import io, resource, sys, toolkit\n"
        "from toolkit.codecs import container\n"
        "from toolkit.codecs.registry import get_codec\n"
        "class Src(io.RawIOBase):\n"
        "    n = 64 << 20\n"
        "    def readable(self): return True\n"
        "    def read(self, k=-1):\n"
        "        k = min(k if k >= 0 else self.n, self.n); self.n -= k\n"
        "        return b'abcdefgh' * (k // 8) + b'x' * (k % 8)\n"
        "class Sink:\n"
        "    n = 0\n"
        "    def write(self, b): self.n += len(b)\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "c = get_codec('zstd').from_settings({'level': 1}); c.chunk_size = 1 << 20\n"
        "container.write_stream(c, Src(), Sink())\n"
        "after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "print((after - before) // 1024)\n"
    )
    grown_mb = int(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                                  check=True).stdout.strip())
    assert grown_mb < 32


def test_debug_shows_traceback(tmp_path):
    r = subprocess.run([sys.executable, "-m", "toolkit", "--debug", "decompress", str(tmp_path / "missing.tkz")],
                       capture_output=True, text=True)
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_output_gets_the_umask_mode_not_0600(sample, tmp_path):
    old = os.umask(0o027)
    try:
        assert main(["compress", str(sample), "-o", str(tmp_path / "m.tkz"), "-q", "--codec", "zstd"]) == 0
    finally:
        os.umask(old)
    assert (tmp_path / "m.tkz").stat().st_mode & 0o777 == 0o640


def _create_meanwhile(monkeypatch, path, content=b"someone else's"):
    """Make compress_stream create ``path`` while it runs (the race between check and rename)."""
    import toolkit.api

    real = toolkit.api.compress_stream

    def racing(*a, **kw):
        path.write_bytes(content)
        return real(*a, **kw)

    monkeypatch.setattr(toolkit.api, "compress_stream", racing)


def test_a_file_created_during_compression_is_never_overwritten(sample, tmp_path, monkeypatch, capsys):
    out = tmp_path / "race.tkz"
    _create_meanwhile(monkeypatch, out)
    assert main(["compress", str(sample), "-o", str(out), "-q", "--codec", "zstd"]) == 6
    assert "exists" in capsys.readouterr().err
    assert out.read_bytes() == b"someone else's"
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".part")]


def test_without_hard_links_it_still_never_overwrites(sample, tmp_path, monkeypatch):
    def no_links(src, dst):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    assert main(["compress", str(sample), "-o", str(tmp_path / "a.tkz"), "-q", "--codec", "zstd"]) == 0
    assert (tmp_path / "a.tkz").read_bytes()[:4] == b"\x89TKZ"
    _create_meanwhile(monkeypatch, tmp_path / "b.tkz")
    assert main(["compress", str(sample), "-o", str(tmp_path / "b.tkz"), "-q", "--codec", "zstd"]) == 6
    assert (tmp_path / "b.tkz").read_bytes() == b"someone else's"
    assert sorted(os.listdir(tmp_path)) == ["a.tkz", "b.tkz", "notes.txt"]


def test_sigterm_leaves_no_part_file(tmp_path):
    import signal
    import time

    out = tmp_path / "t.tkz"
    p = subprocess.Popen([sys.executable, "-m", "toolkit", "compress", "-", "-o", str(out), "--codec", "zstd",
                          "-q"], stdin=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdin.write(TEXT)
    p.stdin.flush()  # the input stays open: the command waits for more
    deadline = time.time() + 30
    while not [n for n in os.listdir(tmp_path) if n.endswith(".part")] and time.time() < deadline:
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=30) == 143
    assert b"terminated" in p.stderr.read()
    p.stdin.close()
    assert os.listdir(tmp_path) == []


def test_output_in_a_directory_that_takes_no_files(sample, capsys):
    assert main(["compress", str(sample), "-o", "/proc/t.tkz", "-q", "--codec", "zstd"]) == 6
    err = capsys.readouterr().err
    assert "cannot create files in /proc" in err and "does not exist" not in err


def test_setting_type_errors_read_like_words(sample, capsys):
    assert main(["compress", str(sample), "--codec", "xz", "--set", "preset=abc", "-q", "-o", "-"]) == 2
    err = capsys.readouterr().err
    assert "is not an integer" in err and "<class" not in err


def test_empty_input_reports_no_nan(tmp_path, capsys):
    (tmp_path / "e").write_bytes(b"")
    assert main(["compress", str(tmp_path / "e")]) == 0
    err = capsys.readouterr().err
    assert "nan" not in err and "empty input" in err


def test_resource_errors_are_named_not_called_damage(sample, tmp_path, monkeypatch, capsys):
    from toolkit.codecs import classic

    assert main(["compress", str(sample), "--codec", "zstd", "-q"]) == 0

    def exhausted(self, payloads, sizes, known):
        raise MemoryError

    monkeypatch.setattr(classic._ZstdDecoder, "decode_chunks", exhausted)
    assert main(["decompress", str(tmp_path / "notes.txt.tkz"), "-o", str(tmp_path / "x"), "-q"]) == 1
    err = capsys.readouterr().err
    assert "out of memory" in err and "cannot decode" not in err and err.count("\n") == 1


def test_a_missing_optional_dependency_names_the_extra(monkeypatch, capsys):
    import toolkit.cli as cli

    def needs_papermill(args):
        raise ModuleNotFoundError("No module named 'papermill'", name="papermill")

    monkeypatch.setattr(cli, "cmd_list", needs_papermill)
    assert cli.main(["list"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "toolkit[notebooks]" in err


def test_auto_prints_its_reason_and_hint(tmp_path, capsys, monkeypatch):
    from toolkit.codecs import auto

    monkeypatch.setattr(auto, "LM_BUDGET_S", 0.001)  # as if the file were long: lm would take too long
    p = tmp_path / "long.txt"
    p.write_bytes(TEXT)
    assert main(["compress", str(p)]) == 0
    err = capsys.readouterr().err
    assert "auto: text of 5,400 bytes" in err and "codec: hint:" in err and "--best" in err
    assert main(["compress", str(p), "--codec", "zstd", "--best", "-f"]) == 2


def test_bench_speeds_read_and_empty_files_have_no_nan(tmp_path, capsys):
    from toolkit.bench import speed

    assert speed(0.0084) == "8.4 KB/s" and speed(12.345) == "12.35 MB/s"
    (tmp_path / "empty").write_bytes(b"")
    assert main(["bench", str(tmp_path / "empty"), "--codec", "zstd", "--no-rivals"]) == 0
    out = capsys.readouterr().out
    assert "nan" not in out and "| empty | zstd |" in out


def test_torch_out_of_memory_is_named_when_torch_is_loaded(monkeypatch, capsys):
    import types

    import toolkit.cli as cli

    class OutOfMemoryError(RuntimeError):
        pass

    monkeypatch.setitem(sys.modules, "torch", types.SimpleNamespace(OutOfMemoryError=OutOfMemoryError))

    def oom(args):
        raise OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(cli, "cmd_list", oom)
    assert cli.main(["list"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "out of GPU memory (torch)" in err
