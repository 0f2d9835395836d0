"""3D Swin Transformer encoder (the SwinUNETR ``swinViT`` backbone) with the shared feature API.

Layout follows MONAI's ``SwinTransformer`` so its weights load through
:mod:`umit.models.monai_compat`: a stride-``patch`` Conv3d patch embedding, then stages of
window-attention blocks (every second block with shifted windows and the region mask), each stage
ending in a 2x patch merging that doubles the width. With ``embed_dim=48`` the feature maps have
widths 48 (patch embedding), 96, 192, 384, 768 at strides 2, 4, 8, 16, 32, the SwinUNETR
skips.

Internally tokens stay channels-last (B, D, H, W, C); maps are only permuted on the way out.
Window attention runs through ``scaled_dot_product_attention`` with the relative position bias
(and, for shifted windows, the region mask) as an additive ``attn_mask``. For shifted blocks the
window axis is folded into the head axis, so the combined (windows x heads) bias is built once per
call and broadcast over the batch instead of being copied B times (timm and MONAI's flash path
expand it to (B·nW, heads, N, N)).

Feature API:

- ``forward_features(x) -> (B, L, C_last)``: tokens of the last stage in (d, h, w) raster order,
  layer-normalised without affine parameters (MONAI's ``normalize=True`` output; a learned affine
  before a linear head would be redundant). ``num_prefix_tokens == 0``.
- ``forward_intermediates(x, indices, norm=False)``: maps (B, C, d, h, w) of the patch embedding
  (index 0) and of each stage (1..num_stages); ``norm=True`` equals MONAI ``swinViT(x, True)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from umit.models.layers import DropPath, Mlp, PatchEmbed3d, to_3tuple
from umit.models.registry import register_model
from umit.models.vit3d import NormLayer, check_rate, intermediates_plan, resolve_norm_layer

__all__ = [
    "PatchMerging3D",
    "SwinBlock3D",
    "SwinStage3D",
    "SwinTransformer3D",
    "WindowAttention3D",
    "compute_shift_mask",
    "effective_window",
    "window_partition",
    "window_reverse",
]

Int3 = tuple[int, int, int]
MASK_VALUE = -100.0  # additive mask of the original Swin / MONAI: exp(-100) underflows to 0
_OUT_NORM_EPS = 1e-5  # eps of MONAI's parameter-free ``proj_out`` layer norm
_MASK_CACHE_SIZE = 4


def window_partition(x: torch.Tensor, window: Int3) -> torch.Tensor:
    """(B, D, H, W, C) -> (B·nW, wd·wh·ww, C) windows, nW = (D/wd)(H/wh)(W/ww), raster order."""
    B, D, H, W, C = x.shape
    wd, wh, ww = window
    # (B, D, H, W, C) -> (B, D/wd, wd, H/wh, wh, W/ww, ww, C)
    x = x.view(B, D // wd, wd, H // wh, wh, W // ww, ww, C)
    # -> (B, D/wd, H/wh, W/ww, wd, wh, ww, C) -> (B·nW, N, C)
    return x.permute(0, 1, 3, 5, 2, 4, 6, 7).reshape(-1, wd * wh * ww, C)


def window_reverse(windows: torch.Tensor, window: Int3, shape: Sequence[int]) -> torch.Tensor:
    """Inverse of :func:`window_partition`: (B·nW, N, C) -> (B, D, H, W, C) for ``shape`` (B, D, H, W)."""
    B, D, H, W = shape
    wd, wh, ww = window
    C = windows.shape[-1]
    # (B·nW, N, C) -> (B, D/wd, H/wh, W/ww, wd, wh, ww, C)
    x = windows.view(B, D // wd, H // wh, W // ww, wd, wh, ww, C)
    # -> (B, D/wd, wd, H/wh, wh, W/ww, ww, C) -> (B, D, H, W, C)
    return x.permute(0, 1, 4, 2, 5, 3, 6, 7).reshape(B, D, H, W, C)


def effective_window(grid: Sequence[int], window: Int3, shift: Int3) -> tuple[Int3, Int3]:
    """Window and shift actually used on ``grid`` (MONAI ``get_window_size``): an axis no longer
    than its window gets one window spanning it and no shift."""
    ws, ss = list(window), list(shift)
    for i, g in enumerate(grid):
        if g <= window[i]:
            ws[i], ss[i] = g, 0
    return tuple(ws), tuple(ss)  # type: ignore[return-value]


def compute_shift_mask(
    padded_grid: Sequence[int], window: Int3, shift: Int3, device: torch.device | str | None = None
) -> torch.Tensor:
    """Additive mask for shifted windows: (nW, N, N), 0 within a region, ``MASK_VALUE`` across.

    After rolling the (padded) grid by ``-shift`` the last window along an axis holds tokens from
    two sides of the volume; each axis is split into regions ``[0, P-w)``, ``[P-w, P-s)``,
    ``[P-s, P)`` and tokens attend only within their region (same labels as MONAI ``compute_mask``).
    """
    labels = []
    for P, w, s in zip(padded_grid, window, shift, strict=True):
        r = torch.arange(P, device=device)
        labels.append((r >= P - w).long() + (r >= P - s).long() if s > 0 else torch.zeros_like(r))
    # per-axis labels in {0, 1, 2} -> one region id per voxel: (D, H, W)
    region = labels[0].view(-1, 1, 1) * 9 + labels[1].view(1, -1, 1) * 3 + labels[2].view(1, 1, -1)
    # (D, H, W) -> (1, D, H, W, 1) -> (nW, N)
    win = window_partition(region[None, ..., None], window).squeeze(-1)
    mask = win.unsqueeze(1) != win.unsqueeze(2)  # (nW, N, N)
    return torch.zeros(mask.shape, device=device).masked_fill_(mask, MASK_VALUE)


def relative_position_index(window: Int3) -> torch.Tensor:
    """(N, N) index into the ((2wd-1)(2wh-1)(2ww-1), heads) relative-position bias table."""
    coords = torch.stack(
        torch.meshgrid(*[torch.arange(w, device="cpu") for w in window], indexing="ij")
    ).flatten(1)  # (3, N)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)  # (N, N, 3)
    rel = rel + torch.tensor([w - 1 for w in window], device="cpu")  # shift to start from 0
    return (
        rel[..., 0] * (2 * window[1] - 1) * (2 * window[2] - 1)
        + rel[..., 1] * (2 * window[2] - 1)
        + rel[..., 2]
    )


class WindowAttention3D(nn.Module):
    """Multi-head self-attention inside windows with a learned relative position bias.

    Args:
        dim: token width.
        num_heads: heads; must divide ``dim``.
        window_size: configured window (wd, wh, ww); sets the bias table size.
        qkv_bias: bias on the fused qkv projection.
        attn_drop: dropout on attention weights.
        proj_drop: dropout after the output projection.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: Int3,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ):
        super().__init__()
        if num_heads <= 0 or dim % num_heads:
            raise ValueError(f"dim={dim!r} must be divisible by num_heads={num_heads!r}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.window_size = window_size
        wd, wh, ww = window_size
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * wd - 1) * (2 * wh - 1) * (2 * ww - 1), num_heads)
        )
        # derived from window_size, so not saved (MONAI saves it; the converter drops it)
        self.register_buffer(
            "relative_position_index", relative_position_index(window_size), persistent=False
        )
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = float(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def relative_position_bias(self, n: int) -> torch.Tensor:
        """(heads, n, n) bias for windows of ``n`` tokens.

        When a grid axis is shorter than the window the effective window has ``n < N`` tokens and,
        like MONAI (and Video Swin), the top-left ``n x n`` block of the full index is used, so
        weights trained there keep their meaning.
        """
        idx = self.relative_position_index[:n, :n].reshape(-1)
        # (n·n, heads) -> (n, n, heads) -> (heads, n, n)
        return self.relative_position_bias_table[idx].view(n, n, -1).permute(2, 0, 1).contiguous()

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Attends within each window.

        Args:
            x: windows (B·nW, N, C), windows of one sample contiguous (``window_partition`` order).
            mask: optional (nW, N, N) additive shift mask.

        Returns:
            (B·nW, N, C)
        """
        Bw, N, C = x.shape
        nH, hd = self.num_heads, self.head_dim
        # (Bw, N, 3C) -> (Bw, N, 3, nH, hd) -> (3, Bw, nH, N, hd)
        q, k, v = self.qkv(x).reshape(Bw, N, 3, nH, hd).permute(2, 0, 3, 1, 4).unbind(0)
        bias = self.relative_position_bias(N).to(q.dtype)  # (nH, N, N)
        dropout_p = self.attn_drop if self.training else 0.0
        if mask is None:
            x = F.scaled_dot_product_attention(
                q, k, v, attn_mask=bias.unsqueeze(0), dropout_p=dropout_p
            )
        else:
            nW = mask.shape[0]
            B = Bw // nW
            # windows folded into heads: (Bw, nH, N, hd) -> (B, nW·nH, N, hd), so one
            # (1, nW·nH, N, N) bias broadcasts over the batch
            q, k, v = (t.reshape(B, nW * nH, N, hd) for t in (q, k, v))
            attn_mask = (bias.unsqueeze(0) + mask.to(q.dtype).unsqueeze(1)).view(1, nW * nH, N, N)
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)
            # (B, nW·nH, N, hd) -> (B, nW, nH, N, hd) -> (B, nW, N, nH, hd) -> (Bw, N, C); the
            # split is a view whatever layout the SDPA kernel returned
            return self.proj_drop(
                self.proj(x.view(B, nW, nH, N, hd).permute(0, 1, 3, 2, 4).reshape(Bw, N, C))
            )
        x = x.transpose(1, 2)  # (Bw, nH, N, hd) -> (Bw, N, nH, hd)
        if torch.compiler.is_exporting():
            # The CPU SDPA kernel returns (Bw, N, nH, hd) memory, so the reshape below is traced
            # as a view; ONNX export then decomposes SDPA into ops that return (Bw, nH, N, hd)
            # memory, where that view is invalid. An explicit copy is valid for both layouts.
            x = x.clone(memory_format=torch.contiguous_format)
        x = x.reshape(Bw, N, C)  # (Bw, N, nH, hd) -> (Bw, N, C)
        return self.proj_drop(self.proj(x))


class SwinBlock3D(nn.Module):
    """Swin block on a channels-last grid: (shifted) window attention, then an MLP, pre-norm."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: Int3,
        shifted: bool,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        norm_layer: NormLayer = nn.LayerNorm,
    ):
        super().__init__()
        self.shifted = shifted
        self.norm1 = norm_layer(dim)
        self.attn = WindowAttention3D(dim, num_heads, window_size, qkv_bias, attn_drop, proj_drop)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(round(dim * mlp_ratio)), drop=proj_drop)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def _attn(self, x: torch.Tensor, window: Int3, shift: Int3, mask: torch.Tensor | None):
        B, D, H, W, C = x.shape
        pad = [(-s) % w for s, w in zip((D, H, W), window, strict=True)]
        if any(pad):
            # zero-pad the far end (after norm1, as Swin / MONAI): (B, D, H, W, C) -> (B, Dp, Hp, Wp, C)
            x = F.pad(x, (0, 0, 0, pad[2], 0, pad[1], 0, pad[0]))
        Dp, Hp, Wp = x.shape[1:4]
        shifted = self.shifted and any(shift)
        if shifted:
            x = torch.roll(x, shifts=tuple(-s for s in shift), dims=(1, 2, 3))
        windows = window_partition(x, window)  # (B·nW, N, C)
        windows = self.attn(windows, mask if shifted else None)
        x = window_reverse(windows, window, (B, Dp, Hp, Wp))  # (B, Dp, Hp, Wp, C)
        if shifted:
            x = torch.roll(x, shifts=shift, dims=(1, 2, 3))
        if any(pad):
            x = x[:, :D, :H, :W]
        return x

    def forward(
        self, x: torch.Tensor, window: Int3, shift: Int3, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """x: (B, D, H, W, C); ``window``/``shift`` already fitted to the grid (stage-wide)."""
        x = x + self.drop_path1(self._attn(self.norm1(x), window, shift, mask))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class PatchMerging3D(nn.Module):
    """2x downsampling: concatenates each 2x2x2 neighbourhood (8C), norms, projects to 2C.

    Neighbours are concatenated in (d, h, w) offset order ``000, 001, 010, ..., 111`` (MONAI's
    ``mergingv2`` order; MONAI's default ``merging`` order is a channel permutation of it that the
    converter applies to the weights). Odd sizes are zero-padded at the far end.
    """

    def __init__(self, dim: int, norm_layer: NormLayer = nn.LayerNorm):
        super().__init__()
        self.norm = norm_layer(8 * dim)
        self.reduction = nn.Linear(8 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, D, H, W, C = x.shape
        if D % 2 or H % 2 or W % 2:
            x = F.pad(x, (0, 0, 0, W % 2, 0, H % 2, 0, D % 2))
            D, H, W = D + D % 2, H + H % 2, W + W % 2
        # (B, D, H, W, C) -> (B, D/2, 2, H/2, 2, W/2, 2, C)
        x = x.view(B, D // 2, 2, H // 2, 2, W // 2, 2, C)
        # -> (B, D/2, H/2, W/2, 2, 2, 2, C) -> (B, D/2, H/2, W/2, 8C)
        x = x.permute(0, 1, 3, 5, 2, 4, 6, 7).reshape(B, D // 2, H // 2, W // 2, 8 * C)
        return self.reduction(self.norm(x))  # -> (B, D/2, H/2, W/2, 2C)


class SwinStage3D(nn.Module):
    """``depth`` Swin blocks (alternating plain / shifted windows) and an optional merging."""

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        window_size: Int3,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: Sequence[float] = (),
        norm_layer: NormLayer = nn.LayerNorm,
        downsample: bool = True,
    ):
        super().__init__()
        self.window_size = window_size
        self.shift_size: Int3 = tuple(w // 2 for w in window_size)  # type: ignore[assignment]
        dp = list(drop_path) or [0.0] * depth
        self.blocks = nn.ModuleList(
            SwinBlock3D(
                dim, num_heads, window_size, i % 2 == 1, mlp_ratio, qkv_bias, proj_drop,
                attn_drop, dp[i], norm_layer,
            )
            for i in range(depth)
        )  # fmt: skip
        self.downsample = PatchMerging3D(dim, norm_layer) if downsample else None
        self.grad_checkpointing = False
        self._mask_cache: dict[tuple, torch.Tensor] = {}

    def _shift_mask(self, padded: Int3, window: Int3, shift: Int3, device: torch.device):
        key = (padded, window, shift, device)
        mask = self._mask_cache.get(key)
        if mask is None:
            mask = compute_shift_mask(padded, window, shift, device)
            if len(self._mask_cache) >= _MASK_CACHE_SIZE:
                self._mask_cache.pop(next(iter(self._mask_cache)))
            self._mask_cache[key] = mask
        return mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, D, H, W, C) -> (B, D/2, H/2, W/2, 2C) (or unchanged size without downsample)."""
        grid = tuple(x.shape[1:4])
        window, shift = effective_window(grid, self.window_size, self.shift_size)
        mask = None
        if any(shift) and len(self.blocks) > 1:
            padded = tuple(-(-g // w) * w for g, w in zip(grid, window, strict=True))
            mask = self._shift_mask(padded, window, shift, x.device)  # type: ignore[arg-type]
        for blk in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(blk, x, window, shift, mask, use_reentrant=False)
            else:
                x = blk(x, window, shift, mask)
        return self.downsample(x) if self.downsample is not None else x


class SwinTransformer3D(nn.Module):
    """3D Swin Transformer encoder (SwinUNETR ``swinViT``).

    Args:
        img_size: nominal input size (D, H, W) or one int. Only documents the expected input: any
            size runs (inputs and grids are padded to the patch / window / merge multiples).
        patch_size: patch-embedding stride per axis or one int (SwinUNETR: 2).
        in_chans: input channels.
        embed_dim: width after the patch embedding (MONAI SwinUNETR ``feature_size``); stage
            ``i`` outputs ``embed_dim * 2 ** (i + 1)`` channels.
        depths: blocks per stage.
        num_heads: heads per stage; each must divide that stage's width.
        window_size: attention window per axis or one int.
        mlp_ratio: MLP hidden width / block width.
        qkv_bias: bias on the qkv projections.
        drop_rate: dropout after the patch embedding, in MLPs and after projections.
        attn_drop_rate: dropout on attention weights.
        drop_path_rate: stochastic depth, linearly increasing over all blocks.
        patch_norm: LayerNorm after the patch embedding (MONAI ``patch_norm``, default off).
        norm_layer: ``"layernorm"`` or a callable ``f(dim) -> Module``.
        norm_eps: LayerNorm epsilon (1e-5 as MONAI).
        num_classes: classifier outputs; 0 means no head.
        global_pool: ``"avg"`` (mean over last-stage tokens) or ``""`` (none).
        grad_checkpointing: recompute each block during backward.
    """

    def __init__(
        self,
        img_size: int | Sequence[int] = 96,
        patch_size: int | Sequence[int] = 2,
        in_chans: int = 1,
        embed_dim: int = 48,
        depths: Sequence[int] = (2, 2, 2, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: int | Sequence[int] = 7,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        patch_norm: bool = False,
        norm_layer: str | NormLayer = "layernorm",
        norm_eps: float = 1e-5,
        num_classes: int = 0,
        global_pool: str = "avg",
        grad_checkpointing: bool = False,
    ):
        super().__init__()
        depths, num_heads = tuple(depths), tuple(num_heads)
        if embed_dim <= 0:
            raise ValueError(f"embed_dim must be positive, got {embed_dim!r}")
        if not depths or any(d <= 0 for d in depths):
            raise ValueError(f"depths must be non-empty positive ints, got {depths!r}")
        if len(num_heads) != len(depths):
            raise ValueError(
                f"num_heads={num_heads!r} needs one entry per stage of depths={depths!r}"
            )
        for i, h in enumerate(num_heads):
            dim = embed_dim * 2**i
            if h <= 0 or dim % h:
                raise ValueError(f"stage {i} width {dim} is not divisible by num_heads[{i}]={h!r}")
        if mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio must be positive, got {mlp_ratio!r}")
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes!r}")
        if global_pool not in ("avg", ""):
            raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
        drop_rate = check_rate("drop_rate", drop_rate)
        attn_drop_rate = check_rate("attn_drop_rate", attn_drop_rate)
        drop_path_rate = check_rate("drop_path_rate", drop_path_rate)
        window = to_3tuple(window_size, "window_size")
        norm = resolve_norm_layer(norm_layer, norm_eps)
        self.init_args: dict[str, Any] = {
            "img_size": img_size,
            "patch_size": patch_size,
            "in_chans": in_chans,
            "embed_dim": embed_dim,
            "depths": depths,
            "num_heads": num_heads,
            "window_size": window_size,
            "mlp_ratio": mlp_ratio,
            "qkv_bias": qkv_bias,
            "drop_rate": drop_rate,
            "attn_drop_rate": attn_drop_rate,
            "drop_path_rate": drop_path_rate,
            "patch_norm": patch_norm,
            "norm_layer": norm_layer if isinstance(norm_layer, str) else repr(norm_layer),
            "norm_eps": norm_eps,
            "num_classes": num_classes,
            "global_pool": global_pool,
            "grad_checkpointing": grad_checkpointing,
        }
        self.model_name: str | None = None  # set by create_model
        self.model_args: dict[str, Any] = {}

        self.embed_dim = embed_dim
        self.num_stages = len(depths)
        self.num_features = embed_dim * 2**self.num_stages
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.num_prefix_tokens = 0
        self.window_size = window
        self.patch_embed = PatchEmbed3d(
            img_size, patch_size, in_chans, embed_dim,
            norm_layer=norm if patch_norm else None, output_fmt="NDHWC", pad=True,
        )  # fmt: skip
        self.img_size = self.patch_embed.img_size
        self.pos_drop = nn.Dropout(drop_rate)
        dpr = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        self.stages = nn.ModuleList(
            SwinStage3D(
                embed_dim * 2**i, depths[i], num_heads[i], window, mlp_ratio, qkv_bias,
                drop_rate, attn_drop_rate, dpr[sum(depths[:i]) : sum(depths[: i + 1])], norm,
            )
            for i in range(self.num_stages)
        )  # fmt: skip
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()
        p = self.patch_embed.patch_size
        self.feature_info = [{"num_chs": embed_dim, "reduction": p, "module": "patch_embed"}] + [
            {
                "num_chs": embed_dim * 2 ** (i + 1),
                "reduction": tuple(r * 2 ** (i + 1) for r in p),
                "module": f"stages.{i}",
            }
            for i in range(self.num_stages)
        ]
        self.init_weights()
        self.set_grad_checkpointing(grad_checkpointing)

    @torch.no_grad()
    def init_weights(self) -> None:
        """trunc-normal 0.02 Linear weights and bias tables, zero biases, unit LayerNorms."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm) and m.elementwise_affine:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, WindowAttention3D):
                nn.init.trunc_normal_(m.relative_position_bias_table, std=0.02)

    # ------------------------------------------------------------------ small API
    @property
    def patch_size(self) -> tuple[int, int, int]:
        """Patch-embedding stride (pd, ph, pw)."""
        return self.patch_embed.patch_size

    def feature_grid_sizes(self, input_spatial_shape: Sequence[int]) -> list[Int3]:
        """Grid (d, h, w) of each ``forward_intermediates`` level for an input (D, H, W)."""
        grid = self.patch_embed.grid_size(input_spatial_shape)
        grids = [grid]
        for _ in range(self.num_stages):
            grid = tuple(-(-g // 2) for g in grid)  # type: ignore[assignment]
            grids.append(grid)
        return grids

    def grid_size(self, input_spatial_shape: Sequence[int]) -> Int3:
        """Last-stage token grid (d, h, w): the grid of ``forward_features`` tokens."""
        return self.feature_grid_sizes(input_spatial_shape)[-1]

    def no_weight_decay(self) -> set[str]:
        """Parameter names to exclude from weight decay (relative position bias tables)."""
        return {n for n, _ in self.named_parameters() if n.endswith("relative_position_bias_table")}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block during backward (saves activation memory)."""
        self.grad_checkpointing = enable
        for s in self.stages:
            s.grad_checkpointing = enable

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replaces the head (``num_classes=0`` removes it)."""
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes!r}")
        if global_pool is not None:
            if global_pool not in ("avg", ""):
                raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
            self.global_pool = global_pool
        self.num_classes = num_classes
        device = self.patch_embed.proj.weight.device
        self.head = (
            nn.Linear(self.num_features, num_classes, device=device)
            if num_classes
            else nn.Identity()
        )
        if isinstance(self.head, nn.Linear):
            nn.init.trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)

    # ------------------------------------------------------------------ forward
    @staticmethod
    def _out_norm(x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, x.shape[-1:], eps=_OUT_NORM_EPS)  # over C of (B, d, h, w, C)

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.pos_drop(self.patch_embed(x))  # (B, C_in, D, H, W) -> (B, d, h, w, C)

    def forward_features(
        self, x: torch.Tensor, keep_indices: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Encodes a volume.

        Args:
            x: (B, C_in, D, H, W), any spatial size.
            keep_indices: not supported (window attention needs the full grid); must be None.

        Returns:
            (B, L, num_features) last-stage tokens in (d, h, w) order (``grid_size`` gives the
            grid), layer-normalised without affine parameters.
        """
        if keep_indices is not None:
            raise ValueError(
                "SwinTransformer3D does not take keep_indices: window attention needs the full "
                "grid (mask inputs instead, SimMIM-style)"
            )
        x = self._stem(x)
        for stage in self.stages:
            x = stage(x)
        return self._out_norm(x).flatten(1, 3)  # (B, d, h, w, C) -> (B, L, C)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        output_fmt: str = "NCDHW",
        intermediates_only: bool = True,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Multi-scale feature maps for decoders (SwinUNETR skips).

        Args:
            x: (B, C_in, D, H, W).
            indices: levels among ``0`` (patch embedding) and ``1..num_stages`` (stage outputs,
                after merging); negatives from the end, in the order given; an int ``n`` for the
                last ``n``; None for all ``num_stages + 1``.
            norm: layer-normalise each map over channels without affine parameters; True equals
                MONAI ``swinViT(x, normalize=True)`` (SwinUNETR's default).
            output_fmt: ``"NCDHW"`` (B, C, d, h, w) or ``"NLC"`` (B, d·h·w, C).
            intermediates_only: when False return ``(forward_features(x), maps)``.
        """
        take, last = intermediates_plan(
            self.num_stages + 1, indices, output_fmt, intermediates_only
        )
        wanted = set(take)
        feats: dict[int, torch.Tensor] = {}
        x = self._stem(x)
        for level in range(last + 1):
            if level > 0:
                x = self.stages[level - 1](x)
            if level in wanted:
                y = self._out_norm(x) if norm else x
                # (B, d, h, w, C) -> (B, C, d, h, w), or -> (B, L, C)
                feats[level] = (
                    y.permute(0, 4, 1, 2, 3) if output_fmt == "NCDHW" else y.flatten(1, 3)
                )
        out = [feats[i] for i in take]
        if intermediates_only:
            return out
        return self._out_norm(x).flatten(1, 3), out

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pools ``forward_features`` tokens (B, L, C) and applies the classifier."""
        if self.global_pool == "avg":
            x = x.mean(dim=1)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# ---------------------------------------------------------------------- registered variants
def _create_swin3d(defaults: dict[str, Any], **kwargs: Any) -> SwinTransformer3D:
    return SwinTransformer3D(**{**defaults, **kwargs})


_SWIN_DEFAULTS = {"patch_size": 2, "depths": (2, 2, 2, 2), "num_heads": (3, 6, 12, 24)}


@register_model
def swin3d_test(**kwargs: Any) -> SwinTransformer3D:
    """Tiny Swin for unit tests: feature size 12, depths 2,2,2,2, heads 3,6,12,24."""
    return _create_swin3d({**_SWIN_DEFAULTS, "embed_dim": 12}, **kwargs)


@register_model
def swin3d_tiny(**kwargs: Any) -> SwinTransformer3D:
    """SwinUNETR encoder, feature size 24 (MONAI SwinUNETR's default)."""
    return _create_swin3d({**_SWIN_DEFAULTS, "embed_dim": 24}, **kwargs)


@register_model
def swin3d_small(**kwargs: Any) -> SwinTransformer3D:
    """SwinUNETR encoder, feature size 36."""
    return _create_swin3d({**_SWIN_DEFAULTS, "embed_dim": 36}, **kwargs)


@register_model
def swin3d_base(**kwargs: Any) -> SwinTransformer3D:
    """SwinUNETR encoder, feature size 48 (the BTCV / SSL-pretrained SwinUNETR)."""
    return _create_swin3d({**_SWIN_DEFAULTS, "embed_dim": 48}, **kwargs)
