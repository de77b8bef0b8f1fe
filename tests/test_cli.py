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
        "c = get_codec('zstd')(); c.config.level = 1; c.chunk_size = 1 << 20\n"
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
