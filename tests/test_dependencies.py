"""pyproject.toml declares every library the code imports."""

import ast
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

import toolkit.cli

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[1]
#: imported through another declared dependency (torch installs triton on Linux)
VIA = {"triton": "torch"}


def _imports() -> set[str]:
    names = set()
    for path in (ROOT / "toolkit").rglob("*.py"):
        if "assets" in path.relative_to(ROOT / "toolkit").parts:  # sample files are data, not code
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names.add(node.module.split(".")[0])
    return {n for n in names if n not in sys.stdlib_module_names and n not in ("toolkit", "__future__")}


def _name(requirement: str) -> str:
    for sep in "<>=![; ":
        requirement = requirement.split(sep)[0]
    return requirement.lower().replace("_", "-")


def test_every_import_is_declared():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    base = {_name(r) for r in project["dependencies"]}
    extras = {extra: {_name(r) for r in reqs} for extra, reqs in project["optional-dependencies"].items()}
    dists = packages_distributions()
    for module in sorted(_imports()):
        dist = VIA.get(module) or dists.get(module, [module])[0]  # not installed: its own name
        name = _name(dist)
        if name in base:
            continue
        extra = toolkit.cli._EXTRAS.get(module)
        assert extra and name in extras[extra], f"{module} ({dist}) is neither a dependency nor in its extra"
