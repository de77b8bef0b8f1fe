"""KV-cache compression: kernels, KIVI/GEAR/MiniCache caches in generate(), bitstreams and bad input."""

from __future__ import annotations

import io

import numpy as np
import pytest
import tkz_tools
import torch
from llm_tiny import VOCAB, one_thread, shape  # noqa: F401
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.cache_utils import DynamicCache

import toolkit
from toolkit.codecs import container, kv
from toolkit.entropy import decode_iid, encode_iid
from toolkit.entropy.tables import from_counts
from toolkit.errors import ConfigError, FormatError, ModelMismatchError, UnsupportedInputError
from toolkit.kernels.kv_attention import packed_attention_reference
from toolkit.kernels.kv_quant import (
    kv_dequantize,
    kv_quantize_reference,
    pack_codes,
    unpack_codes,
)
from toolkit.kernels.testing import check_kernel
from toolkit.llm import kvcache
from toolkit.llm.kvcache import (
    BitstreamConfig,
    GEARCache,
    GEARConfig,
    KIVICache,
    KIVIConfig,
    KVHeader,
    MiniCache,
    MiniCacheConfig,
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Llama saved and loaded back through from_pretrained (MHA heads of 32, 256 positions)."""
    torch.manual_seed(0)
    cfg = LlamaConfig(**{**shape(), "num_key_value_heads": 4, "max_position_embeddings": 256,
                         "num_hidden_layers": 4})
    path = tmp_path_factory.mktemp("tiny")
    LlamaForCausalLM(cfg).save_pretrained(path)
    return LlamaForCausalLM.from_pretrained(path).eval()


def _ids(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (1, n), generator=torch.Generator().manual_seed(seed))


# --- kernels -------------------------------------------------------------------
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("axis", ["token", "channel"])
def test_quantize_round_trip_is_within_half_a_step(bits: int, axis: str) -> None:
    x = torch.randn(64, 32) * torch.linspace(0.1, 5, 32)
    codes, scale, low = kv_quantize_reference(x, bits, 16, axis)
    assert codes.dtype == torch.uint8 and codes.shape == (64, 32 * bits // 8)
    y = kv_dequantize(codes, scale, low, bits, 16, axis)
    step = scale.float()[:, None, :].expand(4, 16, 32).reshape(64, 32) if axis == "channel" else \
        scale.float()[:, :, None].expand(64, 2, 16).reshape(64, 32)
    # Half a step, plus the float16 rounding of the group minimum.
    assert ((x - y).abs() <= step / 2 + low.float().abs().max() * 1e-3 + 1e-6).all()


def test_pack_unpack_are_inverse_and_little_endian() -> None:
    q = torch.tensor([[1, 2, 3, 0, 3, 3, 0, 1]], dtype=torch.uint8)
    packed = pack_codes(q, 2)
    assert packed.tolist() == [[1 | 2 << 2 | 3 << 4, 3 | 3 << 2 | 0 << 4 | 1 << 6]]
    assert torch.equal(unpack_codes(packed, 2), q)


def test_kernels_match_references_in_interpreter() -> None:
    cases = [[2, "token", 40, 64, 32], [4, "channel", 64, 64, 32], [8, "token", 20, 64, 64],
             [2, "channel", 32, 32, 16]]
    report = check_kernel("toolkit.kernels.kv_quant:_cases_triton", "toolkit.kernels.kv_quant:_cases_reference",
                          "toolkit.kernels.kv_quant:_example_cases", cases)
    assert len(report) == 3 * len(cases)
    assert all(r["shape_ok"] and r["max_abs_err"] == 0.0 for r in report), report
    att = [[2], [4, 2, 4, 70, 64, 32, 64], [8, 1, 1, 40, 32, 32, 32]]
    report = check_kernel("toolkit.kernels.kv_attention:_cases_triton",
                          "toolkit.kernels.kv_attention:_cases_reference",
                          "toolkit.kernels.kv_attention:_example_cases", att)
    assert len(report) == 2 * len(att)
    assert all(r["shape_ok"] and r["max_abs_err"] < 1e-5 for r in report), report


def test_packed_attention_reference_is_softmax_attention() -> None:
    from toolkit.kernels.kv_attention import _example_inputs

    args, _ = _example_inputs(4, n=2, nq=3, t=64, d=32, k_group=32, v_group=32)
    q, kc, ks, kl, vc, vs, vl, bits, kg, vg, scale = args
    out, lse = packed_attention_reference(*args)
    k = kv_dequantize(kc.reshape(128, -1), ks.reshape(-1, 32), kl.reshape(-1, 32), bits, kg, "channel")
    v = kv_dequantize(vc.reshape(128, -1), vs.reshape(128, -1), vl.reshape(128, -1), bits, vg, "token")
    k, v = k.reshape(2, 64, 32), v.reshape(2, 64, 32)
    w = torch.softmax(q @ k.transpose(1, 2) * scale, -1)
    assert torch.allclose(out, w @ v, atol=1e-5)
    assert torch.allclose(lse, torch.logsumexp(q @ k.transpose(1, 2) * scale, -1), atol=1e-5)


def test_quantize_rejects_bad_shapes_and_bits() -> None:
    with pytest.raises(ValueError, match="bits"):
        kv_quantize_reference(torch.randn(4, 8), 3, 4, "token")
    with pytest.raises(ValueError, match="multiple"):
        kv_quantize_reference(torch.randn(5, 8), 2, 4, "channel")


# --- caches in generate() --------------------------------------------------------
def _greedy(model, ids, cache, n=12):
    return model.generate(ids, past_key_values=cache, max_new_tokens=n, do_sample=False,
                          pad_token_id=0)[0, ids.shape[1]:].tolist()


def test_kivi_8bit_generates_what_the_full_cache_does(tiny) -> None:
    ids = _ids(150)
    want = _greedy(tiny, ids, DynamicCache())
    got = _greedy(tiny, ids, KIVICache(KIVIConfig(bits=8, group_size=32, residual_length=32), tiny.config))
    assert got == want


def test_kivi_storage_is_packed_and_small(tiny) -> None:
    ids = _ids(200)
    cache = KIVICache(KIVIConfig(bits=2, group_size=32, residual_length=32), tiny.config)
    with torch.no_grad():
        tiny(input_ids=ids, past_key_values=cache, use_cache=True)
    layer = cache.layers[0]
    # 200 tokens: 160 quantized (five groups beyond a window of 32..63), 40 in the window.
    assert layer.quantized_length == 160 and layer.keys.shape[2] == 40
    assert layer.k_codes.dtype == torch.uint8 and layer.k_codes.shape[-1] == 16 * 2 // 8
    assert cache.get_seq_length() == 200
    full = 4 * 2 * 4 * 200 * 16 * 2  # layers, k/v, heads, tokens, head_dim, fp16 bytes
    assert kvcache.cache_nbytes(cache) < 0.55 * full
    # The float view follows the codes: decoding with the cache gives finite logits.
    with torch.no_grad():
        out = tiny(input_ids=_ids(1, 5), past_key_values=cache, use_cache=True)
    assert torch.isfinite(out.logits).all()


@pytest.mark.parametrize("bits", [2, 4])
def test_decode_attention_over_packed_codes_matches_dequantized_attention(tiny, bits: int) -> None:
    cache = KIVICache(KIVIConfig(bits=bits, group_size=16, residual_length=16), tiny.config)
    with torch.no_grad():
        tiny(input_ids=_ids(90), past_key_values=cache, use_cache=True)
    layer = cache.layers[1]
    k, v = layer.dequantized()
    k = torch.cat([k.float(), layer.keys.float()], 2)
    v = torch.cat([v.float(), layer.values.float()], 2)
    q = torch.randn(1, 4, 1, 16)
    want = torch.softmax(q @ k.transpose(-1, -2) * 16 ** -0.5, -1) @ v
    assert torch.allclose(layer.decode_attention(q), want, atol=1e-5)


def test_gear_corrects_kivi_at_two_bits(tiny) -> None:
    ids = _ids(200)
    with torch.no_grad():
        ref = DynamicCache()
        tiny(input_ids=ids, past_key_values=ref, use_cache=True)
        errs = {}
        for name, cache in (("kivi", KIVICache(KIVIConfig(bits=2, residual_length=32), tiny.config)),
                            ("gear", GEARCache(GEARConfig(bits=2, residual_length=32, rank=4), tiny.config))):
            tiny(input_ids=ids, past_key_values=cache, use_cache=True)
            k, v = cache.layers[2].dequantized()
            n = k.shape[2]
            errs[name] = ((k.float() - ref.layers[2].keys[:, :, :n]).norm()
                          + (v.float() - ref.layers[2].values[:, :, :n]).norm()).item()
            errs[name + "_bytes"] = kvcache.cache_nbytes(cache)
    assert errs["gear"] < 0.8 * errs["kivi"]
    assert errs["gear_bytes"] > errs["kivi_bytes"]  # the correction is paid for in bytes


def test_gear_generates_and_follows_beams(tiny) -> None:
    out = _greedy(tiny, _ids(160), GEARCache(GEARConfig(bits=4, residual_length=32, block_size=64), tiny.config))
    assert len(out) == 12
    beams = tiny.generate(_ids(100).repeat(2, 1), num_beams=2, max_new_tokens=4, do_sample=False, pad_token_id=0,
                          past_key_values=GEARCache(GEARConfig(bits=8, residual_length=32), tiny.config))
    assert beams.shape == (2, 104)


def test_minicache_merges_similar_layers_and_keeps_dissimilar_tokens() -> None:
    cache = MiniCache(MiniCacheConfig(start_layer=2, retain_angle=0.1), num_layers=4)
    k = torch.randn(1, 2, 10, 8)
    v = torch.randn(1, 2, 10, 8)
    bent = k.clone()
    bent[0, 1, 3] = -bent[0, 1, 3]  # one token points the other way in the second layer
    for i in range(2):
        cache.update(k, v, i)
    cache.update(k, v, 2)
    cache.update(bent * 2.0, v * 0.5, 3)
    k2, _ = cache.update(torch.zeros(1, 2, 1, 8), torch.zeros(1, 2, 1, 8), 2)
    k3, v3 = cache.update(torch.zeros(1, 2, 1, 8), torch.zeros(1, 2, 1, 8), 3)
    # Parallel vectors merge exactly up to float16; norms are per layer; the flipped token is kept.
    assert torch.allclose(k2[:, :, :10], k, atol=1e-2 * k.abs().max())
    assert torch.allclose(k3[:, :, :10], bent * 2.0, atol=2e-2 * k.abs().max())
    assert torch.allclose(v3[:, :, :10], v * 0.5, atol=1e-2)
    assert cache.retained_fraction() == pytest.approx(1 / 44)  # 2 kinds x 2 heads x 11 tokens
    pair_full = 2 * 2 * 2 * 11 * 8 * 2  # layers 2-3, k/v, heads, tokens, head_dim, fp16
    assert cache.layers[2].nbytes() < 0.7 * pair_full and cache.layers[3].nbytes() == 0
    assert cache.nbytes() == cache.layers[0].nbytes() * 2 + cache.layers[2].nbytes()


def test_minicache_generates(tiny) -> None:
    assert len(_greedy(tiny, _ids(40), MiniCache(MiniCacheConfig(), tiny.config))) == 12


# --- bitstreams ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def prefill(tiny):
    ids = _ids(120, 3)
    cache = DynamicCache()
    with torch.no_grad():
        tiny(input_ids=ids, past_key_values=cache, use_cache=True)
    return ids, cache


@pytest.mark.parametrize("coder", ["zstd", "rans"])
def test_bitstream_decodes_to_the_lossy_cache_and_shrinks(tiny, prefill, coder: str) -> None:
    _, cache = prefill
    cfg = BitstreamConfig(coder=coder)
    stream = kvcache.encode(cache, tiny, cfg)
    assert stream.header.tokens == 120 and stream.header.layers == 4 and stream.header.bitstream == cfg
    got = kvcache.decode(stream, tiny)
    want = kvcache.lossy(cache, tiny, cfg)
    for a, b in zip(got.layers, want.layers, strict=True):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
    fp16 = 4 * 2 * 4 * 120 * 16 * 2
    assert len(stream.payload) < fp16 / 4
    err = max((a.keys - b.keys).abs().max().item() for a, b in zip(got.layers, cache.layers, strict=True))
    assert 0 < err < 1.0


def test_reloaded_cache_continues_like_the_lossy_cache(tiny, prefill, tmp_path) -> None:
    ids, cache = prefill
    path = tmp_path / "prompt.tkz"
    size = kv.save(cache, path, tiny)
    assert size == path.stat().st_size
    follow = torch.cat([ids, _ids(1, 9)], dim=1)
    got = _greedy(tiny, follow, kv.load(path, tiny), n=10)
    want = _greedy(tiny, follow, kvcache.lossy(cache, tiny), n=10)
    assert got == want
    # One container: the header is the .tkz header, the payload its chunk (what `codec decompress` gives).
    head = toolkit.info(path.read_bytes())["header"]
    stream = kvcache.encode(cache, tiny)
    assert head["codec"] == "kv" and head["config"]["tokens"] == 120
    assert KVHeader.from_dict(head["config"]) == stream.header
    assert toolkit.decompress(path.read_bytes()) == stream.payload


def test_bitstream_refuses_another_model_and_a_payload_of_another_shape(tiny, prefill) -> None:
    _, cache = prefill
    stream = kvcache.encode(cache, tiny)
    with pytest.raises(ModelMismatchError):
        kvcache.decode(stream, tiny, model_sha256="0" * 64)
    with pytest.raises(FormatError, match="KV payload"):
        kvcache.decode(stream._replace(payload=stream.payload[:-7]), tiny)
    with pytest.raises(FormatError, match="trailing"):
        kvcache.decode(stream._replace(payload=stream.payload + b"\0"), tiny)
    with pytest.raises(FormatError):
        kvcache.decode(stream._replace(header=stream.header.replace(tokens=119)), tiny)
    with pytest.raises(FormatError, match="no cache"):
        kvcache.decode(stream._replace(header=KVHeader(), payload=b""), tiny)


def test_a_damaged_file_is_refused_never_read_as_another_cache(tiny, prefill, tmp_path) -> None:
    """A flipped bit anywhere (framing, JSON header, payload, digest) is a FormatError, never a cache.

    ChecksumError (a FormatError) where a CRC or the digest finds it: the
    payload's chunk CRC and content digest, the header's ``config_crc32``.
    """
    _, cache = prefill
    path = tmp_path / "c.tkz"
    kv.save(cache, path, tiny)
    raw = path.read_bytes()
    head = len(tkz_tools.parse(raw).head)
    rng = np.random.default_rng(0)
    positions = [*range(head), *rng.integers(head, len(raw), 40).tolist(), *range(len(raw) - 8, len(raw))]
    bad = tmp_path / "bad.tkz"
    for pos in positions:
        damaged = bytearray(raw)
        damaged[pos] ^= 1 << int(rng.integers(8))
        bad.write_bytes(bytes(damaged))
        with pytest.raises(FormatError):
            kv.load(bad, tiny)
    bad.write_bytes(raw[:-1])
    with pytest.raises(FormatError):
        kv.load(bad, tiny)
    bad.write_bytes(toolkit.compress(b"some text", codec="zstd"))
    with pytest.raises(FormatError, match="not a stored KV cache"):
        kv.load(bad, tiny)


def test_payload_reader_stays_bounded_on_damage(tiny, prefill) -> None:
    """Damage to a bare payload (no container): an error naming the payload, or a cache of the header's shape.

    A flipped bit inside a float16 value is in range, so only the file's
    checksums see it (the test above); the reader's part is to refuse every
    count and length that does not fit, before allocating.
    """
    _, cache = prefill
    stream = kvcache.encode(cache, tiny, BitstreamConfig(coder="rans"))
    rng = np.random.default_rng(0)
    for _ in range(20):
        bad = bytearray(stream.payload)
        bad[int(rng.integers(len(bad)))] ^= int(rng.integers(1, 256))
        try:
            got = kvcache.decode(stream._replace(payload=bytes(bad)), tiny)
        except FormatError as e:
            assert "KV payload" in str(e) or "damaged" in str(e), e
            continue
        assert [tuple(layer.keys.shape) for layer in got.layers] == [tuple(cache.layers[0].keys.shape)] * 4


def test_an_old_kv_file_is_refused_with_a_clear_message(tiny, tmp_path) -> None:
    class OldKV(kv.KVCodec):  # version 1 framed a bitstream with its own magic and JSON header
        version = 1

        def config_dict(self) -> dict:
            return {"model_sha256": "0" * 64, "tokens": 120, "layers": 4, "key_step": 0.7, "value_step": 1.0}

        def header_fields(self) -> dict:
            return {"model_sha256": "0" * 64}

        def encode_chunks(self, chunks):
            return list(chunks)

    out = io.BytesIO()
    container.write_stream(OldKV(), io.BytesIO(b"TKKV\x01" + bytes(40)), out)
    path = tmp_path / "old.tkz"
    path.write_bytes(out.getvalue())
    with pytest.raises(FormatError, match="store the cache again"):
        kv.load(path, tiny)
    with pytest.raises(FormatError, match="store the cache again"):
        toolkit.decompress(out.getvalue())


def test_kv_codec_refuses_other_input(prefill, tiny) -> None:
    with pytest.raises(UnsupportedInputError):
        toolkit.compress(b"not a cache", codec="kv")
    _, cache = prefill
    stream = kvcache.encode(cache, tiny)
    with pytest.raises(UnsupportedInputError):  # a payload is parsed against the header it is given
        toolkit.compress(stream.payload[:-1], codec=kv.KVCodec(stream.header))
    blob = toolkit.compress(stream.payload, codec=kv.KVCodec(stream.header))
    assert toolkit.decompress(blob) == stream.payload


# --- bad settings -----------------------------------------------------------------
def test_bad_settings_get_clear_errors(tiny) -> None:
    with pytest.raises(ConfigError, match="bits"):
        KIVIConfig(bits=3)
    with pytest.raises(ConfigError, match="multiple"):
        KIVIConfig(group_size=32, residual_length=48)
    with pytest.raises(ConfigError, match="longer than the model's context"):
        KIVICache(KIVIConfig(residual_length=512), tiny.config)
    with pytest.raises(ConfigError, match="start_layer"):
        MiniCache(MiniCacheConfig(start_layer=3), tiny.config)
    with pytest.raises(ConfigError):
        GEARConfig(outlier_fraction=0.5)
    with pytest.raises(ConfigError):
        BitstreamConfig(key_step=0)
    for bad in (lambda: KIVIConfig(bits="2"), lambda: GEARConfig(block_size="x"), lambda: MiniCacheConfig(t=None),
                lambda: BitstreamConfig(pre_rope=1), lambda: KVHeader(layers=1), lambda: KVHeader(dtype="int8"),
                lambda: KVHeader.from_dict({"layers": 0, "magic": 1})):
        with pytest.raises(ConfigError):
            bad()


def test_configs_round_trip_through_dicts() -> None:
    for config in (KIVIConfig(bits=4), GEARConfig(rank=2), MiniCacheConfig(start_layer=1),
                   BitstreamConfig(coder="rans"), KVHeader()):
        assert type(config).from_dict(config.to_dict()) == config
    # the form stored caches' headers and the benchmark results hold: the fields alone
    assert BitstreamConfig().to_dict() == {"key_step": 0.7, "value_step": 1.0, "pre_rope": True, "sink_tokens": 1,
                                           "outlier_sd": 8.0, "code_bits": 6, "anchor_every": 16, "coder": "zstd"}


# --- pieces ---------------------------------------------------------------------------
def test_zstd_byte_coding_round_trip_and_bounds() -> None:
    from toolkit.entropy import decode_bytes, encode_bytes

    sym = np.random.default_rng(2).integers(0, 9, 20000).astype(np.uint8)
    blob = encode_bytes(sym)
    assert np.array_equal(decode_bytes(blob, sym.size), sym)
    assert len(blob) * 8 < sym.size * 3.3  # log2(9) = 3.17 bits
    with pytest.raises(FormatError):
        decode_bytes(blob, sym.size - 1)  # more output than announced is refused, not allocated


def test_iid_range_coding_round_trip() -> None:
    sym = np.random.default_rng(1).integers(0, 7, 5000)
    freqs = from_counts(np.bincount(sym, minlength=9))
    assert freqs.sum() == 1 << 16 and freqs[7] == 0 and freqs[8] == 0
    blob = encode_iid(sym, freqs)
    assert np.array_equal(decode_iid(blob, freqs, sym.size), sym)
    assert len(blob) * 8 < sym.size * 2.9  # log2(7) = 2.81 bits


def test_recall_tasks_hold_their_answer_in_the_context() -> None:
    from toolkit.data.recall import make_task, make_training_row
    from toolkit.models import locate
    from toolkit.models.tokenizer import ByteTokenizer

    tok = ByteTokenizer.load(locate("lm-default").path / "tokenizer.json")
    filler = np.array(tok.encode(b"plain words of filler text, " * 400))
    rng = np.random.default_rng(0)
    task = make_task(tok, filler, rng, context_len=600, n_facts=5, depth=0.25)
    assert len(task.context) == 600 and 0.2 < task.depth < 0.3
    fact = task.query + task.answer
    ctx = task.context
    assert any(ctx[i:i + len(fact)] == fact for i in range(len(ctx)))
    ids, kind = make_training_row(tok, filler, rng, 512)
    assert ids.shape == (513,) and kind.shape == (512,)
    assert (kind == 1).sum() >= 4 and (kind == -1).sum() >= 4
