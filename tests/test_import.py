import os
import subprocess
import sys


def _import_seconds(module: str) -> tuple[float, list[str]]:
    """Seconds to import ``module`` in a fresh interpreter, and which heavy libraries it brought in."""
    code = (
        "import sys, time\n"
        "t = time.perf_counter()\n"
        f"import {module}\n"
        "dt = time.perf_counter() - t\n"
        "print(dt, *[m for m in ('numpy', 'torch', 'transformers') if m in sys.modules])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    return float(out[0]), out[1:]


def test_import_is_quick_and_does_not_touch_cuda():
    # the baseline is measured here, in this run: importing numpy alone (the lightest of the heavy
    # libraries) in a fresh interpreter; ``import toolkit`` must cost less, so it cannot load any of them
    numpy_seconds = min(_import_seconds("numpy")[0] for _ in range(3))
    toolkit_seconds, heavy = min(_import_seconds("toolkit") for _ in range(3))
    assert heavy == []  # neither numpy nor torch is imported
    assert toolkit_seconds < numpy_seconds, (toolkit_seconds, numpy_seconds)


def _walk_public_names() -> str:
    """Every package's ``__all__`` and listed submodules, resolved from a bare ``import toolkit``."""
    return (
        "import types, toolkit\n"
        "seen, todo, resolved = set(), [toolkit], []\n"
        "while todo:\n"
        "    pkg = todo.pop()\n"
        "    for name in pkg.__all__:\n"
        "        value = getattr(pkg, name)\n"
        "        assert value is not None, (pkg.__name__, name)\n"
        "        if isinstance(value, types.ModuleType) and value.__name__ not in seen:\n"
        "            seen.add(value.__name__)\n"
        "            resolved.append(value.__name__)\n"
        "            if hasattr(value, '__path__'):\n"
        "                todo.append(value)\n"
        "        elif not isinstance(value, types.ModuleType):\n"
        "            resolved.append(f'{pkg.__name__}.{name}')\n"
        "print('\\n'.join(sorted(resolved)))\n"
    )


def test_every_listed_name_and_submodule_resolves_from_a_bare_import():
    out = subprocess.run([sys.executable, "-c", _walk_public_names()], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    names = set(out.stdout.split())
    for module in ("toolkit.weights", "toolkit.llm.kvcache", "toolkit.vision.sam", "toolkit.vision.mod",
                   "toolkit.audio", "toolkit.circuits", "toolkit.text", "toolkit.entropy", "toolkit.formats"):
        assert module in names
    assert "toolkit.compress" in names and "toolkit.llm.quantize_" in names


def test_codec_use_does_not_initialise_cuda():
    code = (
        "import toolkit, torch\n"
        "toolkit.decompress(toolkit.compress(b'abc' * 100, codec='xz'))\n"
        "from toolkit import entropy\n"
        "entropy.logits_to_freqs(torch.zeros(2, 8))\n"
        "print(torch.cuda.is_initialized())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_public_api_names_resolve():
    import toolkit

    for name in toolkit.__all__:
        assert getattr(toolkit, name) is not None


def _torch_after(argv: list[str], tmp_path) -> bool:
    code = (
        "import sys\n"
        "from toolkit.cli import main\n"
        "try:\n"
        "    main(sys.argv[1:])\n"
        "except SystemExit:\n"
        "    pass\n"
        "print('torch' in sys.modules)\n"
    )
    r = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, cwd=tmp_path)
    return r.stdout.strip().splitlines()[-1] == "True"


def test_classic_commands_do_not_import_torch(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"no torch for classic codecs " * 100)
    assert not _torch_after(["--help"], tmp_path)
    for codec in ("zstd", "xz", "store"):
        assert not _torch_after(["compress", "a.txt", "--codec", codec, "-q", "-f"], tmp_path)
        assert not _torch_after(["info", "a.txt.tkz"], tmp_path)
        assert not _torch_after(["decompress", "a.txt.tkz", "-o", "b.txt", "-q", "-f"], tmp_path)
    (tmp_path / "n.bin").write_bytes(os.urandom(3000))
    assert not _torch_after(["compress", "n.bin", "-q"], tmp_path)  # auto: binary, decided cheaply


def test_codec_list_does_not_import_torch(tmp_path):
    assert not _torch_after(["list"], tmp_path)


def test_looking_up_a_codec_imports_only_its_module():
    code = (
        "import sys\n"
        "from toolkit.codecs.registry import get_codec\n"
        "get_codec('zstd')\n"
        "print(sorted(m for m in sys.modules if m.startswith('toolkit.codecs.')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "toolkit.codecs.lm" not in out and "toolkit.codecs.pc" not in out and "toolkit.codecs.classic" in out


def _heavy_after(argv: list[str], tmp_path) -> list[str]:
    code = (
        "import sys\n"
        "from toolkit.cli import main\n"
        "main(sys.argv[1:])\n"
        "print([m for m in ('torch', 'transformers', 'torchvision') if m in sys.modules])\n"
    )
    r = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, cwd=tmp_path, check=True)
    return eval(r.stdout.strip().splitlines()[-1])  # a list literal of names


def test_lm_codec_with_the_shipped_model_imports_no_torch(tmp_path):
    """The integer engine runs the shipped model on numpy: neither torch nor transformers is imported."""
    text = b"The integer engine codes this note without torch.\n" * 20
    (tmp_path / "note.txt").write_bytes(text)
    assert _heavy_after(["compress", "note.txt", "--codec", "lm", "-q"], tmp_path) == []
    assert _heavy_after(["decompress", "note.txt.tkz", "-o", "back.txt", "-q"], tmp_path) == []
    assert (tmp_path / "back.txt").read_bytes() == text
    # auto decides from the classic codecs' sizes: no model loads on its way to a choice
    (tmp_path / "auto.txt").write_bytes(text[:2048])
    assert _heavy_after(["compress", "auto.txt", "-q"], tmp_path) == []


def test_every_package_lists_every_module_it_has():
    """A module on disk that its package's table leaves out does not resolve from ``import toolkit``."""
    import importlib
    import pkgutil
    from pathlib import Path

    import toolkit

    # the command and the recipes sit at the top: nothing reaches them through the package
    top_only = {"toolkit": {"cli", "recipes"}}
    for init in sorted(Path(toolkit.__file__).parent.rglob("__init__.py")):
        name = ".".join(init.parent.relative_to(Path(toolkit.__file__).parent.parent).parts)
        if name.startswith("toolkit.recipes") or "assets" in name:
            continue
        package = importlib.import_module(name)
        on_disk = {m.name for m in pkgutil.iter_modules(package.__path__) if not m.name.startswith("_")}
        assert on_disk - set(package.__all__) - top_only.get(name, set()) == set(), name
