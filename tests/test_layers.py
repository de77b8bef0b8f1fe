"""The layers of DESIGN.md, enforced: every import inside ``toolkit`` points down the stack.

Each module's imports are read from its syntax tree (function-level and
type-checking imports included), resolved to the top-level part of the
package they name, and checked against :data:`ALLOWED`. Libraries may use one
another only through public names.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import toolkit

PACKAGE = Path(toolkit.__file__).parent

#: top to bottom; a part may import parts of lower layers
LAYERS: list[set[str]] = [
    {"cli", "recipes", "__main__"},
    {"api", "bench"},
    {"codecs"},
    {"text", "llm", "circuits", "weights", "image", "vision", "audio"},
    {"models", "data", "formats"},
    {"entropy", "kernels"},
    {"errors", "numerics", "config", "progress", "schedule", "notebook", "_lazy"},
]
LIBRARIES = LAYERS[3]
#: imports within one layer that the design allows: libraries use one another (public names only);
#: the benchmark helpers call the public API; the leaves' base classes raise the toolkit's errors
SIDEWAYS: set[tuple[str, str]] = {(a, b) for a in LIBRARIES for b in LIBRARIES} | {
    ("__main__", "cli"), ("bench", "api"), ("config", "errors"), ("progress", "errors"),
    ("kernels", "entropy"), ("models", "formats"), ("data", "formats"),
}


def _level(part: str) -> int:
    for i, layer in enumerate(LAYERS):
        if part in layer:
            return i
    raise KeyError(part)


ALLOWED: dict[str, set[str]] = {
    part: {other for layer in LAYERS[_level(part) + 1:] for other in layer}
    | {b for a, b in SIDEWAYS if a == part} | {part}
    for layer in LAYERS for part in layer
}


def _module_name(path: Path, root: Path) -> tuple[str, bool]:
    rel = path.relative_to(root.parent).with_suffix("")
    parts = list(rel.parts)
    is_pkg = parts[-1] == "__init__"
    if is_pkg:
        parts = parts[:-1]
    return ".".join(parts), is_pkg


def _targets(tree: ast.AST, module: str, is_pkg: bool, root_name: str) -> list[tuple[str, list[str], int]]:
    """(imported module, names taken from it, line) for every toolkit import in ``tree``: import statements,
    ``importlib.import_module("toolkit...")`` calls, and underscore attributes of an imported module."""
    out = []
    package = module if is_pkg else module.rsplit(".", 1)[0]
    aliases: dict[str, str] = {}  # a local name -> the toolkit module or name it was imported as
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names if a.name.split(".")[0] == root_name]
            aliases.update({a.asname: a.name for a in node.names if a.asname and a.name.split(".")[0] == root_name})
        elif isinstance(node, ast.Call) and (getattr(node.func, "attr", None) == "import_module"
                                             or getattr(node.func, "id", None) == "import_module"):
            arg = node.args[0] if node.args else None
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and \
                    arg.value.split(".")[0] == root_name:
                out.append((arg.value, [], node.lineno))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] == root_name:
                names = [a.name for a in node.names]
                if target == root_name:  # `from toolkit import entropy` names a part; other names are the API's
                    out += [(f"{root_name}.{n}" if not n.startswith("__") else root_name, [], node.lineno)
                            for n in names]
                else:
                    out.append((target, names, node.lineno))
                aliases.update({a.asname or a.name: f"{target}.{a.name}" for a in node.names})
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases \
                and node.attr.startswith("_") and not node.attr.startswith("__"):
            out.append((aliases[node.value.id], [node.attr], node.lineno))
    return out


def violations(root: Path = PACKAGE) -> list[str]:
    """Every import under ``root`` (a ``toolkit`` package folder) that the layers forbid."""
    root_name = root.name
    problems = []
    for path in sorted(root.rglob("*.py")):
        if "assets" in path.relative_to(root).parts:
            continue
        module, is_pkg = _module_name(path, root)
        if module == root_name:
            continue  # the package's own lazy table names the public API by string, not by import
        src = module.split(".")[1]
        if src not in ALLOWED:
            problems.append(f"{path}: part {src!r} is in no layer of tests/test_layers.py")
            continue
        for target, names, line in _targets(ast.parse(path.read_text(), str(path)), module, is_pkg, root_name):
            parts = target.split(".")
            # `import toolkit` reaches the public API (the api layer) through the package's lazy names
            dst = parts[1] if len(parts) > 1 else "api"
            where = f"{path.relative_to(root.parent)}:{line}"
            if dst not in ALLOWED:
                problems.append(f"{where}: imports {target}, a part in no layer")
            elif dst not in ALLOWED[src]:
                problems.append(f"{where}: {src} imports {target} ({dst} is not below {src})")
            elif dst != src and (any(p.startswith("_") and p != "__init__" for p in parts[2:])
                                 or any(n.startswith("_") and not n.startswith("__") for n in names)):
                problems.append(f"{where}: {src} uses a private name of {dst} ({target}: {', '.join(names)})")
    return problems


def test_every_import_points_down_the_layers():
    assert violations() == []


def test_every_part_of_the_package_has_a_layer():
    parts = {p.name if p.is_dir() else p.stem for p in PACKAGE.iterdir()
             if (p.is_dir() and (p / "__init__.py").exists()) or (p.suffix == ".py" and p.stem != "__init__")}
    assert parts - set(ALLOWED) == set()


def _fake_package(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "toolkit"
    for rel, text in {"__init__.py": "", **files}.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        for parent in path.parents:
            if parent == root.parent:
                break
            (parent / "__init__.py").touch()
        path.write_text(text)
    return root


@pytest.mark.parametrize("source, reason", [
    ("from toolkit.codecs.registry import get_codec\n", "not below"),
    ("def f():\n    from toolkit import api\n", "not below"),
    ("import toolkit\n", "not below"),
    ("from ..codecs import lm\n", "not below"),
    ("from toolkit.text.tokens import _private\n", "private name"),
    ("from toolkit.text._engine import run\n", "private name"),
    ("from toolkit.shiny import thing\n", "in no layer"),
    ("import importlib\nimportlib.import_module('toolkit.codecs.lm')\n", "not below"),
    ("from toolkit.text import tokens\ntokens._private()\n", "private name"),
])
def test_the_check_finds_a_wrong_way_import_in_a_temporary_module(tmp_path, source, reason):
    root = _fake_package(tmp_path, {"weights/bad.py": source, "text/tokens.py": "", "codecs/lm.py": ""})
    found = violations(root)
    assert len(found) == 1 and reason in found[0] and "weights/bad.py" in found[0]


def test_a_private_name_is_private_to_its_part_on_every_layer(tmp_path):
    root = _fake_package(tmp_path, {"api.py": "from toolkit.codecs import container\ncontainer._read_full(1)\n",
                                    "codecs/container.py": ""})
    found = violations(root)
    assert len(found) == 1 and "private name" in found[0] and "api.py" in found[0]


def test_the_check_accepts_imports_that_point_down(tmp_path):
    root = _fake_package(tmp_path, {
        "weights/good.py": "from toolkit.entropy import core\nfrom toolkit.text.tokens import encode\n"
                           "from . import other\nfrom toolkit.weights._own import helper\n",
        "codecs/adapter.py": "from toolkit.weights import good\nfrom toolkit.errors import FormatError\n",
        "cli.py": "import toolkit\nfrom toolkit import api\n",
    })
    assert violations(root) == []
