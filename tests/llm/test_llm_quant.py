"""toolkit.llm.quant and toolkit.llm.eval: packing, GPTQ, quantize_, QuantizedLinear and the eval helpers.

Every model is built here from a tiny config (no network, no shipped weights).
Checkpoints are tested in test_llm_checkpoint.py.
"""

from __future__ import annotations

import math

import pytest
import torch
import transformers
from llm_tiny import VOCAB, one_thread, shape  # noqa: F401  (one_thread: autouse fixture)
from torch import nn
from torch.nn import functional as F

from toolkit.errors import ConfigError, ToolkitError
from toolkit.kernels.pack import pack_int32, packed_words, unpack_int32
from toolkit.llm import GPTQConfig, OutlierConfig, QuantConfig, QuantizedLinear, RTNConfig, find_targets, quantize_
from toolkit.llm import eval as llm_eval
from toolkit.llm.quant import apply as quant_apply
from toolkit.llm.quant import grid
from toolkit.llm.quant.apply import build_calibration
from toolkit.llm.quant.gptq import round_to_nearest, solve

LINEAR_LEAVES = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def tiny_llama(tied: bool = True, seed: int = 0, **kw) -> nn.Module:
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(**shape(tie_word_embeddings=tied, **kw))
    return transformers.LlamaForCausalLM(cfg).eval()


def tiny_qwen2(tied: bool = False, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    cfg = transformers.Qwen2Config(**shape(tie_word_embeddings=tied))
    return transformers.Qwen2ForCausalLM(cfg).eval()


MODELS = {
    "llama-tied": lambda: tiny_llama(True),
    "llama-untied": lambda: tiny_llama(False),
    "qwen2": tiny_qwen2,
}


def calib_batches(n: int = 4, vocab: int = VOCAB, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (2, 32), generator=g) for _ in range(n)]


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def rel_err(a, b) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm())


def snapshot(model: nn.Module):
    return ({n: m for n, m in model.named_modules()},
            {k: v.detach().clone() for k, v in model.state_dict().items()})


def assert_unchanged(model: nn.Module, snap) -> None:
    mods, state = snap
    now = dict(model.named_modules())
    assert now.keys() == mods.keys()
    for name, mod in mods.items():
        assert now[name] is mod, f"{name} was replaced"
    assert not any(isinstance(m, QuantizedLinear) for m in model.modules())
    after = model.state_dict()
    assert after.keys() == state.keys()
    for k, v in state.items():
        assert after[k].dtype == v.dtype and torch.equal(after[k], v), k
    assert not hasattr(model, "quantization")


def decoder_linears(model) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if n.split(".")[-1] in LINEAR_LEAVES}


# ===================================================================== pack
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("length", [1, 5, 31, 32, 33, 67, 96])
def test_pack_round_trip(bits, length) -> None:
    g = torch.Generator().manual_seed(bits * 100 + length)
    lo, hi = grid.qrange(bits)
    codes = torch.randint(lo, hi + 1, (3, length), generator=g, dtype=torch.int8)
    codes[0, 0], codes[-1, -1] = lo, hi  # both extremes present
    packed = pack_int32(codes, bits)
    assert packed.dtype == torch.int32
    assert packed.shape == (3, packed_words(length, bits)) == (3, math.ceil(length * bits / 32))
    out = unpack_int32(packed, bits, length)
    assert out.dtype == torch.int8 and torch.equal(out, codes)
    # Along dim 0 too (how zero points are packed).
    packed0 = pack_int32(codes.t().contiguous(), bits, dim=0)
    assert packed0.shape == (packed_words(length, bits), 3)
    assert torch.equal(unpack_int32(packed0, bits, length, dim=0), codes.t())


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("dim", [0, 1])
def test_pack_matches_compressed_tensors(bits, dim) -> None:
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32

    g = torch.Generator().manual_seed(bits + 10 * dim)
    lo, hi = grid.qrange(bits)
    shape = (37, 29) if dim == 1 else (29, 37)  # odd length along the packed dim
    codes = torch.randint(lo, hi + 1, shape, generator=g, dtype=torch.int8)
    ours = pack_int32(codes, bits, dim=dim)
    theirs = pack_to_int32(codes, bits, packed_dim=dim)
    assert ours.dtype == theirs.dtype == torch.int32
    assert torch.equal(ours, theirs)
    assert torch.equal(unpack_from_int32(ours, bits, codes.shape, packed_dim=dim), codes)


def test_pack_rejects_non_2d() -> None:
    with pytest.raises(ValueError):
        pack_int32(torch.zeros(4, dtype=torch.int8), 4)


# ============================================================= grid / gptq
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_grid_codes_in_range_and_error_bounded(bits, symmetric) -> None:
    g = torch.Generator().manual_seed(bits)
    w = torch.randn(16, 32, generator=g) * 0.1
    w[3] = 0.0  # an all-zero row
    scale, zero = grid.find_params(w, bits, symmetric)
    assert torch.equal(scale, scale.half().float())  # scales are stored in float16
    assert bool((scale > 0).all())
    if symmetric:
        assert bool((zero == 0).all())
    q = grid.quantize(w, scale, zero, bits)
    lo, hi = grid.qrange(bits)
    assert bool((q >= lo).all() and (q <= hi).all()) and torch.equal(q, q.round())
    err = (grid.fake_quantize(w, scale, zero, bits) - w).abs()
    # Min-max grids clip (almost) nothing: error at most half a step, plus what the
    # float16 rounding of the scale moves the extreme code (2**-11 of up to 2**bits steps).
    assert bool((err <= scale[:, None] * (0.5 + 2.0**-11 * 2**bits) + 1e-7).all())
    assert float((err / scale[:, None]).max()) > 0.3  # and the bound is not vacuous
    assert bool((grid.fake_quantize(w, scale, zero, bits)[3] == 0).all())


