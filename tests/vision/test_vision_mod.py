"""Mixture-of-Depths (p-MoD) on a tiny LlavaForConditionalGeneration."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from llava_tiny import IMAGE_ID, N_VIS, batch, generate, make_tiny_llava

from toolkit.errors import ConfigError, ModelMismatchError, ToolkitError, UnsupportedInputError
from toolkit.vision import TokenDropConfig, drop_vision_tokens_
from toolkit.vision import mod as M
from toolkit.vision.measure import kv_cache_bytes, prefill_flops

SCHEDULE = (1.0, 0.5, 0.25, 0.125)  # 8, 4 and 2 of the 16 vision tokens in layers 1-3


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    return make_tiny_llava(tmp_path_factory.mktemp("llava"), layers=4)


def converted(dense, keep=SCHEDULE, tanh_scale=0.2, seed=3):
    """A converted copy with random router weights (a fresh router is all zeros: every token ties)."""
    m = copy.deepcopy(dense)
    M.convert_(m, M.MoDConfig(keep=keep, tanh_scale=tanh_scale))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in M.router_parameters(m):
            p.copy_(torch.randn(p.shape, generator=g))
    return m


def test_shifted_cosine_schedule():
    # four layers: mean + cos(pi l / 3) / 2 = 0.9, 0.65, 0.15, -0.1 -> dense, 0.65, 0.15, floor 0.15
    assert M.MoDConfig().keep_schedule(4) == pytest.approx([1.0, 0.65, 0.15, 0.15])
    # p-MoD's 32-layer LLaVA setting: mean 0.5, dense while above 0.85, floor 0.15
    s = M.MoDConfig(mean=0.5).keep_schedule(32)
    assert s[:8] == [1.0] * 8 and s[8] == pytest.approx(0.5 + math.cos(8 * math.pi / 31) / 2)
    assert s[-1] == 0.15 and all(a >= b for a, b in zip(s, s[1:], strict=False))
    assert M.MoDConfig(schedule="shifted_linear", mean=0.4).keep_schedule(3) == pytest.approx([1.0, 0.4, 0.15])
    assert M.MoDConfig(keep=lambda i: 1.0 if i == 0 else 0.5).keep_schedule(3) == [1.0, 0.5, 0.5]


@pytest.mark.parametrize("kwargs, match", [
    ({"keep": (1.0, 1.5, 0.5)}, "share must be in"),
    ({"keep": (1.0, 0.5, -0.1)}, "share must be in"),
    ({"keep": (0.5, 0.5, 0.5)}, "first layer must stay dense"),
    ({"keep": (1.0, 0.5)}, "2 shares for a model of 3 layers"),
    ({"keep": lambda i: 2.0}, "share must be in"),
])
def test_bad_schedules(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        M.MoDConfig(**kwargs).keep_schedule(3)


@pytest.mark.parametrize("kwargs, match", [
    ({"mean": 1.2}, "mean must be"), ({"min_keep": -0.1}, "min_keep must be"),
    ({"min_keep": 0.9, "max_keep": 0.5}, "above max_keep"), ({"schedule": "cosine"}, "unknown schedule"),
    ({"tanh_scale": 1.0}, "tanh_scale"), ({"keep": "zzz"}, "keep must be a list of shares"),
    ({"keep": (1.0, "0.5")}, "keep must be a list of shares"), ({"mean": "0.4"}, "mean='0.4' is not a number"),
])
def test_bad_configs(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        M.MoDConfig(**kwargs)


def _capture_layer_inputs(model):
    seen = {}
    hooks = [layer.register_forward_pre_hook(lambda mod, a, kw, i=i: seen.setdefault(i, (a, dict(kw))),
                                             with_kwargs=True)
             for i, layer in enumerate(model.model.language_model.layers)]
    return seen, hooks


@pytest.mark.parametrize("tanh_scale", [0.0, 0.2])
def test_layer_is_gather_compute_scatter(dense, tanh_scale):
    """A MoD layer: kept tokens get ``h + w * mlp`` of the dense layer run on the kept tokens alone, skipped
    vision tokens ``w * x``, text tokens the dense layer's output; ``w = 1 + a * tanh(router(x))``."""
    m = converted(dense, tanh_scale=tanh_scale)
    inputs = batch((5, 3, 7))
    seen, hooks = _capture_layer_inputs(m)
    outs = {}
    hooks += [layer.register_forward_hook(lambda mod, a, kw, out, i=i: outs.setdefault(i, out), with_kwargs=True)
              for i, layer in enumerate(m.model.language_model.layers)]
    with torch.no_grad():
        m(**inputs)
    for h in hooks:
        h.remove()
    layer = m.model.language_model.layers[2]
    (x,), kw = seen[2]
    b, t, d = x.shape
    vis = inputs["input_ids"] == IMAGE_ID
    kept = M.kept_tokens(m)[2]
    assert kept.shape == (b, 4)
    with torch.no_grad():
        vis_pos = torch.nonzero(vis)[:, 1].view(b, N_VIS)
        logits = layer.mod_router(x[torch.arange(b)[:, None], vis_pos]).squeeze(-1)
        assert torch.equal(kept, logits.topk(4, dim=1).indices.sort(1).values)  # the router's top-k
        w = 1 + tanh_scale * torch.tanh(logits)
        for r in range(b):
            keep = ~vis[r].clone()
            keep[vis_pos[r, kept[r]]] = True
            cols = torch.nonzero(keep).flatten()
            cos, sin = (e.expand(b, -1, -1) for e in kw["position_embeddings"])
            mask = kw["attention_mask"][r:r + 1][:, :, cols][:, :, :, cols]
            sub = x[r:r + 1, cols]
            normed = layer.input_layernorm(sub)
            attn, _ = layer.self_attn(hidden_states=normed, attention_mask=mask,
                                      position_embeddings=(cos[r:r + 1, cols], sin[r:r + 1, cols]))
            hmid = sub + attn
            f = layer.mlp(layer.post_attention_layernorm(hmid))
            weight = torch.ones(t)
            weight[vis_pos[r]] = w[r]
            ref = hmid + weight[cols][None, :, None] * f
            torch.testing.assert_close(outs[2][r, cols], ref[0], rtol=1e-5, atol=1e-5)
            skipped = vis[r] & ~keep
            torch.testing.assert_close(outs[2][r, skipped], x[r, skipped] * weight[skipped][:, None])
            if tanh_scale == 0.0:  # then the kept tokens see exactly the dense layer on the shorter sequence
                dense_out = type(layer).forward(layer, sub, attention_mask=mask,
                                                position_embeddings=(cos[r:r + 1, cols], sin[r:r + 1, cols]))
                torch.testing.assert_close(outs[2][r, cols], dense_out[0], rtol=1e-5, atol=1e-5)


