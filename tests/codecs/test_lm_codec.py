"""LM codec: exact round trips, engines that agree with transformers, model checks, fresh-process decode."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_CORPUS as CORPUS

import toolkit
from toolkit.errors import ModelMismatchError


def _tiny_llama(tmp_path, seed=0, name="tiny"):
    from conftest import make_tiny_lm

    return make_tiny_lm(tmp_path / name, seed=seed)


@pytest.fixture(scope="module")
def tiny(tiny_lm):
    return tiny_lm


SETTINGS = dict(segment=256, streams=3, window=24, keep=8)


@pytest.mark.parametrize("data", [
    b"",
    b"x",
    CORPUS,
    CORPUS * 5 + bytes(range(256)) * 3 + CORPUS,  # text, then binary, then text: mixed chunks
    "Grüße, 世界! ünïcödé text\n".encode() * 20,
    os.urandom(700),
])
def test_roundtrip(tiny, data):
    blob = toolkit.compress(data, codec="lm", model=str(tiny), **SETTINGS)
    assert toolkit.decompress(blob) == data
    store = toolkit.compress(data, codec="store")
    assert len(blob) <= len(store) + 680  # the header carries the model record (path, two hashes), settings and env


def test_header_records_everything(tiny):
    """The default (integer) engine records no environment: its numbers are the same everywhere."""
    h = toolkit.info(toolkit.compress(CORPUS, codec="lm", model=str(tiny), **SETTINGS))["header"]
    assert h["codec"] == "lm" and h["config"]["window"] == 24 and h["config"]["threads"] >= 1
    assert len(h["model"]["weights_sha256"]) == 64 and len(h["model"]["tokenizer_sha256"]) == 64
    # every setting resolved: nothing for the decoder to work out again
    assert h["config"]["engine"] == "int" and h["config"]["dtype"] == "int8"
    assert not h.get("env")


def test_float_engine_header_is_machine_bound(tiny):
    """A float engine's file records what changes its numbers (torch build, CPU capability, float behaviour)."""
    h = toolkit.info(toolkit.compress(CORPUS, codec="lm", model=str(tiny), engine="lean", **SETTINGS))["header"]
    assert h["env"]["torch"] == torch.__version__ and h["env"]["cpu_capability"]
    assert len(h["env"]["float_fingerprint"]) == 16
    assert h["config"]["engine"] == "lean" and h["config"]["dtype"] in ("float32", "bfloat16")
    assert "transformers" not in h["env"]  # the lean engine does not run transformers' code


def test_hf_engine_records_transformers_version(tiny):
    import transformers

    h = toolkit.info(toolkit.compress(CORPUS, codec="lm", model=str(tiny), engine="hf", **SETTINGS))["header"]
    assert h["config"]["engine"] == "hf" and h["env"]["transformers"] == transformers.__version__


def test_other_environment_is_refused_unless_allowed(tiny, monkeypatch):
    """A file from another torch build is refused with what differs; --allow-mismatch tries, the digest decides."""
    from toolkit.codecs.lm import LMCodec
    from toolkit.errors import EnvironmentMismatchError

    blob = toolkit.compress(CORPUS, codec="lm", model=str(tiny), engine="lean", **SETTINGS)
    real = LMCodec.environment
    monkeypatch.setattr(LMCodec, "environment", lambda self: {**real(self), "torch": "0.0.1"})
    with pytest.raises(EnvironmentMismatchError, match="torch.*machine-bound"):
        toolkit.decompress(blob)
    assert toolkit.decompress(blob, allow_mismatch=True) == CORPUS


def _drive(engine, seq):
    engine.reset(seq.shape[0])
    with torch.inference_mode():
        return [engine.step(seq[:, p]) for p in range(seq.shape[1])]


