"""CNN baselines: an nnU-Net-style residual-encoder U-Net and 3D ResNet classifiers.

- :class:`ResUNet3D` (``resunet3d``): nnU-Net's residual encoder U-Net ("ResEnc"): a conv stem,
  stages of residual blocks (instance norm, leaky ReLU; stride-2 convolution opens each deeper
  stage), transposed-conv up-sampling, concatenated skips, conv-norm-act decoder stages and 1x1
  segmentation heads; ``deep_supervision`` returns one output per decoder stage in training
  (full resolution first). Its encoder (:class:`ResEncoder3D`) has the feature API, so
  ``freeze_encoder`` / ``layer_id_fn`` work on it like on the transformers.
- :class:`ResNet3D` (``resnet3d_18`` / ``resnet3d_34`` / ``resnet3d_50``): torchvision's ResNet in
  3D (basic or bottleneck blocks, 7³ stride-2 stem and max-pool) with ``forward_features`` ->
  (B, C, d, h, w) and ``forward_head`` (average pool, dropout, Linear). Default norm is
  ``"group"``: BatchNorm mixes samples of a batch, which DP-SGD (per-sample gradients, Opacus)
  cannot allow, and instance norm degenerates on the 3³ maps of the last stage. It is built from
  stock ``nn.Conv3d`` / ``nn.GroupNorm`` modules so Opacus wraps it unchanged.

Every model takes (and ignores) ``img_size`` so the fine-tuning CLI can pass the same arguments
to any registered model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from umit.models.blocks import Conv3d, ConvNormAct, NormSpec, ResBlock, UpConv, get_norm_layer
from umit.models.heads import load_encoder_state_dict
from umit.models.registry import create_model, register_model
from umit.models.vit3d import intermediates_plan

__all__ = ["ResEncoder3D", "ResNet3D", "ResUNet3D"]

Int3 = tuple[int, int, int]
# nnU-Net ResEnc M / L blocks per stage, truncated to the number of stages
NNUNET_RESENC_BLOCKS = (1, 3, 4, 6, 6, 6, 6)


def _int3(value: int | Sequence[int], name: str) -> Int3:
    out = (value,) * 3 if isinstance(value, int) else tuple(int(v) for v in value)
    if len(out) != 3 or any(v <= 0 for v in out):
        raise ValueError(f"{name} must be a positive int or 3 positive ints, got {value!r}")
    return out  # type: ignore[return-value]


def _he_init(module: nn.Module, slope: float) -> None:
    """nnU-Net's ``InitWeights_He``: kaiming-normal convolutions, zero biases."""
    for m in module.modules():
        if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d)):
            nn.init.kaiming_normal_(m.weight, a=slope)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


