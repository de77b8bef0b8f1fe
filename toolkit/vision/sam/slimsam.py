"""SlimSAM: alternate slimming of a SAM image encoder, with disturbed Taylor importance.

SlimSAM (Chen et al., 2024) compresses SAM's ViT encoder with very little data
by pruning and distilling one decoupled sub-structure at a time, instead of
pruning everything at once and distilling the wreck:

1. **Embedding.** The residual width (the channels every block reads and writes,
   with the patch embedding, the position embedding, the layer norms and the
   neck's input) is pruned to ``hidden``. The pruned encoder is then distilled:
   its embeddings are matched to the teacher's, and each block's output to the
   teacher's block output at the kept channels (the kept channels are a subset
   of the teacher's, so the two are directly comparable).
2. **Bottleneck.** The attention width (query/key channels with their
   relative-position tables, value channels with the output projection) and the
   MLP's inner width are pruned, and distilled the same way.

Importance is first-order Taylor, ``|w * dL/dw|`` summed over every weight a
channel owns. With no labels the only loss is the distance to the teacher's
embeddings, which is exactly zero for the unpruned model, so its gradient is
zero too; SlimSAM's *disturbed* Taylor score takes the gradient of the distance
to the teacher's embeddings plus Gaussian noise instead, which is nonzero and
ranks channels by how much they move the embedding.

The pruning is uniform: every block keeps the same widths, so the result is a
plain ``SamModel`` whose ``SamVisionConfig`` has a smaller ``hidden_size`` and
``mlp_dim``, saved and loaded by ``save_pretrained`` / ``from_pretrained`` as
they are. In that class the attention width equals ``hidden_size`` (with the
teacher's head count), so the bottleneck step prunes each head's query/key and
value channels to ``hidden / heads``.

Structured pruning here is written against this one architecture rather than
through a graph-tracing pruning library: its channel groups are few and known,
and a tracer would need custom rules for the relative-position tables (shared
by the heads of a block) and the 4-D position embedding anyway.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from toolkit.config import Config, check
from toolkit.data.segments import SegImage
from toolkit.errors import ConfigError
from toolkit.progress import Progress, reporter
from toolkit.schedule import lr_at
from toolkit.vision.sam.model import check_images, to_pixels

__all__ = ["SlimConfig", "slim", "importance", "widths_for", "encoder_params", "taylor_scores"]


@dataclass(frozen=True)
class SlimConfig(Config):
    """``ratio``: the share of the teacher encoder's parameters to keep, in (0, 1).

    ``steps``: distillation steps after each pruning step; ``noise``: the
    disturbance, as a multiple of the teacher embeddings' standard deviation;
    ``align``: the weight of the per-block alignment at the start of a
    distillation stage (it decays linearly to zero, leaving the embedding loss,
    which is what the mask decoder reads).
    """

    ratio: float = 0.5
    steps: int = 300
    batch: int = 16
    lr: float = 3e-4
    noise: float = 0.1
    align: float = 1.0
    score_batches: int = 8
    flip: bool = True
    seed: int = 0
    threads: int | None = None

    def __post_init__(self) -> None:
        check(0 < self.ratio < 1, f"ratio must lie strictly between 0 and 1, got {self.ratio!r}")
        check(self.steps >= 0 and self.batch >= 1 and self.score_batches >= 1,
              "steps must be >= 0, batch and score_batches >= 1")
        check(0 < self.lr < math.inf, f"lr must be a positive learning rate, got {self.lr!r}")
        for name in ("noise", "align"):
            value = getattr(self, name)
            check(0 <= value < math.inf, f"{name} must be a finite number >= 0, got {value!r}")
        check(self.threads is None or self.threads >= 0,
              f"threads must be >= 0 (0 or None: torch's), got {self.threads!r}")


# ---------------------------------------------------------------------------
# sizes


def encoder_params(hidden: int, mlp: int, layers: int, patch: int, grid: int, channels: int,
                   qkv_bias: bool = True) -> int:
    """Parameters of a ``SamVisionEncoder`` with these widths, leaving out the relative-position tables."""
    n = 3 * patch * patch * hidden + hidden + grid * grid * hidden  # patch embedding, position embedding
    per_block = (4 * hidden  # two layer norms
                 + 3 * hidden * hidden + (3 * hidden if qkv_bias else 0) + hidden * hidden + hidden  # attention
                 + 2 * hidden * mlp + mlp + hidden)  # MLP
    return n + layers * per_block + hidden * channels + 9 * channels * channels + 4 * channels  # + neck


def _rel_params(vc, hidden: int) -> int:
    grid = vc.image_size // vc.patch_size
    head_dim = hidden // vc.num_attention_heads
    total = 0
    for i in range(vc.num_hidden_layers):
        side = grid if i in vc.global_attn_indexes else vc.window_size
        total += 2 * (2 * side - 1) * head_dim
    return total if vc.use_rel_pos else 0


def _count(vc, hidden: int, mlp: int) -> int:
    grid = vc.image_size // vc.patch_size
    return encoder_params(hidden, mlp, vc.num_hidden_layers, vc.patch_size, grid, vc.output_channels,
                          vc.qkv_bias) + _rel_params(vc, hidden)


def widths_for(vision_config, ratio: float) -> tuple[int, int]:
    """``(hidden, mlp_dim)`` keeping about ``ratio`` of the encoder's parameters.

    Both widths shrink by the same factor (the hidden width a multiple of the head
    count), and ``mlp_dim`` then takes up the rounding so the count lands close.
    """
    vc = vision_config
    full = _count(vc, vc.hidden_size, vc.mlp_dim)
    heads = vc.num_attention_heads
    best = None
    for hidden in range(heads, vc.hidden_size + 1, heads):
        k = hidden / vc.hidden_size
        for mlp in range(max(1, int(k * vc.mlp_dim * 0.6)), min(vc.mlp_dim, int(k * vc.mlp_dim * 1.4) + 1) + 1):
            err = abs(_count(vc, hidden, mlp) - ratio * full)
            if best is None or err < best[0]:
                best = (err, hidden, mlp)
    if best is None or ratio * full < _count(vc, heads, 1):
        raise ConfigError(f"ratio {ratio} leaves no room: the neck alone is "
                         f"{_count(vc, heads, 1) / full:.1%} of the encoder")
    return best[1], best[2]


# ---------------------------------------------------------------------------
# features and losses


def _features(enc, pixels: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The encoder's image embeddings and every block's output."""
    h = enc.patch_embed(pixels)
    if enc.pos_embed is not None:
        h = h + enc.pos_embed
    feats = []
    for layer in enc.layers:
        h = layer(h)
        h = h[0] if isinstance(h, tuple) else h
        feats.append(h)
    return enc.neck(h), feats


