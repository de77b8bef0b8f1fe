"""The lm coder's model: weights, tokenizer, hashes and engines, loaded through the model store.

A Llama-family directory (``config.json`` + safetensors + a ByteTokenizer)
loads without ``transformers``: the lean engine needs only the config and
the state dict, read with ``safetensors``, and the tokenizer is a
``tokenizers`` file. Any other model, a Hugging Face tokenizer, a hub id or
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

import torch

from toolkit.errors import ConfigError, ModelMismatchError
from toolkit.models import store
from toolkit.text.engines import HFEngine, LeanLlama, native_bf16
from toolkit.text.tokens import ByteTokens, HFTokens

__all__ = ["CodingModel", "load_coding_model", "SHIPPED_LM"]

#: the name ``model=default`` stands for
SHIPPED_LM = "lm-default"


@dataclass
class CodingModel:
    """A model, its tokenizer and the identifiers the header records."""

    name: str
    config: Any
    tokenizer: Any
    weights_sha256: str
    where: store.Located
    weights: dict | None = None  # fp32 state dict, where the lean engine can run without transformers
    _hf: Any = dataclasses.field(default=None, repr=False)
    _engines: dict = dataclasses.field(default_factory=dict, repr=False)

    def engine_kind(self, requested: str) -> str:
        """``auto``: the lean engine where it computes this model exactly, else ``hf``."""
        if requested == "auto":
            return "lean" if LeanLlama.supports(self.config) else "hf"
        if requested == "lean" and not LeanLlama.supports(self.config):
            raise ConfigError(f"engine=lean needs a Llama-family model, not {self.config.model_type}")
        return requested

    def dtype(self, requested: str, kind: str) -> str:
        """``auto``: bf16 for the lean engine on CPUs with bf16 arithmetic, else fp32."""
        if requested != "auto":
            return requested
        return "bfloat16" if kind == "lean" and native_bf16() else "float32"

    def hf_model(self) -> Any:
        """The ``transformers`` model (loaded on first use; fp32, never cast in place)."""
        if self._hf is None:
            self._hf = _load_hf_model(self.where)
        return self._hf

    def engine(self, kind: str, window: int, keep: int, dtype: str) -> Any:
        """The engine for these settings, built once per model (the lean engine copies and fuses weights)."""
        key = (kind, window, keep, dtype)
        if key not in self._engines:
            if kind == "lean":
                weights = self.weights if self.weights is not None else self.hf_model().state_dict()
                self._engines[key] = LeanLlama(self.config, weights, window, keep, getattr(torch, dtype))
            else:
                model = self.hf_model()
                if dtype != "float32":  # a cast copy: the cached fp32 model serves every other engine
                    model = copy.deepcopy(model).to(getattr(torch, dtype))
                self._engines[key] = HFEngine(model, window, keep)
        return self._engines[key]

    def header(self) -> dict:
        return {"name": self.name, "weights_sha256": self.weights_sha256,
                "tokenizer_sha256": self.tokenizer.digest, "alphabet": self.tokenizer.alphabet}


def load_coding_model(name: str, model_dir: str | None = None) -> CodingModel:
    """The shipped default (``default``), a local directory or a Hugging Face id, through the store."""
    return store.load("lm", _load, SHIPPED_LM if name == "default" else name, model_dir=model_dir, hub=True)


def _weight_files(path: Path) -> list[Path]:
    files = sorted(path.glob("*.safetensors"))
    return files or sorted(path.glob("*.bin"))


def _load(where: store.Located) -> CodingModel:
    with torch.inference_mode():
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
        if LeanLlama.supports(cfg) and all(f.suffix == ".safetensors" for f in files):
            from safetensors.torch import load_file

            weights: dict = {}
            for f in files:
                weights.update(load_file(str(f)))
            return CodingModel(where.name, cfg, tok, sha, where, weights={k: v.float() for k, v in weights.items()})
        model = _load_hf_model(where)
        return CodingModel(where.name, model.config, tok, sha, where, _hf=model)


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
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the codec command owns stderr
    try:
        model = AutoModelForCausalLM.from_pretrained(str(where.path or where.hub_id), dtype=torch.float32)
    except (OSError, ValueError) as e:
        raise ModelMismatchError(f"cannot load model {where.name!r}: {str(e).splitlines()[0]}") from None
    return model.eval()
