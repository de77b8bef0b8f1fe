"""The neural audio codec: training (one process, resumed, two DDP processes), streaming, the file codec."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import wave

import numpy as np
import pytest
import soundfile as sf

from toolkit.errors import ConfigError, FormatError, ToolkitError, UnsupportedInputError

SR = 16000
#: a tiny codec: hop 4 (4000 frames/s), 16 codes of 4 bits, 4 quantizers kept in pairs: 32 and 64 kbps;
#: it codes blocks of 0.5 s, as the shipped model's 1 s blocks, so that an hour is a few thousand blocks
TINY = ["--channels", "4", "--max-channels", "16", "--dim", "8", "--ratios", "2", "2", "--codebook-size", "16",
        "--quantizers", "4", "--dropout-multiple", "2", "--block-frames", "2000", "--segment", "0.15", "--batch", "2",
        "--warmup", "2",
        "--log-every", "2", "--valid-every", "4", "--ckpt-every", "2", "--quiet", "--threads", "1"]
ENV = {**os.environ, "LOGURU_LEVEL": "ERROR", "OMP_NUM_THREADS": "1"}


def _signal(seconds: float, seed: int = 0) -> np.ndarray:
    """Harmonic tones with vibrato and a little noise, like a voiced sound."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    f0 = 140 + 30 * np.sin(2 * np.pi * 3 * t)
    phase = 2 * np.pi * np.cumsum(f0) / SR
    x = sum(np.sin(k * phase) / k for k in range(1, 6)) * 0.2 + 0.01 * rng.standard_normal(t.size)
    return x.astype(np.float32)


def _write_split(root, name: str, x: np.ndarray) -> None:
    pcm = np.round(x * 32767).astype(np.int16)
    np.save(root / f"{name}.npy", pcm)
    (root / f"{name}.json").write_text(json.dumps({"sample_rate": SR, "clips": [
        {"source": "test", "offset": 0, "length": int(pcm.size)}]}))


