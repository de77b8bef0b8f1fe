"""Train the audio codec: ``python -m toolkit.recipes.train_audio --data runs/audio --run-dir runs/audio-train``.

One process, or many under ``torchrun --nproc-per-node N -m toolkit.recipes.train_audio ...``: the
generator and the discriminators are wrapped in DistributedDataParallel (gloo on CPU, NCCL on
CUDA), each rank draws its own crops and bitrates, and the codebooks synchronise their statistics
themselves, so every rank holds the same weights after every step.

A step: random crops of the training material (random gain and polarity), the codec's
reconstruction at a bitrate drawn by quantizer dropout, then the generator loss

    15 * multi-scale mel + 1 * multi-resolution STFT + commitment
    (+ --wave-weight * relative waveform L1, off by default)
    (+ --stoi-weight * (1 - STOI), a differentiable intelligibility term, off by default)
    (+ 1 * hinge adversarial + 2 * feature matching once ``--gan-start`` is reached)

and, with the adversarial terms on, one discriminator step on the same batch. Rank 0 writes
``last.pt`` every ``--ckpt-every`` steps (model, discriminators, optimisers, step, RNG), logs
losses and a validation (6 kbps) to ``log.jsonl`` and shows a tqdm bar; ``--resume`` continues.
``--export DIR`` writes the inference model (safetensors + config + code priors) from ``last.pt``.
``--init-from DIR`` starts from an exported model instead; with a larger ``--residual-layers`` the
model grows (SoundStream's blocks have 3 residual units, dilations 1, 3, 9) and starts as the same
function. ``--decoder istft`` with ``--init-from`` gives the model a new Vocos-style decoder, and
``--freeze-encoder`` trains that decoder alone: the codes, and the priors measured on them, stay.

A notebook or script builds :class:`TrainAudioConfig` and calls :func:`run`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from toolkit.audio.config import AudioNetConfig
from toolkit.audio.losses import (
    Discriminators,
    MelLoss,
    discriminator_loss,
    feature_matching_loss,
    generator_adv_loss,
    mel_distance,
    si_sdr,
)
from toolkit.audio.network import InferenceCodec, SEANetCodec
from toolkit.config import Config, check
from toolkit.data.audio import load_split
from toolkit.errors import ConfigError, InputError
from toolkit.recipes.common import TimeBudget, cli, load_checkpoint, lr_at, save_checkpoint, set_threads, step_progress

__all__ = ["Batches", "TrainAudioConfig", "export", "main", "run", "train", "validate"]

logger = logging.getLogger(__name__)

#: the losses' longest window (the multi-resolution STFT's 2048 samples)
LONGEST_WINDOW = 2048


def _positive(name: str, value: int | None) -> None:
    check(value is None or value >= 1, f"--{name.replace('_', '-')} {value} is not a positive whole number")


@dataclass(frozen=True)
class TrainAudioConfig(Config):
    """Train the audio codec (one process, or many under torchrun), or export a trained one."""

    data: str = field(default="runs/audio", metadata={
        "help": "a directory of splits written by python -m toolkit.recipes.build_audio_data"})
    run_dir: str = field(default="runs/audio-train", metadata={"help": "where last.pt and log.jsonl go"})
    steps: int = field(default=4000, metadata={"help": "the step to train to (a resumed run counts on)"})
    batch: int = field(default=8, metadata={"help": "crops per step and process"})
    segment: float = field(default=1.0, metadata={"help": "seconds per crop"})
    lr: float = field(default=5e-4, metadata={"help": "peak learning rate (cosine to a tenth of it)"})
    warmup: int = field(default=100, metadata={"help": "steps of linear warmup"})
    wave_weight: float = field(default=0.0, metadata={"help": "weight of the relative waveform L1 loss"})
    stoi_weight: float = field(default=0.0, metadata={"help": "weight of the (1 - STOI) intelligibility loss"})
    gan_start: int = field(default=2000, metadata={"help": "step at which the adversarial losses start"})
    channels: int = field(default=24, metadata={"help": "a new model's first convolution's channels"})
    max_channels: int = field(default=384, metadata={"help": "a new model's widest convolution"})
    residual_layers: int | None = field(default=None, metadata={
        "help": "residual units per block (default 1); with --init-from, more than the model has grows it"})
    decoder: str | None = field(default=None, metadata={
        "help": "decoder kind, seanet or istft (new models: seanet); with --init-from, another kind starts "
                "a new decoder"})
    decoder_channels: int | None = field(default=None, metadata={"help": "a new istft decoder's width (384)"})
    decoder_layers: int | None = field(default=None, metadata={"help": "a new istft decoder's ConvNeXt blocks (6)"})
    freeze_encoder: bool = field(default=False, metadata={
        "help": "train the decoder alone: encoder, codebooks and so the codes stay as they are"})
    dim: int = field(default=128, metadata={"help": "a new model's latent width"})
    ratios: tuple[int, ...] = field(default=(2, 4, 5, 8), metadata={"help": "a new model's downsampling factors"})
    codebook_size: int = field(default=1024, metadata={"help": "a new model's codes per codebook"})
    quantizers: int = field(default=24, metadata={"help": "a new model's codebooks"})
    dropout_multiple: int = field(default=3, metadata={"help": "quantizer dropout keeps a multiple of this many"})
    block_frames: int = field(default=50, metadata={"help": "frames per block when coding (streaming unit)"})
    threads: int = field(default=0, metadata={"help": "torch threads per process (0: torch's choice)"})
    log_every: int = field(default=25, metadata={"help": "steps between lines of log.jsonl"})
    valid_every: int = field(default=250, metadata={"help": "steps between validations (on a logged step)"})
    ckpt_every: int = field(default=100, metadata={"help": "steps between checkpoints"})
    seed: int = field(default=0, metadata={"help": "seed of the initial weights and the crops"})
    resume: bool = field(default=False, metadata={"help": "continue from RUN_DIR/last.pt"})
    init_from: str | None = field(default=None, metadata={
        "help": "start from an exported model (its config wins; a larger --residual-layers grows it)"})
    quiet: bool = field(default=False, metadata={"help": "no progress bar, no export summary"})
    export: str | None = field(default=None, metadata={
        "help": "write the inference model of RUN_DIR/last.pt to this directory and stop"})

    def __post_init__(self):
        for name in ("residual_layers", "decoder_channels", "decoder_layers", "batch", "log_every", "valid_every",
                     "ckpt_every"):
            _positive(name, getattr(self, name))
        check(self.decoder in (None, "seanet", "istft"), f"--decoder must be seanet or istft, not {self.decoder!r}")
        check(self.steps >= 0 and self.warmup >= 0 and self.gan_start >= 0,
              "--steps, --warmup and --gan-start must not be negative")
        check(self.lr >= 0, f"--lr must not be negative, got {self.lr}")
        check(self.threads >= 0, f"--threads must not be negative (0: torch's choice), got {self.threads}")
        check(self.segment * 16000 >= LONGEST_WINDOW,
              "--segment must be at least 0.128 s: the losses' longest window is 2048 samples")


class Batches:
    """Random crops of a split written by :mod:`toolkit.data.audio`, augmented, as float tensors."""

    def __init__(self, samples: np.ndarray, segment: int, batch: int, seed: int):
        if samples.size < segment:
            raise ConfigError(f"the split has {samples.size} samples, fewer than one {segment}-sample crop")
        self.samples, self.segment, self.batch = samples, segment, batch
        self.rng = np.random.default_rng(seed)

    def __next__(self) -> torch.Tensor:
        starts = self.rng.integers(0, self.samples.size - self.segment + 1, self.batch)
        x = np.stack([self.samples[s:s + self.segment] for s in starts]).astype(np.float32) / 32768.0
        # loudness from -35 to -12 dB RMS, either polarity: the codec meets both quiet and loud inputs
        rms = np.sqrt((x ** 2).mean(axis=1, keepdims=True)) + 1e-5
        target = 10 ** (self.rng.uniform(-35, -12, (self.batch, 1)) / 20)
        x = x * np.minimum(target / rms, 0.99 / (np.abs(x).max(axis=1, keepdims=True) + 1e-5))
        x *= self.rng.choice([-1.0, 1.0], (self.batch, 1))
        return torch.from_numpy(x.astype(np.float32)).unsqueeze(1)


def _setup_distributed() -> tuple[int, int, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, torch.device("cpu")
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    rank = dist.get_rank()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if backend == "nccl" else torch.device("cpu")
    return rank, world, device


@torch.no_grad()
def validate(net: SEANetCodec, samples: np.ndarray, kbps: float | None = None, seconds: float = 4.0,
             count: int = 8) -> dict:
    """Mel distance and SI-SDR at ``kbps`` (6 where the model has it) on ``count`` fixed crops."""
    cfg = net.cfg
    if kbps is None:
        kbps = 6.0 if 6.0 in cfg.bitrates else cfg.bitrates[len(cfg.bitrates) // 2]
    inf = InferenceCodec(cfg)
    inf.load_state(net.inference_state())
    seg = int(seconds * cfg.sample_rate) // cfg.hop * cfg.hop
    starts = np.linspace(0, samples.size - seg, count).astype(int)
    mels, sdrs = [], []
    for s in starts:
        x = torch.from_numpy(samples[s:s + seg].astype(np.float32) / 32768.0).view(1, 1, -1)
        codes = inf.quantize(inf.encoder(x), cfg.quantizers_for(kbps))
        y = inf.decoder(inf.dequantize(codes))
        if cfg.decoder_lag:
            x, y = x[..., : -cfg.decoder_lag], y[..., : -cfg.decoder_lag]
        mels.append(mel_distance(y, x, cfg.sample_rate))
        sdrs.append(si_sdr(y, x))
    return {"mel": float(np.mean(mels)), "si_sdr": float(np.mean(sdrs))}


def _decoder_size(config: TrainAudioConfig) -> dict:
    """The size of a new decoder: the flags, or ``AudioNetConfig``'s defaults."""
    default = AudioNetConfig()
    return {"decoder_channels": config.decoder_channels or default.decoder_channels,
            "decoder_layers": config.decoder_layers or default.decoder_layers}