class _Targets:
    """The teacher's embeddings and block outputs for a fixed set of images (and their mirror images)."""

    def __init__(self, teacher_enc, items: list[SegImage], flip: bool, batch: int = 16):
        pixels = to_pixels([it.image for it in items])
        if flip:
            pixels = torch.cat([pixels, pixels.flip(-1)])
        self.pixels = pixels
        embs, feats = [], []
        with torch.no_grad():
            for i in range(0, len(pixels), batch):
                e, f = _features(teacher_enc, pixels[i:i + batch])
                embs.append(e)  # float32: the importance gradient is the (small) disturbance alone
                feats.append(torch.stack(f, 1).to(torch.bfloat16))
        self.emb = torch.cat(embs)
        self.feats = torch.cat(feats)  # (N, L, g, g, hidden), bfloat16: only the alignment reads them
        self.emb_std = float(self.emb.float().std())

    def __len__(self) -> int:
        return len(self.pixels)


def _loss(enc, targets: _Targets, idx: torch.Tensor, kept: torch.Tensor, align: float,
          noise: float = 0.0, generator: torch.Generator | None = None) -> torch.Tensor:
    emb, feats = _features(enc, targets.pixels[idx])
    t_emb = targets.emb[idx].float()
    if noise:
        t_emb = t_emb + noise * targets.emb_std * torch.randn(t_emb.shape, generator=generator)
    loss = F.mse_loss(emb, t_emb) / targets.emb_std ** 2
    if align:
        t_feats = targets.feats[idx][..., kept].float()
        scale = t_feats.pow(2).mean(dim=(0, 2, 3, 4), keepdim=True).clamp(min=1e-6)  # per block
        s = torch.stack(feats, 1)
        loss = loss + align * ((s - t_feats).pow(2) / scale).mean()
    return loss