def test_lean_engine_matches_transformers(tiny):
    """Lean and hf engines agree step by step, through several window restarts."""
    from toolkit.text.model import load_coding_model

    cm = load_coding_model(str(tiny))
    g = torch.Generator().manual_seed(0)
    seq = torch.randint(0, cm.tokenizer.alphabet, (3, 50), generator=g)
    lean = _drive(cm.engine("lean", 16, 5, "float32"), seq)
    hf = _drive(cm.engine("hf", 16, 5, "float32"), seq)
    for p, (a, b) in enumerate(zip(lean, hf, strict=True)):
        assert torch.allclose(a, b, atol=2e-4, rtol=1e-4), p
    # and both equal a plain forward over the tokens since the last restart
    with torch.inference_mode():
        want = cm.hf_model()(input_ids=seq[:, 16 - 5 + 1 : 16 + 1]).logits[:, -1]
    assert torch.allclose(lean[16], want, atol=2e-4)


def test_ring_engine_is_exact_until_full_then_deterministic(tiny):
    from toolkit.text.model import load_coding_model

    cm = load_coding_model(str(tiny))
    g = torch.Generator().manual_seed(1)
    seq = torch.randint(0, cm.tokenizer.alphabet, (2, 40), generator=g)
    ring = cm.engine("lean", 16, 0, "float32")
    first, second = _drive(ring, seq), _drive(ring, seq)
    for p in range(16):
        with torch.inference_mode():
            want = cm.hf_model()(input_ids=seq[:, : p + 1]).logits[:, -1]
        assert torch.allclose(first[p], want, atol=2e-4), p
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    blob = toolkit.compress(CORPUS * 3, codec="lm", model=str(tiny), segment=512, streams=2, window=16, keep=0)
    assert toolkit.decompress(blob) == CORPUS * 3


def test_adaptation_learns_the_file_and_round_trips(tiny):
    """Online adaptation of the model's top: fewer bits on repetitive text, exact decode, header says so."""
    data = CORPUS * 6
    plain = toolkit.compress(data, codec="lm", model=str(tiny), adapt=0.0, orders=[], **SETTINGS)
    adapted = toolkit.compress(data, codec="lm", model=str(tiny), adapt=0.5, adapt_tokens=12, orders=[], **SETTINGS)
    assert len(adapted) < 0.9 * len(plain)
    assert toolkit.decompress(adapted) == data
    h = toolkit.info(adapted)["header"]["config"]
    assert h["adapt"] == 0.5 and h["adapt_tokens"] == 12


def test_adapter_head_step_is_the_cross_entropy_gradient_step():
    """The closed-form head update equals an SGD step on autograd's gradient of the mean cross-entropy."""
    from toolkit.text.adapt import HeadAdapter
    from toolkit.text.engines import Top

    g = torch.Generator().manual_seed(0)
    hid, inter, vocab = 16, 24, 40
    base = Top(1 + 0.1 * torch.randn(hid, generator=g), torch.randn(2 * inter, hid, generator=g) / 4,
                torch.randn(hid, inter, generator=g) / 5, 1 + 0.1 * torch.randn(hid, generator=g),
                torch.randn(vocab, hid, generator=g), 1e-5, inter)
    adapter = HeadAdapter(base, lr=0.3, tokens=1000, rows=1, dtype=torch.float32)
    steps = [torch.randn(5, hid, generator=g) for _ in range(3)]
    targets = [torch.randint(0, vocab - 1, (5,), generator=g).tolist() for _ in steps]
    active = [True, True, False, True, True]  # a finished stream's row is not trained on
    for r, y in zip(steps, targets, strict=True):
        logits = adapter.logits(r)[:, : vocab - 1]  # the coder's alphabet stops short of the head
        adapter.observe(torch.softmax(logits, -1), y, active)
    adapter.flush()

    head = base.head.clone().requires_grad_(True)
    keep = [j for j, a in enumerate(active) if a]
    r = torch.cat([s[keep] for s in steps])
    y = torch.tensor([t[j] for t in targets for j in keep])
    loss = torch.nn.functional.cross_entropy((base.hidden(r) @ head.T)[:, : vocab - 1], y)
    loss.backward()
    want = base.head - 0.3 * head.grad
    assert torch.allclose(adapter.master, want, atol=1e-6)
    assert not torch.equal(adapter.master, base.head)
    assert torch.equal(adapter.master[-1], base.head[-1])  # the uncoded last row never moves


