"""A small vision-language model of the real class: ``LlavaForConditionalGeneration``.

The model is a CLIP vision tower (``CLIPVisionModel``: 64 x 64 images in
4 x 4 patches, so 256 image tokens plus [CLS]), LLaVA's two-layer projector,
and the shipped ``lm-default`` Llama as language model. The language model's
embedding table grows by two rows: the image placeholder and padding.

:class:`VLMProcessor` is the processor: it turns images and questions into
``input_ids`` (left-padded), ``attention_mask`` and ``pixel_values``, with
the prompt ``<bos><image>x256 Question: ...? Answer:``; answers are a word
and a full stop. It is written here because ``lm-default`` has a byte-exact
tokenizer of its own (:mod:`toolkit.models.tokenizer`) rather than a
``PreTrainedTokenizer`` that ``LlavaProcessor`` could wrap.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from toolkit.config import Config, check

__all__ = ["VLMSpec", "ProcessorConfig", "VLMProcessor", "build_vlm", "load_vlm", "read_vlm", "save_vlm",
           "answer_questions", "evaluate_vqa"]

PROCESSOR_FILE = "vlm_processor.json"


def _positive(config: Config, names: tuple[str, ...]) -> None:
    for name in names:  # the shared check has made them integers
        v = getattr(config, name)
        check(v > 0, f"{name} must be a positive integer, got {v!r}")


@dataclass(frozen=True)
class VLMSpec(Config):
    """The vision tower's shape: ``image_size`` pixels square in ``patch_size`` patches, a small CLIP encoder.

    CLIP's attention needs ``vision_hidden`` to be a multiple of ``vision_heads``.
    """

    image_size: int = 64
    patch_size: int = 4
    vision_hidden: int = 128
    vision_layers: int = 3
    vision_heads: int = 4
    vision_intermediate: int = 512

    def __post_init__(self) -> None:
        _positive(self, ("image_size", "patch_size", "vision_hidden", "vision_layers", "vision_heads",
                         "vision_intermediate"))
        check(self.vision_hidden % self.vision_heads == 0,
              f"vision_hidden {self.vision_hidden} is not a multiple of vision_heads {self.vision_heads}")


@dataclass(frozen=True)
class ProcessorConfig(Config):
    """What the processor needs: image size, how many placeholders an image takes, and the special ids.

    Saved as ``vlm_processor.json`` beside the model (the dataclass's fields).
    """

    versioned = False  # the file's form since the shipped models were saved
    image_size: int
    num_image_tokens: int
    image_token_id: int
    pad_token_id: int
    bos_token_id: int

    def __post_init__(self) -> None:
        _positive(self, ("image_size", "num_image_tokens"))
        for name in ("image_token_id", "pad_token_id", "bos_token_id"):
            v = getattr(self, name)
            check(v >= 0, f"{name} must be a token id (a non-negative integer), got {v!r}")


class VLMProcessor:
    """Images and questions to model inputs; generated ids back to answer words."""

    def __init__(self, tokenizer, config: ProcessorConfig) -> None:
        self.tokenizer = tokenizer
        self.config = config

    @property
    def image_token_id(self) -> int:
        return self.config.image_token_id

    def prompt_ids(self, question: str) -> list[int]:
        c = self.config
        text = self.tokenizer.encode(f" Question: {question} Answer:".encode())
        return [c.bos_token_id] + [c.image_token_id] * c.num_image_tokens + text

    def answer_ids(self, answer: str) -> list[int]:
        return self.tokenizer.encode(f" {answer}.".encode())

    def pixel_values(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        s = self.config.image_size
        arr = np.stack([np.asarray(im) for im in images])
        if arr.shape[1:] != (s, s, 3) or arr.dtype != np.uint8:
            raise ValueError(f"images must be uint8 arrays of shape ({s}, {s}, 3), got {arr.dtype} {arr.shape[1:]}")
        x = torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 255.0
        return (x - 0.5) / 0.5

    def __call__(self, images: Sequence[np.ndarray], questions: Sequence[str]) -> dict[str, torch.Tensor]:
        if len(images) != len(questions):
            raise ValueError(f"{len(images)} images but {len(questions)} questions")
        rows = [self.prompt_ids(q) for q in questions]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.config.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):  # left padding, as decoder-only generation needs
            ids[i, width - len(r):] = torch.tensor(r)
            mask[i, width - len(r):] = 1
        return {"input_ids": ids, "attention_mask": mask, "pixel_values": self.pixel_values(images)}

    def decode_answer(self, ids: Sequence[int]) -> str:
        """The first word of generated text (the answer), lower-cased."""
        c = self.config
        special = {c.bos_token_id, c.image_token_id, c.pad_token_id}
        text = self.tokenizer.decode([i for i in ids if i not in special])
        words = text.decode("latin-1").replace(".", " ").split()
        return words[0].lower() if words else ""

    def save(self, directory: str | Path) -> None:
        Path(directory, PROCESSOR_FILE).write_text(json.dumps(self.config.to_dict(), indent=1) + "\n")
        self.tokenizer.save(directory)

    @classmethod
    def load(cls, directory: str | Path) -> VLMProcessor:
        from toolkit.models.tokenizer import ByteTokenizer
        cfg = ProcessorConfig.from_dict(json.loads(Path(directory, PROCESSOR_FILE).read_text()))
        return cls(ByteTokenizer.load(directory), cfg)


def build_vlm(spec: VLMSpec = VLMSpec(), language_model: str = "lm-default"):
    """A new ``LlavaForConditionalGeneration``: a fresh CLIP tower and projector on a trained Llama.

    Returns ``(model, processor)``.
    """
    from transformers import CLIPVisionConfig, LlamaForCausalLM, LlavaConfig, LlavaForConditionalGeneration

    from toolkit.models import locate
    from toolkit.models.tokenizer import ByteTokenizer

    where = locate(language_model)
    lm = LlamaForCausalLM.from_pretrained(where.path)
    tok = ByteTokenizer.load(where.path)
    vocab = lm.config.vocab_size
    image_id, pad_id = vocab, vocab + 1
    n_tokens = (spec.image_size // spec.patch_size) ** 2
    text_cfg = lm.config.to_dict()
    text_cfg.update(vocab_size=vocab + 2, pad_token_id=pad_id, max_position_embeddings=max(512, n_tokens + 64))
    vision = CLIPVisionConfig(hidden_size=spec.vision_hidden, intermediate_size=spec.vision_intermediate,
                              num_hidden_layers=spec.vision_layers, num_attention_heads=spec.vision_heads,
                              image_size=spec.image_size, patch_size=spec.patch_size, num_channels=3)
    config = LlavaConfig(vision_config=vision, text_config=text_cfg, image_token_id=image_id,
                         vision_feature_layer=-1, vision_feature_select_strategy="default",
                         projector_hidden_act="gelu", image_seq_length=n_tokens, tie_word_embeddings=True)
    model = LlavaForConditionalGeneration(config)
    with torch.no_grad():
        src = lm.model.state_dict()
        emb = src.pop("embed_tokens.weight")
        target = model.model.language_model
        missing = target.load_state_dict(src, strict=False)
        if [k for k in missing.missing_keys if k != "embed_tokens.weight"] or missing.unexpected_keys:
            raise RuntimeError(f"language model weights do not fit: {missing}")
        new_emb = target.embed_tokens.weight
        new_emb[:vocab] = emb
        new_emb[vocab:] = emb.mean(0, keepdim=True)
    model.tie_weights()
    processor = VLMProcessor(tok, ProcessorConfig(spec.image_size, n_tokens, image_id, pad_id, tok.bos_id))
    return model, processor


def save_vlm(model, processor: VLMProcessor, directory: str | Path, dtype: torch.dtype | None = None) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(directory)
    processor.save(directory)


def read_vlm(directory: str | Path):
    """``(model, processor)`` read afresh from a directory written by :func:`save_vlm` (not shared: train it).

    A Mixture-of-Depths model is converted again on load.
    """
    from toolkit.vision.mod import from_pretrained
    model = from_pretrained(directory, dtype=torch.float32, attn_implementation="sdpa")
    return model, VLMProcessor.load(directory)


def load_vlm(name: str = "vlm-scenes", model_dir: str | Path | None = None):
    """``(model, processor)`` for a shipped name or a directory written by :func:`save_vlm`.

    The model is shared between callers of the same name (the model store's
    cache); attach hooks to it with a handle and remove them after.
    """
    from toolkit.models import store
    return store.load("vlm", lambda where: read_vlm(where.path), name, model_dir)


@torch.no_grad()
def answer_questions(model, processor: VLMProcessor, images: Sequence[np.ndarray], questions: Sequence[str],
                     max_new_tokens: int = 6) -> list[str]:
    """Greedy answers through ``model.generate`` (prefill, then decode steps over the cache)."""
    inputs = processor(images, questions)
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=processor.config.pad_token_id)
    new = out[:, inputs["input_ids"].shape[1]:]
    return [processor.decode_answer(row.tolist()) for row in new]


def evaluate_vqa(model, processor: VLMProcessor, items: Sequence, batch_size: int = 32) -> dict:
    """Exact-match accuracy of the first answer word, overall and by question kind."""
    hits: dict[str, list[int]] = {}
    for start in range(0, len(items), batch_size):
        batch = items[start:start + batch_size]
        preds = answer_questions(model, processor, [it.image for it in batch], [it.question for it in batch])
        for it, p in zip(batch, preds, strict=True):
            hits.setdefault(it.kind, []).append(int(p == it.answer))
    total = [h for v in hits.values() for h in v]
    return {"accuracy": sum(total) / max(1, len(total)), "n": len(total),
            "by_kind": {k: sum(v) / len(v) for k, v in sorted(hits.items())}}
