"""Drawn-scene VQA data, the LLaVA builder and processor, and the training command."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from toolkit.data import scenes
from toolkit.errors import ConfigError


def test_items_are_pure_functions_of_their_seed():
    a, b = scenes.make_item(7), scenes.make_item(7)
    assert np.array_equal(a.image, b.image) and a.question == b.question and a.answer == b.answer
    assert not np.array_equal(scenes.make_item(7, "test").image, a.image)
    assert a.image.shape == (64, 64, 3) and a.image.dtype == np.uint8
    with pytest.raises(ValueError, match="split"):
        scenes.make_item(0, "validation")


def test_answers_are_true_of_the_scene():
    vocab = set(scenes.answer_vocabulary())
    for it in scenes.items(300, "test"):
        assert it.answer in vocab
        objs = it.objects
        if it.kind == "count_colour":
            colour = it.question.split()[2]
            assert int(it.answer) == sum(o.colour == colour for o in objs)
        elif it.kind == "shape_of":
            colour = it.question.split()[4]
            (o,) = [o for o in objs if o.colour == colour]
            assert o.shape == it.answer
        elif it.kind == "is_left":
            words = it.question.rstrip("?").split()
            a = [o for o in objs if (o.colour, o.shape) == (words[2], words[3])][0]
            b = [o for o in objs if (o.colour, o.shape) == (words[7], words[8])][0]
            assert (a.x < b.x) == (it.answer == "yes")


def test_every_kind_is_posed_and_text_alone_is_weak():
    train, test = scenes.items(3000), scenes.items(600, "test")
    assert {it.kind for it in test} == set(scenes.KINDS)
    assert scenes.text_only_accuracy(train, test) < 0.5


def test_the_image_is_needed():
    """Identical questions get different answers on different scenes."""
    answers, items = {}, scenes.items(2000)
    for it in items:
        answers.setdefault(it.question, set()).add(it.answer)
    assert sum(len(answers[it.question]) > 1 for it in items) > 0.8 * len(items)


@pytest.fixture(scope="module")
def built():
    from toolkit.vision.vlm import build_vlm
    return build_vlm()


def test_build_is_a_llava_on_lm_default(built, tmp_path):
    from transformers import LlamaForCausalLM, LlavaForConditionalGeneration

    from toolkit.models import locate
    from toolkit.vision.vlm import load_vlm, save_vlm
    model, proc = built
    assert isinstance(model, LlavaForConditionalGeneration)
    lm = LlamaForCausalLM.from_pretrained(locate("lm-default").path)
    w = model.model.language_model.layers[0].self_attn.q_proj.weight
    assert torch.equal(w, lm.model.layers[0].self_attn.q_proj.weight)
    assert model.lm_head.weight.data_ptr() == model.model.language_model.embed_tokens.weight.data_ptr()
    save_vlm(model, proc, tmp_path / "m")
    again, proc2 = load_vlm(str(tmp_path / "m"))
    items = scenes.items(3, "test")
    inputs = proc2([it.image for it in items], [it.question for it in items])
    with torch.no_grad():
        torch.testing.assert_close(again(**inputs).logits, model.eval()(**inputs).logits)


def test_processor_pads_on_the_left_and_checks_images(built):
    _, proc = built
    items = [scenes.make_item(i) for i in range(4)]
    inputs = proc([it.image for it in items], [it.question for it in items])
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    assert (ids[:, -1] != proc.config.pad_token_id).all() and mask[:, -1].all()
    assert ((ids == proc.image_token_id).sum(1) == 256).all()
    assert torch.equal(mask.bool(), ids != proc.config.pad_token_id)
    with pytest.raises(ValueError, match="uint8 arrays of shape"):
        proc([np.zeros((32, 32, 3), np.uint8)], ["What shape is the red object?"])
    with pytest.raises(ValueError, match="images but"):
        proc([items[0].image], ["a", "b"])
    assert proc.decode_answer(proc.answer_ids("purple")) == "purple"


def test_the_command_line_keeps_the_flags_of_the_recorded_commands():
    from toolkit.recipes.common import parse_config
    from toolkit.recipes.train_vlm import TrainVLMConfig
    from toolkit.vision import MoDConfig

    argv = ["--out", "runs/ft", "--init", "vlm-scenes", "--steps", "300", "--seed", "1", "--lr", "5e-5",
            "--lm-lr-scale", "0.4", "--router-lr-scale", "20", "--eval-every", "50", "--mod", '{"mean": 0.4}']
    cfg = parse_config(TrainVLMConfig, argv)
    assert cfg == TrainVLMConfig(out=Path("runs/ft"), init="vlm-scenes", steps=300, seed=1, lr=5e-5, lm_lr_scale=0.4,
                                 router_lr_scale=20.0, eval_every=50, mod=MoDConfig(mean=0.4))
    assert TrainVLMConfig.from_dict(cfg.to_dict()) == cfg  # the nested config travels as its dict
    base = argv[:-2]
    for flag, match in [("{mean: 0.4}", "mod must be MoDConfig fields as JSON"), ('{"mean": 1.5}', "mean must be"),
                        ('{"avg": 0.4}', "unknown setting")]:
        with pytest.raises(ConfigError, match=match):
            parse_config(TrainVLMConfig, base + ["--mod", flag])
    for bad, match in [({"mod": '{"mean": 0.4}'}, "mod=.* is not a MoDConfig"), ({"precision": "fp16"}, "precision"),
                       ({"minutes": -5.0}, "minutes must be positive")]:
        with pytest.raises(ConfigError, match=match):
            TrainVLMConfig(out=Path("x"), **bad)


@pytest.mark.slow
def test_training_runs_and_resumes(tmp_path):
    from toolkit.recipes.train_vlm import TrainVLMConfig, run
    from toolkit.vision import evaluate_vqa, load_vlm
    config = TrainVLMConfig(out=tmp_path, minutes=0.15, batch=4, eval_every=1000, final_items=8, checkpoint_every=1)
    assert run(config) == tmp_path / "model"
    first = torch.load(tmp_path / "checkpoint.pt", weights_only=False)["step"]
    assert first > 0
    assert run(config.replace(minutes=0.3, resume=True)) == tmp_path / "model"
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=False)["step"] > first
    history = json.loads((tmp_path / "history.json").read_text())
    model, proc = load_vlm(str(tmp_path / "model"))
    assert history[-1]["final"] and history[-1]["accuracy"] == evaluate_vqa(model, proc, scenes.items(8, "test"))[
        "accuracy"]


@pytest.mark.slow
def test_fine_tuning_to_mixture_of_depths_runs_and_resumes(tmp_path):
    from toolkit.recipes.train_vlm import TrainVLMConfig, run
    from toolkit.vision import MoDConfig, load_vlm
    from toolkit.vision import mod as M
    config = TrainVLMConfig(out=tmp_path, init="vlm-scenes", mod=MoDConfig(mean=0.4), steps=2, batch=2, eval_every=1000,
                            final_items=4, checkpoint_every=0)
    run(config)
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=False)["step"] == 2
    run(config.replace(steps=3, resume=True))
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert state["step"] == 3 and any(".mod_router." in k for k in state["model"])
    history = json.loads((tmp_path / "history.json").read_text())
    assert history[0]["total_steps"] == 2  # the schedule's length stays the first run's
    model, _ = load_vlm(str(tmp_path / "model"))
    assert M.is_converted(model) and M.mod_config_of(model).keep == pytest.approx((1.0, 0.65, 0.15, 0.15))
    routers = M.router_parameters(model)
    assert len(routers) == 6 and any(int(torch.count_nonzero(p)) for p in routers)  # trained away from zero


@pytest.mark.parametrize("name", ["vlm-scenes", "vlm-scenes-ft", "vlm-scenes-mod", "vlm-scenes-mod-lean"])
def test_shipped_model_matches_its_manifest_and_reads_images(name):
    from toolkit.models import model_entry
    from toolkit.models.store import ASSETS, file_sha256
    from toolkit.vision import evaluate_vqa, load_vlm
    from toolkit.vision import mod as M
    entry = model_entry(name)
    path = ASSETS / name
    assert file_sha256(path / "model.safetensors") == entry["sha256"]
    assert sum(p.stat().st_size for p in path.iterdir()) < 25 * 2**20
    model, proc = load_vlm(name)
    assert M.is_converted(model) == ("mod" in name)
    if "mod" in name:
        assert list(M.mod_config_of(model).keep) == entry["schedule"]
    test = scenes.items(100, "test", start=5000)  # held-out scenes beyond the manifest's figure set
    acc = evaluate_vqa(model, proc, test, batch_size=50)["accuracy"]
    text_only = scenes.text_only_accuracy(scenes.items(3000, start=10_000_000), test)
    assert acc > text_only + 0.15
