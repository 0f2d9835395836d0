"""Losses for fine-tuning: Dice + cross-entropy for segmentation (nnU-Net / MONAI DiceCE)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def soft_dice_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    include_background: bool = False,
    smooth: float = 1e-5,
) -> torch.Tensor:
    """1 - mean soft Dice over classes (and batch), computed on softmax probabilities.

    Args:
        logits: (B, K, d, h, w).
        target: (B, 1, d, h, w) or (B, d, h, w) integer labels in [0, K).
        include_background: Count class 0 in the mean.
        smooth: Added to numerator and denominator (MONAI's smooth_nr = smooth_dr).
    """
    K = logits.shape[1]
    target = target.reshape(logits.shape[0], *logits.shape[2:]).long()
    probs = logits.float().softmax(dim=1)
    onehot = (
        F.one_hot(target, K).movedim(-1, 1).to(probs.dtype)
    )  # (B, d, h, w, K) -> (B, K, d, h, w)
    if not include_background:
        probs, onehot = probs[:, 1:], onehot[:, 1:]
    dims = tuple(range(2, probs.ndim))
    inter = (probs * onehot).sum(dims)
    denom = probs.sum(dims) + onehot.sum(dims)
    dice = (2 * inter + smooth) / (denom + smooth)  # (B, K')
    return 1.0 - dice.mean()


def dice_ce_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    include_background: bool = False,
    dice_weight: float = 1.0,
    ce_weight: float = 1.0,
) -> torch.Tensor:
    """Soft Dice + cross-entropy, in float32 whatever the autocast precision."""
    target = target.reshape(logits.shape[0], *logits.shape[2:]).long()
    ce = F.cross_entropy(logits.float(), target)
    return dice_weight * soft_dice_loss(logits, target, include_background) + ce_weight * ce
