"""3D patch embedding: a Conv3d with kernel = stride = patch size (a per-patch Linear)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

_OUTPUT_FMTS = ("NLC", "NDHWC", "NCDHW")


def to_3tuple(value: int | Sequence[int], name: str) -> tuple[int, int, int]:
    """Returns ``value`` as three positive ints (one per spatial axis D, H, W).

    Raises:
        ValueError: naming ``name`` and the value when it is not an int or three positive ints.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        out = (value, value, value)
    elif isinstance(value, (str, bytes)):
        raise ValueError(f"{name} must be an int or 3 ints, got {value!r}")
    else:
        try:
            out = tuple(int(v) for v in value)  # type: ignore[union-attr]
        except (TypeError, ValueError):
            raise ValueError(f"{name} must be an int or 3 ints, got {value!r}") from None
        if len(out) != 3 or any(o != v for o, v in zip(out, value, strict=True)):  # type: ignore[arg-type]
            raise ValueError(f"{name} must be an int or 3 ints, got {value!r}")
    if any(v <= 0 for v in out):
        raise ValueError(f"{name} must be positive, got {value!r}")
    return out  # type: ignore[return-value]


class PatchEmbed3d(nn.Module):
    """Splits a volume into non-overlapping patches and projects each to ``embed_dim``.

    Args:
        img_size: nominal input size (D, H, W) or one int; with ``pad=False`` it must be divisible
            by ``patch_size``. Other input sizes work at run time (see ``pad``).
        patch_size: patch size per axis or one int.
        in_chans: input channels.
        embed_dim: output width.
        norm_layer: optional norm applied to each token after the projection.
        output_fmt: ``"NLC"`` (B, L, C) tokens in (d, h, w) raster order, ``"NDHWC"`` channels-last
            grid, or ``"NCDHW"`` channels-first grid.
        pad: zero-pad inputs at the far end of each axis to a multiple of the patch (Swin, MONAI
            ``PatchEmbed``); when False a non-divisible input raises ``ValueError``.
    """

    def __init__(
        self,
        img_size: int | Sequence[int] = 96,
        patch_size: int | Sequence[int] = 16,
        in_chans: int = 1,
        embed_dim: int = 768,
        norm_layer: Callable[[int], nn.Module] | None = None,
        output_fmt: str = "NLC",
        pad: bool = False,
    ):
        super().__init__()
        self.img_size = to_3tuple(img_size, "img_size")
        self.patch_size = to_3tuple(patch_size, "patch_size")
        if in_chans <= 0:
            raise ValueError(f"in_chans must be positive, got {in_chans!r}")
        if embed_dim <= 0:
            raise ValueError(f"embed_dim must be positive, got {embed_dim!r}")
        if output_fmt not in _OUTPUT_FMTS:
            raise ValueError(f"output_fmt must be one of {_OUTPUT_FMTS}, got {output_fmt!r}")
        if not pad and any(s % p for s, p in zip(self.img_size, self.patch_size, strict=True)):
            raise ValueError(
                f"img_size={self.img_size} must be divisible by patch_size={self.patch_size} "
                "along every axis"
            )
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        self.output_fmt = output_fmt
        self.pad = pad
        self.proj = nn.Conv3d(in_chans, embed_dim, self.patch_size, stride=self.patch_size)
        self.norm = norm_layer(embed_dim) if norm_layer is not None else nn.Identity()

    def grid_size(self, spatial_shape: Sequence[int]) -> tuple[int, int, int]:
        """Token grid (d, h, w) for an input of spatial shape (D, H, W)."""
        shape = tuple(int(s) for s in spatial_shape)
        if len(shape) != 3:
            raise ValueError(f"expected a spatial shape (D, H, W), got {spatial_shape!r}")
        if self.pad:
            return tuple(-(-s // p) for s, p in zip(shape, self.patch_size, strict=True))  # type: ignore[return-value]
        if any(s % p for s, p in zip(shape, self.patch_size, strict=True)):
            raise ValueError(
                f"input spatial shape {shape} is not divisible by patch_size={self.patch_size}"
            )
        return tuple(s // p for s, p in zip(shape, self.patch_size, strict=True))  # type: ignore[return-value]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 5 or x.shape[1] != self.in_chans:
            raise ValueError(
                f"expected input (B, {self.in_chans}, D, H, W), got shape {tuple(x.shape)}"
            )
        grid = self.grid_size(x.shape[2:])
        if self.pad:
            pads = [g * p - s for g, p, s in zip(grid, self.patch_size, x.shape[2:], strict=True)]
            if any(pads):
                # F.pad takes (W_lo, W_hi, H_lo, H_hi, D_lo, D_hi)
                x = F.pad(x, (0, pads[2], 0, pads[1], 0, pads[0]))
        x = self.proj(x)  # (B, C_in, D, H, W) -> (B, C, d, h, w)
        if self.output_fmt == "NLC":
            x = x.flatten(2).transpose(1, 2)  # (B, C, d, h, w) -> (B, d·h·w, C)
            return self.norm(x)
        x = x.permute(0, 2, 3, 4, 1)  # (B, C, d, h, w) -> (B, d, h, w, C)
        x = self.norm(x)
        if self.output_fmt == "NCDHW":
            x = x.permute(0, 4, 1, 2, 3)  # (B, d, h, w, C) -> (B, C, d, h, w)
        return x