# ---------------------------------------------------------------------- residual U-Net
class ResEncoder3D(nn.Module):
    """Residual encoder of :class:`ResUNet3D` with the shared feature API.

    Args:
        in_chans: input channels.
        features: width of each stage.
        blocks: residual blocks per stage (an int: the same for all).
        strides: down-sampling of each stage's first block (default 1, then 2 per stage).
        norm: norm spec (``"instance_affine"`` as nnU-Net).
    """

    def __init__(
        self,
        in_chans: int = 1,
        features: Sequence[int] = (32, 64, 128, 256, 320),
        blocks: int | Sequence[int] | None = None,
        strides: Sequence[int | Sequence[int]] | None = None,
        norm: NormSpec = "instance_affine",
    ):
        super().__init__()
        features = [int(f) for f in features]
        if not features or any(f <= 0 for f in features):
            raise ValueError(f"features must be positive ints, got {features!r}")
        n = len(features)
        if blocks is None:
            blocks = NNUNET_RESENC_BLOCKS[:n] if n <= len(NNUNET_RESENC_BLOCKS) else [2] * n
        blocks = [int(blocks)] * n if isinstance(blocks, int) else [int(b) for b in blocks]
        if len(blocks) != n or any(b <= 0 for b in blocks):
            raise ValueError(f"blocks must hold {n} positive ints (one per stage), got {blocks!r}")
        strides = [1] + [2] * (n - 1) if strides is None else list(strides)
        if len(strides) != n:
            raise ValueError(f"strides must hold {n} entries (one per stage), got {strides!r}")
        stride3 = [_int3(s, "strides") for s in strides]
        self.in_chans = in_chans
        self.stem = ConvNormAct(in_chans, features[0], 3, 1, norm)
        self.stages = nn.ModuleList()
        self.feature_info: list[dict[str, Any]] = []
        reduction = (1, 1, 1)
        prev = features[0]
        for i, (f, b, s) in enumerate(zip(features, blocks, stride3, strict=True)):
            layers = [ResBlock(prev, f, 3, s, norm)]
            layers += [ResBlock(f, f, 3, 1, norm) for _ in range(b - 1)]
            self.stages.append(nn.Sequential(*layers))
            reduction = tuple(r * si for r, si in zip(reduction, s, strict=True))  # type: ignore[assignment]
            self.feature_info.append(
                {"num_chs": f, "reduction": reduction, "module": f"stages.{i}"}
            )
            prev = f
        self.strides = stride3
        self.num_features = features[-1]

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        output_fmt: str = "NCDHW",
        intermediates_only: bool = True,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Stage outputs (B, C_i, D/r_i, H/r_i, W/r_i) (timm ``indices`` semantics)."""
        if norm:
            raise ValueError("ResEncoder3D has no final norm (norm=True is not supported)")
        take, last = intermediates_plan(
            len(self.stages), indices, output_fmt, intermediates_only, formats=("NCDHW",)
        )
        feats: dict[int, torch.Tensor] = {}
        x = self.stem(x)
        for i in range(last + 1):
            x = self.stages[i](x)
            feats[i] = x
        out = [feats[i] for i in take]
        return out if intermediates_only else (x, out)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, D, H, W) -> deepest map (B, C_last, d, h, w)."""
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)


