"""The lm coder's model: weights, tokenizer, hashes and engines, loaded through the model store.

A Llama-family directory (``config.json`` + safetensors + a ByteTokenizer)
loads without ``transformers`` or torch: the weights are read as numpy
arrays with ``safetensors`` and the tokenizer is a ``tokenizers`` file. The
integer engine (the default) runs on them as they are; the lean engine
takes them as torch tensors when it is first built. A directory may carry
the integer engine's calibrated weights (``integer.safetensors``, written by
``python -m toolkit.recipes.calibrate_lm``); without them the engine quantizes the float
weights as it loads. Any other model, a Hugging Face tokenizer, a hub id or
``engine=hf`` goes through ``transformers``. The weights hash is the hash of
the weight files (the store caches it by the files' stamps), or for a hub id
of the loaded state dict.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from toolkit.errors import ConfigError, ModelMismatchError
from toolkit.models import store
from toolkit.text import llama
from toolkit.text.tokens import ByteTokens, HFTokens

__all__ = ["CodingModel", "load_coding_model", "SHIPPED_LM", "INTEGER_FILE"]

#: the name ``model=default`` stands for
SHIPPED_LM = "lm-default"
#: the integer engine's calibrated weights, beside a model's float weights (not part of their hash)
INTEGER_FILE = "integer.safetensors"


@dataclass
class CodingModel:
    """A model, its tokenizer and the identifiers the header records."""

    name: str
    config: Any
    tokenizer: Any
    weights_sha256: str
    where: store.Located
    weights: dict | None = None  # float32 numpy state dict, where the lean and integer engines run it
    integer: dict | None = None  # calibrated integer weights, where the directory ships them
    integer_sha256: str | None = None
    _hf: Any = dataclasses.field(default=None, repr=False)
    _engines: dict = dataclasses.field(default_factory=dict, repr=False)

    def engine_kind(self, requested: str) -> str:
        """``auto``: the integer engine where it computes this model (Llama family), else ``hf``."""
        if requested == "auto":
            return "int" if llama.supports(self.config) else "hf"
        if requested in ("lean", "int") and not llama.supports(self.config):
            raise ConfigError(f"engine={requested} needs a Llama-family model, not "
                              f"{getattr(self.config, 'model_type', '?')}")
        return requested

    def dtype(self, requested: str, kind: str) -> str:
        """``auto``: int8 for the integer engine; bf16 for the lean engine on CPUs with bf16 arithmetic, else fp32."""
        if kind == "int":
            if requested not in ("auto", "int8"):
                raise ConfigError(f"engine=int computes in int8, not {requested}")
            return "int8"
        if requested == "int8":
            raise ConfigError(f"dtype=int8 is the integer engine's, not engine={kind}'s")
        if requested != "auto":
            return requested
        from toolkit.text.engines import native_bf16

        return "bfloat16" if kind == "lean" and native_bf16() else "float32"

    def float_weights(self) -> dict:
        """The float32 state dict as numpy arrays (from the files, or from the ``transformers`` model)."""
        if self.weights is None:
            self.weights = {k: v.detach().float().numpy() for k, v in self.hf_model().state_dict().items()}
        return self.weights

    def integer_weights(self) -> dict:
        """The integer engine's arrays: shipped calibrated ones, or plain per-row int8 of the float weights."""
        if self.integer is None:
            from toolkit.text.integer import quantize

            self.integer = quantize(self.config, self.float_weights())
        return self.integer

    def hf_model(self) -> Any:
        """The ``transformers`` model (loaded on first use; fp32, never cast in place)."""
        if self._hf is None:
            self._hf = _load_hf_model(self.where)
        return self._hf

    def engine(self, kind: str, window: int, keep: int, dtype: str, device: str = "auto") -> Any:
        """The engine for these settings, built once per model (the lean engine copies and fuses weights).

        ``device`` (integer engine): ``auto`` runs it on the CPU with numpy and compiled loops; a torch
        device runs its linear layers there. Either gives the same integers.
        """
        key = (kind, window, keep, dtype, device)
        if key not in self._engines:
            if kind == "int":
                from toolkit.text.integer import IntLlama

                self._engines[key] = IntLlama(self.config, self.integer_weights(), window, keep,
                                              None if device == "auto" else device)
            elif kind == "lean":
                import torch

                from toolkit.text.engines import LeanLlama

                weights = {k: torch.from_numpy(v) for k, v in self.float_weights().items()}
                self._engines[key] = LeanLlama(self.config, weights, window, keep, getattr(torch, dtype))
            else:
                import torch

                from toolkit.text.engines import HFEngine

                model = self.hf_model()
                if dtype != "float32":  # a cast copy: the cached fp32 model serves every other engine
                    model = copy.deepcopy(model).to(getattr(torch, dtype))
                self._engines[key] = HFEngine(model, window, keep)
        return self._engines[key]

    def header(self) -> dict:
        out = {"name": self.name, "weights_sha256": self.weights_sha256,
               "tokenizer_sha256": self.tokenizer.digest, "alphabet": self.tokenizer.alphabet}
        if self.integer_sha256 is not None:
            out["integer_sha256"] = self.integer_sha256
        return out


