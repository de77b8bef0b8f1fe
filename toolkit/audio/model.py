"""The codec network: a causal SEANet encoder and decoder around a residual vector quantizer.

The layout follows SoundStream and EnCodec (Zeghidour et al. 2021, Défossez
et al. 2022): a 1-D convolution, then per downsampling stage residual units
(dilated convolutions with a skip) and a strided convolution that doubles the
channels; the decoder mirrors it with transposed convolutions. Every
convolution is causal (padded on the left only), so a sample's code depends
on the past alone and the network streams.

The other decoder, :class:`ISTFTDecoder` (``decoder="istft"``), follows Vocos
(Siuzdak 2023): it predicts short-time spectra at the frame rate and inverts
them, which trains several times faster on a CPU than generating samples
through transposed convolutions. Vocos itself decodes EnCodec's codes that
way; here one is trained on this project's frozen encoder and codebooks.

Streaming is exact, not approximate: each convolution keeps the last inputs
its kernel needs (a transposed one keeps the tail of its output that the next
block overlaps), and offline coding *is* the streaming loop run over fixed
blocks of frames. So streamed and offline coding run the same arithmetic on
the same shapes and give the same codes and samples.

The codebooks are ``vector_quantize_pytorch``'s: EMA updates with k-means
initialisation and restart of dead codes from the batch, statistics
synchronised across DDP ranks. Quantizer dropout, so one model serves every
bitrate, is drawn here and not by its ``ResidualVQ``: that one draws a layer
index uniformly and rounds it up to a multiple of the smallest bitrate's
count, which gives the smallest bitrate 1 step in 22 (3 codebooks of 24) and
every other 3 in 22. Here each clip draws its bitrate uniformly from those
the model serves (EnCodec's structured dropout, per clip), every codebook
sees every clip's residual, and so all ranks run the same collectives with
no seed to agree on.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, replace

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["CodecConfig", "SEANetCodec", "StreamingState", "grow_state"]


@dataclass
class CodecConfig:
    sample_rate: int = 16000
    channels: int = 16
    #: downsampling factors, first to last (their product is the hop)
    ratios: tuple[int, ...] = (2, 4, 5, 8)
    #: latent width, the quantizer's input
    dim: int = 128
    residual_layers: int = 1
    max_channels: int = 256
    codebook_size: int = 1024
    #: 24 quantizers at 50 frames/s and 10 bits: 12 kbps; bitrates below use the first ones
    num_quantizers: int = 24
    #: quantizer dropout keeps a multiple of this many (3 = 1.5 kbps at 50 frames/s)
    dropout_multiple: int = 3
    ema_decay: float = 0.99
    #: a code whose EMA count of uses per step falls below this is restarted from the batch; a step
    #: here has ~400 frames for 1024 codes (0.4 uses per code on average), so 2 (EnCodec's value at
    #: ~5000 frames a step) would restart nearly every code on every step
    dead_code_threshold: float = 0.02
    commitment_weight: float = 1.0
    #: frames per block of the streaming loop (offline coding runs the same blocks)
    block_frames: int = 50
    #: "seanet": transposed convolutions back to samples; "istft": ConvNeXt blocks that predict
    #: short-time spectra, inverted by an inverse FFT and overlap-add (Vocos; Siuzdak 2023)
    decoder: str = "seanet"
    #: width and depth of the istft decoder's ConvNeXt blocks
    decoder_channels: int = 384
    decoder_layers: int = 6
    #: spectra per latent frame in the istft decoder (its hop is hop / this, its window 4 hops)
    decoder_upsample: int = 2

    def __post_init__(self):
        if self.decoder not in ("seanet", "istft"):
            raise ValueError(f"decoder must be 'seanet' or 'istft', not {self.decoder!r}")
        if self.decoder == "istft" and (self.decoder_upsample < 1 or self.hop % self.decoder_upsample):
            raise ValueError(f"decoder_upsample must divide the hop ({self.hop}), got {self.decoder_upsample}")

    @property
    def hop(self) -> int:
        return math.prod(self.ratios)

    @property
    def stft_hop(self) -> int:
        return self.hop // self.decoder_upsample

    @property
    def decoder_lag(self) -> int:
        """Samples by which the decoder's output trails its codes: the istft decoder's overlap-add
        completes a sample only once the 3 spectra after it are in."""
        return 0 if self.decoder == "seanet" else 3 * self.stft_hop

    def frames_for(self, samples: int) -> int:
        """Frames that code ``samples`` samples: whole frames, and enough to complete the decoder's output."""
        return -(-(samples + self.decoder_lag) // self.hop) if samples > 0 else 0

    @property
    def frame_rate(self) -> float:
        return self.sample_rate / self.hop

    @property
    def bits_per_code(self) -> int:
        return int(math.log2(self.codebook_size))

    @property
    def bitrates(self) -> tuple[float, ...]:
        """The bitrates quantizer dropout trained (kbps before entropy coding): multiples of the smallest."""
        return tuple(q * self.frame_rate * self.bits_per_code / 1000
                     for q in range(self.dropout_multiple, self.num_quantizers + 1, self.dropout_multiple))

    def quantizers_for(self, kbps: float) -> int:
        """How many quantizers give ``kbps`` (before entropy coding)."""
        n = kbps * 1000 / (self.frame_rate * self.bits_per_code)
        if abs(n - round(n)) > 1e-6 or round(n) % self.dropout_multiple or not 1 <= round(n) <= self.num_quantizers:
            rates = ", ".join(f"{r:g}" for r in self.bitrates)
            raise ValueError(f"{kbps:g} kbps is not a bitrate of this model (it has {rates} kbps)")
        return int(round(n))

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_dict(cls, d: dict) -> CodecConfig:
        d = dict(d)
        d.pop("bitrates", None)
        if "ratios" in d:
            d["ratios"] = tuple(d["ratios"])
        return cls(**d)


# --------------------------------------------------------------------------- streaming convolutions
StreamingState = dict  # module -> its carried tensor, one per stream


class CausalConv1d(nn.Conv1d):
    """A convolution padded on the left by what its kernel reaches back, so output t sees inputs <= t.

    ``step(x, state)`` continues from the inputs kept in ``state`` (zeros at
    the start, which is what the offline left padding is).
    """

    @property
    def context(self) -> int:
        return (self.kernel_size[0] - 1) * self.dilation[0] + 1 - self.stride[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.pad(x, (self.context, 0)))

    def step(self, x: torch.Tensor, state: StreamingState) -> torch.Tensor:
        prev = state.get(self)
        if prev is None:
            prev = x.new_zeros(x.shape[0], x.shape[1], self.context)
        x = torch.cat([prev, x], dim=-1)
        state[self] = x[..., x.shape[-1] - self.context:]
        return super().forward(x)


class CausalConvTranspose1d(nn.ConvTranspose1d):
    """A transposed convolution whose output is cut to ``stride`` samples per input, the overlap carried.

    Offline, the ``kernel - stride`` samples that spill past the end are
    dropped; streaming, they are added to the start of the next block's
    output (overlap-add), with the bias added once per sample.
    """

    @property
    def overlap(self) -> int:
        return self.kernel_size[0] - self.stride[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        return y[..., : y.shape[-1] - self.overlap]

    def step(self, x: torch.Tensor, state: StreamingState) -> torch.Tensor:
        y = F.conv_transpose1d(x, self.weight, None, self.stride)
        prev = state.get(self)
        if prev is not None:
            y = torch.cat([y[..., : self.overlap] + prev, y[..., self.overlap:]], dim=-1)
        n = y.shape[-1] - self.overlap
        state[self] = y[..., n:]
        return y[..., :n] + self.bias[:, None]


def _step(module: nn.Module, x: torch.Tensor, state: StreamingState) -> torch.Tensor:
    return module.step(x, state) if hasattr(module, "step") else module(x)


class Sequential(nn.Sequential):
    def step(self, x: torch.Tensor, state: StreamingState) -> torch.Tensor:
        for m in self:
            x = _step(m, x, state)
        return x


class ResidualUnit(nn.Module):
    """ELU, a dilated kernel-3 convolution to half the channels, ELU, a 1x1 back: added to the input."""

    def __init__(self, ch: int, dilation: int):
        super().__init__()
        self.block = Sequential(nn.ELU(), CausalConv1d(ch, ch // 2, 3, dilation=dilation), nn.ELU(),
                                CausalConv1d(ch // 2, ch, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)

    def step(self, x: torch.Tensor, state: StreamingState) -> torch.Tensor:
        return x + self.block.step(x, state)


def _wn(m: nn.Module) -> nn.Module:
    # weight normalisation, as SEANet's convolutions have; folded away for inference (InferenceCodec)
    return nn.utils.parametrizations.weight_norm(m)


def encoder(cfg: CodecConfig) -> Sequential:
    ch = cfg.channels
    layers: list[nn.Module] = [_wn(CausalConv1d(1, ch, 7))]
    for r in cfg.ratios:
        out = min(2 * ch, cfg.max_channels)
        layers += [ResidualUnit(ch, 3 ** i) for i in range(cfg.residual_layers)]
        layers += [nn.ELU(), _wn(CausalConv1d(ch, out, 2 * r, stride=r))]
        ch = out
    layers += [nn.ELU(), _wn(CausalConv1d(ch, cfg.dim, 3))]
    return Sequential(*layers)


def conv_parts(cfg: CodecConfig) -> tuple[str, ...]:
    """The parts made of SEANet convolutions (weight norm, residual units): the decoder only if it is SEANet's."""
    return ("encoder", "decoder") if cfg.decoder == "seanet" else ("encoder",)


def nearest_code(residual: torch.Tensor, embed: torch.Tensor) -> torch.Tensor:
    """Index of the nearest codeword of ``embed [K, D]`` for each vector of ``residual [..., D]``."""
    return (embed.pow(2).sum(-1) - 2 * residual @ embed.t()).argmin(-1)


def decoder(cfg: CodecConfig) -> nn.Module:
    return seanet_decoder(cfg) if cfg.decoder == "seanet" else ISTFTDecoder(cfg)


def seanet_decoder(cfg: CodecConfig) -> Sequential:
    chans = [cfg.channels]
    for _ in cfg.ratios:
        chans.append(min(2 * chans[-1], cfg.max_channels))
    ch = chans[-1]
    layers: list[nn.Module] = [_wn(CausalConv1d(cfg.dim, ch, 7))]
    for r, out in zip(reversed(cfg.ratios), reversed(chans[:-1]), strict=True):
        layers += [nn.ELU(), _wn(CausalConvTranspose1d(ch, out, 2 * r, stride=r))]
        layers += [ResidualUnit(out, 3 ** i) for i in range(cfg.residual_layers)]
        ch = out
    layers += [nn.ELU(), _wn(CausalConv1d(ch, 1, 7))]
    return Sequential(*layers)


class ConvNeXtBlock(nn.Module):
    """Vocos's backbone block made causal: a depthwise kernel-7 convolution over this and past frames,
    LayerNorm, a 3x-wide GELU MLP and a per-channel scale, added to the input."""

    def __init__(self, ch: int, layer_scale: float):
        super().__init__()
        self.dw = CausalConv1d(ch, ch, 7, groups=ch)
        self.norm = nn.LayerNorm(ch)
        self.up, self.down = nn.Linear(ch, 3 * ch), nn.Linear(3 * ch, ch)
        self.scale = nn.Parameter(torch.full((ch,), layer_scale))

    def _mlp(self, h: torch.Tensor) -> torch.Tensor:
        h = self.down(F.gelu(self.up(self.norm(h.transpose(1, 2)))))
        return (self.scale * h).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self._mlp(self.dw(x))

    def step(self, x: torch.Tensor, state: StreamingState) -> torch.Tensor:
        return x + self._mlp(self.dw.step(x, state))


class ISTFTDecoder(nn.Module):
    """Latent frames to samples through predicted spectra (Vocos; Siuzdak 2023), made causal.

    Each latent frame becomes ``decoder_upsample`` spectra (one 1x1 convolution,
    interleaved); causal ConvNeXt blocks refine them; a linear head gives each
    spectrum's log magnitude and phase. An inverse real FFT, a Hann window and
    overlap-add at ``stft_hop`` make the waveform. The network works at the
    frame rate, not the sample rate, so it costs a fraction of a transposed-
    convolution decoder, and a spectrum is an easier target than raw samples.

    Causality: a spectrum's window ends at or before the end of its latent
    frame's input, so it never depicts audio the encoder has not heard. A sample is whole
    once the 3 spectra after it are added, so the output lags its codes by 3
    hops (:attr:`CodecConfig.decoder_lag`), and a stream's end is padded with
    silence to complete the last samples (:meth:`CodecConfig.frames_for`). Offline,
    the output is the overlap-add shifted left by those 3 hops; streaming
    carries the incomplete tail from block to block and drops the first 3
    hops, which gives the same samples.
    """

    def __init__(self, cfg: CodecConfig):
        super().__init__()
        ch, self.up_factor = cfg.decoder_channels, cfg.decoder_upsample
        self.hop, self.n_fft = cfg.stft_hop, 4 * cfg.stft_hop
        self.conv_in = CausalConv1d(cfg.dim, ch, 7)
        self.upsample = nn.Conv1d(ch, ch * self.up_factor, 1)
        self.blocks = nn.ModuleList(ConvNeXtBlock(ch, 1.0 / cfg.decoder_layers) for _ in range(cfg.decoder_layers))
        self.norm = nn.LayerNorm(ch)
        self.head = nn.Linear(ch, 2 * (self.n_fft // 2 + 1))
        self.register_buffer("window", torch.hann_window(self.n_fft), persistent=False)

    def _interleave(self, h: torch.Tensor) -> torch.Tensor:
        b, _, t = h.shape
        h = self.upsample(h).view(b, self.up_factor, -1, t)  # [b, j, c, t] -> spectrum t * up + j
        return h.permute(0, 2, 3, 1).reshape(b, -1, t * self.up_factor)

    def _overlap_add(self, h: torch.Tensor) -> torch.Tensor:
        """Spectra features ``[b, ch, n]`` to the overlap-add of their windowed frames, ``(n + 3) * hop`` long."""
        logmag, phase = self.head(self.norm(h.transpose(1, 2))).chunk(2, dim=-1)
        # exp caps at e^4.6 = 100, Vocos's clip: a loud start cannot overflow
        spec = torch.polar(logmag.clamp(max=4.6).exp(), phase)
        frames = torch.fft.irfft(spec, n=self.n_fft) * self.window  # [b, n, n_fft]
        n = frames.shape[1]
        return F.fold(frames.transpose(1, 2), output_size=(1, (n + 3) * self.hop), kernel_size=(1, self.n_fft),
                      stride=(1, self.hop)).view(frames.shape[0], 1, -1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self._interleave(self.conv_in(z))
        for block in self.blocks:
            h = block(h)
        return self._overlap_add(h)[..., 3 * self.hop:]

    def step(self, z: torch.Tensor, state: StreamingState) -> torch.Tensor:
        h = self._interleave(self.conv_in.step(z, state))
        for block in self.blocks:
            h = block.step(h, state)
        y = self._overlap_add(h)
        tail = state.get(self)
        if tail is not None:
            y = torch.cat([y[..., : tail.shape[-1]] + tail, y[..., tail.shape[-1]:]], dim=-1)
        n = y.shape[-1] - 3 * self.hop
        state[self] = y[..., n:]
        drop = state.get((self, "drop"), 3 * self.hop)  # the first 3 hops lie before the signal's start
        out = y[..., min(drop, n):n]
        state[(self, "drop")] = max(0, drop - n)
        return out

    def finish(self, state: StreamingState) -> torch.Tensor:
        """The samples still held at the end of a stream (the last 3 hops, as offline decoding gives them)."""
        tail = state.pop(self, None)
        if tail is None:
            return torch.zeros(1, 1, 0)
        return tail[..., state.pop((self, "drop"), 0):]


# --------------------------------------------------------------------------- the codec network
class SEANetCodec(nn.Module):
    def __init__(self, cfg: CodecConfig):
        super().__init__()
        from vector_quantize_pytorch import ResidualVQ

        self.cfg = cfg
        self.encoder = encoder(cfg)
        self.decoder = decoder(cfg)
        self.quantizer = ResidualVQ(
            dim=cfg.dim, num_quantizers=cfg.num_quantizers, codebook_size=cfg.codebook_size,
            decay=cfg.ema_decay, kmeans_init=True, kmeans_iters=10,
            threshold_ema_dead_code=cfg.dead_code_threshold, commitment_weight=cfg.commitment_weight,
        )

    #: train the decoder alone: the encoder and codebooks stay as they are (so do the codes, and the
    #: priors measured on them), and quantizer dropout is drawn here instead of by the quantizer
    frozen_encoder: bool = False

    def freeze_encoder(self) -> None:
        self.frozen_encoder = True
        self.encoder.requires_grad_(False)
        self.quantizer.requires_grad_(False)

    # training ----------------------------------------------------------------
    def draw_quantizers(self, clips: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """Quantizer dropout: how many codebooks each clip keeps, uniform over the model's bitrates."""
        levels = self.cfg.num_quantizers // self.cfg.dropout_multiple
        return torch.randint(1, levels + 1, (clips,), device=device) * self.cfg.dropout_multiple

    def forward(self, wav: torch.Tensor, keep: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``wav [B, 1, T]`` (T a multiple of the hop) -> (reconstruction, codes [B, frames, q], commit loss).

        Clip ``b`` is decoded from its first ``keep[b]`` codebooks (drawn by :meth:`draw_quantizers`
        when not given).
        """
        if keep is None:
            keep = self.draw_quantizers(wav.shape[0], wav.device)
        if self.frozen_encoder:
            q, codes = self.frozen_latent(wav, keep)
            return self.decoder(q), codes, wav.new_zeros(())
        residual = self.encoder(wav).transpose(1, 2)
        out, codes, commit = torch.zeros_like(residual), [], wav.new_zeros(())
        for i, layer in enumerate(self.quantizer.layers):
            # every codebook quantizes (and learns from) every clip's residual; a dropped one only
            # leaves that clip's reconstruction
            quantized, idx, loss = layer(residual)
            out = out + quantized * (i < keep).to(out.dtype)[:, None, None]
            residual = residual - quantized.detach()
            codes.append(idx)
            commit = commit + loss.sum()
        return self.decoder(out.transpose(1, 2)), torch.stack(codes, dim=-1), commit

    @torch.no_grad()
    def frozen_latent(self, wav: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The quantized latent ``[B, dim, frames]`` with the first ``keep[b]`` codebooks for clip ``b``, as
        :class:`InferenceCodec` quantizes (nearest codeword of each residual), and the codes."""
        residual = self.encoder(wav).transpose(1, 2)
        out, codes = torch.zeros_like(residual), []
        for i, layer in enumerate(self.quantizer.layers):
            embed = layer._codebook.embed[0]
            idx = nearest_code(residual, embed)
            out += embed[idx] * (i < keep).to(out.dtype)[:, None, None]
            residual = residual - embed[idx]
            codes.append(idx)
        return out.transpose(1, 2), torch.stack(codes, dim=-1)

    @torch.no_grad()
    def load_inference_state(self, state: dict[str, torch.Tensor], uses_per_step: float = 0.4,
                             source: CodecConfig | None = None) -> None:
        """Start from an exported model: the folded weights go back through weight norm's inverse and the
        codebooks become the quantizer's, marked initialised (no k-means) with a neutral usage count.

        ``source``, the exported model's config, may have fewer residual units per block than this
        one: the model then grows. Its units keep their weights and each new unit starts as the
        identity (its output convolution at zero), so training resumes from the same function.
        """
        switching = source is not None and source.decoder != self.cfg.decoder
        if switching:
            # another kind of decoder: the encoder and codebooks carry over, the decoder starts afresh
            state = {k: v for k, v in state.items() if not k.startswith("decoder.")}
            source = replace(source, decoder=self.cfg.decoder, decoder_channels=self.cfg.decoder_channels,
                             decoder_layers=self.cfg.decoder_layers, decoder_upsample=self.cfg.decoder_upsample)
        growing = source is not None and source != self.cfg
        if growing:
            # without a decoder in the state, only the encoder's layers are renamed
            only_encoder = {"decoder": "istft"} if switching else {}
            state = grow_state(state, replace(source, **only_encoder), replace(self.cfg, **only_encoder))
        if switching:
            state.update({k: v.detach().clone() for k, v in self._conv_weights().items() if k.startswith("decoder.")})
        expected = {k: v.shape for k, v in self._conv_weights().items()}
        expected.update({f"codebook.{i}": (self.cfg.codebook_size, self.cfg.dim)
                         for i in range(self.cfg.num_quantizers)})
        new_units = set()
        if growing:
            new_units = {f"{part}.{name}" for part in conv_parts(self.cfg)
                         for name, m in getattr(self, part).named_modules()
                         if isinstance(m, ResidualUnit) and f"{part}.{name}.block.1.weight" not in state}
        missing = [k for k in expected if k not in state and k.rsplit(".", 3)[0] not in new_units]
        wrong = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k])]
        extra = [k for k in state if k not in expected and k != "priors"]
        if missing or wrong or extra:
            raise ValueError(f"the state does not fit this model: missing {missing[:3]}, wrong shape {wrong[:3]}, "
                             f"unknown {extra[:3]}")
        for part in conv_parts(self.cfg):
            for name, m in getattr(self, part).named_modules():
                if f"{part}.{name}" in new_units:
                    # a new unit adds 0; its convolutions carry no weight norm, so zeroing the weight is exact
                    assert not nn.utils.parametrize.is_parametrized(m.block[3], "weight")
                    m.block[3].weight.zero_()
                    m.block[3].bias.zero_()
                elif isinstance(m, nn.Conv1d | nn.ConvTranspose1d) and f"{part}.{name}.weight" in state:
                    w = state[f"{part}.{name}.weight"].float()
                    if nn.utils.parametrize.is_parametrized(m, "weight"):
                        m.weight = w  # weight norm's right inverse sets its g and v
                    else:
                        m.weight.copy_(w)
                    m.bias.copy_(state[f"{part}.{name}.bias"].float())
        if self.cfg.decoder == "istft":
            self.decoder.load_state_dict({k[len("decoder."):]: v.float() for k, v in state.items()
                                          if k.startswith("decoder.")})
        for i, layer in enumerate(self.quantizer.layers):
            book = layer._codebook
            book.embed[0].copy_(state[f"codebook.{i}"].float())
            book.cluster_size.fill_(uses_per_step)
            book.embed_avg.copy_(book.embed * uses_per_step)
            book.initted.fill_(True)

    def _conv_weights(self) -> dict[str, torch.Tensor]:
        """Every weight of encoder and decoder (a weight-normed convolution's as one folded tensor)."""
        out = {}
        if self.cfg.decoder == "istft":  # no weight norm there: its own state is what ships
            out.update({f"decoder.{k}": v for k, v in self.decoder.state_dict().items()})
        for part in conv_parts(self.cfg):
            for name, m in getattr(self, part).named_modules():
                if isinstance(m, nn.Conv1d | nn.ConvTranspose1d):
                    out[f"{part}.{name}.weight"], out[f"{part}.{name}.bias"] = m.weight, m.bias
        return out

    @torch.no_grad()
    def inference_state(self) -> dict[str, torch.Tensor]:
        """Encoder and decoder weights with weight norm folded in, and each quantizer's codebook."""
        state = {k: v.detach().float().cpu().clone() for k, v in self._conv_weights().items()}
        for i, layer in enumerate(self.quantizer.layers):
            state[f"codebook.{i}"] = layer._codebook.embed[0].detach().float().cpu().clone()
        return state


def _layout(cfg: CodecConfig, part: str) -> list[str]:
    with torch.device("meta"):  # the layer kinds only: no memory, no draws from the random generator
        seq = encoder(cfg) if part == "encoder" else decoder(cfg)
    return [f"res{m.block[1].dilation[0]}" if isinstance(m, ResidualUnit) else type(m).__name__ for m in seq]


def grow_state(state: dict[str, torch.Tensor], source: CodecConfig, target: CodecConfig) -> dict[str, torch.Tensor]:
    """Rename an exported state of ``source`` to the layer indices of ``target``, a model that differs
    only by more residual units per block: each old layer maps to the next matching one of the new
    layout, and the new units are left out of the result."""
    if replace(source, residual_layers=target.residual_layers) != target:
        raise ValueError("a model grows only by residual units per block; the other settings must match")
    if target.residual_layers < source.residual_layers:
        raise ValueError(f"a model grows but does not shrink: it has {source.residual_layers} residual units "
                         f"per block, not fewer ({target.residual_layers})")
    out = {k: v for k, v in state.items() if k.startswith("codebook.")}
    if target.decoder != "seanet":  # residual units live in the encoder alone: the decoder keeps its names
        out.update({k: v for k, v in state.items() if k.startswith("decoder.")})
    for part in conv_parts(target):
        old, new = _layout(source, part), _layout(target, part)
        rename, j = {}, 0
        for i, kind in enumerate(new):
            if j < len(old) and old[j] == kind:
                rename[str(j)] = str(i)
                j += 1
        for k, v in state.items():
            if k.startswith(part + "."):
                idx, rest = k[len(part) + 1:].split(".", 1)
                out[f"{part}.{rename[idx]}.{rest}"] = v
    return out


class InferenceCodec(nn.Module):
    """The parts that run after training: plain convolutions (weight norm folded) and the codebooks."""

    def __init__(self, cfg: CodecConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = encoder(cfg)
        self.decoder = decoder(cfg)
        for m in self.modules():
            if nn.utils.parametrize.is_parametrized(m, "weight"):
                nn.utils.parametrize.remove_parametrizations(m, "weight")
        self.register_buffer("codebooks", torch.zeros(cfg.num_quantizers, cfg.codebook_size, cfg.dim))

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        enc = {k[len("encoder."):]: v.float() for k, v in state.items() if k.startswith("encoder.")}
        dec = {k[len("decoder."):]: v.float() for k, v in state.items() if k.startswith("decoder.")}
        self.encoder.load_state_dict(enc)
        self.decoder.load_state_dict(dec)
        books = [state[f"codebook.{i}"].float() for i in range(self.cfg.num_quantizers)]
        self.codebooks.copy_(torch.stack(books))

    @torch.no_grad()
    def quantize(self, z: torch.Tensor, n_q: int) -> torch.Tensor:
        residual = z.transpose(1, 2)
        codes = []
        for embed in self.codebooks[:n_q]:
            idx = nearest_code(residual, embed)
            codes.append(idx)
            residual = residual - embed[idx]
        return torch.stack(codes, dim=1)

    @torch.no_grad()
    def dequantize(self, codes: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(codes.shape[0], codes.shape[2], self.cfg.dim)
        for i in range(codes.shape[1]):
            out += self.codebooks[i][codes[:, i]]
        return out.transpose(1, 2)
