"""Make calibration / evaluation token tensors for ``run_rival.py``.

The rivals take plain torch-saved LongTensors so that every method (and our own
toolkit) sees exactly the same tokens:

    calib.pt : LongTensor [n_samples, seq_len]   (GPTQ calibration batches)
    eval.pt  : LongTensor [n_windows, seq_len]   (non-overlapping perplexity windows)

The text is fixed and present on every Debian machine (/usr/share/common-licenses),
so numbers are reproducible without network access. Calibration and evaluation
use *different* licence files so the evaluation is not on the calibration text.

    python benchmarks/rivals/make_data.py --model toolkit/assets/lm-default \
        --out-dir runs/rivals-data --seq-len 512
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

LICENSES = Path("/usr/share/common-licenses")
# Unique files only (GPL, LGPL, GFDL are symlinks to one of these).
CALIB_FILES = ["GPL-3", "GPL-2", "LGPL-2.1", "GFDL-1.3", "LGPL-2", "GPL-1", "GFDL-1.2", "LGPL-3"]
EVAL_FILES = ["Apache-2.0", "MPL-2.0", "MPL-1.1", "Artistic", "CC0-1.0", "BSD"]


def tokenize_files(tok, names: list[str]) -> list[int]:
    ids: list[int] = []
    for name in names:
        text = (LICENSES / name).read_text(encoding="utf-8", errors="replace")
        ids.extend(tok(text)["input_ids"])
    return ids


def to_windows(ids: list[int], seq_len: int, limit: int | None) -> torch.Tensor:
    # Non-overlapping windows; the ragged tail is dropped so every window is full.
    n = len(ids) // seq_len
    if limit is not None:
        n = min(n, limit)
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="toolkit/assets/lm-default")
    ap.add_argument("--out-dir", default="runs/rivals-data")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--n-calib", type=int, default=None, help="cap on calibration samples")
    ap.add_argument("--n-eval", type=int, default=None, help="cap on eval windows")
    args = ap.parse_args()

    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_file=str(Path(args.model) / "tokenizer.json"))
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    calib = to_windows(tokenize_files(tok, CALIB_FILES), args.seq_len, args.n_calib)
    evals = to_windows(tokenize_files(tok, EVAL_FILES), args.seq_len, args.n_eval)
    torch.save(calib, out / "calib.pt")
    torch.save(evals, out / "eval.pt")
    meta = {
        "seq_len": args.seq_len,
        "calib_shape": list(calib.shape),
        "eval_shape": list(evals.shape),
        "calib_files": CALIB_FILES,
        "eval_files": EVAL_FILES,
    }
    (out / "data.json").write_text(json.dumps(meta, indent=2))
    print(json.dumps(meta))


if __name__ == "__main__":
    main()