def _train(run, data, *extra: str, steps: int = 4, nproc: int = 1) -> subprocess.CompletedProcess:
    head = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port",
            str(29500 + os.getpid() % 1000)] if nproc > 1 else [sys.executable]
    cmd = head + ["-m", "toolkit.recipes.train_audio", "--data", str(data), "--run-dir", str(run),
                  "--steps", str(steps), *TINY, *extra]
    return subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny codec trained for a few steps (adversarial losses on from step 2) and exported."""
    root = tmp_path_factory.mktemp("audio")
    data = root / "data"
    data.mkdir()
    _write_split(data, "train", _signal(8.0, 0))
    _write_split(data, "valid", _signal(5.0, 1))
    run = root / "run"
    r = _train(run, data, "--gan-start", "2")
    assert r.returncode == 0, r.stderr
    r = subprocess.run([sys.executable, "-m", "toolkit.recipes.train_audio", "--data", str(data), "--run-dir", str(run),
                        "--export", str(root / "model"), *TINY], capture_output=True, text=True, env=ENV)
    assert r.returncode == 0, r.stderr
    return {"root": root, "data": data, "run": run, "model": root / "model"}


def test_training_logs_checkpoints_and_resumes(tiny, tmp_path):
    log = [json.loads(line) for line in (tiny["run"] / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [2, 4]
    assert log[-1]["adv"] > 0 and log[-1]["disc"] > 0  # the adversarial terms ran
    assert np.isfinite(log[-1]["valid"]["mel"])
    run = tmp_path / "run"
    run.mkdir()
    (run / "last.pt").write_bytes((tiny["run"] / "last.pt").read_bytes())
    r = _train(run, tiny["data"], "--resume", "--gan-start", "2", steps=6)
    assert r.returncode == 0, r.stderr
    import torch

    state = torch.load(run / "last.pt", weights_only=True)
    assert state["step"] == 6
    assert [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()] == [6]


def test_training_continues_from_an_exported_model(tiny, tmp_path):
    import torch
    from safetensors.torch import load_file

    from toolkit.audio import AudioNetConfig, SEANetCodec

    exported = load_file(str(tiny["model"] / "model.safetensors"))
    cfg = AudioNetConfig.from_dict(json.loads((tiny["model"] / "config.json").read_text())["config"])
    net = SEANetCodec(cfg)
    net.load_inference_state(exported)
    back = net.inference_state()
    for k, v in back.items():
        assert torch.allclose(v, exported[k].float(), atol=1e-3, rtol=1e-3), k
    r = _train(tmp_path / "more", tiny["data"], "--init-from", str(tiny["model"]), steps=2)
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "more" / "log.jsonl").read_text().splitlines()[-1])["step"] == 2


def test_a_model_grows_by_residual_units_and_keeps_its_function(tiny, tmp_path):
    import dataclasses

    import torch
    from safetensors.torch import load_file

    from toolkit.audio import AudioNetConfig, SEANetCodec, load_codec

    exported = load_file(str(tiny["model"] / "model.safetensors"))
    cfg = AudioNetConfig.from_dict(json.loads((tiny["model"] / "config.json").read_text())["config"])
    small, grown = SEANetCodec(cfg).eval(), SEANetCodec(dataclasses.replace(cfg, residual_layers=3)).eval()
    small.load_inference_state(exported)
    grown.load_inference_state(exported, source=cfg)
    x = torch.from_numpy(_signal(0.2, 5)).view(1, 1, -1)
    with torch.no_grad():
        z = small.encoder(x)
        assert torch.allclose(grown.encoder(x), z, atol=1e-6)
        assert torch.allclose(grown.decoder(z), small.decoder(z), atol=1e-6)
    with pytest.raises(ValueError, match="grows only by residual units"):
        SEANetCodec(dataclasses.replace(cfg, dim=16)).load_inference_state(exported, source=cfg)
    with pytest.raises(ValueError, match="does not shrink"):
        small.load_inference_state(grown.inference_state(), source=grown.cfg)
    # without the source config, a state that does not fit is refused rather than loaded in part
    with pytest.raises(ValueError, match="does not fit this model: missing"):
        SEANetCodec(dataclasses.replace(cfg, residual_layers=3)).load_inference_state(exported)
    with pytest.raises(ValueError, match="wrong shape"):
        small.load_inference_state({**exported, "codebook.0": exported["codebook.0"][:, :4]})
    # training, resumption and export of the grown model, whose streaming then equals its offline coding
    run = tmp_path / "grown"
    r = _train(run, tiny["data"], "--init-from", str(tiny["model"]), "--residual-layers", "3", steps=2)
    assert r.returncode == 0, r.stderr
    r = _train(run, tiny["data"], "--resume", "--residual-layers", "3", steps=4)
    assert r.returncode == 0, r.stderr
    assert torch.load(run / "last.pt", weights_only=True)["step"] == 4
    for extra, message in ((["--resume", "--residual-layers", "2"], "has 3 residual units per block, not 2"),
                           (["--init-from", str(run.parent / "x"), "--residual-layers", "0"], "not a positive")):
        r = _train(run, tiny["data"], *extra, steps=6)
        assert r.returncode != 0 and message in r.stderr and "Traceback" not in r.stderr, r.stderr
    grown_model = tmp_path / "grown_model"
    r = subprocess.run([sys.executable, "-m", "toolkit.recipes.train_audio", "--data", str(tiny["data"]), "--run-dir",
                        str(run), "--export", str(grown_model), *TINY], capture_output=True, text=True, env=ENV)
    assert r.returncode == 0, r.stderr
    r = _train(tmp_path / "shrunk", tiny["data"], "--init-from", str(grown_model), "--residual-layers", "2")
    assert r.returncode != 0 and "grows but does not shrink" in r.stderr and "Traceback" not in r.stderr, r.stderr
    codec = load_codec(str(grown_model))
    assert codec.cfg.residual_layers == 3
    _check_streaming(codec)


def test_ddp_two_processes_keep_identical_weights(tiny, tmp_path):
    r = _train(tmp_path / "ddp", tiny["data"], "--gan-start", "2", steps=4, nproc=2)
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = json.loads((tmp_path / "ddp" / "ranks.json").read_text())
    assert len(ranks["digests"]) == 2 and ranks["agree"], ranks


def test_quantizer_dropout_is_per_clip_and_uniform_over_the_bitrates():
    import copy

    import torch

    from toolkit.audio import AudioNetConfig, SEANetCodec

    torch.manual_seed(0)
    cfg = AudioNetConfig(channels=4, ratios=(2, 2), dim=8, max_channels=8, codebook_size=16, num_quantizers=6,
                         dropout_multiple=2)
    net = SEANetCodec(cfg)
    draws = net.draw_quantizers(6000)
    counts = torch.bincount(draws, minlength=7)
    assert set(draws.unique().tolist()) == {2, 4, 6}
    assert (counts[[2, 4, 6]] - 2000).abs().max() < 150  # 1 in 3 each; 150 is > 4 standard deviations
    wav = torch.randn(3, 1, 64)
    net.train()
    net(wav)  # the first step initialises the codebooks (k-means)
    mixed, *same = [copy.deepcopy(net)(wav, torch.tensor(k)) for k in ([2, 4, 6], [2] * 3, [4] * 3, [6] * 3)]
    y, codes, commit = mixed
    assert codes.shape == (3, 16, 6) and (codes >= 0).all() and commit.item() > 0
    for b in range(3):  # clip b is decoded from its own first keep[b] codebooks, whatever the others keep
        assert torch.allclose(y[b], same[b][0][b], atol=1e-6)
        assert torch.equal(codes[b], same[b][1][b])
    assert not torch.allclose(same[0][0][0], same[2][0][0], atol=1e-3)


def test_export_has_priors_for_every_codebook(tiny):
    from toolkit.audio import load_codec

    codec = load_codec(str(tiny["model"]))
    assert codec.priors.shape == (4, 16)
    assert (codec.priors.sum(axis=1) == 1 << 16).all() and (codec.priors >= 1).all()
    assert codec.bitrates == (32.0, 64.0)
    with pytest.raises(ConfigError, match="not a bitrate"):
        codec.encoder(kbps=48)


def test_streaming_equals_offline_and_the_full_forward(tiny):
    from toolkit.audio import load_codec

    _check_streaming(load_codec(str(tiny["model"])))


def _check_streaming(codec) -> None:
    import torch

    x = _signal(0.7, 3)
    off = codec.encode(x, SR, kbps=64)
    assert off.codes.shape == (4, codec.cfg.frames_for(x.size))
    rng = np.random.default_rng(0)
    enc, parts, i = codec.encoder(kbps=64), [], 0
    while i < x.size:
        n = int(rng.integers(1, 700))
        parts.append(enc.push(x[i:i + n]))
        i += n
    streamed = np.concatenate(parts + [enc.flush()], axis=1)
    assert np.array_equal(streamed, off.codes)
    y = codec.decode(off)
    dec, outs, i = codec.decoder(), [], 0
    while i < off.codes.shape[1]:
        n = int(rng.integers(1, 90))
        outs.append(dec.push(off.codes[:, i:i + n]))
        i += n
    ys = np.concatenate(outs + [dec.flush()])[: x.size]
    assert y.shape == x.shape and np.array_equal(ys, y)
    # the block loop carries convolution state correctly: it matches one pass over the whole signal
    with torch.no_grad():
        pad = torch.from_numpy(np.pad(x, (0, -x.size % 4))).view(1, 1, -1)
        z_full = codec.net.encoder(pad)
        state, block = {}, codec.cfg.block_frames * codec.cfg.hop
        z_blocks = torch.cat([codec.net.encoder.step(pad[..., i:i + block], state)
                              for i in range(0, pad.shape[-1], block)], dim=-1)
        y_full = codec.net.decoder(codec.net.dequantize(torch.from_numpy(off.codes.astype(np.int64))[None]))
    assert torch.allclose(z_full, z_blocks, atol=1e-5)
    assert np.allclose(y_full[0, 0, : x.size].numpy(), y, atol=1e-5)


@pytest.fixture(scope="module")
def tiny_istft(tiny):
    """The tiny codec's encoder and codebooks with a Vocos-style decoder trained alone for 2 steps."""
    run, model = tiny["root"] / "istft_run", tiny["root"] / "istft_model"
    r = _train(run, tiny["data"], "--init-from", str(tiny["model"]), "--decoder", "istft", "--decoder-channels", "8",
               "--decoder-layers", "2", "--freeze-encoder", steps=2)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([sys.executable, "-m", "toolkit.recipes.train_audio", "--data", str(tiny["data"]), "--run-dir",
                        str(run), "--export", str(model), *TINY], capture_output=True, text=True, env=ENV)
    assert r.returncode == 0, r.stderr
    return model