def test_adapter_state_is_per_file(tiny):
    """Two files coded by one process start from the same weights: the second file's output is unchanged."""
    first = toolkit.compress(CORPUS * 2, codec="lm", model=str(tiny), adapt=0.5, adapt_tokens=12, **SETTINGS)
    toolkit.compress(b"other words entirely, " * 40, codec="lm", model=str(tiny), adapt=0.5, adapt_tokens=12,
                     **SETTINGS)
    again = toolkit.compress(CORPUS * 2, codec="lm", model=str(tiny), adapt=0.5, adapt_tokens=12, **SETTINGS)
    assert first == again


def test_dtypes_round_trip_and_auto_is_resolved(tiny, tmp_path):
    """fp32 and bf16 both decode exactly (bf16 in a fresh process); the header holds the dtype used, never auto."""
    data = CORPUS * 3
    for dtype in ("float32", "bfloat16"):
        blob = toolkit.compress(data, codec="lm", model=str(tiny), engine="lean", dtype=dtype, **SETTINGS)
        assert toolkit.info(blob)["header"]["config"]["dtype"] == dtype
        assert toolkit.decompress(blob) == data
    (tmp_path / "bf16.tkz").write_bytes(blob)
    out = tmp_path / "bf16.out"
    subprocess.run([sys.executable, "-m", "toolkit", "decompress", str(tmp_path / "bf16.tkz"), "-o", str(out), "-q"],
                   check=True)
    assert out.read_bytes() == data
    lean = toolkit.compress(data, codec="lm", model=str(tiny), engine="lean", **SETTINGS)
    assert toolkit.info(lean)["header"]["config"]["dtype"] in ("float32", "bfloat16")
    auto = toolkit.info(toolkit.compress(data, codec="lm", model=str(tiny), **SETTINGS))["header"]["config"]["dtype"]
    assert auto == "int8"


def test_hf_engine_roundtrip(tiny):
    blob = toolkit.compress(CORPUS * 3, codec="lm", model=str(tiny), engine="hf", **SETTINGS)
    assert toolkit.decompress(blob) == CORPUS * 3
    assert toolkit.info(blob)["header"]["config"]["adapt"] == 0.0  # adaptation trains the int and lean heads only


def test_model_mismatch_is_refused(tmp_path):
    """The store notices a model replaced on disk (its files' stamps change): no cache to clear."""
    d = _tiny_llama(tmp_path, seed=1, name="m")
    blob = toolkit.compress(CORPUS, codec="lm", model=str(d), **SETTINGS)
    _tiny_llama(tmp_path, seed=2, name="m")  # same path, other weights
    with pytest.raises(ModelMismatchError, match="weights"):
        toolkit.decompress(blob)
    import shutil

    shutil.rmtree(d)
    with pytest.raises(ModelMismatchError, match="not found"):
        toolkit.decompress(blob)


def test_decoder_pointed_at_another_model_dir(tmp_path):
    """A file coded with a model at one path decodes with the model moved elsewhere (--set model_dir=...)."""
    import shutil

    d = _tiny_llama(tmp_path, seed=3, name="where")
    blob = toolkit.compress(CORPUS, codec="lm", model=str(d), **SETTINGS)
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    shutil.move(str(d), moved / "where")
    with pytest.raises(ModelMismatchError):
        toolkit.decompress(blob)
    assert toolkit.decompress(blob, model_dir=str(moved)) == CORPUS
    from toolkit.errors import ConfigError

    with pytest.raises(ConfigError, match="decode setting"):
        toolkit.decompress(blob, window=5)


def test_weights_hash_is_the_files_hash(tiny):
    """The header's weights hash is the SHA-256 of the weight file, not a walk over the state dict."""
    import hashlib

    h = toolkit.info(toolkit.compress(CORPUS, codec="lm", model=str(tiny), **SETTINGS))["header"]
    want = hashlib.sha256((Path(tiny) / "model.safetensors").read_bytes()).hexdigest()
    assert h["model"]["weights_sha256"] == want


