"""Vision-token dropping on a tiny LlavaForConditionalGeneration (random weights, saved and reloaded)."""

from __future__ import annotations

import pytest
import torch
from llava_tiny import IMAGE_ID, N_VIS, batch, generate, make_tiny_llava

from toolkit.errors import ConfigError, ToolkitError, UnsupportedInputError
from toolkit.vision import TokenDropConfig, drop_vision_tokens_
from toolkit.vision.measure import kv_cache_bytes, prefill_flops


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_tiny_llava(tmp_path_factory.mktemp("llava"))


def last_logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits[:, -1]


@pytest.mark.parametrize("method", ["fastv", "visionzip", "multistage", "random"])
def test_keep_all_is_identical(model, method):
    inputs = batch()
    ref = generate(model, inputs)
    with drop_vision_tokens_(model, TokenDropConfig(method, keep=1.0, layer=1)):
        out = generate(model, inputs)
    assert torch.equal(out.sequences, ref.sequences)
    for a, b in zip(out.scores, ref.scores, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("method", ["fastv", "visionzip", "multistage"])
def test_batched_rows_match_single_rows(model, method):
    """Left padding and per-row choices: each row of a batch gives what it gives alone.

    (``random`` draws differ between calls; its masks are checked by the next test.)
    """
    lengths = (5, 3, 7)
    inputs = batch(lengths)
    cfg = TokenDropConfig(method, keep=0.25, layer=1)
    with drop_vision_tokens_(model, cfg):
        both = generate(model, inputs, n=3)
        for r, q in enumerate(lengths):
            width = 1 + N_VIS + q
            single = {k: v[r:r + 1, -width:] if k != "pixel_values" else v[r:r + 1] for k, v in inputs.items()}
            alone = generate(model, single, n=3)
            for step in range(3):
                torch.testing.assert_close(both.scores[step][r], alone.scores[step][0], atol=2e-5, rtol=1e-4)


def test_pre_lm_drop_equals_the_shorter_prompt(model):
    """Dropping before the LM is the same as feeding the LM only the kept embeddings at their old positions."""
    inputs = batch((4,))
    with drop_vision_tokens_(model, TokenDropConfig("random", keep=0.5, seed=3)) as h:
        got = last_logits(model, inputs)
        kept = h.kept[0]
    assert kept.shape == (8,)
    core = model.model
    with torch.no_grad():
        emb = core.get_input_embeddings()(inputs["input_ids"])
        feats = core.get_image_features(pixel_values=inputs["pixel_values"], vision_feature_layer=-1,
                                        vision_feature_select_strategy="default").pooler_output[0]
        vis = (inputs["input_ids"][0] == IMAGE_ID).nonzero().flatten()
        emb[0, vis] = feats
        cols = torch.cat([torch.arange(vis[0]), vis[kept], torch.arange(vis[-1] + 1, emb.shape[1])])
        h = core.language_model(inputs_embeds=emb[:, cols], position_ids=cols[None]).last_hidden_state
        want = model.lm_head(h)[:, -1]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method,early_full", [("fastv", True), ("visionzip", False), ("multistage", False),
                                               ("random", False)])
def test_cache_shrinks_with_the_tokens_dropped(model, method, early_full):
    inputs = batch((4, 4))
    full = generate(model, inputs, n=1)
    full_bytes = kv_cache_bytes(full.cache if hasattr(full, "cache") else full.past_key_values)
    with drop_vision_tokens_(model, TokenDropConfig(method, keep=0.25, layer=1)):
        out = generate(model, inputs, n=1)
    cache = out.cache if hasattr(out, "cache") else out.past_key_values
    lengths = [layer.keys.shape[-2] for layer in cache.layers]
    length = inputs["input_ids"].shape[1]
    dropped = N_VIS - 4
    if early_full:
        assert lengths[0] == length and all(n == length - dropped for n in lengths[1:])
    else:
        assert all(n == length - dropped for n in lengths)
    per_token = full_bytes / (3 * length)
    assert kv_cache_bytes(cache) == pytest.approx(per_token * sum(lengths))


