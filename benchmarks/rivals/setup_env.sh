#!/usr/bin/env bash
# Build the rival-tools virtual environment (idempotent) and print its versions.
#
#   bash benchmarks/rivals/setup_env.sh          # from the repo root
#
# Why a separate venv: llmcompressor 0.14.0.1 pins torch<=2.14.0,
# transformers<=5.17.0 and compressed-tensors==0.19.0, and transformers 5.17
# wants huggingface-hub<2. The main venv has torch 2.14.1 (a ~5 GB CUDA build),
# transformers 5.24 and huggingface-hub 2.x; letting pip "fix" that would either
# download another torch or break the main venv.
#
# How: runs/rival-venv is a plain venv whose site-packages holds a .pth file that
# appends the main venv's site-packages to sys.path. Packages installed in the
# rival venv come first on sys.path, so its transformers 5.17 / hub 1.x shadow
# the main venv's, while torch (and numpy, safetensors, tokenizers, ...) are
# reused from the main venv. pip sees the main venv's packages as installed but
# "outside environment", so it never uninstalls them; the main venv is untouched.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
MAIN_VENV="${MAIN_VENV:-$ROOT/.venv}"
VENV="${RIVAL_VENV:-$ROOT/runs/rival-venv}"
PY_MAIN="$MAIN_VENV/bin/python"

MAIN_SITE="$("$PY_MAIN" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
TORCH_VERSION="$("$PY_MAIN" -c 'import torch; print(torch.__version__.split("+")[0])')"

# Versions that were checked to work together on CPU with torch 2.14.1 (2026-12).
LLMC="llmcompressor==0.14.0.1"
CT="compressed-tensors==0.19.0"       # exactly what llmcompressor 0.14.0.1 requires
TRANSFORMERS="transformers==5.17.0"   # llmcompressor: >=5.15,<=5.17
TORCHAO="torchao==0.18.0"
HQQ="hqq==0.2.8.post1"

if [ ! -x "$VENV/bin/python" ]; then
    echo "creating $VENV"
    # The main venv's python makes a venv of the same base interpreter (same
    # Python version, so the main venv's compiled packages load).
    "$PY_MAIN" -m venv "$VENV"
fi

SITE="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
# zz_ so it is processed after anything else; plain path lines are appended to sys.path.
echo "$MAIN_SITE" > "$SITE/zz_main_venv.pth"

# Never let pip touch torch: the constraint makes any resolution that wants another
# torch fail instead of downloading one.
CONSTRAINTS="$VENV/torch-constraint.txt"
echo "torch==$TORCH_VERSION" > "$CONSTRAINTS"
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check -q -c "$CONSTRAINTS")

have() { "$VENV/bin/python" - "$@" <<'EOF'
import sys
from importlib import metadata
for spec in sys.argv[1:]:
    name, _, ver = spec.partition("==")
    try:
        got = metadata.version(name)
    except metadata.PackageNotFoundError:
        sys.exit(1)
    if ver and got != ver:
        sys.exit(1)
EOF
}

if ! have "$LLMC"; then
    # --no-deps: its torch<=2.14.0 pin is the only thing that does not fit, and
    # auto-round (a hard dep) is only imported for AutoRound recipes.
    "${PIP[@]}" --no-deps "$LLMC"
fi
if ! have "$CT" "$TRANSFORMERS" datasets accelerate loguru nvidia-ml-py auto-round; then
    # The rest of llmcompressor's requirements, resolved normally (minus torch).
    "${PIP[@]}" "$CT" "$TRANSFORMERS" "huggingface-hub<2" datasets "accelerate>=1.15.0" \
        loguru nvidia-ml-py pillow "auto-round>=0.14.1,<=0.15.1"
fi
if ! have "$TORCHAO"; then
    # torchao wheels declare no torch requirement; --no-deps keeps it that way.
    "${PIP[@]}" --no-deps "$TORCHAO"
fi
if ! have "$HQQ"; then
    # sdist, pure python build (CUDA extensions are a separate optional package).
    "${PIP[@]}" "$HQQ"
fi

"$VENV/bin/python" - <<'EOF'
import warnings
warnings.filterwarnings("ignore")
from importlib import metadata
import torch
print("python", __import__("platform").python_version(), "| torch", torch.__version__, "from", torch.__file__.rsplit("/", 2)[0])
for p in ["transformers", "huggingface-hub", "llmcompressor", "compressed-tensors", "torchao", "hqq",
          "accelerate", "datasets", "auto-round"]:
    print(f"  {p:20s} {metadata.version(p)}")
# Import checks: each rival's entry point.
import llmcompressor, compressed_tensors                     # noqa: F401
from llmcompressor import oneshot                              # noqa: F401
from llmcompressor.modifiers.quantization import GPTQModifier  # noqa: F401
from torchao.quantization import quantize_                     # noqa: F401
from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig  # noqa: F401
from hqq.models.hf.base import AutoHQQHFModel                  # noqa: F401
print("imports ok")
EOF
