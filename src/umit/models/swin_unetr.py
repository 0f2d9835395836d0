"""SwinUNETR: a convolutional decoder over the Swin encoder's multi-scale maps (Hatamizadeh et al.).

The decoder reads the encoder only through ``forward_intermediates(x, norm=True)`` (levels 0 =
patch embedding .. S = last stage; MONAI's ``swinViT(x, normalize=True)``) and ``feature_info``
(widths and reductions), so any Swin configuration works. With the default four stages it is
MONAI's ``SwinUNETR`` module for module (names included, so its weights map):

```
x ──── encoder1 (res, C_in -> F) ───────────────────────────────── decoder1 ── out
level 0 (F, 1/2)    ─ encoder2 (res) ──────────────────────── decoder2
level 1 (2F, 1/4)   ─ encoder3 (res) ──────────────── decoder3
level 2 (4F, 1/8)   ─ encoder4 (res) ─────── decoder4
level 3 (8F, 1/16)  ──────────────── decoder5
level 4 (16F, 1/32) ─ encoder10 (res) ┘
```

``decoderK`` up-samples 2x (transposed conv), concatenates the skip and applies a residual block;
``F`` is the encoder's ``embed_dim`` (MONAI ``feature_size``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from umit.models.blocks import NormSpec, OutBlock, ResBlock, UpBlock
from umit.models.heads import build_encoder, check_encoder_api, load_encoder_state_dict
from umit.models.monai_compat import convert_monai_decoder_keys, convert_monai_swin_state_dict
from umit.models.registry import register_model

__all__ = ["SwinUNETR", "convert_monai_swin_unetr_state_dict"]


class SwinUNETR(nn.Module):
    """SwinUNETR segmentation network.

    Args:
        encoder: a registered Swin name (built with ``encoder_args``, ``in_chans``, ``img_size``
            and ``feature_size``) or an encoder module exposing the feature API with
            ``num_stages + 1`` levels.
        out_channels: output classes.
        in_chans: input channels (forwarded to a named encoder).
        img_size: nominal input size (forwarded to a named encoder; documents the input).
        encoder_args: more constructor arguments of a named encoder.
        feature_size: the encoder's ``embed_dim`` F (MONAI ``feature_size``); None keeps the
            named variant's (``swin3d_base``: 48). For a module it must match its width.
        norm: decoder norm (``"instance"`` as MONAI, ``"batch"``, ``"group"``, ...).
    """

    def __init__(
        self,
        encoder: str | nn.Module = "swin3d_base",
        out_channels: int = 2,
        in_chans: int | None = None,
        img_size: int | Sequence[int] | None = None,
        encoder_args: Mapping[str, Any] | None = None,
        feature_size: int | None = None,
        norm: NormSpec = "instance",
    ):
        super().__init__()
        if out_channels <= 0:
            raise ValueError(f"out_channels must be positive, got {out_channels!r}")
        args = dict(encoder_args or {})
        if feature_size is not None and isinstance(encoder, str):
            args["embed_dim"] = feature_size
        self.encoder, in_chans = build_encoder(encoder, args or None, in_chans, img_size)
        check_encoder_api(self.encoder, "SwinUNETR")
        info = self.encoder.feature_info
        widths = [int(i["num_chs"]) for i in info]
        reductions = [tuple(int(r) for r in i["reduction"]) for i in info]
        stages = len(info) - 1
        if stages < 1:
            raise ValueError("SwinUNETR needs an encoder with at least one stage after the stem")
        if stages > 8:
            raise ValueError(f"SwinUNETR supports up to 8 stages (MONAI names), got {stages}")
        for lvl in range(1, stages + 1):
            prev, cur = reductions[lvl - 1], reductions[lvl]
            if any(c % p for c, p in zip(cur, prev, strict=True)) or cur == prev:
                raise ValueError(
                    f"SwinUNETR needs a hierarchical encoder (each level down-sampling the last); "
                    f"feature_info reductions are {reductions}"
                )
        if feature_size is not None and widths[0] != feature_size:
            raise ValueError(f"feature_size={feature_size} but the encoder's width is {widths[0]}")
        self.init_args: dict[str, Any] = {
            "encoder": encoder if isinstance(encoder, str) else type(encoder).__name__,
            "out_channels": out_channels,
            "in_chans": in_chans,
            "img_size": img_size,
            "encoder_args": dict(encoder_args or {}),
            "feature_size": feature_size,
            "norm": norm,
        }
        self.model_name: str | None = None  # set by create_model
        self.model_args: dict[str, Any] = {}
        self.num_stages = stages
        self.out_channels = out_channels
        self.feature_size = widths[0]
        self.reduction = reductions[-1]

        fs = widths[0]
        self.encoder1 = ResBlock(in_chans, fs, 3, 1, norm)
        for lvl in range(stages - 1):  # levels 0 .. S-2 get a residual block; S-1 is used raw
            self.add_module(f"encoder{lvl + 2}", ResBlock(widths[lvl], widths[lvl], 3, 1, norm))
        self.encoder10 = ResBlock(widths[-1], widths[-1], 3, 1, norm)
        for lvl in range(stages, 0, -1):
            factor = tuple(
                a // b for a, b in zip(reductions[lvl], reductions[lvl - 1], strict=True)
            )
            self.add_module(
                f"decoder{lvl + 1}", UpBlock(widths[lvl], widths[lvl - 1], factor, norm, True)
            )
        self.decoder1 = UpBlock(fs, fs, reductions[0], norm, True)
        self.out = OutBlock(fs, out_channels)

    # ------------------------------------------------------------------ fine-tuning helpers
    def load_encoder_state_dict(
        self, state_dict: Mapping[str, torch.Tensor], strict: bool = True
    ) -> Any:
        """Loads bare encoder weights (``SwinTransformer3D`` keys) into ``encoder``."""
        return load_encoder_state_dict(self.encoder, state_dict, strict)

    def no_weight_decay(self) -> set[str]:
        fn = getattr(self.encoder, "no_weight_decay", None)
        return {f"encoder.{n}" for n in fn()} if callable(fn) else set()

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, D, H, W), sides divisible by the total reduction (32 for 4 stages) ->
        logits (B, out_channels, D, H, W)."""
        bad = [s for s, r in zip(x.shape[2:], self.reduction, strict=True) if s % r]
        if bad:
            raise ValueError(
                f"SwinUNETR input spatial shape {tuple(x.shape[2:])} must be divisible by "
                f"{self.reduction} (pad or crop it, e.g. with the sliding-window inferer)"
            )
        S = self.num_stages
        maps = self.encoder.forward_intermediates(x, None, norm=True)  # S + 1 levels
        skips = [self.encoder1(x)]
        skips += [getattr(self, f"encoder{lvl + 2}")(maps[lvl]) for lvl in range(S - 1)]
        skips.append(maps[S - 1])
        y = self.encoder10(maps[S])
        for lvl in range(S, 0, -1):
            y = getattr(self, f"decoder{lvl + 1}")(y, skips[lvl])
        return self.out(self.decoder1(y, skips[0]))