def test_a_new_decoder_trained_alone_keeps_the_codes_and_streams(tiny, tiny_istft):
    from toolkit.audio import load_codec

    old, new = load_codec(str(tiny["model"])), load_codec(str(tiny_istft))
    assert new.cfg.decoder == "istft" and new.cfg.decoder_lag == 6  # 3 hops of 2 samples
    x = _signal(0.7, 5)
    a, b = old.encode(x, SR, kbps=64), new.encode(x, SR, kbps=64)
    # the frozen encoder codes alike; the lagging decoder needs 2 more frames to complete the end
    assert np.array_equal(a.codes, b.codes[:, : a.codes.shape[1]]) and b.codes.shape[1] == a.codes.shape[1] + 2
    assert np.array_equal(old.priors, new.priors)
    y = new.decode(b)
    assert y.shape == x.shape and np.isfinite(y).all() and np.abs(y).max() > 0
    _check_streaming(new)
    for n in (0, 1):
        assert new.decode(new.encode(np.full(n, 0.1, np.float32), SR, 32)).size == n
    # the state refuses to load into a model with the other decoder
    from safetensors.torch import load_file

    from toolkit.audio import AudioNetConfig, SEANetCodec

    with pytest.raises(ValueError, match="does not fit"):
        SEANetCodec(old.cfg).load_inference_state(load_file(str(tiny_istft / "model.safetensors")))
    r = _train(tiny["root"] / "refused", tiny["data"], "--freeze-encoder")
    assert r.returncode != 0 and "--init-from" in r.stderr and "Traceback" not in r.stderr, r.stderr
    # back to a SEANet decoder, grown on the way: the encoder's units are renamed, the decoder is new
    import dataclasses

    back = SEANetCodec(dataclasses.replace(new.cfg, decoder="seanet", residual_layers=2))
    back.load_inference_state(load_file(str(tiny_istft / "model.safetensors")), source=new.cfg)
    assert AudioNetConfig(ratios=(3, 5)).hop == 15  # an odd hop is fine for a SEANet decoder


