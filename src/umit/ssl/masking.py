"""Token masking for masked volume modeling: random and block-wise, always an exact ratio.

Both draw one score per token and keep the ``len_keep`` lowest scores, so every sample in a batch
masks exactly ``L - len_keep`` tokens (no ragged batches) and the kept indices can be fed to an
encoder's ``forward_features(x, keep_indices=...)``. Block-wise masking gives all tokens of one
``block³`` cube the same score (plus a tiny tie-breaker), so masked regions come in cubes, which
makes the pretext harder than scattered patches for smooth 3D anatomy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class Masking:
    """Result of one masking draw.

    Attributes:
        keep: (B, L_keep) int64 indices of visible tokens, sorted ascending.
        mask: (B, L) float, 1 for masked tokens, 0 for visible ones.
        restore: (B, L) int64 permutation that puts [visible, masked] tokens back in raster order.
    """

    keep: torch.Tensor
    mask: torch.Tensor
    restore: torch.Tensor


def num_keep(num_tokens: int, mask_ratio: float) -> int:
    """Visible tokens for a ratio (MAE's rule ``int(L * (1 - r))``, at least one)."""
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio!r}")
    return max(1, int(num_tokens * (1.0 - mask_ratio)))


def _from_scores(scores: torch.Tensor, len_keep: int) -> Masking:
    B, L = scores.shape
    order = torch.argsort(scores, dim=1)  # ascending: the first len_keep are kept
    restore = torch.argsort(order, dim=1)
    keep = torch.sort(order[:, :len_keep], dim=1).values
    mask = torch.ones(B, L, device=scores.device)
    mask.scatter_(1, keep, 0.0)
    # restore for the decoder's [visible (sorted), masked] layout
    masked = torch.sort(order[:, len_keep:], dim=1).values
    layout = torch.cat([keep, masked], dim=1)
    restore = torch.argsort(layout, dim=1)
    return Masking(keep=keep, mask=mask, restore=restore)


def random_masking(
    batch: int,
    num_tokens: int,
    mask_ratio: float,
    *,
    device=None,
    generator: torch.Generator | None = None,
) -> Masking:
    """Uniformly random masking of exactly ``num_tokens - num_keep`` tokens per sample."""
    scores = torch.rand(batch, num_tokens, device=device, generator=generator)
    return _from_scores(scores, num_keep(num_tokens, mask_ratio))


def block_masking(
    batch: int,
    grid: Sequence[int],
    mask_ratio: float,
    block: int | Sequence[int] = 2,
    *,
    device=None,
    generator: torch.Generator | None = None,
) -> Masking:
    """Masking in cubes of ``block`` tokens per axis over a (d, h, w) token grid."""
    block = (block,) * 3 if isinstance(block, int) else tuple(block)
    if len(block) != 3 or min(block) < 1:
        raise ValueError(f"block must be a positive int or 3 positive ints, got {block!r}")
    d, h, w = (int(g) for g in grid)
    nb = [-(-g // b) for g, b in zip((d, h, w), block, strict=True)]  # blocks per axis (ceil)
    # integer rank of each block: blocks are masked whole, only the last one may be partial
    block_scores = torch.rand(batch, int(nb[0] * nb[1] * nb[2]), device=device, generator=generator)
    block_scores = (
        torch.argsort(torch.argsort(block_scores, dim=1), dim=1).float().reshape(batch, *nb)
    )
    # (B, nd, nh, nw) -> (B, d, h, w): every token takes its block's score
    scores = block_scores.repeat_interleave(block[0], 1).repeat_interleave(block[1], 2)
    scores = scores.repeat_interleave(block[2], 3)[:, :d, :h, :w]
    jitter = torch.rand(batch, d, h, w, device=device, generator=generator)  # in [0, 1): tie-break
    scores = (scores + jitter).reshape(batch, d * h * w)  # (B, d, h, w) -> (B, L)
    return _from_scores(scores, num_keep(d * h * w, mask_ratio))
