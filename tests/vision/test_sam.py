"""SAM compression: data with known masks, SlimSAM pruning, MobileSAM distillation, evaluation, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from toolkit.data import segments
from toolkit.errors import ConfigError
from toolkit.vision import sam
from toolkit.vision.sam import slimsam as slim_mod
from toolkit.vision.sam.prompts import KINDS, make_batch


def tiny(seed: int = 0):
    """A SamModel small enough for tests: 32 x 32 inputs, a 4 x 4 embedding grid."""
    cfg = sam.sam_config(image_size=32, patch_size=8, hidden=24, layers=2, heads=2, mlp=48, window=2,
                         global_attn=(1,), channels=16, decoder_mlp=32, decoder_heads=2)
    return sam.build_sam(cfg, seed=seed)


@pytest.fixture(scope="module")
def items32():
    return segments.images(12, "train", size=32)


# --- data ------------------------------------------------------------------------------------------------


def test_images_are_pure_functions_of_seed_and_split():
    a, b = segments.make_image(5, "train"), segments.make_image(5, "train")
    assert np.array_equal(a.image, b.image) and np.array_equal(a.masks, b.masks)
    c = segments.make_image(5, "test")
    assert not np.array_equal(a.image, c.image)
    assert not set(segments.PHOTOS["train"]) & set(segments.PHOTOS["test"])


def test_masks_are_visible_parts_that_do_not_overlap():
    for seed in range(30):
        im = segments.make_image(seed, "train")
        assert im.image.shape == (128, 128, 3) and im.image.dtype == np.uint8
        assert len(im.masks) == len(im.kinds)
        if len(im.masks):
            assert im.masks.sum(0).max() <= 1  # occlusion: each pixel belongs to at most one object
            assert im.masks.reshape(len(im.masks), -1).sum(1).min() >= 40


def test_bad_split_is_a_clear_error():
    with pytest.raises(ValueError, match="split"):
        segments.make_image(0, "validation")


def test_prompts_lie_on_their_objects(items32):
    rng = np.random.default_rng(0)
    _, p, target = make_batch(items32, "box", 3, rng)
    for b in range(len(items32)):
        for j in range(3):
            ys, xs = np.nonzero(target[b, j].numpy())
            assert p.boxes[b, j].tolist() == [xs.min(), ys.min(), xs.max(), ys.max()]
    _, p, target = make_batch(items32, "points", 3, rng)
    x, y = p.points[..., 0].long(), p.points[..., 1].long()
    inside = target[torch.arange(len(items32))[:, None, None], torch.arange(3)[None, :, None], y, x]
    assert inside.all() and (p.labels == 1).all()
    with pytest.raises(ValueError, match="prompt kind"):
        make_batch(items32, "scribble", 1, rng)


# --- SlimSAM ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ratio", [0.5, 0.25])
def test_slim_gives_a_plain_smaller_sam_at_the_ratio(tmp_path, items32, ratio):
    from transformers import SamModel

    teacher = tiny()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    out = sam.slim(teacher, sam.SlimConfig(ratio=ratio, steps=3, batch=4, score_batches=1), items32)
    full = sum(p.numel() for p in teacher.vision_encoder.parameters())
    kept = sum(p.numel() for p in out.vision_encoder.parameters())
    assert abs(kept / full - ratio) < 0.05
    assert type(out) is SamModel and out.config.vision_config.hidden_size < 24
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())  # teacher untouched
    out.save_pretrained(tmp_path)
    back = SamModel.from_pretrained(tmp_path).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(back.vision_encoder(x).last_hidden_state, out.vision_encoder(x).last_hidden_state)
    res = sam.evaluate(back, items32[:4], cost=False)
    assert set(res) == {"box", "point", "points"}


def test_disturbed_taylor_scores_need_the_disturbance(items32):
    teacher = tiny()
    targets = slim_mod._Targets(teacher.vision_encoder, items32[:4], flip=False)
    kept = torch.arange(24)
    enc = teacher.vision_encoder
    # Against the teacher's own embeddings the loss is zero, and every gradient is rounding noise: no ranking.
    quiet = slim_mod.taylor_scores(enc, targets, kept, sam.SlimConfig(noise=0.0, batch=4, score_batches=1))
    loud = slim_mod.taylor_scores(enc, targets, kept, sam.SlimConfig(noise=0.1, batch=4, score_batches=1))
    for name in quiet:
        assert bool((loud[name] > 0).all()) and float(quiet[name].max()) < 1e-4 * float(loud[name].max())
    assert loud["embed"].shape == (24,) and loud["qk"].shape == (2, 12) and loud["v"].shape == (2, 2, 12)
    assert loud["mlp"].shape == (2, 48)


def test_importance_scores_the_model_without_changing_it(items32):
    teacher = tiny()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    cfg = sam.SlimConfig(batch=4, score_batches=2)
    scores = sam.importance(teacher, cfg, items32[:4])
    targets = slim_mod._Targets(teacher.vision_encoder, items32[:4], flip=True)
    direct = slim_mod.taylor_scores(teacher.vision_encoder, targets, torch.arange(24), cfg)
    for name in direct:
        assert torch.allclose(scores[name], direct[name])
        assert float(scores[name].max()) > 0
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert all(p.grad is None for p in teacher.parameters())
    with pytest.raises(ValueError, match="32 x 32"):
        sam.importance(teacher, sam.SlimConfig(), segments.images(1, "train", size=48))


def test_pruning_removes_dead_channels_first_and_exactly(items32):
    """MLP channels with no weights score zero, are pruned first, and removing them changes nothing."""
    teacher = tiny()
    enc = teacher.vision_encoder
    dead = torch.tensor([3, 7, 20, 41])
    with torch.no_grad():
        for layer in enc.layers:
            layer.mlp.lin1.weight[dead] = 0
            layer.mlp.lin1.bias[dead] = 0
            layer.mlp.lin2.weight[:, dead] = 0
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = enc(x).last_hidden_state
    targets = slim_mod._Targets(enc, items32[:4], flip=False)
    scores = slim_mod.taylor_scores(enc, targets, torch.arange(24), sam.SlimConfig(batch=4, score_batches=2))
    assert (scores["mlp"][:, dead] == 0).all()
    slim_mod.prune_bottleneck(enc, scores, head_dim=12, mlp=48 - len(dead))  # attention kept whole
    with torch.no_grad():
        assert torch.allclose(enc(x).last_hidden_state, ref, atol=1e-5)
    assert enc.layers[0].mlp.lin1.weight.shape == (44, 24)


def test_widths_for_hits_the_parameter_share():
    vc = sam.sam_config().vision_config
    full = slim_mod._count(vc, vc.hidden_size, vc.mlp_dim)
    for ratio in (0.5, 0.25, 0.1):
        hidden, mlp = slim_mod.widths_for(vc, ratio)
        assert hidden % vc.num_attention_heads == 0
        assert abs(slim_mod._count(vc, hidden, mlp) / full - ratio) < 0.005
    with pytest.raises(ConfigError, match="neck"):
        slim_mod.widths_for(vc, 0.01)


@pytest.mark.parametrize("ratio", [0, 1, -0.2, 1.5, float("nan")])
def test_ratio_outside_the_open_interval_is_an_error(ratio):
    with pytest.raises(ConfigError, match="ratio"):
        sam.SlimConfig(ratio=ratio)


@pytest.mark.parametrize("make", [
    lambda: sam.SlimConfig(steps="300"), lambda: sam.SlimConfig(batch=2.0), lambda: sam.SlimConfig(lr=-1e-3),
    lambda: sam.SlimConfig(lr=float("nan")), lambda: sam.SlimConfig(noise=-0.1), lambda: sam.SlimConfig(align=-1.0),
    lambda: sam.SlimConfig(align=float("nan")), lambda: sam.SlimConfig(flip="no"),
    lambda: sam.DistillConfig(steps="1500"), lambda: sam.DistillConfig(batch=None), lambda: sam.DistillConfig(lr=0.0),
    lambda: sam.DistillConfig(lr=float("nan")), lambda: sam.DistillConfig(warmup=-1),
])
def test_bad_training_settings_are_config_errors(make):
    with pytest.raises(ConfigError):
        make()


def test_recipe_configs_refuse_a_negative_budget(tmp_path):
    from toolkit.recipes.train_sam import TrainSamConfig

    with pytest.raises(ConfigError, match="minutes must be positive"):
        TrainSamConfig(out=tmp_path, minutes=-5.0)
    assert TrainSamConfig(out=str(tmp_path), minutes=None).out == tmp_path  # a path given as a string


def test_slim_rejects_images_of_the_wrong_size():
    with pytest.raises(ValueError, match="32 x 32"):
        sam.slim(tiny(), sam.SlimConfig(ratio=0.5), segments.images(2, "train", size=64))
    with pytest.raises(ValueError, match="at least one image"):
        sam.slim(tiny(), sam.SlimConfig(ratio=0.5), [])


# --- MobileSAM -------------------------------------------------------------------------------------------


def test_distill_trains_a_student_that_loads_as_a_plain_sam(tmp_path, items32):
    from transformers import SamModel

    teacher = tiny()
    losses = []
    student_cfg = sam.student_config(teacher, hidden=16, layers=1, heads=2, mlp=32, global_attn=(0,))
    out = sam.distill(teacher, student_cfg, sam.DistillConfig(steps=40, batch=8, views=2, warmup=5, lr=3e-3),
                      items32, log=lambda r: losses.append(r["loss"]))
    assert losses[-1] < 0.7 * losses[0]
    assert out.config.vision_config.hidden_size == 16
    t_state = teacher.state_dict()
    for k, v in out.state_dict().items():  # prompt encoder and mask decoder are the teacher's
        if k.startswith(("mask_decoder.", "prompt_encoder.")):
            assert torch.equal(v, t_state[k])
    out.save_pretrained(tmp_path)
    back = SamModel.from_pretrained(tmp_path).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(back.vision_encoder(x).last_hidden_state, out.vision_encoder(x).last_hidden_state)


def test_distill_refuses_a_student_whose_embeddings_cannot_match(items32):
    from transformers import SamVisionConfig

    teacher = tiny()
    wrong_channels = SamVisionConfig(hidden_size=16, output_channels=8, num_hidden_layers=1, num_attention_heads=2,
                                     image_size=32, patch_size=8, window_size=2, global_attn_indexes=[0], mlp_dim=32)
    with pytest.raises(ValueError, match="teacher's"):
        sam.distill(teacher, wrong_channels, sam.DistillConfig(steps=1), items32)
    wrong_grid = SamVisionConfig(hidden_size=16, output_channels=16, num_hidden_layers=1, num_attention_heads=2,
                                 image_size=32, patch_size=16, window_size=2, global_attn_indexes=[0], mlp_dim=32)
    with pytest.raises(ValueError, match="teacher's"):
        sam.distill(teacher, wrong_grid, sam.DistillConfig(steps=1), items32)
    with pytest.raises(TypeError, match="student"):
        sam.distill(teacher, torch.nn.Linear(2, 2), sam.DistillConfig(steps=1), items32)


# --- evaluation and prompts ------------------------------------------------------------------------------


def test_evaluate_against_itself_as_teacher_is_exact(items32):
    model = tiny()
    res = sam.evaluate(model, items32[:6], teacher=model)
    for kind in KINDS:
        assert res[kind]["miou_vs_teacher"] == 1.0 and res[kind]["n"] == 24
        # the same prompts (evaluate's seed for the first batch of a kind), predicted and scored here
        pixels, prompts, target = make_batch(items32[:6], kind, 4, np.random.default_rng([0, 0, KINDS.index(kind)]))
        pred = sam.predict(model, pixels, prompts)
        inter = (pred & target).flatten(-2).sum(-1).double()
        union = (pred | target).flatten(-2).sum(-1).double()
        iou = torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(inter))
        assert res[kind]["miou"] == pytest.approx(float(iou.mean()), abs=1e-6)
    enc = res["encoder"]
    assert enc["params"] == sum(p.numel() for p in model.vision_encoder.parameters())
    assert enc["macs"] > 16 * enc["params"] * 0.5
    # an encoder four times as wide and twice as deep costs many times the MACs on the same input
    big = sam.build_sam(sam.sam_config(image_size=32, patch_size=8, hidden=96, layers=4, heads=2, mlp=384, window=2,
                                       global_attn=(3,), channels=16, decoder_mlp=32, decoder_heads=2))
    assert sam.encoder_cost(big, repeats=1)["macs"] > 10 * enc["macs"]


def test_encoder_latency_is_the_median_of_its_runs_in_milliseconds(monkeypatch):
    from types import SimpleNamespace

    from toolkit.vision.sam import metrics

    runs = iter([0.004, 0.001, 0.003, 0.005, 0.002])  # seconds; the median is 3 ms
    clock = {"now": 0.0, "start": True}

    def perf_counter() -> float:  # each run reads the clock before and after
        if not clock["start"]:
            clock["now"] += next(runs)
        clock["start"] = not clock["start"]
        return clock["now"]

    monkeypatch.setattr(metrics, "time", SimpleNamespace(perf_counter=perf_counter))
    assert sam.encoder_cost(tiny(), repeats=5)["latency_ms"] == pytest.approx(3.0)


def test_evaluate_resizes_and_converts_other_images():
    model = tiny()
    big = segments.images(3, "test", size=64)
    grey = [segments.SegImage(it.image[..., 0], it.masks, it.kinds) for it in big]
    res = sam.evaluate(model, grey, kinds=("box",), cost=False)
    assert res["box"]["n"] == 12


def test_segment_handles_any_image_and_rejects_bad_prompts():
    model = tiny()
    img = (np.random.default_rng(0).random((45, 100)) * 255).astype(np.uint8)
    masks = sam.segment(model, img, boxes=[[1, 2, 30, 40], [50, 5, 99, 44]])
    assert masks.shape == (2, 45, 100) and masks.dtype == bool
    assert sam.segment(model, np.zeros((20, 30, 4)), points=[[[3, 4], [10, 10]]], labels=[[1, 0]]).shape == (1, 20, 30)
    for bad, msg in [({"boxes": []}, "empty"), ({"boxes": [[0, 0, 100, 10]]}, "outside"),
                     ({"points": [[[-1, 3]]]}, "outside"), ({"points": [[1, 2]]}, "points must"),
                     ({"boxes": [[1, 1, 2, 2]], "points": [[[1, 1]]]}, "either"), ({}, "either")]:
        with pytest.raises(ValueError, match=msg):
            sam.segment(model, img, **bad)
    with pytest.raises(ValueError, match="NaN"):
        sam.segment(model, np.full((8, 8, 3), np.nan), boxes=[[0, 0, 4, 4]])
    with pytest.raises(ValueError, match="image must be"):
        sam.segment(model, np.zeros((4, 4, 5)), boxes=[[0, 0, 1, 1]])


def test_mask_loss_prefers_the_true_mask():
    from toolkit.vision.sam import mask_loss

    target = torch.zeros(1, 1, 32, 32, dtype=torch.bool)
    target[..., 8:20, 4:16] = True
    good = torch.where(target, 8.0, -8.0)[:, :, None, ::2, ::2].float()
    bad = -good
    iou = torch.ones(1, 1, 1)
    assert float(mask_loss(good, iou, target)) < 0.1 < float(mask_loss(bad, iou, target))


@pytest.mark.parametrize("name", ["sam-shapes", "sam-shapes-slim50", "sam-shapes-slim25", "sam-shapes-mobile"])
def test_shipped_model_matches_its_manifest_and_segments_held_out_images(name):
    from toolkit.models import model_entry
    from toolkit.models.store import ASSETS, file_sha256

    entry = model_entry(name)
    path = ASSETS / name
    assert file_sha256(path / "model.safetensors") == entry["sha256"]
    assert sum(p.stat().st_size for p in path.iterdir()) < 25 * 2**20
    model = sam.load_sam(name)
    held = segments.images(16, "test", start=20_000)  # beyond the manifest's figure and fp16 check images
    box = sam.evaluate(model, held, kinds=("box",), cost=False)["box"]["miou"]
    assert abs(box - entry["figures"]["box"]["miou"]) < 0.08  # 16 images against the manifest's 500
    if name != "sam-shapes":
        assert entry["compression_images"] <= model_entry("sam-shapes")["images_seen"] // 100


def test_ship_stores_half_precision_weights_and_a_manifest_entry_that_matches(tmp_path):
    import json

    from toolkit.models.store import file_sha256
    from toolkit.recipes.ship_sam import ShipSamConfig, run, ship

    model = tiny(seed=3)
    config = ShipSamConfig(name="tiny-sam", command="python -m toolkit.recipes.train_sam ...", eval_images=6,
                           check_images=4, max_loss=1.0, assets=tmp_path)
    entry = ship(model, config, extra={"images_seen": 1600})
    saved = json.loads((tmp_path / "MANIFEST.json").read_text())["tiny-sam"]
    assert saved == json.loads(json.dumps(entry)) and saved["images_seen"] == 1600
    assert saved["sha256"] == file_sha256(tmp_path / "tiny-sam" / "model.safetensors")
    assert set(saved["figures"]) >= {"box", "point", "points", "encoder"}
    loaded = sam.load_sam(tmp_path / "tiny-sam")
    assert next(loaded.parameters()).dtype == torch.float32
    expected = sam.as_stored(model, torch.float16)
    for (name, a), b in zip(loaded.state_dict().items(), expected.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert next(model.parameters()).dtype == torch.float32  # the caller's model is left as it was
    with pytest.raises(ConfigError, match="dtype"):
        ShipSamConfig(name="tiny-sam", command="cmd", dtype="int8")
    # the recipe: a saved model and its trainer's history, shipped under another name
    model.save_pretrained(tmp_path / "run" / "model")
    curve = [{"step": 50, "minutes": 0.5, "loss": 0.9, "box": 0.3}, {"step": 100, "minutes": 1.0, "loss": 0.7}]
    history = [*curve, {"step": 100, "final": True, "minutes": 1.26, "images_seen": 1600, "box": {"miou": 0.3}}]
    (tmp_path / "run" / "history.json").write_text(json.dumps(history))
    out = run(config.replace(name="tiny-sam-2", model=tmp_path / "run" / "model",
                             history=tmp_path / "run" / "history.json"))
    assert out == tmp_path / "tiny-sam-2"
    second = json.loads((tmp_path / "MANIFEST.json").read_text())
    assert set(second) == {"tiny-sam", "tiny-sam-2"}
    extra = {k: second["tiny-sam-2"][k] for k in ("images_seen", "steps", "training_minutes", "curve")}
    assert extra == {"images_seen": 1600, "steps": 100, "training_minutes": 1.3, "curve": curve}
    assert second["tiny-sam-2"]["sha256"] == saved["sha256"]  # the same weights, stored the same way


@pytest.mark.slow
def test_training_runs_and_resumes(tmp_path):
    import json

    from toolkit.recipes.train_sam import TrainSamConfig, run

    config = TrainSamConfig(out=tmp_path, steps=2, batch=2, per_image=1, eval_every=2, eval_images=2, final_images=2,
                            checkpoint_every=0.0, bf16=False)
    assert run(config) == tmp_path / "model"
    first = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert run(config.replace(steps=3, resume=True)) == tmp_path / "model"
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert first["step"] == 2 and state["step"] == 3 and state["elapsed"] > first["elapsed"]
    history = json.loads((tmp_path / "history.json").read_text())
    assert [(h["step"], bool(h.get("final"))) for h in history] == [(2, False), (3, True)]
    assert history[-1]["images_seen"] == 6 and set(history[-1]) >= {"box", "point", "points", "encoder"}
    model = sam.load_sam(tmp_path / "model")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), state["model"].values(), strict=True))