def test_resuming_a_frozen_encoder_run_needs_the_flag(tiny, tiny_istft, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "last.pt").write_bytes((tiny["root"] / "istft_run" / "last.pt").read_bytes())
    r = _train(run, tiny["data"], "--resume", steps=4)
    assert r.returncode != 0 and "froze the encoder" in r.stderr and "Traceback" not in r.stderr, r.stderr
    r = _train(run, tiny["data"], "--resume", "--freeze-encoder", steps=4)
    assert r.returncode == 0, r.stderr
    r = _train(tmp_path / "short", tiny["data"], "--init-from", str(tiny_istft), "--segment", "0.128")
    assert r.returncode != 0 and "decoder's lag" in r.stderr and "Traceback" not in r.stderr, r.stderr
    # a decoder's size is set when it is made: a flag that would be ignored is refused
    r = _train(run, tiny["data"], "--resume", "--freeze-encoder", "--decoder-layers", "3", steps=6)
    assert r.returncode != 0 and "has 2" in r.stderr and "Traceback" not in r.stderr, r.stderr
    r = _train(tmp_path / "seanet", tiny["data"], "--init-from", str(tiny["model"]), "--decoder-channels", "8")
    assert r.returncode != 0 and "this model's decoder is seanet" in r.stderr, r.stderr