# ---------------------------------------------------------------------------
# importance


def taylor_scores(enc, targets: _Targets, kept: torch.Tensor, cfg: SlimConfig) -> dict[str, torch.Tensor]:
    """Disturbed first-order Taylor importance of every prunable channel group.

    Returns ``embed`` (hidden,), ``qk`` (layers, head_dim) summed over heads (the
    relative-position tables are shared by a block's heads), ``v`` (layers, heads,
    head_dim) and ``mlp`` (layers, mlp_dim).
    """
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    enc.zero_grad(set_to_none=True)
    rng = np.random.default_rng(cfg.seed + 2)
    for _ in range(cfg.score_batches):
        idx = torch.from_numpy(rng.choice(len(targets), min(cfg.batch, len(targets)), replace=False))
        _loss(enc, targets, idx, kept, align=0.0, noise=cfg.noise, generator=gen).backward()

    def t(p: nn.Parameter) -> torch.Tensor:
        return (p.detach() * p.grad).abs() if p.grad is not None else torch.zeros_like(p)

    embed = t(enc.patch_embed.projection.weight).flatten(1).sum(1) + t(enc.patch_embed.projection.bias)
    if enc.pos_embed is not None:
        embed = embed + t(enc.pos_embed).flatten(0, 2).sum(0)
    qk, v, mlp = [], [], []
    for layer in enc.layers:
        a = layer.attn
        heads = a.num_attention_heads
        inner = a.qkv.weight.shape[0] // 3
        d = inner // heads
        for ln in (layer.layer_norm1, layer.layer_norm2):
            embed = embed + t(ln.weight) + t(ln.bias)
        w = t(a.qkv.weight)
        b = t(a.qkv.bias) if a.qkv.bias is not None else torch.zeros(3 * inner)
        embed = embed + w.sum(0) + t(a.proj.weight).sum(1) + t(a.proj.bias)
        rows = w.sum(1) + b
        q, k, vv = rows[:inner].view(heads, d), rows[inner:2 * inner].view(heads, d), rows[2 * inner:].view(heads, d)
        proj_in = t(a.proj.weight).sum(0).view(heads, d)
        score_qk = (q + k).sum(0)
        if a.use_rel_pos:
            score_qk = score_qk + t(a.rel_pos_h).sum(0) + t(a.rel_pos_w).sum(0)
        qk.append(score_qk)
        v.append(vv + proj_in)
        m = layer.mlp
        embed = embed + t(m.lin1.weight).sum(0) + t(m.lin2.weight).sum(1) + t(m.lin2.bias)
        mlp.append(t(m.lin1.weight).sum(1) + t(m.lin1.bias) + t(m.lin2.weight).sum(0))
    embed = embed + t(enc.neck.conv1.weight).flatten(2).sum((0, 2))
    enc.zero_grad(set_to_none=True)
    return {"embed": embed, "qk": torch.stack(qk), "v": torch.stack(v), "mlp": torch.stack(mlp)}


def importance(model, config: SlimConfig, images: list[SegImage]) -> dict[str, torch.Tensor]:
    """The disturbed Taylor scores :func:`slim` starts from, for ``model``'s unpruned encoder on ``images``.

    Keys as in :func:`taylor_scores`; ``model`` is not changed.
    """
    if not isinstance(config, SlimConfig):
        raise ConfigError(f"config must be a SlimConfig, got {type(config).__name__}")
    check_images(model, images, "importance")
    enc = copy.deepcopy(model.vision_encoder).eval()
    for p in enc.parameters():
        p.requires_grad_(True)
    targets = _Targets(model.vision_encoder.eval(), images, config.flip)
    return taylor_scores(enc, targets, torch.arange(model.config.vision_config.hidden_size), config)