class ResUNet3D(nn.Module):
    """nnU-Net-style residual-encoder U-Net.

    Args:
        in_chans: input channels.
        out_channels: output classes.
        features: width per stage (nnU-Net 3d_fullres: 32, 64, 128, 256, 320, 320).
        blocks: residual blocks per encoder stage (default nnU-Net ResEnc 1, 3, 4, 6, 6, 6).
        strides: down-sampling per stage (default 1 then 2; an entry may be per axis).
        decoder_convs: conv-norm-act layers per decoder stage (nnU-Net ResEnc: 1).
        norm: norm spec (``"instance_affine"``: nnU-Net's instance norm with affine).
        deep_supervision: in training, return a list of logits, one per decoder stage, full
            resolution first (lower ones at 1/2, 1/4, ... of the input); in eval always the
            full-resolution tensor.
        img_size: accepted and ignored (any size divisible by the total stride runs).
    """

    def __init__(
        self,
        in_chans: int = 1,
        out_channels: int = 2,
        features: Sequence[int] = (32, 64, 128, 256, 320),
        blocks: int | Sequence[int] | None = None,
        strides: Sequence[int | Sequence[int]] | None = None,
        decoder_convs: int = 1,
        norm: NormSpec = "instance_affine",
        deep_supervision: bool = False,
        img_size: int | Sequence[int] | None = None,
    ):
        super().__init__()
        if out_channels <= 0:
            raise ValueError(f"out_channels must be positive, got {out_channels!r}")
        if decoder_convs <= 0:
            raise ValueError(f"decoder_convs must be positive, got {decoder_convs!r}")
        if len(features) < 2:
            raise ValueError(f"ResUNet3D needs at least 2 stages, got features={features!r}")
        self.init_args: dict[str, Any] = {
            "in_chans": in_chans,
            "out_channels": out_channels,
            "features": tuple(features),
            "blocks": blocks if blocks is None or isinstance(blocks, int) else tuple(blocks),
            "strides": None if strides is None else tuple(strides),
            "decoder_convs": decoder_convs,
            "norm": norm,
            "deep_supervision": deep_supervision,
            "img_size": img_size,
        }
        self.model_name: str | None = None  # set by create_model
        self.model_args: dict[str, Any] = {}
        # built by name, so that the encoder alone can be saved (``encoder.pt`` of a pretrained
        # ResUNet) and rebuilt from its artifact
        self.encoder = create_model(
            "resunet3d_encoder",
            in_chans=in_chans,
            features=tuple(int(f) for f in features),
            blocks=self.init_args["blocks"],
            strides=self.init_args["strides"],
            norm=norm,
        )
        self.deep_supervision = deep_supervision
        self.out_channels = out_channels
        info = self.encoder.feature_info
        self.reduction = info[-1]["reduction"]
        self.upsamples = nn.ModuleList()
        self.stages = nn.ModuleList()
        self.seg_layers = nn.ModuleList()
        for s in range(len(info) - 1, 0, -1):  # deepest first
            c_in, c_out = info[s]["num_chs"], info[s - 1]["num_chs"]
            self.upsamples.append(UpConv(c_in, c_out, self.encoder.strides[s]))
            convs = [ConvNormAct(2 * c_out, c_out, 3, 1, norm)]
            convs += [ConvNormAct(c_out, c_out, 3, 1, norm) for _ in range(decoder_convs - 1)]
            self.stages.append(nn.Sequential(*convs))
            # every stage has a head (so checkpoints load with or without deep supervision)
            self.seg_layers.append(Conv3d(c_out, out_channels, 1, bias=True))
        _he_init(self, 1e-2)

    def load_encoder_state_dict(self, state_dict: Any, strict: bool = True) -> Any:
        """Loads :class:`ResEncoder3D` weights into ``encoder``."""
        return load_encoder_state_dict(self.encoder, state_dict, strict)

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        """(B, C_in, D, H, W), sides divisible by the total stride -> logits (B, K, D, H, W),
        or with deep supervision in training a list of them at decreasing resolution."""
        bad = [s for s, r in zip(x.shape[2:], self.reduction, strict=True) if s % r]
        if bad:
            raise ValueError(
                f"ResUNet3D input spatial shape {tuple(x.shape[2:])} must be divisible by the "
                f"total stride {self.reduction}"
            )
        skips = self.encoder.forward_intermediates(x)  # shallowest first
        y = skips[-1]
        outputs = []
        n = len(self.stages)
        ds = self.deep_supervision and self.training
        for j, (up, stage) in enumerate(zip(self.upsamples, self.stages, strict=True)):
            y = stage(torch.cat((up(y), skips[-2 - j]), dim=1))
            if ds or j == n - 1:
                outputs.append(self.seg_layers[j](y))
        return outputs[::-1] if ds else outputs[-1]


@register_model
def resunet3d_encoder(img_size: Any = None, **kwargs: Any) -> ResEncoder3D:
    """The residual encoder of :func:`resunet3d` alone (feature maps; ``img_size`` is ignored)."""
    return ResEncoder3D(**kwargs)


@register_model
def resunet3d(**kwargs: Any) -> ResUNet3D:
    """nnU-Net-like residual-encoder U-Net, features (32, 64, 128, 256, 320)."""
    return ResUNet3D(**kwargs)