def _net_config(config: TrainAudioConfig, state: dict | None, ckpt: Path
                ) -> tuple[AudioNetConfig, AudioNetConfig | None]:
    """The network to train, and the exported model's config where it starts from one (``--init-from``)."""
    source = None
    if state is not None:
        cfg = AudioNetConfig.from_dict(state["config"])
        if config.residual_layers is not None and config.residual_layers != cfg.residual_layers:
            raise ConfigError(f"--resume continues {ckpt}, which has {cfg.residual_layers} residual units per "
                              f"block, not {config.residual_layers}")
    elif config.init_from:
        meta = Path(config.init_from) / "config.json"
        if not meta.is_file():
            raise InputError(f"--init-from {config.init_from}: not an exported audio model (no config.json)")
        source = AudioNetConfig.from_dict(json.loads(meta.read_text())["config"])
        cfg = replace(source, residual_layers=config.residual_layers or source.residual_layers)
        if config.decoder and config.decoder != source.decoder:
            cfg = replace(cfg, decoder=config.decoder, **_decoder_size(config))
    else:
        cfg = AudioNetConfig(channels=config.channels, max_channels=config.max_channels, dim=config.dim,
                             ratios=config.ratios, codebook_size=config.codebook_size,
                             num_quantizers=config.quantizers, dropout_multiple=config.dropout_multiple,
                             block_frames=config.block_frames, residual_layers=config.residual_layers or 1,
                             decoder=config.decoder or "seanet", **_decoder_size(config))
    for flag, given, has in (("--decoder-channels", config.decoder_channels, cfg.decoder_channels),
                             ("--decoder-layers", config.decoder_layers, cfg.decoder_layers)):
        # a decoder's size is fixed when it is made: a silently ignored flag would mislead
        if given is not None and cfg.decoder != "istft":
            raise ConfigError(f"{flag} sizes an istft decoder; this model's decoder is {cfg.decoder}")
        if given is not None and given != has:
            raise ConfigError(f"{flag} {given}: the model's istft decoder has {has}; a decoder's size is set only "
                              "when --decoder istft makes a new one")
    if state is not None and bool(state["args"].get("freeze_encoder")) != config.freeze_encoder:
        was = "froze" if state["args"].get("freeze_encoder") else "did not freeze"
        raise ConfigError(f"--resume continues {ckpt}, whose run {was} the encoder: give --freeze-encoder as it did")
    crop = int(config.segment * cfg.sample_rate) // cfg.hop * cfg.hop - cfg.decoder_lag
    if crop < LONGEST_WINDOW:
        raise ConfigError(f"--segment {config.segment:g} leaves {crop} samples a crop after whole frames and the "
                          f"decoder's lag; the losses' longest window is {LONGEST_WINDOW}")
    if config.stoi_weight and crop < cfg.sample_rate // 2:
        raise ConfigError(f"--stoi-weight needs crops of at least 0.5 s (STOI correlates 30 frames of 25.6 ms); "
                          f"--segment {config.segment:g} leaves {crop} samples after whole frames and the "
                          "decoder's lag")
    if state is not None and config.decoder and config.decoder != cfg.decoder:
        raise ConfigError(f"--resume continues {ckpt}, which has a {cfg.decoder} decoder, not {config.decoder}")
    if config.freeze_encoder and state is None and not config.init_from:
        raise ConfigError("--freeze-encoder trains a decoder for a trained encoder: give --init-from or --resume")
    return cfg, source


