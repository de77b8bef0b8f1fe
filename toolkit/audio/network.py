"""The codec network: an encoder and a decoder around a residual vector quantizer.

:class:`SEANetCodec` is what trains: the SEANet encoder (:mod:`toolkit.audio.seanet`),
``vector_quantize_pytorch``'s codebooks, and either decoder (SEANet's, or the
Vocos-style one of :mod:`toolkit.audio.istft`). :class:`InferenceCodec` is
what ships: the same convolutions with weight norm folded in, and the
codebooks as one tensor.

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

from dataclasses import replace

import torch
from torch import nn

from toolkit.audio.config import AudioNetConfig
from toolkit.audio.istft import ISTFTDecoder
from toolkit.audio.seanet import ResidualUnit, encoder, seanet_decoder

__all__ = ["InferenceCodec", "SEANetCodec", "conv_parts", "decoder", "grow_state", "nearest_code"]


def decoder(cfg: AudioNetConfig) -> nn.Module:
    return seanet_decoder(cfg) if cfg.decoder == "seanet" else ISTFTDecoder(cfg)


def conv_parts(cfg: AudioNetConfig) -> tuple[str, ...]:
    """The parts made of SEANet convolutions (weight norm, residual units): the decoder only if it is SEANet's."""
    return ("encoder", "decoder") if cfg.decoder == "seanet" else ("encoder",)


def nearest_code(residual: torch.Tensor, embed: torch.Tensor) -> torch.Tensor:
    """Index of the nearest codeword of ``embed [K, D]`` for each vector of ``residual [..., D]``."""
    return (embed.pow(2).sum(-1) - 2 * residual @ embed.t()).argmin(-1)


class SEANetCodec(nn.Module):
    def __init__(self, cfg: AudioNetConfig):
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
                             source: AudioNetConfig | None = None) -> None:
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


def _layout(cfg: AudioNetConfig, part: str) -> list[str]:
    with torch.device("meta"):  # the layer kinds only: no memory, no draws from the random generator
        seq = encoder(cfg) if part == "encoder" else decoder(cfg)
    return [f"res{m.block[1].dilation[0]}" if isinstance(m, ResidualUnit) else type(m).__name__ for m in seq]


def grow_state(state: dict[str, torch.Tensor], source: AudioNetConfig,
               target: AudioNetConfig) -> dict[str, torch.Tensor]:
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

    def __init__(self, cfg: AudioNetConfig):
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