def test_fresh_conversion_weighs_every_token_by_one(dense):
    m = copy.deepcopy(dense)
    handle = M.convert_(m, M.MoDConfig(keep=SCHEDULE))
    assert all(int(torch.count_nonzero(p)) == 0 for p in M.router_parameters(m))
    with torch.no_grad():
        m(**batch())
    for w in handle.state.weights.values():
        assert torch.equal(w, torch.ones_like(w))


def test_remove_gives_back_the_dense_model(dense):
    m = copy.deepcopy(dense)
    inputs = batch((5, 3))
    with torch.no_grad():
        ref = m(**inputs).logits
    handle = M.convert_(m, M.MoDConfig(keep=SCHEDULE))
    with torch.no_grad():
        for p in M.router_parameters(m):
            p.normal_()
        assert not torch.allclose(m(**inputs).logits, ref)
    handle.remove()
    assert not M.is_converted(m) and not hasattr(m.config, M.CONFIG_KEY)
    assert not any(hasattr(layer, "mod_router") or "forward" in vars(layer) for layer in m.model.language_model.layers)
    assert m.state_dict().keys() == dense.state_dict().keys()
    with torch.no_grad():
        assert torch.equal(m(**inputs).logits, ref)
    handle.remove()  # a second remove changes nothing
    assert M.convert_(m, M.MoDConfig(keep=SCHEDULE)).shares == list(SCHEDULE)  # and it converts again


def test_skipped_tokens_stay_out_of_the_cache(dense):
    m = converted(dense)
    inputs = batch((5, 3, 7))
    width = inputs["input_ids"].shape[1]
    with torch.no_grad():
        out = m(**inputs, use_cache=True)
        ref = dense(**inputs, use_cache=True)
    lengths = [layer.keys.shape[-2] for layer in out.past_key_values.layers]
    assert lengths == [width - N_VIS + k for k in (16, 8, 4, 2)]
    per_token = kv_cache_bytes(ref.past_key_values) / (4 * width)  # dense: every layer holds every token
    assert kv_cache_bytes(out.past_key_values) == per_token * sum(lengths)


def test_cached_decoding_equals_recomputing(dense):
    """generate() over per-layer caches gives the tokens a full forward over prompt + answer gives."""
    m = converted(dense)
    inputs = batch((5, 3, 7))
    out = generate(m, inputs, n=4)
    width = inputs["input_ids"].shape[1]
    new = out.sequences[:, width:]
    ids = torch.cat([inputs["input_ids"], new[:, :-1]], 1)
    mask = torch.cat([inputs["attention_mask"], torch.ones_like(new[:, :-1])], 1)
    with torch.no_grad():
        logits = m(input_ids=ids, attention_mask=mask, pixel_values=inputs["pixel_values"]).logits
    assert torch.equal(logits[:, width - 1:].argmax(-1), new)
    for j, s in enumerate(out.scores):
        torch.testing.assert_close(s, logits[:, width - 1 + j], rtol=1e-4, atol=1e-4)


def test_batched_rows_match_single_rows(dense):
    m = converted(dense)
    lengths = (5, 3, 7)
    inputs = batch(lengths)
    both = generate(m, inputs, n=3)
    for r, q in enumerate(lengths):
        width = 1 + N_VIS + q
        one = {k: v[r:r + 1, -width:] if k != "pixel_values" else v[r:r + 1] for k, v in inputs.items()}
        alone = generate(m, one, n=3)
        assert torch.equal(alone.sequences[0, -3:], both.sequences[r, -3:])
        for a, b in zip(alone.scores, both.scores, strict=True):
            torch.testing.assert_close(a[0], b[r], rtol=1e-4, atol=1e-4)


