"""Quantized checkpoints: save_quantized / load_quantized, compressed-tensors' own decoder, transformers, tampering."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from llm_tiny import VOCAB, one_thread, shape  # noqa: F401  (one_thread: autouse fixture)
from safetensors.torch import load_file, save_file
from torch import nn

from toolkit.errors import ConfigError, FormatError
from toolkit.kernels.pack import packed_words
from toolkit.llm import GPTQConfig, OutlierConfig, QuantizedLinear, RTNConfig, load_quantized, quantize_, save_quantized


def tiny_llama(tied: bool = True, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**shape(tie_word_embeddings=tied))).eval()


def tiny_qwen2(tied: bool = False, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**shape(tie_word_embeddings=tied))).eval()


def calib_batches(n: int = 3, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (2, 32), generator=g) for _ in range(n)]


IDS = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(123))


def logits(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def quantized(make, config, **kw) -> nn.Module:
    model = make()
    calib = calib_batches() if config.needs_data else None
    return quantize_(model, config, calib, progress=False, **kw).model


def qlayers(model) -> dict[str, QuantizedLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}


def read_config(d: Path) -> dict:
    return json.loads((d / "config.json").read_text())


# name -> (config, quant_method the checkpoint must declare)
CONFIGS = {
    "rtn-sym": (RTNConfig(bits=4, group_size=32), "compressed-tensors"),
    "rtn-asym": (RTNConfig(bits=4, group_size=32, symmetric=False), "compressed-tensors"),
    "gptq-sym": (GPTQConfig(bits=4, group_size=32), "compressed-tensors"),
    "gptq-asym": (GPTQConfig(bits=4, group_size=32, symmetric=False), "compressed-tensors"),
    "gptq-3bit": (GPTQConfig(bits=3, group_size=32), "compressed-tensors"),
    "rtn-2bit-asym": (RTNConfig(bits=2, group_size=16, symmetric=False), "compressed-tensors"),
    "gptq-channel": (GPTQConfig(bits=4, group_size=None), "compressed-tensors"),
    "gptq-channel-asym-8bit": (GPTQConfig(bits=8, group_size=None, symmetric=False), "compressed-tensors"),
    "outlier": (OutlierConfig(), "toolkit"),
    "gptq-g_idx": (GPTQConfig(bits=4, group_size=32, static_groups=False), "toolkit"),
}


# ============================================================== round trips
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_save_load_round_trip(tmp_path, name, tied) -> None:
    config, method = CONFIGS[name]
    model = quantized(lambda: tiny_llama(tied), config)
    ref = logits(model)
    out = save_quantized(model, tmp_path / "ckpt")
    assert out == tmp_path / "ckpt" and (out / "model.safetensors").exists()

    qcfg = read_config(out)["quantization_config"]
    assert qcfg["quant_method"] == method
    assert qcfg["format"] == ("pack-quantized" if method == "compressed-tensors" else "toolkit-pack-quantized")
    assert qcfg["ignore"] == ["lm_head"]
    assert qcfg["toolkit"]["config"] == config.to_dict()
    groups = list(qcfg["config_groups"].values())
    if method == "compressed-tensors":
        assert len(groups) == 1 and groups[0]["targets"] == ["Linear"]
    else:  # extension schemes carry per-layer counts (outliers), so groups may split
        assert len(groups) == 1 or all(g["targets"] != ["Linear"] for g in groups)
    for group in groups:
        assert group["weights"]["num_bits"] == config.bits
        assert group["weights"]["group_size"] == config.group
    group = groups[0]
    if method == "compressed-tensors":
        assert group["weights"]["strategy"] == ("group" if config.group else "channel")
        assert group["weights"]["symmetric"] == config.symmetric
        assert qcfg["quantization_status"] == "compressed"

    loaded = load_quantized(out)
    assert not loaded.training
    assert type(loaded.lm_head) is nn.Linear
    assert loaded.config.tie_word_embeddings == tied
    if tied:
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    ours, theirs = qlayers(model), qlayers(loaded)
    assert list(ours) == list(theirs) and len(ours) == 14
    for n, q in ours.items():
        t = theirs[n]
        assert (t.bits, t.group_size, t.symmetric, t.coded_stats) == (q.bits, q.group_size, q.symmetric, q.coded_stats)
        bq, bt = dict(q.named_buffers()), dict(t.named_buffers())
        assert bq.keys() == bt.keys(), n
        for k in bq:
            assert bq[k].dtype == bt[k].dtype and torch.equal(bq[k], bt[k]), (n, k)
    assert torch.equal(logits(loaded), ref)
    assert loaded.quantization["config"] == config.to_dict()


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_round_trip_with_quantized_lm_head(tmp_path, tied) -> None:
    model = quantized(lambda: tiny_llama(tied), RTNConfig(bits=8, group_size=32), quantize_lm_head=True)
    assert isinstance(model.lm_head, QuantizedLinear)
    ref = logits(model)
    save_quantized(model, tmp_path / "ckpt")
    assert read_config(tmp_path / "ckpt")["quantization_config"]["ignore"] == []
    loaded = load_quantized(tmp_path / "ckpt")
    assert isinstance(loaded.lm_head, QuantizedLinear)
    assert torch.equal(loaded.model.embed_tokens.weight, model.model.embed_tokens.weight)
    assert torch.equal(logits(loaded), ref)


def test_round_trip_qwen2_biases_and_dtype(tmp_path) -> None:
    model = quantized(tiny_qwen2, GPTQConfig(bits=4, group_size=32, symmetric=False))
    assert model.model.layers[0].self_attn.k_proj.bias is not None
    ref = logits(model)
    save_quantized(model, tmp_path / "q")
    tensors = load_file(str(tmp_path / "q" / "model.safetensors"))
    assert "model.layers.0.self_attn.k_proj.bias" in tensors
    assert "model.layers.0.self_attn.o_proj.bias" not in tensors
    loaded = load_quantized(tmp_path / "q")
    assert torch.equal(loaded.model.layers[1].self_attn.v_proj.bias, model.model.layers[1].self_attn.v_proj.bias)
    assert torch.equal(logits(loaded), ref)
    # dtype= casts the float parts and leaves the packed buffers as they are.
    lb = load_quantized(tmp_path / "q", dtype=torch.bfloat16, device="cpu")
    q = lb.model.layers[0].self_attn.q_proj
    assert q.bias.dtype == torch.bfloat16 and q.weight_scale.dtype == torch.float16
    assert q.weight_zero_point.dtype == torch.int8 and q.weight_packed.dtype == torch.int32
    assert torch.equal(logits(lb), logits(model.to(torch.bfloat16)))


def test_mixed_schemes_round_trip(tmp_path) -> None:
    overrides = {"re:.*down_proj": GPTQConfig(bits=8, group_size=64), "*.0.self_attn.o_proj": RTNConfig(bits=3,
                                                                                                         group_size=16)}
    model = quantized(lambda: tiny_llama(False), GPTQConfig(bits=4, group_size=32), overrides=overrides,
                      ignore=["*.1.mlp.up_proj"])
    ref = logits(model)
    save_quantized(model, tmp_path / "m")
    qcfg = read_config(tmp_path / "m")["quantization_config"]
    assert len(qcfg["config_groups"]) == 3
    assert sorted(qcfg["ignore"]) == ["lm_head", "model.layers.1.mlp.up_proj"]
    loaded = load_quantized(tmp_path / "m")
    assert type(loaded.model.layers[1].mlp.up_proj) is nn.Linear
    assert loaded.model.layers[0].mlp.down_proj.bits == 8 and loaded.model.layers[0].mlp.down_proj.group_size == 64
    assert loaded.model.layers[0].self_attn.o_proj.bits == 3
    assert loaded.model.layers[1].self_attn.o_proj.bits == 4
    assert torch.equal(logits(loaded), ref)
    # compressed-tensors reads every layer of it to the same weight.
    _assert_ct_decompress_matches(tmp_path / "m", model)


def test_save_with_tokenizer_and_generation_config(tmp_path) -> None:
    from toolkit.models.tokenizer import ByteTokenizer, train

    tok = train([b"hello world, a tiny tokenizer for a checkpoint test.\n" * 20], vocab_size=300)
    model = quantized(lambda: tiny_llama(True), RTNConfig(bits=4, group_size=32))
    save_quantized(model, tmp_path / "t", tokenizer=tok)
    assert ByteTokenizer.load(tmp_path / "t").sha256() == tok.sha256()
    assert (tmp_path / "t" / "generation_config.json").exists()


def test_save_errors(tmp_path) -> None:
    with pytest.raises(ConfigError):
        save_quantized(tiny_llama(), tmp_path / "a")  # nothing quantized
    seq = quantize_(nn.Sequential(nn.Linear(32, 16)), RTNConfig(group_size=16), progress=False).model
    with pytest.raises(ConfigError):
        save_quantized(seq, tmp_path / "b")  # not a transformers model
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# ========================================== compressed-tensors' own decoder
def _group_of(name: str, groups: dict) -> dict:
    from compressed_tensors.utils.match import match_name

    for group in groups.values():
        if any(t == "Linear" or match_name(name, t) for t in group["targets"]):
            return group
    raise AssertionError(f"no config group targets {name}")


def _assert_ct_decompress_matches(directory: Path, model) -> int:
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    qcfg = read_config(directory)["quantization_config"]
    assert qcfg["quant_method"] == "compressed-tensors"
    tensors = load_file(str(directory / "model.safetensors"))
    checked = 0
    for name, q in qlayers(model).items():
        group = _group_of(name, qcfg["config_groups"])
        scheme = QuantizationScheme(targets=group["targets"], weights=QuantizationArgs(**group["weights"]))
        local = {k: tensors[f"{name}.{k}"] for k in ("weight_packed", "weight_scale", "weight_shape",
                                                     "weight_zero_point") if f"{name}.{k}" in tensors}
        assert ("weight_zero_point" in local) == (not q.symmetric)
        out = PackedQuantizationCompressor.decompress(local, scheme)
        w = out["weight"]
        assert w.shape == (q.out_features, q.in_features)
        ours = q.dequantize().to(w.dtype)
        assert torch.equal(w, ours), (name, float((w.float() - ours.float()).abs().max()))
        checked += 1
    return checked


@pytest.mark.parametrize("bits", [4, 8, 3, 2])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_compressed_tensors_decompress_is_bit_exact(tmp_path, bits, symmetric) -> None:
    model = quantized(lambda: tiny_llama(False), RTNConfig(bits=bits, group_size=16, symmetric=symmetric))
    save_quantized(model, tmp_path / "c")
    tensors = load_file(str(tmp_path / "c" / "model.safetensors"))
    q = model.model.layers[0].mlp.gate_proj  # out 128, in 64
    assert tensors["model.layers.0.mlp.gate_proj.weight_packed"].shape == (128, packed_words(64, bits))
    if not symmetric:
        zp = tensors["model.layers.0.mlp.gate_proj.weight_zero_point"]
        assert zp.dtype == torch.int32 and zp.shape == (packed_words(128, bits), 4)
        assert int(q.weight_zero_point.abs().max()) > 0  # the zero points are not trivially 0
    assert _assert_ct_decompress_matches(tmp_path / "c", model) == 14


@pytest.mark.parametrize("config", [GPTQConfig(bits=4, group_size=None), GPTQConfig(bits=3, group_size=None,
                                                                                    symmetric=False),
                                    GPTQConfig(bits=4, group_size=32, act_order=True, static_groups=True)],
                         ids=["channel-sym", "channel-asym-3bit", "gptq-actorder-static"])
def test_compressed_tensors_decompress_gptq(tmp_path, config) -> None:
    model = quantized(lambda: tiny_llama(True), config)
    save_quantized(model, tmp_path / "c")
    assert _assert_ct_decompress_matches(tmp_path / "c", model) == 14


# ============================================================= transformers
@pytest.mark.parametrize("make, config", [
    (lambda: tiny_llama(True), GPTQConfig(bits=4, group_size=32)),
    (lambda: tiny_llama(False), RTNConfig(bits=8, group_size=32)),
    (tiny_qwen2, GPTQConfig(bits=3, group_size=32)),
    (lambda: tiny_llama(False), GPTQConfig(bits=4, group_size=None)),
], ids=["llama-tied-gptq4", "llama-untied-rtn8", "qwen2-gptq3", "llama-channel"])
def test_transformers_from_pretrained_gives_the_same_logits(tmp_path, make, config) -> None:
    pytest.importorskip("compressed_tensors")
    model = quantized(make, config)
    ref = logits(model)
    save_quantized(model, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert type(hf) is type(model)
    assert torch.equal(logits(hf.eval()), ref)


# ================================================================ tampering
@pytest.fixture(scope="module")
def plain_ckpt(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("plain") / "ckpt"
    save_quantized(quantized(lambda: tiny_llama(False), RTNConfig(bits=4, group_size=32, symmetric=False)), d)
    return d


@pytest.fixture(scope="module")
def outlier_ckpt(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("outlier") / "ckpt"
    save_quantized(quantized(lambda: tiny_llama(False), OutlierConfig()), d)
    return d


@pytest.fixture(scope="module")
def gidx_ckpt(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("gidx") / "ckpt"
    save_quantized(quantized(lambda: tiny_llama(False), GPTQConfig(bits=4, group_size=32, static_groups=False)), d)
    return d


L = "model.layers.0.self_attn.q_proj"


def _edit_tensors(fn):
    def edit(d: Path) -> None:
        tensors = load_file(str(d / "model.safetensors"))
        fn(tensors)
        save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    return edit


def _edit_config(fn):
    def edit(d: Path) -> None:
        cfg = read_config(d)
        fn(cfg)
        (d / "config.json").write_text(json.dumps(cfg))
    return edit


def _weights(cfg) -> dict:
    return next(iter(cfg["quantization_config"]["config_groups"].values()))["weights"]


def _set(mapping, key, value):
    mapping[key] = value


PLAIN_TAMPERS = {
    "scale-wrong-shape": _edit_tensors(lambda t: _set(t, f"{L}.weight_scale", t[f"{L}.weight_scale"][:, :1].clone())),
    "scale-transposed": _edit_tensors(lambda t: _set(t, f"{L}.weight_scale", t[f"{L}.weight_scale"].t().contiguous())),
    "shape-disagrees": _edit_tensors(lambda t: _set(t, f"{L}.weight_shape", torch.tensor([64, 96]))),
    "packed-wrong-width": _edit_tensors(lambda t: _set(t, f"{L}.weight_packed", t[f"{L}.weight_packed"][:, :-1]
                                                       .clone())),
    "packed-wrong-dtype": _edit_tensors(lambda t: _set(t, f"{L}.weight_packed", t[f"{L}.weight_packed"].long())),
    "zero-point-unpacked": _edit_tensors(lambda t: _set(t, f"{L}.weight_zero_point",
                                                        torch.zeros(64, 2, dtype=torch.int8))),
    "missing-scale": _edit_tensors(lambda t: t.pop(f"{L}.weight_scale")),
    "missing-zero-point": _edit_tensors(lambda t: t.pop(f"{L}.weight_zero_point")),
    "missing-float-tensor": _edit_tensors(lambda t: t.pop("model.norm.weight")),
    "missing-packed": _edit_tensors(lambda t: t.pop(f"{L}.weight_packed")),
    "extra-tensor": _edit_tensors(lambda t: _set(t, "model.layers.0.mystery", torch.zeros(3))),
    "no-quantization-config": _edit_config(lambda c: c.pop("quantization_config")),
    "quantization-config-not-dict": _edit_config(lambda c: _set(c, "quantization_config", "int4")),
    "bad-num-bits": _edit_config(lambda c: _set(_weights(c), "num_bits", 5)),
    "group-size-indivisible": _edit_config(lambda c: _set(_weights(c), "group_size", 48)),
    "other-quant-method": _edit_config(lambda c: _set(c["quantization_config"], "quant_method", "gptq")),
    "other-format": _edit_config(lambda c: _set(c["quantization_config"], "format", "int-quantized")),
    "no-config-groups": _edit_config(lambda c: _set(c["quantization_config"], "config_groups", {})),
    "targets-nothing": _edit_config(lambda c: _set(next(iter(c["quantization_config"]["config_groups"].values())),
                                                   "targets", ["Conv2d"])),
    "config-not-json": lambda d: (d / "config.json").write_text("{not json"),
    "no-config": lambda d: (d / "config.json").unlink(),
    "no-tensors": lambda d: (d / "model.safetensors").unlink(),
    "truncated-tensors": lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:1000]),
}

OUTLIER_TAMPERS = {
    "outlier-col-out-of-range": _edit_tensors(lambda t: t[f"{L}.outlier_col"].__setitem__(0, 64)),
    "outlier-col-negative": _edit_tensors(lambda t: t[f"{L}.outlier_col"].__setitem__(0, -1)),
    "outlier-crow-decreasing": _edit_tensors(lambda t: t[f"{L}.outlier_crow"].__setitem__(
        slice(1, 3), torch.tensor([5, 0], dtype=torch.int32))),
    "outlier-crow-total": _edit_tensors(lambda t: t[f"{L}.outlier_crow"].__setitem__(-1, 10**6)),
    "missing-outlier-val": _edit_tensors(lambda t: t.pop(f"{L}.outlier_val")),
    "scale-codes-too-wide": _edit_tensors(lambda t: t[f"{L}.scale_codes"].__setitem__((0, 0), 200)),
}

GIDX_TAMPERS = {
    "g_idx-out-of-range": _edit_tensors(lambda t: t[f"{L}.weight_g_idx"].__setitem__(0, 2)),
    "g_idx-negative": _edit_tensors(lambda t: t[f"{L}.weight_g_idx"].__setitem__(0, -1)),
    "g_idx-missing": _edit_tensors(lambda t: t.pop(f"{L}.weight_g_idx")),
}


def _tampered(src: Path, tmp_path: Path, edit) -> Path:
    d = tmp_path / "tampered"
    shutil.copytree(src, d)
    load_quantized(d)  # the untouched copy loads
    edit(d)
    return d


@pytest.mark.parametrize("case", list(PLAIN_TAMPERS))
def test_tampered_plain_checkpoint_raises_format_error(plain_ckpt, tmp_path, case) -> None:
    d = _tampered(plain_ckpt, tmp_path, PLAIN_TAMPERS[case])
    with pytest.raises(FormatError):
        load_quantized(d)


@pytest.mark.parametrize("case", list(OUTLIER_TAMPERS))
def test_tampered_outlier_checkpoint_raises_format_error(outlier_ckpt, tmp_path, case) -> None:
    d = _tampered(outlier_ckpt, tmp_path, OUTLIER_TAMPERS[case])
    with pytest.raises(FormatError):
        load_quantized(d)


@pytest.mark.parametrize("case", list(GIDX_TAMPERS))
def test_tampered_g_idx_checkpoint_raises_format_error(gidx_ckpt, tmp_path, case) -> None:
    d = _tampered(gidx_ckpt, tmp_path, GIDX_TAMPERS[case])
    with pytest.raises(FormatError):
        load_quantized(d)


def test_missing_directory_raises_format_error(tmp_path) -> None:
    with pytest.raises(FormatError):
        load_quantized(tmp_path / "nothing-here")