def run(config: TrainAudioConfig) -> Path:
    """Train to ``config.steps`` and return the checkpoint (``last.pt``); with ``export``, write the
    inference model of the run's checkpoint there instead and return that directory."""
    set_threads(config.threads or None)
    if config.export:
        summary = export(Path(config.run_dir) / "last.pt", config.export, config.data)
        if not config.quiet:
            print(json.dumps(summary))
        return Path(config.export)
    return train(config)


def train(config: TrainAudioConfig) -> Path:
    """The training loop (one rank of it under torchrun); returns the checkpoint."""
    from tqdm import tqdm

    for split in ("train", "valid"):
        if not (Path(config.data) / f"{split}.npy").is_file():
            raise InputError(f"--data {config.data}: no {split} split ({split}.npy); build one with "
                             "python -m toolkit.recipes.build_audio_data")
    rank, world, device = _setup_distributed()
    run_dir = Path(config.run_dir)
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    ckpt = run_dir / "last.pt"
    state = load_checkpoint(ckpt, device) if config.resume else None
    cfg, source = _net_config(config, state, ckpt)
    net = SEANetCodec(cfg).to(device)
    if config.freeze_encoder:
        net.freeze_encoder()
    if state is None and config.init_from:
        # a later session continues from exported weights (fresh optimisers and discriminators)
        from safetensors.torch import load_file

        try:
            net.load_inference_state(load_file(str(Path(config.init_from) / "model.safetensors")), source=source)
        except ValueError as e:  # a model that does not fit, or would shrink: one line, not a traceback
            raise ConfigError(f"--init-from {config.init_from}: {e}") from None
    disc = Discriminators().to(device)
    opt_g = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], config.lr, betas=(0.8, 0.99))
    opt_d = torch.optim.AdamW(disc.parameters(), config.lr, betas=(0.8, 0.99))
    step, elapsed = 0, 0.0
    if state is not None:
        net.load_state_dict(state["net"])
        disc.load_state_dict(state["disc"])
        opt_g.load_state_dict(state["opt_g"])
        opt_d.load_state_dict(state["opt_d"])
        step, elapsed = state["step"], state["elapsed"]
        torch.set_rng_state(state["torch_rng"])
        if rank == 0:
            print(f"resumed at step {step} ({elapsed / 60:.1f} min)", flush=True)
    train_pcm, _ = load_split(config.data, "train")
    valid_pcm, _ = load_split(config.data, "valid")
    batches = Batches(train_pcm, int(config.segment * cfg.sample_rate) // cfg.hop * cfg.hop, config.batch,
                      seed=config.seed * 1000 + rank + 7919 * step)
    g_model = DDP(net, broadcast_buffers=False) if world > 1 else net
    d_model = DDP(disc, broadcast_buffers=False) if world > 1 else disc
    mel_loss = MelLoss(cfg.sample_rate).to(device)
    import auraloss

    stft_loss = auraloss.freq.MultiResolutionSTFTLoss(fft_sizes=[256, 512, 1024], hop_sizes=[64, 128, 256],
                                                      win_lengths=[256, 512, 1024]).to(device)
    stoi_loss = None
    if config.stoi_weight:
        # torch_stoi's differentiable STOI (Taal et al. 2011, with its silent-frame removal): the
        # log-mel loss weighs quiet frames as much as speech, STOI only the speech-active ones and
        # their 1/3-octave envelopes, which is where the codec falls short of Opus
        from torch_stoi import NegSTOILoss

        with warnings.catch_warnings():  # its resampler's deprecated method name
            warnings.simplefilter("ignore", UserWarning)
            stoi_loss = NegSTOILoss(cfg.sample_rate).to(device)
    log = open(run_dir / "log.jsonl", "a") if rank == 0 else None  # noqa: SIM115 - closed at the end
    bar = tqdm(total=config.steps, initial=step, desc="audio codec", mininterval=5,
               disable=rank != 0 or config.quiet)
    clock = TimeBudget(float("inf"), elapsed)  # no budget: the clock of training time across resumes
    net.train()
    while step < config.steps:
        lr = lr_at(step, step_progress(step, config.steps, config.warmup), lr=config.lr, warmup=config.warmup,
                   min_ratio=0.1)
        for group in opt_g.param_groups + opt_d.param_groups:
            group["lr"] = lr
        x = next(batches).to(device)
        y, _, commit = g_model(x)
        if cfg.decoder_lag:  # the last samples of a crop wait for frames past its end
            x, y = x[..., : -cfg.decoder_lag], y[..., : -cfg.decoder_lag]
        gan = step >= config.gan_start
        rec_mel, rec_stft = mel_loss(y, x), stft_loss(y, x)
        loss = 15 * rec_mel + rec_stft + commit
        # a time-domain L1 term like EnCodec's, but relative to each clip's level (crops vary by 23 dB);
        # 1.4 for an unrelated waveform
        rec_wave = ((y - x).abs().mean(-1) / x.abs().mean(-1).clamp_min(1e-5)).mean()
        if config.wave_weight:
            loss = loss + config.wave_weight * rec_wave
        rec_stoi = torch.zeros(())
        if stoi_loss is not None:  # a silent crop has no speech-active frame: STOI 0, no gradient
            rec_stoi = 1 + stoi_loss(y.squeeze(1), x.squeeze(1)).mean()
            loss = loss + config.stoi_weight * rec_stoi
        adv = fm = torch.zeros(())
        if gan:
            real, fake = d_model(x), d_model(y)
            adv, fm = generator_adv_loss(fake), feature_matching_loss(real, fake)
            loss = loss + adv + 2 * fm
        opt_g.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 100.0)
        opt_g.step()
        d_loss = torch.zeros(())
        if gan:
            d_loss = discriminator_loss(d_model(x), d_model(y.detach()))
            opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            opt_d.step()
        step += 1
        bar.update(1)
        if rank == 0 and (step % config.log_every == 0 or step == config.steps):
            terms = {"mel": rec_mel, "stft": rec_stft, "commit": commit, "wave": rec_wave, "stoi": rec_stoi,
                     "adv": adv, "fm": fm, "disc": d_loss}
            rec = {"step": step, "minutes": round(clock.elapsed / 60, 2),
                   **{k: round(v.item(), 4) for k, v in terms.items()}}
            if step % config.valid_every == 0 or step == config.steps:
                net.eval()
                rec["valid"] = validate(net, valid_pcm)
                net.train()
            bar.set_postfix(mel=rec["mel"], adv=rec["adv"])
            log.write(json.dumps(rec) + "\n")
            log.flush()
        if rank == 0 and (step % config.ckpt_every == 0 or step == config.steps):
            # "args": the run's settings, under the key earlier runs' checkpoints use, so they resume
            save_checkpoint(ckpt, {"net": net.state_dict(), "disc": disc.state_dict(), "opt_g": opt_g.state_dict(),
                                   "opt_d": opt_d.state_dict(), "step": step, "elapsed": clock.elapsed,
                                   "torch_rng": torch.get_rng_state(), "config": cfg.to_dict(),
                                   "args": config.to_dict()})
    bar.close()
    if log:
        log.close()
    if world > 1:
        _check_ranks_agree(net, disc, run_dir, rank, world)
        dist.destroy_process_group()
    return ckpt