def test_flops_follow_the_formula(dense):
    """Counted language-model FLOPs equal the per-layer formula for the tokens each layer computes."""
    m = converted(dense)
    inputs = batch((6,))
    t = inputs["input_ids"].shape[1]
    cfg = dense.config.text_config
    d, inter, h = cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads
    hd, kv = d // h, cfg.num_key_value_heads

    def layer(n):  # q, k, v, o projections, the gated MLP, and SDPA's two products
        return 2 * n * d * (h * hd + 2 * kv * hd) + 2 * n * h * hd * d + 2 * n * d * inter * 3 + 4 * h * n * n * hd

    tokens = [t - N_VIS + int(s * N_VIS) for s in SCHEDULE]
    router = 2 * N_VIS * d * (len(SCHEDULE) - 1)
    assert prefill_flops(m, inputs)["language_model"] == sum(layer(n) for n in tokens) + router
    assert prefill_flops(dense, inputs)["language_model"] == 4 * layer(t)


def test_text_only_prompt_runs_dense(dense):
    m = converted(dense)
    ids = torch.tensor([[1, 5, 9, 13, 7]])
    with torch.no_grad():
        torch.testing.assert_close(m(input_ids=ids).logits, dense(input_ids=ids).logits)


def test_routers_learn_from_skipped_tokens(dense):
    """STRing: a loss on a skipped token's output reaches the router through its weight ``w``."""
    m = copy.deepcopy(dense)
    M.convert_(m, M.MoDConfig(keep=(1.0, 0.25, 0.25, 0.25)))
    last = m.model.language_model.layers[3]
    captured = {}
    hook = last.register_forward_hook(lambda mod, a, out: captured.setdefault("y", out))
    m(**batch((4,)))
    hook.remove()
    kept = M.kept_tokens(m)[3][0]
    skipped = [j for j in range(N_VIS) if j not in set(kept.tolist())]
    pos = 1 + skipped[0]  # the vision tokens follow <bos>
    captured["y"][0, pos].sum().backward()
    assert last.mod_router.weight.grad is not None and last.mod_router.weight.grad.abs().sum() > 0


def test_save_and_load(dense, tmp_path):
    m = converted(dense)
    m.save_pretrained(tmp_path)
    back = M.from_pretrained(tmp_path, attn_implementation="sdpa")
    assert M.is_converted(back) and M.mod_config_of(back).keep == SCHEDULE
    for p, q in zip(M.router_parameters(m), M.router_parameters(back), strict=True):
        assert torch.equal(p, q)
    inputs = batch()
    assert torch.equal(generate(back, inputs).sequences, generate(m, inputs).sequences)


def test_router_weights_of_another_shape(dense, tmp_path):
    converted(dense).save_pretrained(tmp_path)
    other = make_tiny_llava(tmp_path / "other", layers=4, seed=1)
    M.convert_(other, M.MoDConfig(keep=(1.0, 0.5, 0.5, 1.0)))
    with pytest.raises(ModelMismatchError, match="do not fit"):
        M.load_routers(other, tmp_path)
    bigger = converted(dense)
    bigger.model.language_model.layers[1].mod_router = torch.nn.Linear(48, 1)
    with pytest.raises(ModelMismatchError, match="shape"):
        M.load_routers(bigger, tmp_path)


def test_bad_input(dense):
    m = converted(dense)
    with pytest.raises(ToolkitError, match="already a Mixture-of-Depths"):
        M.convert_(m, M.MoDConfig(keep=SCHEDULE))
    with pytest.raises(ToolkitError, match="token dropping attaches to dense models only"):
        drop_vision_tokens_(m, TokenDropConfig("fastv"))
    with pytest.raises(UnsupportedInputError, match="not a LLaVA-style model"):
        M.convert_(torch.nn.Linear(2, 2))
    plain = copy.deepcopy(dense)
    plain.config.image_token_id = None  # a model without vision tokens
    with pytest.raises(UnsupportedInputError, match="image_token_id"):
        M.convert_(plain)
    assert not M.is_converted(plain)
    fresh = copy.deepcopy(dense)
    with drop_vision_tokens_(fresh, TokenDropConfig("random")):
        with pytest.raises(ToolkitError, match="token dropping is attached"):
            M.convert_(fresh)
    assert not M.is_converted(fresh) and not hasattr(fresh.model.language_model.layers[1], "mod_router")
    inputs = batch((3, 3))
    inputs["input_ids"][1, -1] = IMAGE_ID  # one more vision token in the second row
    with pytest.raises(UnsupportedInputError, match="same number of vision tokens"):
        with torch.no_grad():
            m(**{k: v for k, v in inputs.items() if k != "pixel_values"})
    with pytest.raises(ToolkitError, match="not a Mixture-of-Depths model"):
        M.kept_tokens(dense)