# ---------------------------------------------------------------------- 3D ResNet
class ResNetBasicBlock3D(nn.Module):
    """Two 3x3x3 conv-norm layers and a shortcut (ResNet-18/34)."""

    expansion = 1

    def __init__(self, in_chs: int, width: int, stride: int, norm: NormSpec):
        super().__init__()
        out = width * self.expansion
        self.conv1 = nn.Conv3d(in_chs, width, 3, stride, 1, bias=False)
        self.norm1 = get_norm_layer(norm, width, stock=True)
        self.conv2 = nn.Conv3d(width, out, 3, 1, 1, bias=False)
        self.norm2 = get_norm_layer(norm, out, stock=True)
        self.act = nn.ReLU(inplace=True)
        self.downsample = _shortcut(in_chs, out, stride, norm)

    def last_norm(self) -> nn.Module:
        return self.norm2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.act(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        out += identity
        return self.act(out)


class ResNetBottleneck3D(nn.Module):
    """1x1x1 reduce, 3x3x3 (strided), 1x1x1 expand (x4), and a shortcut (ResNet-50+)."""

    expansion = 4

    def __init__(self, in_chs: int, width: int, stride: int, norm: NormSpec):
        super().__init__()
        out = width * self.expansion
        self.conv1 = nn.Conv3d(in_chs, width, 1, bias=False)
        self.norm1 = get_norm_layer(norm, width, stock=True)
        self.conv2 = nn.Conv3d(width, width, 3, stride, 1, bias=False)
        self.norm2 = get_norm_layer(norm, width, stock=True)
        self.conv3 = nn.Conv3d(width, out, 1, bias=False)
        self.norm3 = get_norm_layer(norm, out, stock=True)
        self.act = nn.ReLU(inplace=True)
        self.downsample = _shortcut(in_chs, out, stride, norm)

    def last_norm(self) -> nn.Module:
        return self.norm3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.act(self.norm1(self.conv1(x)))
        out = self.act(self.norm2(self.conv2(out)))
        out = self.norm3(self.conv3(out))
        out += identity
        return self.act(out)


def _shortcut(in_chs: int, out_chs: int, stride: int, norm: NormSpec) -> nn.Module | None:
    if stride == 1 and in_chs == out_chs:
        return None
    return nn.Sequential(
        nn.Conv3d(in_chs, out_chs, 1, stride, bias=False), get_norm_layer(norm, out_chs, stock=True)
    )


_BLOCKS = {"basic": ResNetBasicBlock3D, "bottleneck": ResNetBottleneck3D}


class ResNet3D(nn.Module):
    """3D ResNet classifier (torchvision layout: stem, layer1..layer4, pooled Linear head).

    Args:
        block: ``"basic"`` (ResNet-18/34) or ``"bottleneck"`` (ResNet-50+).
        layers: blocks per stage.
        in_chans: input channels.
        num_classes: outputs; 0 means no head (``forward`` returns pooled features).
        widths: stage widths before the block expansion.
        stem_width: channels of the stem convolution.
        stem_kernel: stem convolution size (7 as torchvision / MedicalNet).
        stem_stride: stem convolution stride.
        stem_pool: 3³ stride-2 max-pool after the stem.
        norm: ``"group"`` (default: DP-SGD compatible, batch-size independent), ``"instance"``,
            ``"batch"`` or ``(name, kwargs)``.
        drop_rate: dropout before the head.
        zero_init_residual: zero the last norm's scale in every block (each block starts as the
            identity; Goyal et al.).
        img_size: accepted and ignored.
    """

    def __init__(
        self,
        block: str = "basic",
        layers: Sequence[int] = (2, 2, 2, 2),
        in_chans: int = 1,
        num_classes: int = 2,
        widths: Sequence[int] = (64, 128, 256, 512),
        stem_width: int = 64,
        stem_kernel: int = 7,
        stem_stride: int = 2,
        stem_pool: bool = True,
        norm: NormSpec = "group",
        drop_rate: float = 0.0,
        zero_init_residual: bool = True,
        img_size: int | Sequence[int] | None = None,
    ):
        super().__init__()
        if block not in _BLOCKS:
            raise ValueError(f"block must be one of {sorted(_BLOCKS)}, got {block!r}")
        if len(layers) != len(widths) or any(n <= 0 for n in layers):
            raise ValueError(
                f"layers {layers!r} and widths {widths!r} need one positive entry each"
            )
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes!r}")
        if not 0.0 <= drop_rate < 1.0:
            raise ValueError(f"drop_rate must be in [0, 1), got {drop_rate!r}")
        self.init_args: dict[str, Any] = {
            "block": block,
            "layers": tuple(layers),
            "in_chans": in_chans,
            "num_classes": num_classes,
            "widths": tuple(widths),
            "stem_width": stem_width,
            "stem_kernel": stem_kernel,
            "stem_stride": stem_stride,
            "stem_pool": stem_pool,
            "norm": norm,
            "drop_rate": drop_rate,
            "zero_init_residual": zero_init_residual,
            "img_size": img_size,
        }
        self.model_name: str | None = None  # set by create_model
        self.model_args: dict[str, Any] = {}
        cls = _BLOCKS[block]
        self.in_chans = in_chans
        self.conv1 = nn.Conv3d(
            in_chans, stem_width, stem_kernel, stem_stride, stem_kernel // 2, bias=False
        )
        self.norm1 = get_norm_layer(norm, stem_width, stock=True)
        self.act = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool3d(3, 2, 1) if stem_pool else nn.Identity()
        reduction = stem_stride * (2 if stem_pool else 1)
        self.feature_info: list[dict[str, Any]] = []
        prev = stem_width
        for i, (n, w) in enumerate(zip(layers, widths, strict=True)):
            stride = 1 if i == 0 else 2
            reduction *= stride
            blocks = [cls(prev, w, stride, norm)]
            prev = w * cls.expansion
            blocks += [cls(prev, w, 1, norm) for _ in range(n - 1)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
            self.feature_info.append(
                {"num_chs": prev, "reduction": (reduction,) * 3, "module": f"layer{i + 1}"}
            )
        self.num_stages = len(layers)
        self.num_features = prev
        self.num_classes = num_classes
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(prev, num_classes) if num_classes else nn.Identity()
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.GroupNorm, nn.BatchNorm3d, nn.InstanceNorm3d)) and m.affine:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, (ResNetBasicBlock3D, ResNetBottleneck3D)):
                    norm_layer = m.last_norm()
                    if getattr(norm_layer, "weight", None) is not None:
                        nn.init.zeros_(norm_layer.weight)

    def _stages(self) -> list[nn.Module]:
        return [getattr(self, f"layer{i + 1}") for i in range(self.num_stages)]

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        output_fmt: str = "NCDHW",
        intermediates_only: bool = True,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Stage outputs ``layer1..layerN`` as (B, C, d, h, w) maps (timm ``indices``)."""
        if norm:
            raise ValueError("ResNet3D has no final norm (norm=True is not supported)")
        take, last = intermediates_plan(
            self.num_stages, indices, output_fmt, intermediates_only, formats=("NCDHW",)
        )
        x = self.maxpool(self.act(self.norm1(self.conv1(x))))
        feats = {}
        for i, stage in enumerate(self._stages()[: last + 1]):
            x = stage(x)
            feats[i] = x
        out = [feats[i] for i in take]
        return out if intermediates_only else (x, out)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, D, H, W) -> last-stage map (B, num_features, d, h, w)."""
        x = self.maxpool(self.act(self.norm1(self.conv1(x))))
        for stage in self._stages():
            x = stage(x)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Global average pool of a (B, C, d, h, w) map, dropout, Linear."""
        x = self.head_drop(x.mean(dim=(2, 3, 4)))
        return x if pre_logits else self.head(x)

    def reset_classifier(self, num_classes: int) -> None:
        """Replaces the head (``num_classes=0`` removes it)."""
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes!r}")
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


@register_model
def resnet3d_test(**kwargs: Any) -> ResNet3D:
    """Tiny 3D ResNet for unit tests (basic blocks 1, 1, 1, 1, widths 8-16-32-32)."""
    defaults = {"block": "basic", "layers": (1, 1, 1, 1), "widths": (8, 16, 32, 32)}
    return ResNet3D(**{**defaults, "stem_width": 8, **kwargs})


@register_model
def resnet3d_18(**kwargs: Any) -> ResNet3D:
    """3D ResNet-18 (basic blocks 2, 2, 2, 2), group norm."""
    return ResNet3D(**{"block": "basic", "layers": (2, 2, 2, 2), **kwargs})


@register_model
def resnet3d_34(**kwargs: Any) -> ResNet3D:
    """3D ResNet-34 (basic blocks 3, 4, 6, 3), group norm."""
    return ResNet3D(**{"block": "basic", "layers": (3, 4, 6, 3), **kwargs})


@register_model
def resnet3d_50(**kwargs: Any) -> ResNet3D:
    """3D ResNet-50 (bottleneck blocks 3, 4, 6, 3), group norm."""
    return ResNet3D(**{"block": "bottleneck", "layers": (3, 4, 6, 3), **kwargs})