def test_fastv_keeps_the_most_attended_tokens(model):
    """FastV keeps the top share by the question's attention at layer K."""
    inputs = batch((3,))
    layer = model.model.language_model.layers[1]
    calls = {}

    def spy(module, args, kwargs):
        calls["hidden"] = (args[0] if args else kwargs["hidden_states"]).clone()
    h0 = layer.register_forward_pre_hook(spy, with_kwargs=True)
    with drop_vision_tokens_(model, TokenDropConfig("fastv", keep=0.25, layer=1)) as h:
        last_logits(model, inputs)
        kept = h.kept[0]
    h0.remove()
    assert kept.shape == (4,) and kept.unique().numel() == 4
    # the kept tokens are the top-4 by the recomputed attention (checked against eager attention weights)
    from toolkit.vision.fastv import question_attention
    with torch.no_grad():
        hidden = calls["hidden"]
        pos = torch.arange(hidden.shape[1])[None]
        pe = model.model.language_model.rotary_emb(hidden, position_ids=pos)
        probs = question_attention(layer, hidden, pe, torch.ones(1, 3, dtype=torch.bool),
                                    torch.ones(1, hidden.shape[1], dtype=torch.bool))
    vis = (inputs["input_ids"][0] == IMAGE_ID).nonzero().flatten()
    score = probs.mean(1)[0][:, vis].mean(0)
    assert set(kept.tolist()) == set(score.topk(4).indices.tolist())


def test_attention_scores_match_eager_attention(model):
    """The scoring's attention weights equal those of the layer run eagerly with output_attentions."""
    from toolkit.vision.fastv import question_attention
    inputs = batch((3,))
    lm = model.model.language_model
    torch.manual_seed(0)
    hidden = torch.randn(1, 1 + N_VIS + 3, 32)
    pos = torch.arange(hidden.shape[1])[None]
    pe = lm.rotary_emb(hidden, position_ids=pos)
    layer = lm.layers[1]
    attn = layer.self_attn
    from transformers.models.llama.modeling_llama import eager_attention_forward
    with torch.no_grad():
        h = layer.input_layernorm(hidden)
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
        q = attn.q_proj(h).view(1, -1, 4, 8).transpose(1, 2)
        k = attn.k_proj(h).view(1, -1, 2, 8).transpose(1, 2)
        v = attn.v_proj(h).view(1, -1, 2, 8).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, *pe)
        L = hidden.shape[1]
        causal = torch.full((L, L), float("-inf")).triu(1)[None, None]
        _, weights = eager_attention_forward(attn, q, k, v, causal, scaling=attn.scaling)
        got = question_attention(layer, hidden, pe, torch.ones(1, 3, dtype=torch.bool),
                                  torch.ones(1, L, dtype=torch.bool))
    torch.testing.assert_close(got, weights[:, :, -3:], atol=1e-6, rtol=1e-5)
    del inputs


def test_flops_fall_with_the_tokens_kept(model):
    inputs = batch((4,))
    full = prefill_flops(model, inputs)
    with drop_vision_tokens_(model, TokenDropConfig("visionzip", keep=0.25)):
        few = prefill_flops(model, inputs)
    # the tower does the same work plus VisionZip's scoring (one layer's q, k and attention again)
    assert full["vision_tower"] < few["vision_tower"] < 1.25 * full["vision_tower"]
    assert few["language_model"] < 0.5 * full["language_model"]
    assert full["total"] == pytest.approx(sum(v for k, v in full.items() if k != "total"))


def test_sdpa_is_counted(model):
    """torch's flop counter misses CPU SDPA; ours counts 4 * b * h * q * k * d for it."""
    from toolkit.vision.measure import count_flops
    q = torch.randn(2, 4, 10, 8)
    k = torch.randn(2, 4, 12, 8)
    total, _ = count_flops(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, k))
    assert total == 4 * 2 * 4 * 10 * 12 * 8


