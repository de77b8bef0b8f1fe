"""SAM's training loss: mask cross-entropy plus dice for the best of its masks, and the IoU head's error."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["mask_loss"]


def _bce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits, target, reduction="none").flatten(-2).mean(-1)


def _dice(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    p = torch.sigmoid(logits).flatten(-2)
    t = target.flatten(-2)
    return 1 - (2 * (p * t).sum(-1) + 1) / (p.sum(-1) + t.sum(-1) + 1)


def mask_loss(logits: torch.Tensor, iou_pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """SAM's loss for (B, P, K, h, w) mask logits against (B, P, H, W) boolean masks.

    The logits are upsampled to the input size; of a prompt's K masks only the
    best counts (one point is ambiguous, so any of its three may be right), and
    the predicted IoU of every mask is fitted to its real IoU by squared error.
    """
    b, p, k, h, w = logits.shape
    size = target.shape[-1]
    up = F.interpolate(logits.reshape(b * p, k, h, w).float(), size=(size, size), mode="bilinear",
                       align_corners=False).reshape(b, p, k, size, size)
    tgt = target[:, :, None].float().expand_as(up)
    # SAM weights a focal loss 20:1 against dice. From random initialisation that
    # drives every mask to background for hundreds of steps before the decoder
    # starts to read the prompt (measured on a batch it should overfit); plain
    # cross-entropy plus dice leaves that regime several times sooner.
    per = _bce(up, tgt) + _dice(up, tgt)  # (B, P, K)
    best = per.min(dim=2).values
    with torch.no_grad():
        pred = up > 0
        inter = (pred & target[:, :, None]).flatten(-2).sum(-1).float()
        union = (pred | target[:, :, None]).flatten(-2).sum(-1).float().clamp(min=1)
        iou = inter / union
    return best.mean() + F.mse_loss(iou_pred.float(), iou)
