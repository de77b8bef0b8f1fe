"""The lm recipes' configs and the integer engine's calibration search, on a tiny model (no corpus needed)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from toolkit.errors import ConfigError
from toolkit.recipes.build_corpus import BuildCorpusConfig
from toolkit.recipes.calibrate_lm import CalibrateLMConfig, calibration_inputs, choose_clips, cross_entropy
from toolkit.text.integer import quantize
from toolkit.text.model import load_coding_model


def test_clipping_search_never_raises_the_output_error(tiny_lm):
    model = load_coding_model(str(tiny_lm))
    cfg, w = model.config, model.float_weights()
    rng = np.random.default_rng(0)
    seqs = [rng.integers(0, cfg.vocab_size - 1, 24).tolist() for _ in range(4)]
    gram = calibration_inputs(cfg, w, seqs)
    clips, report = choose_clips(cfg, w, gram)
    assert set(clips) == set(report) == set(gram)
    # ratio 1 (max-abs) is one of the candidates, so the chosen error is never above its error
    assert all(r["error_ratio"] <= 1 + 1e-12 and 0 <= r["rows_clipped"] <= r["rows"] for r in report.values())
    bits = cross_entropy(cfg, quantize(cfg, w, clips), seqs, cfg.vocab_size - 1)
    assert math.isfinite(bits) and 0 < bits < 2 * math.log2(cfg.vocab_size)


def test_recipe_configs_check_themselves(tmp_path):
    with pytest.raises(ConfigError, match="seq"):
        CalibrateLMConfig(model_dir=tmp_path, seq=1)
    with pytest.raises(ConfigError, match="min_gain"):
        CalibrateLMConfig(model_dir=tmp_path, min_gain=1.0)
    with pytest.raises(ConfigError, match="out, eval_out or both"):
        BuildCorpusConfig()
    with pytest.raises(ConfigError, match="val_fraction"):
        BuildCorpusConfig(out=tmp_path, val_fraction=0.0)
    config = BuildCorpusConfig.from_dict({"eval_out": str(tmp_path)})
    assert config.eval_out == tmp_path and isinstance(config.linux_cache, Path)


def test_calibrate_lm_needs_a_manifest_entry_to_record_in(tiny_lm, tmp_path):
    from toolkit.recipes.calibrate_lm import run

    with pytest.raises(ConfigError, match="no entry"):
        run(CalibrateLMConfig(model_dir=tiny_lm, manifest=tmp_path / "MANIFEST.json"))