# ---------------------------------------------------------------------- MONAI weights
def convert_monai_swin_unetr_state_dict(
    sd: Mapping[str, torch.Tensor], downsample: str = "merging"
) -> dict[str, torch.Tensor]:
    """MONAI ``SwinUNETR`` state dict -> :class:`SwinUNETR` keys (encoder and decoder).

    ``swinViT.*`` goes through :func:`umit.models.monai_compat.convert_monai_swin_state_dict`
    into ``encoder.*``; decoder keys drop MONAI's ``Convolution`` wrapper level and
    ``UnetrBasicBlock.layer``. SwinUNETR-v2 (``use_v2``) checkpoints are refused by the encoder
    converter.
    """

    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    enc = convert_monai_swin_state_dict(sd, downsample=downsample)
    out = {f"encoder.{k}": v for k, v in enc.items()}
    out.update(convert_monai_decoder_keys(sd, "swinViT."))
    return out


# ---------------------------------------------------------------------- registered variants
@register_model
def swin_unetr(**kwargs: Any) -> SwinUNETR:
    """SwinUNETR over a registered Swin: ``create_model("swin_unetr", encoder="swin3d_base",
    img_size=96, in_chans=1, out_channels=14)`` (MONAI's BTCV model at feature size 48)."""
    return SwinUNETR(**kwargs)
