"""3D absolute position embeddings: fixed sin-cos (MAE-style) and resampling to other grids.

Tables are (1, L, C) with tokens in (d, h, w) raster order, the order of
``Conv3d(...).flatten(2)``. Prefix tokens (cls) carry no position embedding (as in MONAI's ViT and
timm's ``no_embed_class``), so a table only ever covers the patch grid.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F


def _sincos_1d(pos: torch.Tensor, omega: torch.Tensor) -> torch.Tensor:
    out = torch.outer(pos, omega)  # (L,) x (F,) -> (L, F)
    return torch.cat([out.sin(), out.cos()], dim=1)  # (L, 2F)


def build_sincos_pos_embed_3d(
    grid_size: Sequence[int],
    embed_dim: int,
    temperature: float = 10000.0,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Fixed 3D sin-cos table, identical to MONAI's ``build_sincos_position_embedding``.

    The width is split evenly across the three axes (MAE's 2D recipe extended to 3D): each axis gets
    ``F = embed_dim // 6`` frequencies ``1 / temperature ** (i / F)`` and contributes ``[sin, cos]``.
    Blocks are ordered (axis 1, axis 0, axis 2) to match MONAI bit for bit, so MONAI ``sincos``
    checkpoints and ours agree. When ``embed_dim`` is not a multiple of 6 (e.g. 1024, 1280) the
    last ``embed_dim % 6`` channels are zero.

    Args:
        grid_size: token grid (d, h, w).
        embed_dim: width C; at least 6.
        temperature: frequency base.
        device: where to build the table.

    Returns:
        (1, d·h·w, C) float32 table.
    """
    if len(grid_size) != 3 or any(int(g) <= 0 for g in grid_size):
        raise ValueError(f"grid_size must be 3 positive ints, got {grid_size!r}")
    if embed_dim < 6:
        raise ValueError(f"embed_dim must be >= 6 for a 3D sin-cos embedding, got {embed_dim!r}")
    pos_dim = embed_dim // 6
    omega = torch.arange(pos_dim, dtype=torch.float32, device=device) / pos_dim
    omega = 1.0 / (temperature**omega)
    axes = [torch.arange(int(g), dtype=torch.float32, device=device) for g in grid_size]
    gd, gh, gw = torch.meshgrid(*axes, indexing="ij")  # each (d, h, w)
    emb = torch.cat(
        [
            _sincos_1d(gh.flatten(), omega),
            _sincos_1d(gd.flatten(), omega),
            _sincos_1d(gw.flatten(), omega),
        ],
        dim=1,
    )  # (L, 6F)
    if emb.shape[1] < embed_dim:
        emb = F.pad(emb, (0, embed_dim - emb.shape[1]))  # (L, 6F) -> (L, C), zero tail
    return emb.unsqueeze(0)  # (L, C) -> (1, L, C)


def resample_pos_embed_3d(
    pos_embed: torch.Tensor,
    old_grid: Sequence[int],
    new_grid: Sequence[int],
    mode: str = "trilinear",
) -> torch.Tensor:
    """Resamples a (1, L, C) table from ``old_grid`` to ``new_grid`` on the (d, h, w) token grid.

    Interpolation runs in float32 (``align_corners=False``, like timm's
    ``resample_abs_pos_embed``) and the result keeps the input dtype. A same-size call returns
    the input unchanged.

    Returns:
        (1, d'·h'·w', C)
    """
    old_grid = tuple(int(g) for g in old_grid)
    new_grid = tuple(int(g) for g in new_grid)
    if len(old_grid) != 3 or len(new_grid) != 3:
        raise ValueError(f"grids must be (d, h, w), got {old_grid!r} -> {new_grid!r}")
    n, L, C = pos_embed.shape
    if math.prod(old_grid) != L:
        raise ValueError(f"pos_embed has {L} tokens, which does not match grid {old_grid}")
    if old_grid == new_grid:
        return pos_embed
    dtype = pos_embed.dtype
    # (n, L, C) -> (n, d, h, w, C) -> (n, C, d, h, w)
    grid = pos_embed.float().reshape(n, *old_grid, C).permute(0, 4, 1, 2, 3)
    grid = F.interpolate(grid, size=new_grid, mode=mode, align_corners=False)
    # (n, C, d', h', w') -> (n, d'·h'·w', C)
    return grid.flatten(2).transpose(1, 2).to(dtype)