def _state_digest(*modules: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for m in modules:
        for k, v in sorted(m.state_dict().items()):
            h.update(k.encode() + v.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _check_ranks_agree(net, disc, run_dir: Path, rank: int, world: int) -> None:
    """Every rank's digest of its weights and buffers, gathered to rank 0 into ``ranks.json``: DDP
    keeps ranks identical only if everything outside the gradients (codebooks) is synchronised too."""
    digests: list[str | None] = [None] * world
    dist.all_gather_object(digests, _state_digest(net, disc))
    if rank == 0:
        (run_dir / "ranks.json").write_text(json.dumps({"digests": digests, "agree": len(set(digests)) == 1}))
        if len(set(digests)) != 1:
            logger.error("ranks hold different weights after training: %s", digests)


@torch.no_grad()
def export(ckpt: str | Path, out: str | Path, data: str | Path, prior_seconds: float = 600.0) -> dict:
    """Write the inference model of a checkpoint to ``out``: weights (float16), config, code priors.

    The priors are each codebook's code counts at the full bitrate over
    ``prior_seconds`` of training audio (evenly spaced 10-second pieces),
    plus one for every code so that none is uncodable, as integer
    frequencies summing to 2**16.
    """
    from safetensors.torch import save_file

    from toolkit.entropy.tables import from_counts

    state = load_checkpoint(ckpt)
    if state is None:
        raise InputError(f"{ckpt}: no checkpoint to export (train with this --run-dir first)")
    cfg = AudioNetConfig.from_dict(state["config"])
    net = SEANetCodec(cfg)
    net.load_state_dict(state["net"])
    weights = {k: v.half() for k, v in net.inference_state().items()}
    inf = InferenceCodec(cfg)
    inf.load_state(weights)  # priors from the float16 weights that ship
    pcm, _ = load_split(data, "train")
    piece = 10 * cfg.sample_rate
    counts = np.zeros((cfg.num_quantizers, cfg.codebook_size), np.int64)
    for s in np.linspace(0, pcm.size - piece, max(1, int(prior_seconds // 10))).astype(int):
        x = torch.from_numpy(pcm[s:s + piece].astype(np.float32) / 32768.0).view(1, 1, -1)
        codes = inf.quantize(inf.encoder(x), cfg.num_quantizers)[0].numpy()
        for i in range(cfg.num_quantizers):
            counts[i] += np.bincount(codes[i], minlength=cfg.codebook_size)
    priors = np.stack([from_counts(c + 1, 16) for c in counts]).astype(np.int32)
    weights["priors"] = torch.from_numpy(priors)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in weights.items()}, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps({"config": cfg.to_dict(), "step": state["step"]}, indent=1) + "\n")
    p = counts / counts.sum(axis=1, keepdims=True)
    entropy = -(np.where(p > 0, p * np.log2(np.where(p > 0, p, 1)), 0)).sum(axis=1)
    return {"step": state["step"], "train_minutes": round(state["elapsed"] / 60, 1),
            "prior_bits_per_code": [round(float(e), 3) for e in entropy]}


def main(argv: list[str] | None = None) -> int:
    return cli(TrainAudioConfig, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