def test_file_chunks_carry_a_lagging_decoder_across_their_boundaries(tiny_istft, monkeypatch):
    """Files are cut into chunks; a decoder that lags its codes needs frames from the next chunk's time, so
    each chunk carries whole blocks past its end. The decoded file equals the library's offline decoding."""
    import toolkit.codecs.audio as audio_codec
    from toolkit.audio import load_codec
    from toolkit.audio.io import to_pcm16

    monkeypatch.setattr(audio_codec, "CHUNK_SECONDS", 1)
    # 16-bit samples, so that the offline coding is given exactly what the file holds: libsndfile reads
    # sample k as k / 32768, as AudioCodec.encode does (a float signal written as PCM_16 comes back
    # scaled by 32767 / 32768, and where two codewords are nearly tied that picks another code)
    pcm = np.round(_signal(3.3, 7) * 32767).astype(np.int16)
    blob, _ = _compress(_wav_bytes(pcm), tiny_istft)
    from toolkit.api import info

    assert info(blob)["chunks"] == 4
    out = _decompress(blob)
    codec = load_codec(str(tiny_istft))
    ref = to_pcm16(codec.decode(codec.encode(pcm, SR, 32)))
    assert out[44:] == ref
    for n in (0, 1):
        y, _ = sf.read(io.BytesIO(_decompress(_compress(_wav_bytes(np.full(n, 0.25)), tiny_istft)[0])))
        assert y.size == n
    damaged = bytearray(blob)
    damaged[len(blob) // 2] ^= 0x10
    with pytest.raises(ToolkitError):
        _decompress(bytes(damaged))


def test_encode_takes_other_rates_channels_and_bad_samples(tiny):
    from toolkit.audio import load_codec

    codec = load_codec(str(tiny["model"]))
    x = _signal(0.5)
    stereo44 = np.stack([x, -x], axis=1).repeat(2, axis=0)[: int(0.5 * 32000)]
    c = codec.encode(stereo44, 32000, kbps=32)
    assert c.num_samples == x.size and c.codes.shape[0] == 2
    bad = x.copy()
    bad[::7] = np.nan
    bad[::11] = 5.0
    assert np.isfinite(codec.decode(codec.encode(bad, SR, 32))).all()
    assert codec.decode(codec.encode(np.zeros(0, np.float32), SR, 32)).size == 0
    assert codec.decode(codec.encode(np.ones(1, np.float32) * 0.1, SR, 32)).size == 1
    with pytest.raises(ConfigError):
        codec.encode(x, 0, 32)
    with pytest.raises(UnsupportedInputError):
        codec.encode(np.zeros((2, 2, 2)), SR, 32)
    with pytest.raises(ConfigError):
        codec.decode(np.full((2, 3), 99))


def test_configs_check_their_values_and_round_trip():
    import dataclasses

    from toolkit.audio import AudioNetConfig
    from toolkit.codecs.audio import AudioFileConfig
    from toolkit.models.store import ASSETS
    from toolkit.recipes.train_audio import TrainAudioConfig

    shipped = json.loads((ASSETS / "audio-16k" / "config.json").read_text())["config"]
    cfg = AudioNetConfig.from_dict(shipped)
    assert cfg.ratios == (2, 4, 5, 8) and cfg.decoder_lag == 480 and AudioNetConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.dim = 64
    for bad in ({"decoder": "wavenet"}, {"decoder": "istft", "decoder_upsample": 3}, {"codebook_size": 1000},
                {"ratios": ()}, {"channels": 0}, {"dropout_multiple": 25}, {"ema_decay": 1.5}, {"ema_decay": -0.1},
                {"ema_decay": float("nan")}, {"dead_code_threshold": -1.0}, {"dead_code_threshold": float("inf")},
                {"channels": "16"}, {"ratios": (2, "4")}):
        with pytest.raises(ConfigError):
            AudioNetConfig(**bad)
    with pytest.raises(ConfigError, match="not a bitrate"):
        cfg.quantizers_for(5)
    # the file codec's settings are its header's "config", field for field
    assert AudioFileConfig().to_dict() == {"kbps": 6.0, "model": ""}
    for bad in ({"kbps": "six"}, {"model": 3}):
        with pytest.raises(ConfigError):
            AudioFileConfig(**bad)
    for bad in ({"segment": 0.1}, {"residual_layers": 0}, {"decoder": "wavenet"}, {"threads": -1}):
        with pytest.raises(ConfigError):
            TrainAudioConfig(**bad)


# --------------------------------------------------------------------------- the file codec
def _compress(data: bytes, model, kbps: float = 32) -> tuple[bytes, dict]:
    from toolkit.api import compress_stream

    out = io.BytesIO()
    summary = compress_stream(io.BytesIO(data), out, codec="audio", settings={"kbps": kbps, "model": str(model)})
    return out.getvalue(), summary


def _decompress(blob: bytes) -> bytes:
    from toolkit.api import decompress

    return decompress(blob)


def _wav_bytes(x: np.ndarray, sr: int = SR, fmt: str = "WAV", subtype: str = "PCM_16") -> bytes:
    b = io.BytesIO()
    sf.write(b, x, sr, format=fmt, subtype=subtype)
    return b.getvalue()


def test_file_round_trip_is_a_wav_of_the_same_length_and_codes_entropy_coded(tiny):
    x = _signal(1.3)
    blob, summary = _compress(_wav_bytes(x), tiny["model"])
    out = _decompress(blob)
    y, sr = sf.read(io.BytesIO(out), dtype="float32")
    assert sr == SR and y.shape == x.shape
    with wave.open(io.BytesIO(out)) as w:
        assert w.getnchannels() == 1 and w.getsampwidth() == 2
    # entropy coding with the priors: fewer bits than 4 per code for 2 of 4 quantizers at 4000 frames/s
    from toolkit.audio import load_codec

    ref = load_codec(str(tiny["model"])).encode(x, SR, 32)
    assert len(blob) < ref.codes.size * 4 / 8 + 600
    assert summary["decoded_bytes"] == len(out)


@pytest.mark.parametrize("fmt,subtype", [("FLAC", "PCM_16"), ("OGG", "VORBIS"), ("WAV", "FLOAT")])
def test_flac_ogg_and_float_wav_in_with_notes(tiny, fmt, subtype):
    x = _signal(0.6)
    stereo = np.stack([x, x * 0.5], axis=1)
    data = _wav_bytes(np.repeat(stereo, 3, axis=0) if fmt != "OGG" else stereo, 48000 if fmt != "OGG" else SR,
                      fmt, subtype)
    blob, summary = _compress(data, tiny["model"])
    from toolkit.api import info

    notes = info(blob)["header"]["audio"]["notes"]
    assert "downmixed from 2 channels to mono" in notes
    assert (fmt == "OGG") != any("resampled from 48000 Hz" in n for n in notes)
    y, sr = sf.read(io.BytesIO(_decompress(blob)))
    assert sr == SR and abs(y.size - x.size) <= 1


def test_nan_and_out_of_range_samples_are_noted(tiny):
    x = _signal(0.3)
    x[5:9] = np.nan
    x[20:30] = 3.0
    blob, summary = _compress(_wav_bytes(x, subtype="FLOAT"), tiny["model"])
    assert "4 NaN or infinite samples set to silence" in summary["hint"]
    assert "10 samples outside [-1, 1] clipped" in summary["hint"]
    y, _ = sf.read(io.BytesIO(_decompress(blob)))
    assert np.isfinite(y).all() and y.size == x.size


@pytest.mark.parametrize("n", [0, 1])
def test_empty_and_one_sample_files(tiny, n):
    blob, _ = _compress(_wav_bytes(np.full(n, 0.25, np.float32)), tiny["model"])
    y, sr = sf.read(io.BytesIO(_decompress(blob)))
    assert sr == SR and y.size == n


def test_odd_sample_rates(tiny):
    blob, summary = _compress(_wav_bytes(_signal(0.2)[::2], 8000), tiny["model"])
    assert "resampled from 8000 Hz to 16000 Hz" in summary["hint"]
    with pytest.raises(UnsupportedInputError, match="cannot resample 44101 Hz"):
        _compress(_wav_bytes(_signal(0.2), 44101), tiny["model"])


def test_refusals_and_damage(tiny):
    with pytest.raises(UnsupportedInputError, match="not an audio file"):
        _compress(b"this is plain text, not sound\n" * 20, tiny["model"])
    with pytest.raises(ConfigError, match="not a bitrate"):
        _compress(_wav_bytes(_signal(0.1)), tiny["model"], kbps=6)
    blob, _ = _compress(_wav_bytes(_signal(0.8)), tiny["model"])
    for cut in (len(blob) // 2, len(blob) - 3):
        with pytest.raises(FormatError):
            _decompress(blob[:cut])
    damaged = bytearray(blob)
    damaged[-40] ^= 0x10
    with pytest.raises(ToolkitError):
        _decompress(bytes(damaged))


def test_cli_round_trip_and_one_line_errors(tiny, tmp_path):
    src = tmp_path / "voice.flac"
    sf.write(src, _signal(0.9), SR)
    model = str(tiny["model"])
    r = subprocess.run(["codec", "compress", str(src), "--codec", "audio", "--set", "kbps=32", "--set",
                        f"model={model}", "-q"], capture_output=True, text=True, env=ENV)
    assert r.returncode == 0, r.stderr
    out = tmp_path / "voice.wav"
    r = subprocess.run(["codec", "decompress", str(src) + ".tkz", "-o", str(out), "-q"], capture_output=True,
                       text=True, env=ENV)
    assert r.returncode == 0, r.stderr
    assert sf.info(out).frames == sf.info(src).frames
    junk = tmp_path / "notes.txt"
    junk.write_text("hello\n" * 100)
    r = subprocess.run(["codec", "compress", str(junk), "--codec", "audio", "--set", "kbps=32", "--set",
                        f"model={model}"],
                       capture_output=True, text=True, env=ENV)
    assert r.returncode != 0 and "Traceback" not in r.stderr and "not an audio file" in r.stderr
    assert not (tmp_path / "notes.txt.tkz").exists()


@pytest.mark.slow
def test_one_hour_file_in_bounded_memory(tiny, tmp_path):
    """An hour at 16 kHz (115 MB of WAV) through the CLI both ways: peak memory no higher than for 10 minutes.

    The comparison is with a 10-minute file in the same environment, since the baseline (torch and the
    libraries' import) differs between environments by a few hundred MB; holding an hour of samples
    would add at least 230 MB (float32), and the input and output twice that.
    """
    piece = _signal(60.0)
    model = str(tiny["model"])
    script = ("import resource, sys; from toolkit.cli import main; rc = main(sys.argv[1:]); "
              "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); raise SystemExit(rc)")
    peaks = {}
    for minutes in (10, 60):
        src = tmp_path / f"{minutes}.wav"
        with sf.SoundFile(src, "w", SR, 1, subtype="PCM_16") as f:
            for _ in range(minutes):
                f.write(piece)
        out = tmp_path / f"{minutes}.out.wav"
        for args in (["compress", str(src), "--codec", "audio", "--set", "kbps=32", "--set", f"model={model}", "-q"],
                     ["decompress", str(src) + ".tkz", "-o", str(out), "-q"]):
            r = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, env=ENV,
                               timeout=600)
            assert r.returncode == 0, r.stderr
            peaks[args[0], minutes] = int(r.stdout.split()[-1]) / 1024
        assert sf.info(out).frames == minutes * 60 * SR
    for step in ("compress", "decompress"):
        assert peaks[step, 60] < peaks[step, 10] + 100, peaks


def test_the_intelligibility_loss_trains_and_refuses_short_crops(tiny, tmp_path):
    run = tmp_path / "stoi"
    r = _train(run, tiny["data"], "--init-from", str(tiny["model"]), "--stoi-weight", "2", "--segment", "0.6",
               steps=2)
    assert r.returncode == 0, r.stderr
    last = json.loads((run / "log.jsonl").read_text().splitlines()[-1])
    assert 0 < last["stoi"] < 2  # 1 - STOI of a voiced crop after two steps: neither perfect nor empty
    r = _train(tmp_path / "short", tiny["data"], "--init-from", str(tiny["model"]), "--stoi-weight", "2")
    assert r.returncode != 0 and "at least 0.5 s" in r.stderr and "Traceback" not in r.stderr