def _correlated(inf: int, n: int = 512, seed: int = 0) -> torch.Tensor:
    """Inputs X = Z A with a random mixing A of decaying strength: strongly correlated columns."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, inf, generator=g)
    a = torch.randn(inf, inf, generator=g) / math.sqrt(inf) * torch.logspace(0, -2, inf)[:, None]
    return z @ a


def _hessian(x: torch.Tensor) -> torch.Tensor:
    return 2 * x.t() @ x / x.shape[0]


def _out_err(x, w, w_hat) -> float:
    return float((x @ w.t() - x @ w_hat.t()).norm())


VARIANTS = [dict(act_order=False, static_groups=True), dict(act_order=True, static_groups=True),
            dict(act_order=True, static_groups=False), dict(act_order=False, static_groups=False)]


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: f"ao{int(v['act_order'])}-sg{int(v['static_groups'])}")
@pytest.mark.parametrize("symmetric", [True, False])
def test_gptq_beats_rtn_on_correlated_inputs(bits, variant, symmetric) -> None:
    x = _correlated(128)
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(1)) * 0.05
    sol = solve(w, _hessian(x), bits, 32, symmetric, **variant)
    rtn = round_to_nearest(w, bits, 32, symmetric, torch.float16)
    e_gptq, e_rtn = _out_err(x, w, sol.dequantize()), _out_err(x, w, rtn.dequantize())
    assert e_gptq < 0.75 * e_rtn, (e_gptq, e_rtn)
    lo, hi = grid.qrange(bits)
    assert sol.codes.dtype == torch.int8 and int(sol.codes.min()) >= lo and int(sol.codes.max()) <= hi
    assert sol.scale.shape == sol.zero.shape == (64, 4)
    if variant["act_order"] and not variant["static_groups"]:
        # Groups formed in sweep order: every column names its group, each group has 32 columns.
        assert sol.g_idx is not None and sol.g_idx.dtype == torch.int32
        assert torch.equal(torch.bincount(sol.g_idx.long(), minlength=4), torch.full((4,), 32))
        assert not torch.equal(sol.g_idx.long(), torch.arange(128) // 32)
    else:
        assert sol.g_idx is None


def test_gptq_per_channel() -> None:
    x = _correlated(64)
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(2)) * 0.05
    for gs in (None, -1):
        sol = solve(w, _hessian(x), 4, gs, True)
        assert sol.scale.shape == (32, 1)
        rtn = round_to_nearest(w, 4, gs, True, torch.float16)
        assert rtn.scale.shape == (32, 1)
        assert _out_err(x, w, sol.dequantize()) < 0.75 * _out_err(x, w, rtn.dequantize())


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_dead_input_column(act_order) -> None:
    x = _correlated(64)
    x[:, 5] = 0.0
    x[:, 40] = 0.0
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(3)) * 0.05
    h = _hessian(x)
    assert h[5, 5] == 0 and h[40, 40] == 0
    for symmetric in (True, False):
        sol = solve(w, h, 4, 16, symmetric, act_order=act_order)
        deq = sol.dequantize()
        assert bool(torch.isfinite(deq).all())
        # A column no input ever reaches is dropped (coded as exactly zero).
        assert bool((deq[:, 5] == 0).all()) and bool((deq[:, 40] == 0).all())
        rtn = round_to_nearest(w, 4, 16, symmetric, torch.float16)
        assert _out_err(x, w, deq) < _out_err(x, w, rtn.dequantize())


def test_rtn_is_round_to_nearest() -> None:
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(4))
    sol = round_to_nearest(w, 4, 16, True, torch.float16)
    scale, zero = grid.find_params(w.reshape(-1, 16), 4, True)
    assert torch.equal(sol.scale, scale.reshape(8, 4))
    assert torch.equal(sol.dequantize(), grid.fake_quantize(w.reshape(-1, 16), scale, zero, 4).reshape(8, 64))


# ============================================================== quantize_
@pytest.mark.parametrize("arch", list(MODELS))
@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_quantize_replaces_decoder_linears(arch, method) -> None:
    model = MODELS[arch]()
    head = model.lm_head
    embed_before = model.model.embed_tokens.weight.detach().clone()
    cfg = RTNConfig(bits=4, group_size=32) if method == "rtn" else GPTQConfig(bits=4, group_size=32)
    calib = None if method == "rtn" else calib_batches()
    handle = quantize_(model, cfg, calib, progress=False)
    assert handle.model is model and handle.targets == list(decoder_linears(model))
    targets = decoder_linears(model)
    assert len(targets) == 14
    for name, mod in targets.items():
        assert isinstance(mod, QuantizedLinear), name
        assert mod.bits == 4 and mod.group_size == 32
    assert not any(type(m) is nn.Linear for m in model.model.layers.modules())
    # lm_head is left alone by default.
    assert model.lm_head is head and type(model.lm_head) is nn.Linear
    assert torch.equal(model.model.embed_tokens.weight, embed_before)
    if arch == "qwen2":
        q = model.model.layers[0].self_attn.q_proj
        assert q.bias is not None and model.model.layers[0].self_attn.o_proj.bias is None
    assert model.quantization["targets"] == list(targets)
    assert model.quantization["config"]["method"] == method
    y = logits(model, calib_batches(1)[0])
    assert y.shape == (2, 32, VOCAB) and bool(torch.isfinite(y).all())


@pytest.mark.parametrize("tied", [True, False])
def test_quantize_lm_head(tied) -> None:
    model = tiny_llama(tied)
    assert "lm_head" not in find_targets(model)
    assert find_targets(model, quantize_lm_head=True)[-1] == "lm_head"
    ref = logits(model, calib_batches(1)[0])
    quantize_(model, GPTQConfig(bits=8, group_size=32), calib_batches(), quantize_lm_head=True, progress=False)
    assert isinstance(model.lm_head, QuantizedLinear)
    assert type(model.model.embed_tokens) is nn.Embedding  # the input embedding stays float
    assert rel_err(logits(model, calib_batches(1)[0]), ref) < 0.05


def test_ignore_patterns_glob_and_regex() -> None:
    model = tiny_llama(False)
    ignore = ["*.mlp.down_proj", "re:layers\\.0\\.self_attn\\.[qk]_proj$"]
    left = {"model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj",
            "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj"}
    assert set(find_targets(model)) - set(find_targets(model, ignore)) == left
    quantize_(model, GPTQConfig(bits=4, group_size=32), calib_batches(), ignore=ignore, progress=False)
    for name, mod in decoder_linears(model).items():
        if name in left:
            assert type(mod) is nn.Linear, name
        else:
            assert isinstance(mod, QuantizedLinear), name
    assert model.quantization["ignore"] == ignore
    # A bare leaf name matches as a suffix.
    m2 = tiny_llama(False)
    assert not any(n.endswith("v_proj") for n in find_targets(m2, ["v_proj"]))


def test_overrides_give_a_layer_another_config() -> None:
    model = tiny_llama(False)
    overrides = {"re:.*down_proj": GPTQConfig(bits=4, group_size=64), "*.0.self_attn.o_proj": RTNConfig(bits=8,
                                                                                                         group_size=16)}
    quantize_(model, GPTQConfig(bits=4, group_size=32), calib_batches(), overrides=overrides, progress=False)
    for name, mod in decoder_linears(model).items():
        want = (64, 4) if name.endswith("down_proj") else (16, 8) if name == "model.layers.0.self_attn.o_proj" \
            else (32, 4)
        assert (mod.group_size, mod.bits) == want, name
        assert mod.weight_scale.shape[1] == mod.in_features // want[0]
    assert model.model.layers[0].self_attn.o_proj.quant_config.method == "rtn"
    assert set(model.quantization["overrides"]) == set(overrides)


def test_override_makes_an_indivisible_layer_quantizable() -> None:
    model = tiny_llama(False)  # down_proj is 128 wide, the rest 64
    with pytest.raises(ConfigError, match="down_proj"):
        quantize_(model, RTNConfig(group_size=128), progress=False)
    quantize_(model, RTNConfig(group_size=128), overrides={"re:.*(q|k|v|o|gate|up)_proj": RTNConfig(group_size=64)},
              progress=False)
    assert model.model.layers[1].mlp.down_proj.group_size == 128
    assert model.model.layers[1].mlp.up_proj.group_size == 64


def test_rtn_needs_no_calibration_and_ignores_it() -> None:
    a, b = tiny_llama(False), tiny_llama(False)
    quantize_(a, RTNConfig(bits=4, group_size=32), progress=False)
    quantize_(b, RTNConfig(bits=4, group_size=32), calib_batches(), progress=False)
    for (na, qa), (nb, qb) in zip(decoder_linears(a).items(), decoder_linears(b).items(), strict=True):
        assert na == nb and torch.equal(qa.weight_packed, qb.weight_packed)
        assert torch.equal(qa.weight_scale, qb.weight_scale)


@pytest.fixture(scope="module")
def byte_tok():
    from toolkit.models.tokenizer import train

    text = (b"The model predicts the next token; the coder spends -log2 p bits on it.\n"
            b"def f(x):\n    return x * 2 + 1\nCompression and prediction are two views of one problem. ") * 12
    return train([text], vocab_size=300)


TEXTS = ["The quick brown fox jumps over the lazy dog. " * 6,
         "Compression and prediction are two views of one problem; the coder spends bits. " * 6]


def test_calibration_from_texts_with_a_tokenizer(byte_tok) -> None:
    batches = build_calibration(TEXTS, byte_tok, seq_len=16)
    n_ids = sum(len(byte_tok.encode(t.encode())) for t in TEXTS)
    assert len(batches) == n_ids // 16 and all(b.shape == (1, 16) for b in batches)
    assert build_calibration(TEXTS, byte_tok, seq_len=16, num_samples=3).__len__() == 3
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(**{**shape(tie_word_embeddings=True), "vocab_size": byte_tok.vocab_size})
    model = transformers.LlamaForCausalLM(cfg).eval()
    quantize_(model, GPTQConfig(bits=4, group_size=32), TEXTS, tokenizer=byte_tok, seq_len=32, progress=False)
    assert all(isinstance(m, QuantizedLinear) for m in decoder_linears(model).values())


def test_calibration_with_a_callable_tokenizer() -> None:
    class HFStyle:  # what a transformers tokenizer looks like to build_calibration
        def __call__(self, text):
            return {"input_ids": [ord(c) % VOCAB for c in text]}

    batches = build_calibration(["abc" * 20], HFStyle(), seq_len=8)
    assert len(batches) == 7 and torch.equal(batches[0][0], torch.tensor([97, 98, 99] * 2 + [97, 98]))
    model = tiny_llama(False)
    quantize_(model, GPTQConfig(bits=4, group_size=32), ["hello world " * 20], tokenizer=HFStyle(), progress=False)
    assert isinstance(model.model.layers[0].mlp.up_proj, QuantizedLinear)


@pytest.mark.parametrize("arch", ["llama-untied", "qwen2"])
def test_gptq_logits_stay_close_to_float(arch) -> None:
    ids = calib_batches(1, seed=99)[0]
    errs = {}
    for bits in (4, 8):
        model = MODELS[arch]()
        ref = logits(model, ids)
        quantize_(model, GPTQConfig(bits=bits, group_size=32), calib_batches(), progress=False)
        errs[bits] = rel_err(logits(model, ids), ref)
    assert errs[4] < 0.15, errs
    assert errs[8] < errs[4] / 4, errs
    assert errs[8] < 0.02, errs


def test_outlier_config_logits_stay_close() -> None:
    ids = calib_batches(1, seed=99)[0]
    model = tiny_llama(False)
    ref = logits(model, ids)
    rtn = tiny_llama(False)
    quantize_(rtn, RTNConfig(bits=3, group_size=16, symmetric=False), progress=False)
    quantize_(model, OutlierConfig(), calib_batches(), progress=False)
    q = model.model.layers[0].mlp.down_proj
    assert q.coded_stats and q.outlier_val.numel() > 0
    assert rel_err(logits(model, ids), ref) < 0.15
    assert rel_err(logits(model, ids), ref) < rel_err(logits(rtn, ids), ref)


def test_generic_sequential_with_float_batches() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 16))
    g = torch.Generator().manual_seed(5)
    mix = torch.randn(32, 32, generator=g)
    batches = [torch.randn(16, 32, generator=g) @ mix for _ in range(8)]
    x = torch.cat(batches)
    with torch.no_grad():
        ref = model(x)
    rtn = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 16))
    rtn.load_state_dict(model.state_dict())
    quantize_(rtn, RTNConfig(bits=3, group_size=16), progress=False)
    quantize_(model, GPTQConfig(bits=3, group_size=16), batches, progress=False)
    assert isinstance(model[0], QuantizedLinear) and isinstance(model[2], QuantizedLinear)
    assert model[0].bias is not None
    with torch.no_grad():
        e_gptq, e_rtn = rel_err(model(x), ref), rel_err(rtn(x), ref)
    assert e_gptq < e_rtn and e_gptq < 0.2, (e_gptq, e_rtn)
    # Tuple and dict batches reach the forward as positional / keyword arguments.
    m2 = nn.Sequential(nn.Linear(32, 16))
    quantize_(m2, GPTQConfig(bits=4, group_size=16), [(b,) for b in batches], progress=False)
    assert isinstance(m2[0], QuantizedLinear)


def test_progress_bar(capsys) -> None:
    model = tiny_llama(False)
    quantize_(model, RTNConfig(bits=4, group_size=32), progress=True)
    assert "rtn" in capsys.readouterr().err
    m2 = tiny_llama(False)
    quantize_(m2, GPTQConfig(bits=4, group_size=32), calib_batches(2), progress=True)
    assert isinstance(m2.model.layers[1].mlp.down_proj, QuantizedLinear)


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_remove_puts_the_float_layers_back(method) -> None:
    model = tiny_llama(False)
    before = {name: mod for name, mod in model.named_modules() if isinstance(mod, nn.Linear)}
    ids = calib_batches(1)[0]
    want = logits(model, ids)
    cfg = RTNConfig(bits=4, group_size=32) if method == "rtn" else GPTQConfig(bits=4, group_size=32)
    handle = quantize_(model, cfg, None if method == "rtn" else calib_batches(2), progress=False)
    assert not torch.equal(logits(model, ids), want)
    handle.remove()
    after = {name: mod for name, mod in model.named_modules() if isinstance(mod, nn.Linear)}
    assert after.keys() == before.keys() and all(after[n] is before[n] for n in before)  # the very modules
    assert not hasattr(model, "quantization")
    assert torch.equal(logits(model, ids), want)
    handle.remove()  # a second remove does nothing
    assert all(model.get_submodule(n) is before[n] for n in before)


@pytest.mark.gpu
def test_remove_after_quantizing_on_another_device_leaves_the_model_where_it_was() -> None:
    model = tiny_llama(False)
    ids = calib_batches(1)[0]
    want = logits(model, ids)
    handle = quantize_(model, GPTQConfig(bits=4, group_size=32), calib_batches(2), device="cuda", progress=False)
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    handle.remove()
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    assert torch.equal(logits(model, ids), want)


def test_progress_callback_counts_the_layers() -> None:
    seen = []
    quantize_(tiny_llama(False), GPTQConfig(bits=4, group_size=32), calib_batches(2),
              progress=lambda done, total: seen.append((done, total)))
    assert seen[-1] == (14, 14) and [d for d, _ in seen] == sorted(d for d, _ in seen)


def test_training_mode_is_restored() -> None:
    model = tiny_llama(False).train()
    quantize_(model, GPTQConfig(bits=4, group_size=32), calib_batches(2), progress=False)
    assert model.training


# ================================================== bad input, model unchanged
def _no_linear_model():
    return nn.Sequential(nn.Conv1d(4, 4, 3), nn.ReLU())


BAD_CALLS = {
    "no-linear": (_no_linear_model, lambda: (RTNConfig(), None), {}),
    "all-ignored": (lambda: tiny_llama(False), lambda: (RTNConfig(group_size=32), None), {"ignore": ["re:.*"]}),
    "group-indivisible": (lambda: tiny_llama(False), lambda: (GPTQConfig(group_size=48), calib_batches()), {}),
    "group-indivisible-rtn": (lambda: tiny_llama(False), lambda: (RTNConfig(group_size=128), None), {}),
    "empty-calib": (lambda: tiny_llama(False), lambda: (GPTQConfig(group_size=32), []), {}),
    "calib-none": (lambda: tiny_llama(False), lambda: (GPTQConfig(group_size=32), None), {}),
    "calib-none-override": (lambda: tiny_llama(False), lambda: (RTNConfig(group_size=32), None),
                            {"overrides": {"*down_proj": GPTQConfig(group_size=32)}}),
    "texts-no-tokenizer": (lambda: tiny_llama(False), lambda: (GPTQConfig(group_size=32), ["some text"]), {}),
    "mixed-calib": (lambda: tiny_llama(False),
                    lambda: (GPTQConfig(group_size=32), ["text", torch.zeros(1, 8, dtype=torch.long)]), {}),
    "empty-batch": (lambda: tiny_llama(False),
                    lambda: (GPTQConfig(group_size=32), [torch.zeros(1, 0, dtype=torch.long)]), {}),
    "ids-too-large": (lambda: tiny_llama(False),
                      lambda: (GPTQConfig(group_size=32), [torch.full((1, 8), VOCAB, dtype=torch.long)]), {}),
    "ids-negative": (lambda: tiny_llama(False),
                     lambda: (GPTQConfig(group_size=32), calib_batches(2) + [torch.full((1, 8), -1)]), {}),
    "not-a-config": (lambda: tiny_llama(False), lambda: ({"bits": 4}, None), {}),
    "bad-override": (lambda: tiny_llama(False), lambda: (RTNConfig(group_size=32), None),
                     {"overrides": {"*down_proj": 4}}),
}


@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_bad_input_raises_and_leaves_model_unchanged(case) -> None:
    make, args, kw = BAD_CALLS[case]
    model = make()
    snap = snapshot(model)
    config, calib = args()
    with pytest.raises(ConfigError):
        quantize_(model, config, calib, progress=False, **kw)
    assert_unchanged(model, snap)


@pytest.mark.parametrize("make", [
    lambda: RTNConfig(bits=5), lambda: GPTQConfig(bits=5), lambda: OutlierConfig(bits=1),
    lambda: RTNConfig(group_size=0), lambda: RTNConfig(group_size=True), lambda: RTNConfig(group_size=-2),
    lambda: RTNConfig(scale_dtype="int8"), lambda: GPTQConfig(damp=0), lambda: GPTQConfig(damp=1.5),
    lambda: GPTQConfig(block_size=0), lambda: OutlierConfig(group_size=None),
    lambda: OutlierConfig(outlier_fraction=0.5), lambda: OutlierConfig(stat_bits=9),
    lambda: OutlierConfig(stat_group=0), lambda: RTNConfig(bits="4"), lambda: GPTQConfig(damp="0.1"),
    lambda: GPTQConfig(act_order="yes"), lambda: RTNConfig.from_dict(GPTQConfig().to_dict()),
    lambda: GPTQConfig.from_dict({"method": "gptq", "bits": 4, "block": 7}),
])
def test_bad_config_values(make) -> None:
    with pytest.raises(ConfigError):
        make()


def test_config_values_accepted() -> None:
    for bits in (2, 3, 4, 8):
        assert RTNConfig(bits=bits).bits == bits
    assert RTNConfig(group_size=-1).group is None and RTNConfig(group_size=None).group is None
    assert GPTQConfig(scale_dtype="bfloat16").torch_scale_dtype == torch.bfloat16
    assert OutlierConfig().to_dict()["method"] == "outlier"
    assert issubclass(ConfigError, ToolkitError)
    # The form checkpoints and benchmark results hold: the method, then the fields; read back as the method's class.
    gptq = GPTQConfig(bits=3, group_size=None)
    assert gptq.to_dict() == {"method": "gptq", "bits": 3, "group_size": None, "symmetric": True,
                              "scale_dtype": "float16", "act_order": True, "static_groups": True, "damp": 0.01,
                              "block_size": 128}
    for config in (gptq, RTNConfig(bits=2), OutlierConfig()):
        assert QuantConfig.from_dict(config.to_dict()) == config and type(config).from_dict(config.to_dict()) == config


@pytest.mark.parametrize("exc, expected", [
    (ToolkitError("injected"), ToolkitError),
    (RuntimeError("injected"), RuntimeError),
    (torch.linalg.LinAlgError("injected"), ToolkitError),
    (KeyboardInterrupt(), KeyboardInterrupt),
], ids=["toolkit", "runtime", "linalg", "interrupt"])
@pytest.mark.parametrize("fail_at", [3, 10])
def test_failure_midway_restores_every_layer(monkeypatch, exc, expected, fail_at) -> None:
    model = tiny_llama(False).train()
    snap = snapshot(model)
    real = quant_apply.solve
    calls = []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == fail_at:
            raise exc
        return real(*args, **kwargs)

    monkeypatch.setattr(quant_apply, "solve", flaky)
    with pytest.raises(expected):
        quantize_(model, GPTQConfig(bits=4, group_size=32), calib_batches(2), progress=False)
    assert len(calls) == fail_at  # it failed midway, after some layers were swapped
    assert model.training
    assert_unchanged(model, snap)
    # The same model quantizes fine afterwards.
    monkeypatch.setattr(quant_apply, "solve", real)
    quantize_(model, GPTQConfig(bits=4, group_size=32), calib_batches(2), progress=False)
    assert len([m for m in model.modules() if isinstance(m, QuantizedLinear)]) == 14


# ==================================================== QuantizedLinear forward
def _qlinear(inf, outf, bits, gs, symmetric=True, bias=True, seed=0, method="gptq", **kw) -> QuantizedLinear:
    torch.manual_seed(seed)
    lin = nn.Linear(inf, outf, bias=bias)
    if method == "rtn":
        sol = round_to_nearest(lin.weight.detach(), bits, gs, symmetric, torch.float16)
    else:
        sol = solve(lin.weight.detach(), _hessian(_correlated(inf, 256, seed)), bits, gs, symmetric, **kw)
    return QuantizedLinear.from_solution(lin, sol, bits, gs, symmetric, torch.float16)


@pytest.fixture
def int4_calls(monkeypatch):
    calls = []
    real = torch.ops.aten._weight_int4pack_mm_for_cpu

    def spy(*args):
        calls.append(args[2])  # the group size the kernel runs with
        return real(*args)

    monkeypatch.setattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu", spy)
    return calls


def _assert_bf16_close(y, ref) -> None:
    assert y.dtype == torch.bfloat16 and y.shape == ref.shape
    # Scales go to the kernel as bfloat16: a few bf16 ulps of difference.
    assert rel_err(y, ref) < 1e-2
    torch.testing.assert_close(y.float(), ref.float(), rtol=0.03, atol=0.03)


@pytest.mark.parametrize("inf, outf, gs, symmetric, kernel_gs", [
    (128, 64, 32, True, 32), (128, 64, 64, False, 64), (256, 32, 128, True, 128), (256, 16, 256, False, 256),
    (128, 32, None, True, 128), (512, 32, None, True, 256), (512, 16, None, False, 256),
])
def test_cpu_int4_kernel_path(int4_calls, inf, outf, gs, symmetric, kernel_gs) -> None:
    q = _qlinear(inf, outf, 4, gs, symmetric)
    x = torch.randn(3, 5, inf, generator=torch.Generator().manual_seed(0)).bfloat16()
    y = q(x)
    assert int4_calls == [kernel_gs]
    _assert_bf16_close(y, F.linear(x, q.dequantize().to(torch.bfloat16), q.bias.bfloat16()))
    q(x)
    assert len(int4_calls) == 2  # the repacked copy is reused


def test_cpu_int4_kernel_with_g_idx(int4_calls) -> None:
    q = _qlinear(128, 64, 4, 32, True, act_order=True, static_groups=False)
    assert hasattr(q, "weight_g_idx")
    assert not torch.equal(q.group_index(), torch.arange(128) // 32)
    x = torch.randn(7, 128, generator=torch.Generator().manual_seed(1)).bfloat16()
    y = q(x)
    assert int4_calls == [32]
    _assert_bf16_close(y, F.linear(x, q.dequantize().to(torch.bfloat16), q.bias.bfloat16()))


@pytest.mark.parametrize("inf, outf, gs", [(128, 24, 32), (128, 64, 16), (96, 32, 48)])
def test_cpu_int4_falls_back_where_the_kernel_does_not_apply(int4_calls, inf, outf, gs) -> None:
    q = _qlinear(inf, outf, 4, gs)
    x = torch.randn(4, inf, generator=torch.Generator().manual_seed(2)).bfloat16()
    y = q(x)
    assert int4_calls == []
    assert torch.equal(y, F.linear(x, q.dequantize().to(torch.bfloat16)) + q.bias.bfloat16())


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("g_idx", [False, True])
def test_fp32_forward_equals_dequantized_linear(bits, symmetric, g_idx) -> None:
    kw = dict(act_order=True, static_groups=False) if g_idx else {}
    q = _qlinear(64, 48, bits, 16, symmetric, bias=False, **kw)
    assert hasattr(q, "weight_g_idx") == g_idx
    x = torch.randn(2, 3, 64, generator=torch.Generator().manual_seed(3))
    assert torch.equal(q(x), F.linear(x, q.dequantize()))
    # bf16 activations of non-4-bit layers dequantize per call, exactly as F.linear does.
    xb = x.bfloat16()
    if bits != 4:
        assert torch.equal(q(xb), F.linear(xb, q.dequantize().to(torch.bfloat16)))
    assert q.weight.dtype == torch.float32 and torch.equal(q.weight, q.dequantize())


def test_dequantize_matches_the_solution() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(64, 32)
    for kw in (dict(), dict(act_order=True, static_groups=False)):
        for symmetric in (True, False):
            sol = solve(lin.weight.detach(), _hessian(_correlated(64)), 3, 16, symmetric, **kw)
            q = QuantizedLinear.from_solution(lin, sol, 3, 16, symmetric, torch.float16)
            assert torch.equal(q.codes(), sol.codes)
            assert torch.equal(q.dequantize(), sol.dequantize())
            assert torch.equal(q.bias, lin.bias)


@pytest.fixture(scope="module")
def outlier_layer():
    torch.manual_seed(0)
    lin = nn.Linear(64, 32)
    with torch.no_grad():
        lin.weight[3, 7] = 2.0  # outliers worth keeping
        lin.weight[10, 50] = -1.5
    cfg = OutlierConfig(outlier_fraction=0.02)
    sol = solve(lin.weight.detach(), _hessian(_correlated(64)), cfg.bits, cfg.group_size, cfg.symmetric,
                act_order=cfg.act_order, outlier_fraction=cfg.outlier_fraction, stat_bits=cfg.stat_bits,
                stat_group=cfg.stat_group)
    return lin, sol, QuantizedLinear.from_solution(lin, sol, cfg.bits, cfg.group_size, cfg.symmetric,
                                                   torch.float16)


def test_outlier_layer_dequantize_includes_outliers(outlier_layer) -> None:
    lin, sol, q = outlier_layer
    assert q.coded_stats and q.outlier_val.numel() > 0
    assert q.outlier_val.numel() <= 0.02 * 64 * 32 + 64  # the budget, rounded per group
    s, z = q.scales_and_zeros()
    idx = q.group_index()
    base = grid.dequantize(q.codes(), s[:, idx], z[:, idx])
    dense = q.outliers().to_dense()
    assert int((dense != 0).sum()) > 0
    assert torch.equal(q.dequantize(), base + dense)
    assert torch.allclose(q.dequantize(), sol.dequantize(), atol=1e-6)
    # The kept outliers are (near) exact: the big weights survive 3 bits.
    w_hat = q.dequantize()
    assert abs(float(w_hat[3, 7]) - 2.0) < 1e-2 and abs(float(w_hat[10, 50]) + 1.5) < 1e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_outlier_layer_forward_adds_outliers_once(outlier_layer, dtype) -> None:
    lin, sol, q = outlier_layer
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(4)).to(dtype)
    y = q(x)
    ref = F.linear(x.float(), q.dequantize(), q.bias.float())
    if dtype == torch.float32:
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    else:
        assert y.dtype == torch.bfloat16 and rel_err(y, ref) < 2e-2


def test_outlier_4bit_layer_on_the_int4_kernel(int4_calls) -> None:
    torch.manual_seed(0)
    lin = nn.Linear(128, 32)
    sol = solve(lin.weight.detach(), _hessian(_correlated(128)), 4, 32, False, act_order=False,
                outlier_fraction=0.02)
    q = QuantizedLinear.from_solution(lin, sol, 4, 32, False, torch.float16)
    assert q.outlier_val.numel() > 0
    x = torch.randn(4, 128, generator=torch.Generator().manual_seed(5)).bfloat16()
    y = q(x)
    assert int4_calls == [32]
    _assert_bf16_close(y, F.linear(x, q.dequantize().to(torch.bfloat16), q.bias.bfloat16()))


def test_int4_cache_follows_load_state_dict() -> None:
    a, b = _qlinear(128, 32, 4, 32, seed=0), _qlinear(128, 32, 4, 32, seed=1)
    x = torch.randn(4, 128, generator=torch.Generator().manual_seed(6)).bfloat16()
    a(x)  # builds the repacked copy
    a.load_state_dict(b.state_dict())
    assert torch.equal(a.dequantize(), b.dequantize())
    assert torch.equal(a(x), b(x))


@pytest.mark.parametrize("cast", ["bfloat16", "half"])
def test_model_dtype_cast_keeps_buffer_dtypes(cast) -> None:
    model = tiny_qwen2()
    overrides = {"*down_proj": GPTQConfig(bits=3, group_size=32, symmetric=False, static_groups=False),
                 "*.1.mlp.up_proj": OutlierConfig()}
    quantize_(model, GPTQConfig(bits=4, group_size=32), calib_batches(2), overrides=overrides, progress=False)
    ids = calib_batches(1, seed=7)[0]
    ref = logits(model, ids)
    before = {n: {k: b.dtype for k, b in m.named_buffers()} for n, m in model.named_modules()
              if isinstance(m, QuantizedLinear)}
    deq = {n: m.dequantize() for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    kinds = {k for d in before.values() for k in d}
    assert {"weight_zero_point", "weight_g_idx", "outlier_val", "weight_scale"} <= kinds
    target = torch.bfloat16 if cast == "bfloat16" else torch.float16
    model = model.to(torch.bfloat16) if cast == "bfloat16" else model.half()
    for n, m in model.named_modules():
        if isinstance(m, QuantizedLinear):
            assert {k: b.dtype for k, b in m.named_buffers()} == before[n], n
            assert m.weight_packed.dtype == torch.int32
            if hasattr(m, "weight_scale"):
                assert m.weight_scale.dtype == torch.float16
            if m.bias is not None:
                assert m.bias.dtype == target
            assert m.weight.dtype == target
    assert model.model.embed_tokens.weight.dtype == target
    out = logits(model, ids)
    assert out.dtype == target and rel_err(out, ref) < 0.05
    for n, m in model.named_modules():
        if isinstance(m, QuantizedLinear):
            assert {k: b.dtype for k, b in m.named_buffers()} == before[n], n
            assert torch.equal(m.dequantize(), deq[n]), n  # the codes and statistics were not recoded
    model.float()
    assert model.model.layers[0].self_attn.q_proj.bias.dtype == torch.float32
    assert all(m.weight.dtype == torch.float32 for m in model.modules() if isinstance(m, QuantizedLinear))


# ====================================================================== eval
def _hand_nll(model, ids: torch.Tensor, window: int) -> tuple[float, int]:
    n = ids.numel() // window
    total, count = 0.0, 0
    for i in range(n):
        w = ids[i * window:(i + 1) * window]
        logp = torch.log_softmax(logits(model, w[None])[0].double(), dim=-1)
        for t in range(window - 1):
            total -= float(logp[t, w[t + 1]])
            count += 1
    return total / count, count


def test_perplexity_on_token_ids() -> None:
    model = tiny_llama(False)
    ids = torch.randint(0, VOCAB, (16 * 5 + 7,), generator=torch.Generator().manual_seed(8))
    mean, count = _hand_nll(model, ids, 16)
    res = llm_eval.perplexity(model, ids, window=16, batch_size=2)
    assert res["tokens"] == count == 5 * 15
    assert math.isclose(res["nll"], mean, rel_tol=1e-5)
    assert math.isclose(res["perplexity"], math.exp(mean), rel_tol=1e-5)
    assert math.isclose(res["bits_per_token"], mean / math.log(2), rel_tol=1e-5)
    assert res["protocol"]["window"] == 16 and res["protocol"]["windows"] == 5
    # A random model on random ids: perplexity near the vocabulary size.
    assert 0.5 * VOCAB < res["perplexity"] < 2 * VOCAB
    two = llm_eval.perplexity(model, ids, window=16, max_windows=2)
    assert two["tokens"] == 30
    assert math.isclose(two["nll"], _hand_nll(model, ids[:32], 16)[0], rel_tol=1e-5)
    # The window defaults to the model's context.
    long = torch.randint(0, VOCAB, (64 * 2,), generator=torch.Generator().manual_seed(9))
    assert llm_eval.perplexity(model, long)["protocol"]["window"] == 64


def test_perplexity_of_text_with_tokenizer(byte_tok) -> None:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(**{**shape(tie_word_embeddings=True), "vocab_size": byte_tok.vocab_size})
    model = transformers.LlamaForCausalLM(cfg).eval()
    text = TEXTS[0] + TEXTS[1]
    res = llm_eval.perplexity(model, text, byte_tok, window=16)
    ids = llm_eval.tokenize(text, byte_tok)
    assert ids.tolist() == byte_tok.encode(text.encode())
    same = llm_eval.perplexity(model, ids, window=16)
    assert math.isclose(res["perplexity"], same["perplexity"], rel_tol=1e-9)
    assert res["protocol"]["tokenizer"] == "ByteTokenizer"
    assert res["protocol"]["text_sha256"] != same["protocol"]["text_sha256"]


def test_perplexity_errors() -> None:
    model = tiny_llama(False)
    with pytest.raises(ConfigError, match="fewer than one window"):
        llm_eval.perplexity(model, torch.arange(15), window=16)
    with pytest.raises(ConfigError):
        llm_eval.perplexity(model, "some text")  # no tokenizer
    with pytest.raises(ConfigError):
        llm_eval.perplexity(nn.Linear(4, 4), torch.arange(100))  # no context length known


def _bpw_model(shapes, cfg) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(i, o, bias=False) for i, o in shapes])
    quantize_(model, cfg, progress=False)
    return model


SHAPES = [(64, 32), (32, 96), (128, 16)]


def test_bits_per_weight_symmetric_4bit() -> None:
    res = llm_eval.bits_per_weight(_bpw_model(SHAPES, RTNConfig(bits=4, group_size=32)))
    assert res["bits_per_weight"] == 4 + 16 / 32  # codes + a float16 scale per 32
    assert res["quantized_weights"] == sum(i * o for i, o in SHAPES) and res["layers"] == 3
    assert res["stored_bytes"] == res["bits_per_weight"] * res["quantized_weights"] / 8
    assert res["float_params"] == 0


def test_bits_per_weight_asymmetric_4bit() -> None:
    res = llm_eval.bits_per_weight(_bpw_model(SHAPES, RTNConfig(bits=4, group_size=32, symmetric=False)))
    assert res["bits_per_weight"] == 4 + (16 + 4) / 32  # plus a 4-bit zero point per 32


def test_bits_per_weight_3bit_dense_packing() -> None:
    # Rows of 64 or 96 codes pack exactly (192 and 288 bits); a row of 40 takes ceil(120/32) = 4 words.
    res = llm_eval.bits_per_weight(_bpw_model([(64, 32), (96, 16)], RTNConfig(bits=3, group_size=32)))
    assert res["bits_per_weight"] == 3 + 16 / 32
    res = llm_eval.bits_per_weight(_bpw_model([(40, 16)], RTNConfig(bits=3, group_size=None)))
    assert res["bits_per_weight"] == (16 * (4 * 32 + 16)) / (40 * 16)
    res = llm_eval.bits_per_weight(_bpw_model([(64, 16)], RTNConfig(bits=8, group_size=None)))
    assert res["bits_per_weight"] == 8 + 16 / 64


def test_bits_per_weight_counts_float_params_and_needs_a_quantized_layer() -> None:
    model = tiny_llama(False)
    with pytest.raises(ConfigError):
        llm_eval.bits_per_weight(model)
    quantize_(model, RTNConfig(bits=4, group_size=32), progress=False)
    res = llm_eval.bits_per_weight(model)
    assert res["bits_per_weight"] == 4.5 and res["layers"] == 14
    # embed + lm_head + norms
    assert res["float_params"] == 2 * VOCAB * 64 + (2 * 2 + 1) * 64


def test_measure() -> None:
    import mmap

    import numpy as np

    def work(n):
        # a fresh mapping, every page touched: resident whatever the allocator holds from earlier tests
        m = mmap.mmap(-1, n)
        np.frombuffer(m, dtype=np.uint8)[:] = 1
        return m

    n = 64 << 20
    result, report = llm_eval.measure(work, n)
    assert len(result) == n
    assert report["seconds"] > 0
    start = report["peak_rss_bytes"] - report["rss_growth_bytes"]
    assert start > 0 and report["peak_rss_bytes"] >= start
    assert report["rss_growth_bytes"] >= 0.75 * n
    del result
    value, report = llm_eval.measure(lambda a, b=0: a + b, 2, b=3)
    assert value == 5 and report["seconds"] >= 0 and report["peak_rss_bytes"] > 0


# ============================================================ shipped model
@pytest.mark.slow
def test_lm_default_gptq_beats_rtn_on_text() -> None:
    """End to end on the shipped 4-layer model: text calibration with its ByteTokenizer, perplexity."""
    import copy
    import inspect
    import json.decoder
    import json.encoder
    import string
    import textwrap
    from pathlib import Path

    import toolkit
    from toolkit.models.tokenizer import ByteTokenizer

    path = Path(toolkit.__file__).parent / "assets" / "lm-default"
    tok = ByteTokenizer.load(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    calib = [inspect.getsource(json.encoder), inspect.getsource(textwrap)]
    text = inspect.getsource(json.decoder) + inspect.getsource(string)  # held out
    ppl = {"float": llm_eval.perplexity(model, text, tok, window=128)["perplexity"]}
    rtn = quantize_(copy.deepcopy(model), RTNConfig(bits=3, group_size=32), progress=False).model
    ppl["rtn"] = llm_eval.perplexity(rtn, text, tok, window=128)["perplexity"]
    quantize_(model, GPTQConfig(bits=3, group_size=32), calib, tokenizer=tok, seq_len=128, num_samples=16,
              progress=False)
    ppl["gptq"] = llm_eval.perplexity(model, text, tok, window=128)["perplexity"]
    # Observed: float 18.5, RTN 21.2, GPTQ 19.8.
    assert ppl["float"] < ppl["gptq"] < ppl["rtn"], ppl
    assert ppl["gptq"] < 1.12 * ppl["float"], ppl
    assert llm_eval.bits_per_weight(model)["bits_per_weight"] == 3 + 16 / 32