def test_hf_bf16_engine_does_not_touch_the_cached_model(tiny):
    """Building an hf engine in bf16 casts a copy: later fp32 engines still see the fp32 weights."""
    from toolkit.text.model import load_coding_model

    cm = load_coding_model(str(tiny))
    g = torch.Generator().manual_seed(2)
    seq = torch.randint(0, cm.tokenizer.alphabet, (2, 12), generator=g)
    before = _drive(cm.engine("hf", 16, 5, "float32"), seq)
    cm.engine("hf", 16, 5, "bfloat16")
    again = load_coding_model(str(tiny))
    assert all(p.dtype == torch.float32 for p in again.hf_model().parameters())
    fresh = _drive(again.engine("hf", 24, 5, "float32"), seq)  # a new engine, built after the bf16 one
    assert all(torch.equal(a, b) for a, b in zip(before, fresh, strict=True))


@pytest.mark.slow
def test_one_instance_codes_two_files_that_fresh_processes_decode(tiny, tmp_path):
    """Coding state lives in a session per file: a reused codec instance writes files any fresh decoder reads."""
    from toolkit.codecs.lm import LMCodec, LMConfig

    codec = LMCodec(LMConfig(model=str(tiny), adapt=0.5, adapt_tokens=12, **SETTINGS))
    files = {"a": CORPUS * 3, "b": b"other words entirely, " * 40 + CORPUS}
    for name, data in files.items():
        (tmp_path / f"{name}.tkz").write_bytes(toolkit.compress(data, codec=codec))
    assert toolkit.compress(files["b"], codec=codec) == (tmp_path / "b.tkz").read_bytes()
    for name, data in files.items():
        out = tmp_path / f"{name}.out"
        subprocess.run([sys.executable, "-m", "toolkit", "decompress", str(tmp_path / f"{name}.tkz"), "-o", str(out),
                        "-q"], check=True)
        assert out.read_bytes() == data
    codec.token_costs(CORPUS)  # a session of its own: the next file is still coded from scratch
    assert toolkit.compress(files["b"], codec=codec) == (tmp_path / "b.tkz").read_bytes()


def test_kv_cache_beyond_memory_is_refused_before_allocating(tiny):
    from toolkit.errors import ConfigError

    with pytest.raises(ConfigError, match="KV cache"):
        toolkit.compress(CORPUS, codec="lm", model=str(tiny), window=65536, streams=1024, batch=1,
                         segment=256, keep=8)


@pytest.mark.slow
def test_decode_in_fresh_process(tiny, tmp_path):
    data = CORPUS * 4 + b"\x00\x01binary\xff" + CORPUS
    src = tmp_path / "in.txt"
    src.write_bytes(data)
    args = ["--set", f"model={tiny}", "--set", "segment=256", "--set", "streams=2"]
    subprocess.run([sys.executable, "-m", "toolkit", "compress", str(src), "--codec", "lm", "-q", *args],
                   check=True)
    out = tmp_path / "out.txt"
    subprocess.run([sys.executable, "-m", "toolkit", "decompress", str(src) + ".tkz", "-o", str(out), "-q"],
                   check=True)
    assert out.read_bytes() == data


