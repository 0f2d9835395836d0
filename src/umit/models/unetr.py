"""UNETR: a convolutional decoder over any ViT-like encoder (Hatamizadeh et al., 2022).

The decoder reads the encoder only through the shared feature API
(``forward_intermediates(x, skip_indices, intermediates_only=False)``, ``feature_info``,
``num_prefix_tokens``), never ``encoder.blocks[i]``, so any registered ViT (any depth, width or
power-of-two patch size) works, pretrained by MAE or not.

Layout (patch 16 = 4 levels; MONAI ``UNETR`` module names, so its weights map):

```
x ──────────────────────────── encoder1 (res block, C_in -> F) ──────────────── decoder2 ── out
block i_1 -> (B, C, g) ─ encoder2 (3 x up: transp conv [+ res block]) -> 2F, 1/2 ─ decoder3
block i_2 -> (B, C, g) ─ encoder3 (2 x up)                             -> 4F, 1/4 ─ decoder4
block i_3 -> (B, C, g) ─ encoder4 (1 x up)                             -> 8F, 1/8 ─ decoder5
final normed tokens (B, C, g) ─────────────────────────────────────────────────────┘
```

A patch of ``2^n`` gives ``n`` levels: ``n - 1`` transformer skips (default block indices
``k * depth // n``, k = 1..n-1: 3, 6, 9 for depth 12 like MONAI), the final tokens as the
bottleneck, ``decoder{n+1} .. decoder2`` and ``encoder1`` at full resolution. Anisotropic
power-of-two patches (e.g. (16, 16, 8)) up-sample the shorter axes only where needed.

Speed: the convolutions are :class:`umit.models.blocks.Conv3d` (faster weight gradient on CPU)
and norm/activation run in place; see ``docs/models.md`` for the training-step numbers against
MONAI.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from umit.models.blocks import NormSpec, OutBlock, PrUpBlock, UpBlock, make_conv_block
from umit.models.heads import build_encoder, check_encoder_api, load_encoder_state_dict
from umit.models.monai_compat import convert_monai_decoder_keys, convert_monai_vit_state_dict
from umit.models.registry import register_model

__all__ = ["UNETR", "convert_monai_unetr_state_dict", "unetr_levels"]

Int3 = tuple[int, int, int]


def unetr_levels(patch_size: Sequence[int]) -> tuple[int, list[Int3]]:
    """Number of levels ``n`` and the up-sampling factor per axis of each level step.

    Returns ``(n, factors)`` with ``factors[l]`` the factor from level ``l + 1`` to level ``l``
    (level 0 = full resolution, level ``n`` = the token grid).

    Raises:
        ValueError: when a patch side is not a power of two >= 2.
    """
    logs = []
    for p in patch_size:
        lg = int(p).bit_length() - 1
        if p < 2 or 2**lg != p:
            raise ValueError(f"UNETR needs power-of-two patch sides >= 2, got {tuple(patch_size)}")
        logs.append(lg)
    n = max(logs)
    # level l has stride min(2^l, p) per axis; the factor between l + 1 and l is 2 or 1
    factors = [
        tuple(min(2 ** (lvl + 1), p) // min(2**lvl, p) for p in patch_size) for lvl in range(n)
    ]
    return n, factors  # type: ignore[return-value]


def default_skip_indices(depth: int, levels: int) -> list[int]:
    """Evenly spaced block indices ``k * depth // levels`` for k = 1..levels-1 (3, 6, 9 of 12)."""
    return [k * depth // levels for k in range(1, levels)]


class UNETR(nn.Module):
    """UNETR segmentation network over a ViT-like encoder.

    Args:
        encoder: a registered encoder name (built with ``encoder_args``, ``img_size``,
            ``in_chans``) or an encoder module exposing the feature API.
        out_channels: output classes.
        in_chans: input channels; forwarded to a named encoder; for a module, taken from it
            when omitted.
        img_size: nominal input size, forwarded to a named encoder.
        encoder_args: more constructor arguments of a named encoder (e.g. ``drop_path_rate``).
        feature_size: decoder width F at full resolution (F·2^l at level l).
        norm: decoder norm (``"instance"``, ``"batch"``, ``"group"`` or ``(name, kwargs)``).
        res_block: residual conv blocks (MONAI default) instead of plain two-conv blocks.
        conv_block: conv blocks in the skip projections (``encoder2``...); False leaves only
            transposed convolutions there (MONAI ``conv_block``).
        skip_indices: encoder block indices of the ``n - 1`` skips, shallowest first (default:
            evenly spaced, see module docstring).
    """

    def __init__(
        self,
        encoder: str | nn.Module = "vit3d_base_p16",
        out_channels: int = 2,
        in_chans: int | None = None,
        img_size: int | Sequence[int] | None = None,
        encoder_args: Mapping[str, Any] | None = None,
        feature_size: int = 16,
        norm: NormSpec = "instance",
        res_block: bool = True,
        conv_block: bool = True,
        skip_indices: Sequence[int] | None = None,
    ):
        super().__init__()
        if out_channels <= 0:
            raise ValueError(f"out_channels must be positive, got {out_channels!r}")
        if feature_size <= 0:
            raise ValueError(f"feature_size must be positive, got {feature_size!r}")
        self.encoder, in_chans = build_encoder(encoder, encoder_args, in_chans, img_size)
        check_encoder_api(self.encoder, "UNETR", tokens=True)
        info = self.encoder.feature_info
        depth = len(info)
        width = int(info[-1]["num_chs"])
        patch = tuple(int(r) for r in info[-1]["reduction"])
        if any(tuple(i["reduction"]) != patch or i["num_chs"] != width for i in info):
            raise ValueError(
                "UNETR needs a single-scale (ViT-like) encoder whose feature_info levels share one "
                "width and reduction; use SwinUNETR for hierarchical encoders"
            )
        n, factors = unetr_levels(patch)
        if skip_indices is None:
            skip_indices = default_skip_indices(depth, n)
        skip_indices = [int(i) for i in skip_indices]
        if len(skip_indices) != n - 1:
            raise ValueError(
                f"patch {patch} gives {n} levels, so UNETR needs {n - 1} skip_indices, "
                f"got {skip_indices!r}"
            )
        for i in skip_indices:
            if not -depth <= i < depth:
                raise ValueError(f"skip index {i} out of range for an encoder of depth {depth}")
        self.init_args: dict[str, Any] = {
            "encoder": encoder if isinstance(encoder, str) else type(encoder).__name__,
            "out_channels": out_channels,
            "in_chans": in_chans,
            "img_size": img_size,
            "encoder_args": dict(encoder_args or {}),
            "feature_size": feature_size,
            "norm": norm,
            "res_block": res_block,
            "conv_block": conv_block,
            "skip_indices": list(skip_indices),
        }
        self.model_name: str | None = None  # set by create_model
        self.model_args: dict[str, Any] = {}
        self.num_levels = n
        self.skip_indices = skip_indices
        self.patch_size = patch
        self.out_channels = out_channels
        self.feature_size = feature_size

        fs = feature_size
        self.encoder1 = make_conv_block(in_chans, fs, res_block, norm)
        for lvl in range(1, n):
            # skip of level lvl: up-sample the token grid n - lvl times (deepest step first)
            steps = [factors[j] for j in range(n - 1, lvl - 1, -1)]
            self.add_module(
                f"encoder{lvl + 1}",
                PrUpBlock(width, fs * 2**lvl, steps, norm, res_block, conv_block),
            )
        for lvl in range(n - 1, -1, -1):
            in_chs = width if lvl == n - 1 else fs * 2 ** (lvl + 1)
            self.add_module(
                f"decoder{lvl + 2}", UpBlock(in_chs, fs * 2**lvl, factors[lvl], norm, res_block)
            )
        self.out = OutBlock(fs, out_channels)

    # ------------------------------------------------------------------ fine-tuning helpers
    def load_encoder_state_dict(
        self,
        state_dict: Mapping[str, torch.Tensor],
        strict: bool = True,
        source_grid: Sequence[int] | None = None,
    ) -> Any:
        """Loads bare encoder weights (e.g. MAE's ``encoder.state_dict()``) into ``encoder``;
        a position table of another grid is resampled (see :func:`heads.load_encoder_state_dict`)."""
        return load_encoder_state_dict(self.encoder, state_dict, strict, source_grid)

    def no_weight_decay(self) -> set[str]:
        fn = getattr(self.encoder, "no_weight_decay", None)
        return {f"encoder.{n}" for n in fn()} if callable(fn) else set()

    # ------------------------------------------------------------------ forward
    def forward_encoder(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Bottleneck map (B, C, d, h, w) from the final normed tokens, and the skip maps."""
        tokens, maps = self.encoder.forward_intermediates(
            x, self.skip_indices, intermediates_only=False
        )
        B, C = tokens.shape[0], tokens.shape[-1]
        grid = tuple(
            s // p for s, p in zip(x.shape[2:], self.patch_size, strict=True)
        )  # the encoder already rejected non-divisible inputs
        # (B, prefix + L, C) -> (B, L, C) -> (B, C, d, h, w)
        bottleneck = tokens[:, self.encoder.num_prefix_tokens :].transpose(1, 2)
        return bottleneck.reshape(B, C, *grid), list(maps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, D, H, W), sides divisible by the patch -> logits (B, out_channels, D, H, W)."""
        n = self.num_levels
        bottleneck, maps = self.forward_encoder(x)
        skips = [self.encoder1(x)]
        skips += [getattr(self, f"encoder{lvl + 1}")(maps[lvl - 1]) for lvl in range(1, n)]
        y = bottleneck
        for lvl in range(n - 1, -1, -1):
            y = getattr(self, f"decoder{lvl + 2}")(y, skips[lvl])
        return self.out(y)


# ---------------------------------------------------------------------- MONAI weights
def convert_monai_unetr_state_dict(
    sd: Mapping[str, torch.Tensor], patch_size: int | Sequence[int] | None = None
) -> dict[str, torch.Tensor]:
    """MONAI ``UNETR`` state dict -> :class:`UNETR` keys (encoder and decoder).

    ``vit.*`` goes through :func:`umit.models.monai_compat.convert_monai_vit_state_dict` into
    ``encoder.*``; decoder keys drop MONAI's ``Convolution`` wrapper level (``conv1.conv.weight``
    -> ``conv1.weight``) and ``UnetrBasicBlock.layer`` (``encoder1.layer.conv1`` ->
    ``encoder1.conv1``). Build the model with ``encoder=ViT3D(**vit3d_args_from_monai(...))``.
    """

    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    out = {f"encoder.{k}": v for k, v in convert_monai_vit_state_dict(sd, patch_size).items()}
    out.update(convert_monai_decoder_keys(sd, "vit."))
    return out


# ---------------------------------------------------------------------- registered variants
@register_model
def unetr(**kwargs: Any) -> UNETR:
    """UNETR over any registered ViT: ``create_model("unetr", encoder="vit3d_base_p16",
    img_size=96, in_chans=1, out_channels=14)`` (MONAI's UNETR with ``feature_size=16``)."""
    return UNETR(**kwargs)