# ---------------------------------------------------------------------------
# surgery


def _take(p: torch.Tensor, dim: int, idx: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(p.detach().index_select(dim, idx).clone(), requires_grad=p.requires_grad)


def _linear(lin: nn.Linear, out_idx: torch.Tensor | None = None, in_idx: torch.Tensor | None = None) -> None:
    if out_idx is not None:
        lin.weight = _take(lin.weight, 0, out_idx)
        if lin.bias is not None:
            lin.bias = _take(lin.bias, 0, out_idx)
        lin.out_features = len(out_idx)
    if in_idx is not None:
        lin.weight = _take(lin.weight, 1, in_idx)
        lin.in_features = len(in_idx)


def _norm(ln: nn.LayerNorm, idx: torch.Tensor) -> None:
    ln.weight = _take(ln.weight, 0, idx)
    ln.bias = _take(ln.bias, 0, idx)
    ln.normalized_shape = (len(idx),)


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    return torch.sort(torch.topk(scores, k).indices).values


def prune_embedding(enc, idx: torch.Tensor) -> None:
    """Keep residual channels ``idx`` (sorted) everywhere the residual stream is read or written."""
    pe = enc.patch_embed.projection
    pe.weight = _take(pe.weight, 0, idx)
    pe.bias = _take(pe.bias, 0, idx)
    pe.out_channels = len(idx)
    if enc.pos_embed is not None:
        enc.pos_embed = _take(enc.pos_embed, 3, idx)
    for layer in enc.layers:
        _norm(layer.layer_norm1, idx)
        _norm(layer.layer_norm2, idx)
        _linear(layer.attn.qkv, in_idx=idx)
        _linear(layer.attn.proj, out_idx=idx)
        _linear(layer.mlp.lin1, in_idx=idx)
        _linear(layer.mlp.lin2, out_idx=idx)
    conv = enc.neck.conv1
    conv.weight = _take(conv.weight, 1, idx)
    conv.in_channels = len(idx)


def prune_bottleneck(enc, scores: dict, head_dim: int, mlp: int) -> None:
    """Keep ``head_dim`` query/key and value channels per head, and ``mlp`` MLP channels, per block.

    Query and key channels are pruned in pairs (a pair is one term of the dot
    product) and keep the same indices in every head, as the relative-position
    tables they index are shared by the heads. Queries are rescaled so the
    softmax temperature, ``head_dim ** -0.5``, stays what the trained weights
    expect.
    """
    for li, layer in enumerate(enc.layers):
        a = layer.attn
        heads = a.num_attention_heads
        inner = a.qkv.weight.shape[0] // 3
        d = inner // heads
        qk_idx = _top(scores["qk"][li], head_dim)
        v_idx = torch.stack([_top(scores["v"][li, h], head_dim) for h in range(heads)])
        base = torch.arange(heads)[:, None] * d
        q_rows = (base + qk_idx[None]).flatten()
        rows = torch.cat([q_rows, inner + q_rows, 2 * inner + (base + v_idx).flatten()])
        _linear(a.qkv, out_idx=rows)
        _linear(a.proj, in_idx=(base + v_idx).flatten())
        c = math.sqrt(head_dim / d)
        with torch.no_grad():
            a.qkv.weight[:heads * head_dim] *= c
            if a.qkv.bias is not None:
                a.qkv.bias[:heads * head_dim] *= c
        if a.use_rel_pos:
            a.rel_pos_h = _take(a.rel_pos_h, 1, qk_idx)
            a.rel_pos_w = _take(a.rel_pos_w, 1, qk_idx)
            with torch.no_grad():
                a.rel_pos_h /= c
                a.rel_pos_w /= c
        a.scale = head_dim ** -0.5
        m = layer.mlp
        keep = _top(scores["mlp"][li], mlp)
        _linear(m.lin1, out_idx=keep)
        _linear(m.lin2, in_idx=keep)


def _rebuild(model, hidden: int, mlp: int):
    """The pruned model as a plain ``SamModel`` of the smaller config, with the pruned weights."""
    from transformers import SamModel

    config = copy.deepcopy(model.config)
    config.vision_config.hidden_size = hidden
    config.vision_config.mlp_dim = mlp
    fresh = SamModel(config)
    missing, unexpected = fresh.load_state_dict(model.state_dict(), strict=False)
    if missing or unexpected:
        raise RuntimeError(f"pruned weights do not fit the smaller config: {missing or unexpected}")
    fresh.shared_image_embedding.positional_embedding.requires_grad_(False)
    return fresh.eval()


# ---------------------------------------------------------------------------
# distillation and the whole procedure


def _distill(enc, targets: _Targets, kept: torch.Tensor, cfg: SlimConfig, stage: int, log, report) -> None:
    params = [p for p in enc.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    rng = np.random.default_rng([cfg.seed, stage])
    enc.train()
    for step in range(cfg.steps):
        frac = step / max(1, cfg.steps)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, frac, lr=cfg.lr, warmup=0)
        idx = torch.from_numpy(rng.choice(len(targets), min(cfg.batch, len(targets)), replace=False))
        loss = _loss(enc, targets, idx, kept, align=cfg.align * (1 - frac))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if log is not None and (step % 10 == 0 or step == cfg.steps - 1):
            log({"stage": stage, "step": step, "loss": loss.item()})
        report((stage - 1) * cfg.steps + step + 1, 2 * cfg.steps)
    enc.eval()


def slim(model, config: SlimConfig, images: list[SegImage], log: Callable[[dict], None] | None = None,
         progress: Progress = False):
    """A SlimSAM-compressed copy of ``model`` (a ``SamModel``), distilled on ``images`` without labels.

    ``images`` are only looked at, never their masks. Returns a plain ``SamModel``;
    ``model`` is not changed. ``log`` receives ``{"stage", "step", "loss"}``
    every ten distillation steps; ``progress`` counts the steps of both stages.
    """
    if not isinstance(config, SlimConfig):
        raise ConfigError(f"config must be a SlimConfig, got {type(config).__name__}")
    check_images(model, images, "slim")
    vc = model.config.vision_config
    hidden, mlp = widths_for(vc, config.ratio)
    heads = vc.num_attention_heads
    report = reporter(progress, 2 * config.steps, "slim")
    threads = torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(config.threads)
    try:
        teacher_enc = model.vision_encoder.eval()
        targets = _Targets(teacher_enc, images, config.flip)
        student = copy.deepcopy(model).eval()
        for p in student.parameters():
            p.requires_grad_(False)
        enc = student.vision_encoder
        for p in enc.parameters():
            p.requires_grad_(True)
        all_channels = torch.arange(vc.hidden_size)
        # 1: embedding width, then distil with block alignment on the kept channels.
        scores = taylor_scores(enc, targets, all_channels, config)
        kept = _top(scores["embed"], hidden)
        prune_embedding(enc, kept)
        _distill(enc, targets, kept, config, 1, log, report)
        # 2: attention and MLP widths, rebuilt as the plain smaller config, then distil again.
        scores = taylor_scores(enc, targets, kept, config)
        prune_bottleneck(enc, scores, hidden // heads, mlp)
        student = _rebuild(student, hidden, mlp)
        for p in student.parameters():
            p.requires_grad_(False)
        for p in student.vision_encoder.parameters():
            p.requires_grad_(True)
        _distill(student.vision_encoder, targets, kept, config, 2, log, report)
        for p in student.parameters():
            p.requires_grad_(True)
        student.shared_image_embedding.positional_embedding.requires_grad_(False)
    finally:
        torch.set_num_threads(threads)
    student.config.slim = {"ratio": config.ratio, "hidden_size": hidden, "mlp_dim": mlp,
                           "images": len(images), "steps_per_stage": config.steps}
    return student.eval()