def test_hugging_face_tokenizer_and_model(tmp_path):
    """A GPT-2 model with a Hugging Face byte-level BPE tokenizer, saved and loaded from a directory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator([CORPUS.decode()] * 4, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2, n_positions=64))
    d = tmp_path / "gpt2"
    model.save_pretrained(d)
    tok.save_pretrained(d)
    data = CORPUS + "naïve café\n".encode() + b"\xff\xfe not utf-8 " + CORPUS
    blob = toolkit.compress(data, codec="lm", model=str(d), **SETTINGS)
    assert toolkit.info(blob)["header"]["model"]["name"] == str(d)
    assert toolkit.decompress(blob) == data


def test_bad_settings(tiny):
    from toolkit.errors import ConfigError

    with pytest.raises(ConfigError):
        toolkit.compress(CORPUS, codec="lm", model=str(tiny), window=3)
    with pytest.raises(ConfigError):
        toolkit.compress(CORPUS, codec="lm", model=str(tiny), engine="turbo")
    with pytest.raises(ConfigError, match="adapt"):
        toolkit.compress(CORPUS, codec="lm", model=str(tiny), adapt=-1.0)


SHIPPED = (Path(__file__).parents[2] / "toolkit" / "assets" / "lm-default" / "model.safetensors").exists()


@pytest.mark.skipif(not SHIPPED, reason="shipped LM not built yet (python -m toolkit.recipes.train_lm)")
@pytest.mark.slow
def test_shipped_model_is_the_default_and_beats_xz_on_prose(capsys):
    from toolkit.bench import sample_files
    from toolkit.cli import main
    from toolkit.models import list_models

    prose = next(p for p in sample_files() if p.name == "prose.txt").read_bytes()
    blob = toolkit.compress(prose, codec="lm")
    assert toolkit.decompress(blob) == prose
    header = toolkit.info(blob)["header"]
    entry = list_models()["lm-default"]
    assert header["model"]["name"] == "default"
    assert entry["parameters"] == 4262144 and len(entry["sha256"]) == 64
    # the coded segment against xz -9e's whole output: on a 3.7 KB file the .tkz header (the model
    # record with its two hashes) is a quarter of the file, so it is left out of this comparison
    import lzma

    from toolkit.codecs.lm import LMCodec

    (payload,) = LMCodec().open_encoder().encode_chunks([prose])
    assert payload is not None
    assert len(payload) < 0.7 * len(lzma.compress(prose, preset=9 | lzma.PRESET_EXTREME))
    assert toolkit.info(toolkit.compress(prose))["header"]["codec"] == "lm"  # auto picks lm for text
    assert main(["list"]) == 0
    assert "lm-default" in capsys.readouterr().out


def test_plan_cuts_only_the_long_segments():
    from toolkit.text.plan import plan_pieces

    # one segment with five times the tokens of the rest: it alone is cut, into pieces near the mean (2000)
    lengths = [1000, 1000, 5000, 1000]
    assert plan_pieces(lengths, streams=8, piece=100) == [1, 1, 3, 1]
    assert plan_pieces(lengths, streams=8, piece=0) == [1, 1, 1, 1]  # splitting off
    assert plan_pieces(lengths, streams=8, piece=3000) == [1, 1, 2, 1]  # pieces of at least 3000
    assert plan_pieces(lengths, streams=5, piece=100) == [1, 1, 2, 1]  # at most 5 streams
    assert plan_pieces(lengths, streams=4, piece=100) == [1, 1, 1, 1]
    # a small batch is cut to fill half the streams: 8000 tokens over 8 streams
    assert plan_pieces(lengths, streams=16, piece=100) == [1, 1, 5, 1]
    assert plan_pieces(lengths, streams=32, piece=100) == [2, 2, 10, 2]
    assert plan_pieces(lengths, streams=32, piece=2000) == [1, 1, 3, 1]
    assert plan_pieces([5, 0, 7], streams=4, piece=1) == [1, 1, 2]  # an empty segment is one (empty) stream
    assert plan_pieces([], streams=4, piece=1) == []


def test_roundtrip_with_segments_cut_into_pieces(tiny):
    """Segments the tokenizer splits finely are coded as several streams; declined segments replay the plan."""
    from toolkit.codecs.lm import LMCodec, LMConfig
    from toolkit.text.plan import plan_pieces

    wide = "Grüße, 世界! ünïcödé ½ ∑ text\n".encode() * 12  # several tokens per character
    data = CORPUS[:512] + wide[:512] + CORPUS[512:1024] + bytes(range(256)) * 2 + CORPUS[:512]
    settings = dict(SETTINGS, streams=8, batch=4, segment=512, piece=8)
    codec = LMCodec(LMConfig(model=str(tiny), **settings))
    chunks = [data[i : i + 512] for i in range(0, 2048, 512)]
    lengths = [len(t) for t in codec.tokens(chunks)[0] if t is not None]
    assert max(plan_pieces(lengths, 8, 8)) > 1  # the wide segment is cut
    blob = toolkit.compress(data, codec="lm", model=str(tiny), **settings)
    assert toolkit.decompress(blob) == data
    # cutting changes the stream layout but not what comes back, and costs little
    whole = toolkit.compress(data, codec="lm", model=str(tiny), **dict(settings, piece=0))
    assert toolkit.decompress(whole) == data
    assert len(blob) < 1.1 * len(whole)


def test_payload_with_a_wrong_piece_count_is_refused(tiny):
    from toolkit.codecs.lm import LMCodec, LMConfig
    from toolkit.errors import FormatError

    codec = LMCodec(LMConfig(model=str(tiny), **SETTINGS))
    (payload,) = codec.open_encoder().encode_chunks([CORPUS[:256]])
    assert payload is not None
    m = payload[0]  # one-byte line-wrap side length and side data, one-byte token count, then the piece count
    n = payload[1 + m]
    forged = payload[: 1 + m] + bytes([n, 2, 0]) + payload[3 + m :]
    with pytest.raises(FormatError):
        LMCodec(LMConfig(model=str(tiny), **SETTINGS)).open_decoder().decode_chunks([forged], [256], [None])


def test_wrapped_text_is_coded_unwrapped_and_comes_back(tiny):
    """Hard-wrapped prose: the model codes the joined lines, the payload's side data restores the breaks."""
    import textwrap

    from toolkit.codecs.lm import LMCodec, LMConfig

    prose = CORPUS.decode(errors="replace").replace("\n", " ")
    data = "\n\n".join(textwrap.fill(prose, w) for w in (48, 48, 48)).encode()
    settings = dict(SETTINGS, segment=4096)
    (payload,) = LMCodec(LMConfig(model=str(tiny), **settings)).open_encoder().encode_chunks([data])
    (plain,) = LMCodec(LMConfig(model=str(tiny), unwrap=False, **settings)).open_encoder().encode_chunks([data])
    assert payload is not None and plain is not None
    assert payload[0] > 0 and plain[0] == 0  # side data length
    for unwrap in (True, False):
        blob = toolkit.compress(data, codec="lm", model=str(tiny), unwrap=unwrap, **settings)
        assert toolkit.info(blob)["header"]["config"]["unwrap"] is unwrap
        assert toolkit.decompress(blob) == data