def test_bad_input_leaves_the_model_alone(model):
    before = (len(model.model._forward_pre_hooks), len(model.model.language_model._forward_pre_hooks))
    with pytest.raises(ConfigError, match="unknown token-dropping method"):
        TokenDropConfig("tome")
    for keep in (0.0, -0.5, 1.5):
        with pytest.raises(ConfigError, match="keep must be"):
            TokenDropConfig("fastv", keep=keep)
    with pytest.raises(ConfigError, match="beyond the language model's depth"):
        drop_vision_tokens_(model, TokenDropConfig("fastv", layer=3))
    with pytest.raises(UnsupportedInputError, match="not a LLaVA-style model"):
        drop_vision_tokens_(torch.nn.Linear(2, 2), TokenDropConfig("fastv"))
    assert (len(model.model._forward_pre_hooks), len(model.model.language_model._forward_pre_hooks)) == before
    h = drop_vision_tokens_(model, TokenDropConfig("random"))
    with pytest.raises(ToolkitError, match="already attached"):
        drop_vision_tokens_(model, TokenDropConfig("fastv"))
    text_only = batch((4,))
    text_only["input_ids"][text_only["input_ids"] == IMAGE_ID] = 5
    text_only.pop("pixel_values")
    with pytest.raises(UnsupportedInputError, match="no vision tokens"):
        last_logits(model, text_only)
    h.remove()
    assert (len(model.model._forward_pre_hooks), len(model.model.language_model._forward_pre_hooks)) == before
    assert torch.equal(last_logits(model, batch()), last_logits(model, batch()))
    h.remove()  # a second remove changes nothing
    assert (len(model.model._forward_pre_hooks), len(model.model.language_model._forward_pre_hooks)) == before


def test_config_round_trips_through_its_dict():
    cfg = TokenDropConfig("visionzip", keep=0.125, contextual=0.3, proportional_attention=True)
    assert TokenDropConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="keep must be"):
        TokenDropConfig.from_dict({**cfg.to_dict(), "keep": 2.0})


@pytest.mark.parametrize("method", ["visionzip", "multistage"])
def test_proportional_attention_keep_all_is_identical(model, method):
    inputs = batch()
    ref = generate(model, inputs)
    with drop_vision_tokens_(model, TokenDropConfig(method, keep=1.0, layer=1, proportional_attention=True)):
        out = generate(model, inputs)
    assert torch.equal(out.sequences, ref.sequences)


def test_proportional_attention_biases_merged_keys_by_log_size(model):
    """Every layer's mask carries log(size) on each merged token's column, in prefill and in decoding."""
    inputs = batch((5, 3))
    seen = []

    def spy(module, args, kwargs):
        seen.append(kwargs["attention_mask"].clone())
    spies = [layer.self_attn.register_forward_pre_hook(spy, with_kwargs=True)
             for layer in model.model.language_model.layers]
    cfg = TokenDropConfig("visionzip", keep=0.5, contextual=0.5, proportional_attention=True)
    with drop_vision_tokens_(model, cfg) as handle:
        generate(model, inputs, n=2)
        kept, merged = handle.kept, handle.merged_into
        cols = handle.state.lm_cols
    for s in spies:
        s.remove()
    assert len(seen) == 2 * 3  # two forward passes (prefill, one decoding step), three layers
    vis_pos = (inputs["input_ids"] == IMAGE_ID).nonzero()[:, 1].view(2, N_VIS)
    for r in range(2):
        sizes = torch.bincount(merged[r][merged[r] >= 0], minlength=N_VIS)[kept[r]].float()
        assert sizes.sum() == N_VIS and (sizes > 1).any()
        where = [int((cols[r] == vis_pos[r, j]).nonzero()) for j in kept[r]]
        for mask in seen:
            last = mask[r, 0, -1]  # the last query row sees every key
            torch.testing.assert_close(last[where], sizes.log())
            pad = (inputs["attention_mask"][r] == 0)[cols[r]]
            assert torch.isinf(last[: len(pad)][pad]).all()
