"""The LM codec's language model: a small ``transformers`` Llama over ByteTokenizer.

The model is the stock ``LlamaForCausalLM`` (users can load it with plain
``from_pretrained``); only its size is ours. ``lm_config`` builds the
configuration in code, ``load_default_lm`` loads the shipped weights from
``toolkit/assets/lm-default/`` and ``weights_sha256`` identifies a set of
weights for codec headers.
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from toolkit.config import Config, check
from toolkit.models.store import ASSETS as ASSETS_DIR
from toolkit.models.tokenizer import ByteTokenizer
from toolkit.progress import Progress, reporter
from toolkit.schedule import lr_at, step_progress

logger = logging.getLogger(__name__)

DEFAULT_LM_NAME = "lm-default"
DEFAULT_LM_DIR = ASSETS_DIR / DEFAULT_LM_NAME
WEIGHTS_FILE = "model.safetensors"


@dataclass(frozen=True)
class LMShape(Config):
    """Size of the Llama; serialises to JSON for manifests and run logs (the fields alone, as they always have)."""

    versioned = False

    vocab_size: int = 4096
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 704
    max_positions: int = 512
    rope_theta: float = 10000.0

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size", "max_positions"):
            check(getattr(self, name) >= 1, f"{name} must be at least 1, got {getattr(self, name)}")
        check(self.hidden_size % self.num_heads == 0,
              f"hidden_size {self.hidden_size} must be a multiple of num_heads {self.num_heads}")
        check(self.rope_theta > 0, f"rope_theta must be positive, got {self.rope_theta}")


def lm_config(shape: LMShape | None = None, **overrides: object) -> LlamaConfig:
    """A LlamaConfig for ``shape`` (defaults: the shipped model's size).

    Tied input/output embeddings halve the embedding cost, which dominates at
    this size; no dropout (the data is seen about once); ``bos_token_id`` is
    the tokenizer's reserved last id.
    """
    s = shape or LMShape()
    kwargs: dict = dict(
        vocab_size=s.vocab_size,
        hidden_size=s.hidden_size,
        intermediate_size=s.intermediate_size,
        num_hidden_layers=s.num_layers,
        num_attention_heads=s.num_heads,
        num_key_value_heads=s.num_heads,
        max_position_embeddings=s.max_positions,
        rope_theta=s.rope_theta,
        tie_word_embeddings=True,
        attention_dropout=0.0,
        bos_token_id=s.vocab_size - 1,
        eos_token_id=None,
        pad_token_id=None,
        rms_norm_eps=1e-5,
        initializer_range=0.02,
    )
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def build_lm(shape: LMShape | None = None, seed: int = 0) -> LlamaForCausalLM:
    """A freshly initialised model (fp32), seeded so runs are repeatable."""
    torch.manual_seed(seed)
    return LlamaForCausalLM(lm_config(shape))


def count_parameters(model: torch.nn.Module) -> int:
    """Unique parameters (tied embeddings counted once)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def weights_sha256(model: torch.nn.Module) -> str:
    """Digest of the model's weights, independent of how they were stored.

    Hashes the state-dict tensors in sorted name order; for each: its name,
    dtype, shape, then its raw little-endian bytes. Tied weights appear under
    both names, as the state dict lists them. The same weights give the same
    digest whether loaded from safetensors, created in memory or moved
    between devices; a dtype change gives a different digest on purpose
    (the codec's probabilities change with it).
    """
    h = hashlib.sha256()
    state = model.state_dict()
    for name in sorted(state):
        t = state[name].detach().to("cpu").contiguous()
        h.update(name.encode("utf-8") + b"\0")
        h.update(str(t.dtype).encode() + b"\0")
        h.update(repr(tuple(t.shape)).encode() + b"\0")
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save_lm(model: LlamaForCausalLM, tokenizer: ByteTokenizer, directory: str | Path) -> Path:
    """Write config.json, model.safetensors, tokenizer.json and its marker into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save(directory)
    return directory


def load_lm(
    directory: str | Path, dtype: torch.dtype = torch.float32
) -> tuple[LlamaForCausalLM, ByteTokenizer]:
    """Load a model directory written by ``save_lm`` (or a Hugging Face id/path).

    The model comes back in eval mode; its vocabulary must match the
    tokenizer's, or the ids would be misread.
    """
    model = LlamaForCausalLM.from_pretrained(str(directory), dtype=dtype)
    model.eval()
    tokenizer = ByteTokenizer.load(directory)
    if model.config.vocab_size != tokenizer.vocab_size:
        raise ValueError(
            f"model vocab {model.config.vocab_size} != tokenizer vocab {tokenizer.vocab_size}"
        )
    return model, tokenizer


def load_default_lm(
    dtype: torch.dtype = torch.float32,
) -> tuple[LlamaForCausalLM, ByteTokenizer]:
    """The shipped model and tokenizer from ``toolkit/assets/lm-default/``."""
    if not (DEFAULT_LM_DIR / WEIGHTS_FILE).exists():
        raise FileNotFoundError(f"shipped LM missing: {DEFAULT_LM_DIR / WEIGHTS_FILE}")
    return load_lm(DEFAULT_LM_DIR, dtype=dtype)


def train_small_lm(
    texts: list[bytes],
    directory: str | Path,
    shape: LMShape | None = None,
    steps: int = 200,
    seq_len: int = 128,
    batch: int = 8,
    lr: float = 3e-3,
    vocab_size: int = 512,
    seed: int = 0,
    progress: Progress = False,
) -> list[float]:
    """Train a small model and tokenizer in memory and save them to ``directory``.

    For notebooks and tests: the whole corpus is tokenised at once, batches
    are random windows, AdamW with a short warmup and cosine decay. Returns
    the training loss (bits per token) of every step. The shipped model is
    trained by the ``train_lm`` recipe (``python -m toolkit.recipes.train_lm``)
    instead, on a time budget with checkpoints.
    """
    from toolkit.models.tokenizer import train as train_tokenizer

    tok = train_tokenizer(texts, vocab_size=vocab_size)
    shape = shape or LMShape(vocab_size=tok.vocab_size, hidden_size=64, num_layers=2, num_heads=4,
                             intermediate_size=176, max_positions=max(seq_len, 64))
    if shape.vocab_size != tok.vocab_size:
        shape = LMShape(**{**shape.to_dict(), "vocab_size": tok.vocab_size})
    ids: list[int] = []
    for t in texts:
        ids.append(tok.bos_id)
        ids.extend(tok.encode(t))
    data = torch.tensor(ids, dtype=torch.long)
    if len(data) <= seq_len + 1:
        raise ValueError(f"corpus of {len(data)} tokens is too short for windows of {seq_len}")
    model = build_lm(shape, seed=seed)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    report = reporter(progress, steps, "training")
    warmup = max(1, steps // 10)
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, step_progress(step, steps, warmup), lr=lr, warmup=warmup)
        starts = torch.randint(0, len(data) - seq_len - 1, (batch,), generator=gen)
        x = torch.stack([data[s : s + seq_len + 1] for s in starts.tolist()])
        logits = model(input_ids=x[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item() / math.log(2))
        report(step + 1, steps)
    model.eval()
    save_lm(model, tok, directory)
    return losses