def test_damaged_lm_payloads_give_format_errors_only(tiny):
    """Mutated payloads reach the lm payload parser and the lockstep decoder: only ToolkitErrors come out."""
    import random

    from toolkit.codecs.lm import LMCodec, LMConfig
    from toolkit.errors import ToolkitError

    data = CORPUS[:256]
    codec = LMCodec(LMConfig(model=str(tiny), **SETTINGS))
    (payload,) = codec.open_encoder().encode_chunks([data])
    rng = random.Random(0)
    outcomes = {"error": 0, "decoded": 0}
    for trial in range(60):
        p = bytearray(payload)
        kind = trial % 4
        if kind == 0:
            for _ in range(rng.randint(1, 4)):
                p[rng.randrange(len(p))] ^= 1 << rng.randrange(8)
        elif kind == 1:
            p = p[: rng.randrange(len(p))]
        elif kind == 2:
            p[rng.randrange(len(p)) : 0] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 6)))
        else:  # forged leading counts: side length, token count, piece count
            p[rng.randrange(min(4, len(p)))] = rng.choice([0, 1, 0x7F, 0xFF])
        try:
            out = codec.open_decoder().decode_chunks([bytes(p)], [len(data)], [None])
        except ToolkitError:
            outcomes["error"] += 1
            continue
        outcomes["decoded"] += 1
        assert isinstance(out[0], bytes)  # wrong bytes are the container's digest check to catch
    assert outcomes["error"] > 0


def test_progress_moves_while_a_batch_is_coded(tiny):
    """The bar advances as tokens are coded, not once per batch, and ends at the input size."""
    import io

    from toolkit.codecs import container
    from toolkit.codecs.lm import LMCodec, LMConfig

    data = CORPUS * 4
    codec = LMCodec(LMConfig(model=str(tiny), segment=4096, streams=1, batch=1, piece=0, window=24, keep=8))
    ticks: list[int] = []
    container.write_stream(codec, io.BytesIO(data), io.BytesIO(), size=len(data), progress=ticks.append)
    assert len(ticks) > 3 and sum(ticks) == len(data)
