"""3D Vision Transformer encoder (ViT / MAE / UNETR backbone) with the shared feature API.

Pre-norm blocks, fused-qkv SDPA attention, a Conv3d patch embedding and an absolute position
embedding over the patch grid (learned or fixed sin-cos; prefix tokens carry none, as in MONAI).
Inputs of another spatial size than ``img_size`` work: the table is resampled trilinearly on the
token grid and cached per grid size.

Feature API (the same on every encoder; SSL wrappers and decoders use nothing else):

- ``forward_features(x, keep_indices=None) -> (B, prefix + L, C)``: final-normed tokens. With
  ``keep_indices`` (B, L_keep) only those patch tokens (position embedding already added) and the
  prefix tokens go through the blocks: MAE's visible-token encoder.
- ``forward_intermediates(x, indices, norm=False, output_fmt="NCDHW")``: per-block feature maps.
- ``forward_head(tokens, pre_logits=False)``, ``forward(x)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from umit.models.layers import (
    Attention,
    DropPath,
    Mlp,
    PatchEmbed3d,
    build_sincos_pos_embed_3d,
    resample_pos_embed_3d,
)
from umit.models.registry import register_model

__all__ = ["Block", "ViT3D", "resolve_norm_layer"]

NormLayer = Callable[[int], nn.Module]
_POS_EMBED_CACHE_SIZE = 8


def resolve_norm_layer(norm_layer: str | NormLayer, eps: float) -> NormLayer:
    """``"layernorm"`` -> ``LayerNorm(eps=eps)``; a callable ``f(dim) -> Module`` is used as is."""
    if callable(norm_layer):
        return norm_layer
    if norm_layer == "layernorm":
        return partial(nn.LayerNorm, eps=eps)
    raise ValueError(f"norm_layer must be 'layernorm' or a callable, got {norm_layer!r}")


def check_rate(name: str, value: float) -> float:
    """Validates a dropout-like probability in [0, 1)."""
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value!r}")
    return float(value)


def feature_take_indices(num_features: int, indices: int | Sequence[int] | None) -> list[int]:
    """Normalises ``indices`` (timm semantics) to non-negative positions.

    ``None`` -> all; an int ``n`` -> the last ``n``; a sequence -> those positions, negatives
    counted from the end, in the order given.
    """
    if indices is None:
        return list(range(num_features))
    if isinstance(indices, int):
        if not 1 <= indices <= num_features:
            raise ValueError(f"indices={indices!r}: expected 1..{num_features} (the last n)")
        return list(range(num_features - indices, num_features))
    out = []
    for i in indices:
        if not -num_features <= int(i) < num_features:
            raise ValueError(f"index {i!r} out of range for {num_features} feature levels")
        out.append(int(i) % num_features)
    if not out:
        raise ValueError("indices must not be empty")
    return out


def intermediates_plan(
    num_features: int,
    indices: int | Sequence[int] | None,
    output_fmt: str,
    intermediates_only: bool,
    formats: Sequence[str] = ("NCDHW", "NLC"),
) -> tuple[list[int], int]:
    """The opening every ``forward_intermediates`` shares: check ``output_fmt``, normalise
    ``indices`` and find the last level to run.

    Returns:
        ``(take, last)``: positions to return, in the order asked, and the deepest level that
        must be computed (all of them when the final features are wanted too).
    """
    if output_fmt not in formats:
        raise ValueError(f"output_fmt must be one of {tuple(formats)}, got {output_fmt!r}")
    take = feature_take_indices(num_features, indices)
    return take, (max(take) if intermediates_only else num_features - 1)


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))`` then ``x + mlp(norm2(x))``."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        norm_layer: NormLayer = nn.LayerNorm,
    ):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads, qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(round(dim * mlp_ratio)), drop=proj_drop)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.attn(self.norm1(x)))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class ViT3D(nn.Module):
    """3D Vision Transformer.

    Args:
        img_size: nominal input size (D, H, W) or one int; sets the stored position-embedding
            grid. Must be divisible by ``patch_size``.
        patch_size: patch size per axis or one int.
        in_chans: input channels (modalities).
        embed_dim: token width C.
        depth: number of blocks.
        num_heads: attention heads; must divide ``embed_dim``.
        mlp_ratio: MLP hidden width / ``embed_dim``.
        qkv_bias: bias on the fused qkv projection (MONAI's ViT default is False).
        class_token: prepend a learned cls token (no position embedding on it).
        pos_embed: ``"learn"`` (trainable, trunc-normal 0.02) or ``"sincos"`` (fixed buffer,
            identical to MONAI's ``sincos``).
        drop_rate: dropout after the position embedding, in the MLP, after projections and
            before the head.
        attn_drop_rate: dropout on attention weights.
        drop_path_rate: stochastic-depth rate, linearly increasing over the blocks.
        num_classes: classifier outputs; 0 means no head (``forward`` returns pooled features).
        global_pool: ``"token"`` (cls token), ``"avg"`` (mean of patch tokens) or ``""`` (no
            pooling); ``None`` picks ``"token"`` with a class token, else ``"avg"``.
        norm_layer: ``"layernorm"`` or a callable ``f(dim) -> Module`` (not plain data: such a
            model's ``init_args`` cannot be saved in a checkpoint).
        norm_eps: LayerNorm epsilon (timm/MAE 1e-6; MONAI uses 1e-5).
        grad_checkpointing: recompute each block in backward to save memory.
    """

    def __init__(
        self,
        img_size: int | Sequence[int] = 96,
        patch_size: int | Sequence[int] = 16,
        in_chans: int = 1,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        class_token: bool = True,
        pos_embed: str = "learn",
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        num_classes: int = 0,
        global_pool: str | None = None,
        norm_layer: str | NormLayer = "layernorm",
        norm_eps: float = 1e-6,
        grad_checkpointing: bool = False,
    ):
        super().__init__()
        if embed_dim <= 0:
            raise ValueError(f"embed_dim must be positive, got {embed_dim!r}")
        if depth <= 0:
            raise ValueError(f"depth must be positive, got {depth!r}")
        if num_heads <= 0 or embed_dim % num_heads:
            raise ValueError(
                f"embed_dim={embed_dim!r} must be divisible by num_heads={num_heads!r}"
            )
        if mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio must be positive, got {mlp_ratio!r}")
        if pos_embed not in ("learn", "sincos"):
            raise ValueError(f"pos_embed must be 'learn' or 'sincos', got {pos_embed!r}")
        if pos_embed == "sincos" and embed_dim < 6:
            raise ValueError(f"pos_embed='sincos' needs embed_dim >= 6, got {embed_dim!r}")
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes!r}")
        drop_rate = check_rate("drop_rate", drop_rate)
        attn_drop_rate = check_rate("attn_drop_rate", attn_drop_rate)
        drop_path_rate = check_rate("drop_path_rate", drop_path_rate)
        global_pool = self._check_pool(global_pool, class_token)
        norm = resolve_norm_layer(norm_layer, norm_eps)
        self.init_args: dict[str, Any] = {
            "img_size": img_size,
            "patch_size": patch_size,
            "in_chans": in_chans,
            "embed_dim": embed_dim,
            "depth": depth,
            "num_heads": num_heads,
            "mlp_ratio": mlp_ratio,
            "qkv_bias": qkv_bias,
            "class_token": class_token,
            "pos_embed": pos_embed,
            "drop_rate": drop_rate,
            "attn_drop_rate": attn_drop_rate,
            "drop_path_rate": drop_path_rate,
            "num_classes": num_classes,
            "global_pool": global_pool,
            "norm_layer": norm_layer if isinstance(norm_layer, str) else repr(norm_layer),
            "norm_eps": norm_eps,
            "grad_checkpointing": grad_checkpointing,
        }
        self.model_name: str | None = None  # set by create_model
        self.model_args: dict[str, Any] = {}

        self.embed_dim = self.num_features = embed_dim
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.pos_embed_type = pos_embed
        self.num_prefix_tokens = 1 if class_token else 0
        self.grad_checkpointing = grad_checkpointing

        self.patch_embed = PatchEmbed3d(img_size, patch_size, in_chans, embed_dim)
        self.img_size = self.patch_embed.img_size
        self.pos_grid = self.patch_embed.grid_size(self.img_size)
        num_patches = math.prod(self.pos_grid)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if class_token else None
        if pos_embed == "learn":
            self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, embed_dim))
        else:
            self.register_buffer("pos_embed", build_sincos_pos_embed_3d(self.pos_grid, embed_dim))
        self._pos_cache: dict[tuple[int, ...], tuple[tuple, torch.Tensor]] = {}
        self.pos_drop = nn.Dropout(drop_rate)

        dpr = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()
        self.blocks = nn.ModuleList(
            Block(
                embed_dim, num_heads, mlp_ratio, qkv_bias, drop_rate, attn_drop_rate, dpr[i], norm
            )
            for i in range(depth)
        )
        self.norm = norm(embed_dim)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes else nn.Identity()
        self.feature_info = [
            {
                "num_chs": embed_dim,
                "reduction": self.patch_embed.patch_size,
                "module": f"blocks.{i}",
            }
            for i in range(depth)
        ]
        self.init_weights()

    # ------------------------------------------------------------------ construction helpers
    @staticmethod
    def _check_pool(global_pool: str | None, class_token: bool) -> str:
        if global_pool is None:
            return "token" if class_token else "avg"
        if global_pool not in ("token", "avg", ""):
            raise ValueError(f"global_pool must be 'token', 'avg' or '', got {global_pool!r}")
        if global_pool == "token" and not class_token:
            raise ValueError("global_pool='token' needs class_token=True")
        return global_pool

    @torch.no_grad()
    def init_weights(self) -> None:
        """MAE / JAX-ViT init: xavier-uniform Linear (q, k, v fans counted separately), patch
        embedding as a Linear, trunc-normal 0.02 learned position table, normal 0.02 cls token,
        a near-zero (std 2e-5) classifier as in MAE fine-tuning."""
        if self.pos_embed_type == "learn":
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=0.02)
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # (C, C_in, pd, ph, pw) as (C, p³·C_in)
        nn.init.zeros_(self.patch_embed.proj.bias)
        for m in self.modules():
            if isinstance(m, Attention):
                fan_out, fan_in = m.qkv.weight.shape[0] // 3, m.qkv.weight.shape[1]
                bound = math.sqrt(6.0 / (fan_in + fan_out))
                nn.init.uniform_(m.qkv.weight, -bound, bound)
            elif isinstance(m, nn.Linear) and m is not self.head:
                nn.init.xavier_uniform_(m.weight)
            elif isinstance(m, nn.LayerNorm) and m.elementwise_affine:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
        if isinstance(self.head, nn.Linear):
            nn.init.trunc_normal_(self.head.weight, std=2e-5)

    # ------------------------------------------------------------------ small API
    @property
    def patch_size(self) -> tuple[int, int, int]:
        """Patch size (pd, ph, pw)."""
        return self.patch_embed.patch_size

    def grid_size(self, input_spatial_shape: Sequence[int]) -> tuple[int, int, int]:
        """Token grid (d, h, w) for an input of spatial shape (D, H, W); ValueError if the shape
        is not divisible by the patch size."""
        return self.patch_embed.grid_size(input_spatial_shape)

    def no_weight_decay(self) -> set[str]:
        """Parameter names to exclude from weight decay."""
        names = {"cls_token"} if self.cls_token is not None else set()
        if self.pos_embed_type == "learn":
            names.add("pos_embed")
        return names

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block during backward (saves activation memory)."""
        self.grad_checkpointing = enable

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replaces the head (``num_classes=0`` removes it)."""
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes!r}")
        if global_pool is not None:
            self.global_pool = self._check_pool(global_pool, self.cls_token is not None)
        self.num_classes = num_classes
        device = self.patch_embed.proj.weight.device
        self.head = (
            nn.Linear(self.embed_dim, num_classes, device=device) if num_classes else nn.Identity()
        )
        if isinstance(self.head, nn.Linear):
            nn.init.trunc_normal_(self.head.weight, std=2e-5)
            nn.init.zeros_(self.head.bias)

    # ------------------------------------------------------------------ position embedding
    def pos_embed_for_grid(self, grid: tuple[int, int, int]) -> torch.Tensor:
        """Position table (1, d·h·w, C) for a token grid, resampled from the stored grid.

        Resampled tables are cached per grid (and device, dtype and parameter version) unless
        autograd must see the resampling (a learned table while grad is enabled).
        """
        pe = self.pos_embed
        if grid == self.pos_grid:
            return pe
        cacheable = not (pe.requires_grad and torch.is_grad_enabled())
        if cacheable:
            key = (pe.device, pe.dtype, pe._version, pe.data_ptr())
            hit = self._pos_cache.get(grid)
            if hit is not None and hit[0] == key:
                return hit[1]
        out = resample_pos_embed_3d(pe, self.pos_grid, grid)
        if cacheable:
            if len(self._pos_cache) >= _POS_EMBED_CACHE_SIZE:
                self._pos_cache.pop(next(iter(self._pos_cache)))
            out = out.detach()
            self._pos_cache[grid] = (key, out)
        return out

    # ------------------------------------------------------------------ forward
    def _embed(self, x: torch.Tensor, keep_indices: torch.Tensor | None = None) -> torch.Tensor:
        B = x.shape[0]
        grid = self.grid_size(x.shape[2:])
        pos = self.pos_embed_for_grid(grid)  # (1, L, C)
        if keep_indices is None:
            x = self.patch_embed(x) + pos  # (B, C_in, D, H, W) -> (B, L, C)
        else:
            if keep_indices.ndim != 2 or keep_indices.shape[0] != B:
                raise ValueError(
                    f"keep_indices must be (B={B}, L_keep), got shape {tuple(keep_indices.shape)}"
                )
            if keep_indices.dtype != torch.long:
                raise ValueError(f"keep_indices must be int64, got {keep_indices.dtype}")
            # only the kept patches are projected: (B, C_in, D, H, W) -> (B, L_keep, C)
            x = self.patch_embed(x, keep_indices)
            idx = keep_indices.unsqueeze(-1).expand(-1, -1, x.shape[-1])
            x = x + torch.gather(pos.expand(B, -1, -1), 1, idx)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(B, -1, -1), x], dim=1)  # -> (B, 1 + L, C)
        return self.pos_drop(x)

    def _run_block(self, blk: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(blk, x, use_reentrant=False)
        return blk(x)

    def forward_features(
        self, x: torch.Tensor, keep_indices: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Encodes a volume.

        Args:
            x: (B, C_in, D, H, W); D, H, W divisible by the patch size (any size: the position
                table is resampled).
            keep_indices: optional (B, L_keep) int64 indices into the L patch tokens; only those
                (and the prefix tokens) are encoded.

        Returns:
            (B, num_prefix_tokens + L, C) final-normed tokens (L_keep instead of L when
            ``keep_indices`` is given), prefix tokens first.
        """
        x = self._embed(x, keep_indices)
        for blk in self.blocks:
            x = self._run_block(blk, x)
        return self.norm(x)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        output_fmt: str = "NCDHW",
        intermediates_only: bool = True,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Block outputs as feature maps (UNETR skips, probes).

        Args:
            x: (B, C_in, D, H, W).
            indices: block indices (negatives from the end, returned in the order given), an int
                ``n`` for the last ``n`` blocks, or None for all.
            norm: apply the final norm to each output. ``norm=False`` equals MONAI ViT's
                ``hidden_states_out``.
            output_fmt: ``"NCDHW"`` (B, C, d, h, w) or ``"NLC"`` (B, L, C); prefix tokens are
                dropped either way.
            intermediates_only: when False, also run the remaining blocks and return
                ``(forward_features(x), intermediates)``.
        """
        take, last = intermediates_plan(len(self.blocks), indices, output_fmt, intermediates_only)
        wanted = set(take)
        B = x.shape[0]
        grid = self.grid_size(x.shape[2:])
        x = self._embed(x)
        feats: dict[int, torch.Tensor] = {}
        for i in range(last + 1):
            x = self._run_block(self.blocks[i], x)
            if i in wanted:
                y = (self.norm(x) if norm else x)[:, self.num_prefix_tokens :]
                if output_fmt == "NCDHW":
                    y = y.transpose(1, 2).reshape(B, -1, *grid)  # (B, L, C) -> (B, C, d, h, w)
                feats[i] = y
        out = [feats[i] for i in take]
        return out if intermediates_only else (self.norm(x), out)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pools ``forward_features`` tokens (B, prefix + L, C) and applies the classifier."""
        if self.global_pool == "token":
            x = x[:, 0]
        elif self.global_pool == "avg":
            x = x[:, self.num_prefix_tokens :].mean(dim=1)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# ---------------------------------------------------------------------- registered variants
def _create_vit3d(defaults: dict[str, Any], **kwargs: Any) -> ViT3D:
    return ViT3D(**{**defaults, **kwargs})


_SIZES = {
    "test": {"embed_dim": 48, "depth": 2, "num_heads": 3},
    "tiny": {"embed_dim": 192, "depth": 12, "num_heads": 3},
    "small": {"embed_dim": 384, "depth": 12, "num_heads": 6},
    "base": {"embed_dim": 768, "depth": 12, "num_heads": 12},
    "large": {"embed_dim": 1024, "depth": 24, "num_heads": 16},
    "huge": {"embed_dim": 1280, "depth": 32, "num_heads": 16},
}


@register_model
def vit3d_test_p16(**kwargs: Any) -> ViT3D:
    """Tiny ViT for unit tests (C=48, depth 2, 3 heads), patch 16."""
    return _create_vit3d({**_SIZES["test"], "patch_size": 16}, **kwargs)


@register_model
def vit3d_test_p8(**kwargs: Any) -> ViT3D:
    """Tiny ViT for unit tests (C=48, depth 2, 3 heads), patch 8."""
    return _create_vit3d({**_SIZES["test"], "patch_size": 8}, **kwargs)


@register_model
def vit3d_tiny_p4(**kwargs: Any) -> ViT3D:
    """ViT-Ti (C=192, depth 12, 3 heads), patch 4: for small inputs (e.g. 32³ or 64³ crops)."""
    return _create_vit3d({**_SIZES["tiny"], "patch_size": 4}, **kwargs)


@register_model
def vit3d_small_p4(**kwargs: Any) -> ViT3D:
    """ViT-S (C=384, depth 12, 6 heads), patch 4: for small inputs."""
    return _create_vit3d({**_SIZES["small"], "patch_size": 4}, **kwargs)


@register_model
def vit3d_test_p4(**kwargs: Any) -> ViT3D:
    """Tiny ViT for unit tests (C=48, depth 2, 3 heads), patch 4."""
    return _create_vit3d({**_SIZES["test"], "patch_size": 4}, **kwargs)


@register_model
def vit3d_tiny_p16(**kwargs: Any) -> ViT3D:
    """ViT-Ti (C=192, depth 12, 3 heads), patch 16."""
    return _create_vit3d({**_SIZES["tiny"], "patch_size": 16}, **kwargs)


@register_model
def vit3d_tiny_p8(**kwargs: Any) -> ViT3D:
    """ViT-Ti (C=192, depth 12, 3 heads), patch 8."""
    return _create_vit3d({**_SIZES["tiny"], "patch_size": 8}, **kwargs)


@register_model
def vit3d_small_p16(**kwargs: Any) -> ViT3D:
    """ViT-S (C=384, depth 12, 6 heads), patch 16."""
    return _create_vit3d({**_SIZES["small"], "patch_size": 16}, **kwargs)


@register_model
def vit3d_small_p8(**kwargs: Any) -> ViT3D:
    """ViT-S (C=384, depth 12, 6 heads), patch 8."""
    return _create_vit3d({**_SIZES["small"], "patch_size": 8}, **kwargs)


@register_model
def vit3d_base_p16(**kwargs: Any) -> ViT3D:
    """ViT-B (C=768, depth 12, 12 heads), patch 16: the UNETR / MONAI ViT default size."""
    return _create_vit3d({**_SIZES["base"], "patch_size": 16}, **kwargs)


@register_model
def vit3d_base_p8(**kwargs: Any) -> ViT3D:
    """ViT-B (C=768, depth 12, 12 heads), patch 8."""
    return _create_vit3d({**_SIZES["base"], "patch_size": 8}, **kwargs)


@register_model
def vit3d_large_p16(**kwargs: Any) -> ViT3D:
    """ViT-L (C=1024, depth 24, 16 heads), patch 16."""
    return _create_vit3d({**_SIZES["large"], "patch_size": 16}, **kwargs)


@register_model
def vit3d_huge_p16(**kwargs: Any) -> ViT3D:
    """ViT-H (C=1280, depth 32, 16 heads), patch 16."""
    return _create_vit3d({**_SIZES["huge"], "patch_size": 16}, **kwargs)
