"""The LM codec's model: config helper, save/load path, and weight hashes."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from transformers import LlamaForCausalLM

from toolkit.errors import ConfigError
from toolkit.models import lm
from toolkit.models.store import file_sha256, read_manifest
from toolkit.models.tokenizer import chunks, train
from toolkit.recipes.common import lr_at
from toolkit.recipes.train_lm import TrainLMConfig, run, val_window_starts, validation_bpb

TINY = lm.LMShape(vocab_size=280, hidden_size=32, num_layers=2, num_heads=2,
                  intermediate_size=64, max_positions=64)


@pytest.fixture(scope="module")
def tiny_tok():
    text = b"hello world, the tokenizer for a tiny model test.\n" * 30
    tok = train(chunks(text, 256), vocab_size=TINY.vocab_size)
    assert tok.vocab_size == TINY.vocab_size
    return tok


def test_config_helper_builds_llama() -> None:
    cfg = lm.lm_config(TINY)
    assert cfg.model_type == "llama"
    assert cfg.tie_word_embeddings
    assert cfg.bos_token_id == TINY.vocab_size - 1
    model = lm.build_lm(TINY)
    assert isinstance(model, LlamaForCausalLM)
    # Tied embeddings are counted once: embedding + per-layer weights + final norm.
    h, f, L, V = 32, 64, 2, 280
    per_layer = 4 * h * h + 3 * h * f + 2 * h
    assert lm.count_parameters(model) == V * h + L * per_layer + h
    logits = model(input_ids=torch.zeros(1, 5, dtype=torch.long)).logits
    assert logits.shape == (1, 5, V)


def test_build_is_seeded() -> None:
    a, b = lm.build_lm(TINY, seed=3), lm.build_lm(TINY, seed=3)
    assert lm.weights_sha256(a) == lm.weights_sha256(b)
    assert lm.weights_sha256(a) != lm.weights_sha256(lm.build_lm(TINY, seed=4))


def test_save_load_round_trip_and_hash_stability(tmp_path, tiny_tok) -> None:
    model = lm.build_lm(TINY).eval()
    digest = lm.weights_sha256(model)
    lm.save_lm(model, tiny_tok, tmp_path / "m")
    assert (tmp_path / "m" / lm.WEIGHTS_FILE).exists()
    assert json.loads((tmp_path / "m" / "config.json").read_text())["vocab_size"] == 280

    loaded, tok = lm.load_lm(tmp_path / "m")
    assert not loaded.training
    assert lm.weights_sha256(loaded) == digest
    assert tok.sha256() == tiny_tok.sha256()
    x = torch.tensor([tok.encode(b"hello world")])
    with torch.no_grad():
        assert torch.equal(model(input_ids=x).logits, loaded(input_ids=x).logits)

    # Saving the loaded model again gives a byte-identical weights file.
    lm.save_lm(loaded, tok, tmp_path / "again")
    assert file_sha256(tmp_path / "m" / lm.WEIGHTS_FILE) == file_sha256(
        tmp_path / "again" / lm.WEIGHTS_FILE
    )


def test_hash_changes_with_weights_and_dtype() -> None:
    model = lm.build_lm(TINY)
    digest = lm.weights_sha256(model)
    with torch.no_grad():
        model.model.norm.weight[0] += 1e-6
    assert lm.weights_sha256(model) != digest
    assert lm.weights_sha256(model.to(torch.bfloat16)) != lm.weights_sha256(model.float())


def test_load_rejects_vocab_mismatch(tmp_path, tiny_tok) -> None:
    other = lm.build_lm(lm.LMShape(**{**TINY.to_dict(), "vocab_size": 512}))
    lm.save_lm(other, tiny_tok, tmp_path / "bad")
    with pytest.raises(ValueError, match="vocab"):
        lm.load_lm(tmp_path / "bad")


def test_lr_schedule_warmup_then_cosine() -> None:
    assert lr_at(0, 0.0, lr=1.0, warmup=10, min_ratio=0.1) == pytest.approx(0.1)
    assert lr_at(9, 0.0, lr=1.0, warmup=10, min_ratio=0.1) == pytest.approx(1.0)
    assert lr_at(100, 0.5, lr=1.0, warmup=10, min_ratio=0.1) == pytest.approx(0.55)
    assert lr_at(100, 1.0, lr=1.0, warmup=10, min_ratio=0.1) == pytest.approx(0.1)


def test_val_windows_spread_and_do_not_overlap() -> None:
    starts = val_window_starts(10_000, 100, 8)
    assert len(starts) == 8 and starts[0] == 0
    assert all(b - a >= 100 for a, b in zip(starts, starts[1:], strict=False))
    assert starts[-1] > 8_000  # reaches the end of val, not just its first source
    assert val_window_starts(1_001, 100, 50) == [i * 100 for i in range(10)]
    assert val_window_starts(50, 100, 8) == []


def test_validation_bpb_of_untrained_model_is_near_uniform(tiny_tok) -> None:
    # Untrained logits are close to uniform, so the cost is ~log2(V) bits per
    # token spread over the bytes each target token stands for.
    model = lm.build_lm(TINY)
    data = b"hello world, the tokenizer for a tiny model test.\n" * 40
    ids = np.asarray(tiny_tok.encode(data), dtype=np.uint16)
    bpb = validation_bpb(model, tiny_tok, ids, seq_len=32, max_windows=4)
    starts = val_window_starts(len(ids), 32, 4)
    assert len(starts) == 4 and starts[-1] + 33 <= len(ids)
    covered = sum(len(tiny_tok.token_bytes(int(i))) for s in starts for i in ids[s + 1:s + 33])
    expected = len(starts) * 32 * math.log2(TINY.vocab_size) / covered
    assert bpb == pytest.approx(expected, rel=0.05)


@pytest.mark.skipif(not (lm.DEFAULT_LM_DIR / lm.WEIGHTS_FILE).exists(),
                    reason="shipped LM not built")
def test_shipped_default_lm_matches_manifest() -> None:
    model, tok = lm.load_default_lm()
    entry = read_manifest()[lm.DEFAULT_LM_NAME]
    assert file_sha256(lm.DEFAULT_LM_DIR / lm.WEIGHTS_FILE) == entry["sha256"]
    assert lm.weights_sha256(model) == entry["weights_sha256"]
    assert lm.count_parameters(model) == entry["parameters"]
    assert model.config.vocab_size == tok.vocab_size
    assert entry["validation"]["bpb"] < 3.0


def test_train_lm_continues_from_init(tmp_path, tiny_tok) -> None:
    """The ``train_lm`` recipe with ``init`` starts from a saved model (not a fresh one) and records it in its
    manifest."""
    from toolkit.data.corpus import DOC_SEP

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    text = DOC_SEP.join([b"hello world, the tokenizer for a tiny model test.\n" * 40] * 4)
    (corpus / "train.txt").write_bytes(text)
    (corpus / "val.bin").write_bytes(b"hello world, a tiny model.\n" * 20)
    (corpus / "sources.json").write_text(json.dumps(
        {"train_bytes": len(text), "train_sha256": "x", "val_bytes": 540, "sources": []}))
    init = lm.save_lm(lm.build_lm(TINY, seed=3), tiny_tok, tmp_path / "init")
    out, manifest = tmp_path / "out", tmp_path / "MANIFEST.json"
    config = TrainLMConfig(corpus=corpus, init=init, out=out, run_dir=tmp_path / "run", manifest=manifest,
                           minutes=0.02, lr=1e-9, warmup=1, hidden=32, layers=2, heads=2, intermediate=64,
                           seq_len=32, batch=2, threads=(1,), final_val_windows=4)
    assert run(config) == out
    trained, _ = lm.load_lm(out)
    start, _ = lm.load_lm(init)
    for a, b in zip(trained.state_dict().values(), start.state_dict().values(), strict=True):
        assert torch.allclose(a, b, atol=1e-5)  # a rate of 1e-9 leaves the init weights in place
    entry = json.loads(manifest.read_text())["lm-default"]
    assert entry["initialised_from"] == str(init) and entry["training"]["steps"] >= 1
    assert TrainLMConfig.from_dict(entry["config"]) == config  # the entry reruns the recipe as it ran


def test_train_lm_config_refuses_bad_values(tmp_path) -> None:
    base = dict(corpus=tmp_path, out=tmp_path / "out", minutes=1.0)
    for bad, words in [({"minutes": 0.0}, "minutes"), ({"hidden": 30, "heads": 4}, "multiple"),
                       ({"threads": ()}, "threads"), ({"recall_fraction": 1.5}, "recall_fraction")]:
        with pytest.raises(ConfigError, match=words):
            TrainLMConfig(**{**base, **bad})


def test_lm_shape_keeps_its_json_and_checks_itself() -> None:
    assert TINY.to_dict() == {"vocab_size": 280, "hidden_size": 32, "num_layers": 2, "num_heads": 2,
                              "intermediate_size": 64, "max_positions": 64, "rope_theta": 10000.0}
    assert lm.LMShape.from_dict(TINY.to_dict()) == TINY
    with pytest.raises(ConfigError, match="multiple"):
        lm.LMShape(hidden_size=30, num_heads=4)
