"""3D patch embedding: a Conv3d with kernel = stride = patch size (a per-patch Linear).

With ``keep_indices`` (MAE's visible tokens) only the kept patches are projected, as a GEMM over
the gathered flattened patches (``F.linear`` with the Conv3d weight viewed as (C, C_in·p³)),
instead of convolving the whole volume and discarding 75 % of the tokens (what MONAI's
``MaskedAutoEncoderViT`` does). The kept tokens equal the convolution's up to float rounding
(different summation order); without ``keep_indices`` the convolution runs as before, so
all-token outputs stay bit-identical to MONAI's ``conv`` patch embedding. The parameters stay a
``Conv3d`` (same state-dict keys).
"""

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

    def forward(self, x: torch.Tensor, keep_indices: torch.Tensor | None = None) -> torch.Tensor:
        """Embeds ``x`` (B, C_in, D, H, W).

        Args:
            x: the volume.
            keep_indices: optional (B, L_keep) int64 indices of the patches (raster order) to
                embed; only with ``output_fmt="NLC"``. Returns (B, L_keep, C) then.
        """
        if x.ndim != 5 or x.shape[1] != self.in_chans:
            raise ValueError(
                f"expected input (B, {self.in_chans}, D, H, W), got shape {tuple(x.shape)}"
            )
        if keep_indices is not None and self.output_fmt != "NLC":
            raise ValueError(f"keep_indices needs output_fmt='NLC', not {self.output_fmt!r}")
        grid = self.grid_size(x.shape[2:])
        if self.pad:
            pads = [g * p - s for g, p, s in zip(grid, self.patch_size, x.shape[2:], strict=True)]
            if any(pads):
                # F.pad takes (W_lo, W_hi, H_lo, H_hi, D_lo, D_hi)
                x = F.pad(x, (0, pads[2], 0, pads[1], 0, pads[0]))
        if keep_indices is not None:
            return self.norm(self._project_kept(x, grid, keep_indices))
        x = self.proj(x)  # (B, C_in, D, H, W) -> (B, C, d, h, w)
        if self.output_fmt == "NLC":
            x = x.flatten(2).transpose(1, 2)  # (B, C, d, h, w) -> (B, d·h·w, C)
            return self.norm(x)
        x = x.permute(0, 2, 3, 4, 1)  # (B, C, d, h, w) -> (B, d, h, w, C)
        x = self.norm(x)
        if self.output_fmt == "NCDHW":
            x = x.permute(0, 4, 1, 2, 3)  # (B, d, h, w, C) -> (B, C, d, h, w)
        return x

    def _project_kept(
        self, x: torch.Tensor, grid: Sequence[int], keep: torch.Tensor
    ) -> torch.Tensor:
        """The convolution at the kept patches only, as one GEMM.

        (B, C_in, D, H, W) -> (B, L_keep, C)."""
        B, C_in = x.shape[:2]
        (d, h, w), (pd, ph, pw) = grid, self.patch_size
        # (B, C_in, d, pd, h, ph, w, pw) -> (B, d, h, w, C_in, pd, ph, pw) -> (B, L, C_in·p³);
        # the patch vector is ordered as the Conv3d weight (C, C_in, pd, ph, pw) flattens
        patches = x.reshape(B, C_in, d, pd, h, ph, w, pw).permute(0, 2, 4, 6, 1, 3, 5, 7)
        patches = patches.reshape(B, d * h * w, C_in * pd * ph * pw)
        if keep.ndim != 2 or keep.shape[0] != B or keep.dtype != torch.long:
            raise ValueError(
                f"keep_indices must be int64 (B={B}, L_keep), got {keep.dtype} {tuple(keep.shape)}"
            )
        # (B, L, C_in·p³) -> (B, L_keep, C_in·p³)
        patches = torch.gather(patches, 1, keep.unsqueeze(-1).expand(-1, -1, patches.shape[-1]))
        weight = self.proj.weight.view(self.embed_dim, -1)  # (C, C_in, pd, ph, pw) -> (C, C_in·p³)
        return F.linear(patches, weight, self.proj.bias)