def load_coding_model(name: str, model_dir: str | None = None) -> CodingModel:
    """The shipped default (``default``), a local directory or a Hugging Face id, through the store."""
    return store.load("lm", _load, SHIPPED_LM if name == "default" else name, model_dir=model_dir, hub=True)


def _weight_files(path: Path) -> list[Path]:
    files = sorted(p for p in path.glob("*.safetensors") if p.name != INTEGER_FILE)
    return files or sorted(path.glob("*.bin"))


def _load(where: store.Located) -> CodingModel:
    if where.path is None:  # a hub id: transformers resolves it, the loaded state dict is hashed
        from toolkit.models.lm import weights_sha256

        model = _load_hf_model(where)
        return CodingModel(where.name, model.config, _hf_tokens(where), weights_sha256(model), where, _hf=model)
    path = where.path
    files = _weight_files(path)
    if not files:
        raise ModelMismatchError(f"model {where.name!r}: no weight files in {path}")
    try:
        cfg = types.SimpleNamespace(**json.loads((path / "config.json").read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError) as e:
        raise ModelMismatchError(f"model {where.name!r}: cannot read config.json ({e})") from None
    tok = _tokens(where)
    sha = store.files_sha256(files)
    if llama.supports(cfg) and all(f.suffix == ".safetensors" for f in files):
        from safetensors.numpy import load_file

        weights: dict = {}
        for f in files:
            weights.update(_read_float(f))
        cm = CodingModel(where.name, cfg, tok, sha, where, weights={k: _float32(v) for k, v in weights.items()})
        if (path / INTEGER_FILE).is_file():
            cm.integer = load_file(str(path / INTEGER_FILE))
            cm.integer_sha256 = store.files_sha256([path / INTEGER_FILE])
        return cm
    model = _load_hf_model(where)
    return CodingModel(where.name, model.config, tok, sha, where, _hf=model)


def _read_float(path: Path) -> dict:
    """A safetensors file's tensors as numpy arrays; through torch only for dtypes numpy lacks (bfloat16)."""
    from safetensors.numpy import load_file

    try:
        return load_file(str(path))
    except (TypeError, ValueError):
        from safetensors.torch import load_file as load_torch

        return {k: v.float().numpy() for k, v in load_torch(str(path)).items()}


def _float32(a: Any) -> Any:
    import numpy as np

    return a if a.dtype == np.float32 else a.astype(np.float32)


def _tokens(where: store.Located) -> Any:
    from toolkit.models.tokenizer import ByteTokenizer, has_byte_tokenizer

    if where.path is not None and has_byte_tokenizer(where.path):
        return ByteTokens(ByteTokenizer.load(where.path))
    return _hf_tokens(where)


def _hf_tokens(where: store.Located) -> HFTokens:
    from transformers import AutoTokenizer

    try:
        return HFTokens(AutoTokenizer.from_pretrained(str(where.path or where.hub_id)))
    except (OSError, ValueError) as e:
        raise ModelMismatchError(f"cannot load the tokenizer of {where.name!r}: {str(e).splitlines()[0]}") from None


def _load_hf_model(where: store.Located) -> Any:
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the codec command owns stderr
    try:
        model = AutoModelForCausalLM.from_pretrained(str(where.path or where.hub_id), dtype=torch.float32)
    except (OSError, ValueError) as e:
        raise ModelMismatchError(f"cannot load model {where.name!r}: {str(e).splitlines()[0]}") from None
    return model.eval()
