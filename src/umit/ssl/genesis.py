"""Models Genesis: restore the original volume from a corrupted one (Zhou et al. 2019).

Each crop is corrupted by (in order, each with its probability) local pixel shuffling within
small blocks, a non-linear intensity map (a random cubic Bezier curve on the per-sample min-max
range) and in-painting (random boxes filled with noise) or out-painting (everything but one box
filled with noise). A light decoder upsamples the encoder's deepest feature map
(:func:`umit.models.heads.feature_map`, the same path for ViT, Swin and CNN encoders) back to the
input and the loss is the MSE to the original. ``baseline_loss`` is the MSE of returning the
corrupted input unchanged: a model below it restores something.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from umit.models.heads import feature_dim, feature_map

__all__ = ["DensePretext", "Genesis3D", "bezier_map", "corrupt", "local_shuffle"]


def _interp(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """``np.interp`` in torch: xp increasing (N,), values clamped at the ends."""
    idx = torch.searchsorted(xp, x.clamp(xp[0], xp[-1])).clamp(1, len(xp) - 1)
    x0, x1, y0, y1 = xp[idx - 1], xp[idx], fp[idx - 1], fp[idx]
    w = ((x - x0) / (x1 - x0).clamp_min(1e-12)).clamp(0, 1)
    return y0 + w * (y1 - y0)


def bezier_map(u: torch.Tensor, p1: torch.Tensor, p2: torch.Tensor, n: int = 1000) -> torch.Tensor:
    """Maps values ``u`` in [0, 1] through the cubic Bezier curve (0,0), p1, p2, (1,1)."""
    t = torch.linspace(0, 1, n, device=u.device)
    c = [(1 - t) ** 3, 3 * (1 - t) ** 2 * t, 3 * (1 - t) * t**2, t**3]
    xs = c[1] * p1[0] + c[2] * p2[0] + c[3]
    ys = c[1] * p1[1] + c[2] * p2[1] + c[3]
    order = torch.argsort(xs)
    return _interp(u, xs[order], ys[order])


def local_shuffle(
    x: torch.Tensor, blocks: int, max_frac: float = 0.1, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Shuffles voxels within ``blocks`` random small boxes of a (C, D, H, W) volume."""
    out = x.clone()
    shape = x.shape[1:]
    for _ in range(blocks):
        size = [
            int(torch.randint(1, max(2, int(s * max_frac) + 1), (1,), generator=generator))
            for s in shape
        ]
        start = [
            int(torch.randint(0, s - b + 1, (1,), generator=generator))
            for s, b in zip(shape, size, strict=True)
        ]
        sl = tuple(slice(a, a + b) for a, b in zip(start, size, strict=True))
        block = out[(slice(None), *sl)]
        flat = block.reshape(block.shape[0], -1)  # (C, d, h, w) -> (C, n)
        perm = torch.randperm(flat.shape[1], generator=generator).to(x.device)
        out[(slice(None), *sl)] = flat[:, perm].reshape(block.shape)
    return out


def _box(shape, lo: float, hi: float, g: torch.Generator | None) -> tuple[slice, ...]:
    size = [max(1, int(s * (lo + (hi - lo) * float(torch.rand(1, generator=g))))) for s in shape]
    start = [
        int(torch.randint(0, s - b + 1, (1,), generator=g))
        for s, b in zip(shape, size, strict=True)
    ]
    return tuple(slice(a, a + b) for a, b in zip(start, size, strict=True))


def corrupt(
    x: torch.Tensor,
    shuffle_prob: float = 0.5,
    shuffle_blocks: int = 50,
    nonlinear_prob: float = 0.9,
    paint_prob: float = 0.9,
    inpaint_rate: float = 0.2,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Models-Genesis corruption of one (C, D, H, W) volume in [0, 1]."""
    g = generator
    shape = x.shape[1:]
    if float(torch.rand(1, generator=g)) < shuffle_prob:
        x = local_shuffle(x, shuffle_blocks, generator=g)
    if float(torch.rand(1, generator=g)) < nonlinear_prob:
        p1, p2 = torch.rand(2, generator=g), torch.rand(2, generator=g)
        x = bezier_map(x, p1.to(x.device), p2.to(x.device))
    if float(torch.rand(1, generator=g)) < paint_prob:
        x = x.clone()
        if float(torch.rand(1, generator=g)) < inpaint_rate:  # in-painting: up to 5 boxes
            for _ in range(int(torch.randint(1, 6, (1,), generator=g))):
                sl = (slice(None), *_box(shape, 1 / 8, 1 / 4, g))
                x[sl] = torch.rand(x[sl].shape, generator=g).to(x.device, x.dtype)
        else:  # out-painting: keep one large box, noise elsewhere
            sl = (slice(None), *_box(shape, 0.5, 0.8, g))
            keep = x[sl].clone()
            x = torch.rand(x.shape, generator=g).to(x.device, x.dtype)
            x[sl] = keep
    return x


def upsampling_decoder(encoder: nn.Module, decoder_dim: int) -> tuple[nn.Sequential, int]:
    """A light decoder from the encoder's deepest feature map back to the input grid: a 1x1x1
    projection to ``decoder_dim``, then (x2 trilinear upsampling, 3³ conv, BN, ReLU) per factor
    of two of the encoder's reduction, halving the width down to 8. Returns it and its output
    width (the caller adds the output convolution)."""
    reduction = encoder.feature_info[-1].get("reduction", 16)
    reduction = max(reduction) if isinstance(reduction, (tuple, list)) else int(reduction)
    width = decoder_dim
    layers: list[nn.Module] = [nn.Conv3d(feature_dim(encoder), width, 1)]
    for _ in range(max(0, math.ceil(math.log2(max(1, reduction))))):
        nxt = max(8, width // 2)
        layers += [
            nn.Upsample(scale_factor=2, mode="trilinear", align_corners=False),
            nn.Conv3d(width, nxt, 3, padding=1, bias=False),
            nn.BatchNorm3d(nxt),
            nn.ReLU(inplace=True),
        ]
        width = nxt
    return nn.Sequential(*layers), width


class DensePretext(nn.Module):
    """What the dense pretexts (restoration, cross-phase prediction) share: a whole network
    (``self.network``, whose encoder is ``.encoder``), or an encoder behind the light
    :func:`upsampling_decoder` and a 3³ output convolution (``self.out``)."""

    network: nn.Module | None

    def _attach(
        self,
        encoder: nn.Module,
        network: bool,
        out_channels: int,
        decoder_dim: int,
        args: dict[str, Any],
        requirement: str,
    ) -> None:
        """Hold ``encoder`` as the whole network, or build the light decoder and the output
        convolution (``out_channels``) behind it; ``model_args`` records either with ``args``.

        Raises:
            ValueError: a whole network whose ``out_channels`` is not ``out_channels``, with
                ``requirement`` saying why it must be.
        """
        if network:
            have = getattr(encoder, "out_channels", None)
            if have != out_channels:
                raise ValueError(
                    f"{requirement} ({out_channels}); {type(encoder).__name__} has "
                    f"out_channels={have!r}"
                )
            self.network = encoder
            self.model_args = {
                "network": getattr(encoder, "model_name", type(encoder).__name__),
                "network_args": getattr(encoder, "model_args", {}),
                **args,
            }
            return
        self.network = None
        self.encoder = encoder
        self.decoder, width = upsampling_decoder(encoder, decoder_dim)
        self.out = nn.Conv3d(width, out_channels, 3, padding=1)
        self.model_args = {
            "encoder": getattr(encoder, "model_name", type(encoder).__name__),
            "encoder_args": getattr(encoder, "model_args", {}),
            **args,
            "decoder_dim": decoder_dim,
        }

    def __getattr__(self, name: str) -> Any:
        if name == "encoder" and self.__dict__["_modules"].get("network") is not None:
            return self.__dict__["_modules"]["network"].encoder  # the network's own encoder
        return super().__getattr__(name)

    def no_weight_decay(self) -> set[str]:
        if self.network is not None:
            nwd = getattr(self.network, "no_weight_decay", lambda: set())()
            return {f"network.{n}" for n in nwd}
        enc = getattr(self.encoder, "no_weight_decay", lambda: set())()
        return {f"encoder.{n}" for n in enc}

    def dense_output(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, D, H, W) -> the network's (or decoder's) output on the input grid."""
        if self.network is not None:
            y = self.network(x)
            return y[0] if isinstance(y, (list, tuple)) else y  # deep supervision: full res first
        y = self.decoder(feature_map(self.encoder, x))
        y = F.interpolate(y, size=x.shape[2:], mode="trilinear", align_corners=False)
        return self.out(y)


class Genesis3D(DensePretext):
    """Restoration wrapper: corrupt, encode, decode, MSE to the original.

    Args:
        encoder: any encoder with ``forward_intermediates`` and ``feature_info`` (with the
            ``reduction`` of its deepest map); or, with ``network=True``, a whole dense model
            (UNETR, SwinUNETR, ResUNet, ...) built with ``out_channels == in_chans``, whose
            output is the restoration: its decoder is pretrained too (Models Genesis pretrains
            the whole U-Net), and fine-tuning starts from it with only the output layer fresh.
        in_chans: input channels.
        decoder_dim: width of the first decoder stage (halved per upsampling, at least 8);
            unused with ``network=True``.
        shuffle_prob, shuffle_blocks, nonlinear_prob, paint_prob, inpaint_rate: see
            :func:`corrupt`.
        network: whether ``encoder`` is a whole encoder-decoder network.
    """

    def __init__(
        self,
        encoder: nn.Module,
        in_chans: int = 1,
        decoder_dim: int = 64,
        shuffle_prob: float = 0.5,
        shuffle_blocks: int = 50,
        nonlinear_prob: float = 0.9,
        paint_prob: float = 0.9,
        inpaint_rate: float = 0.2,
        network: bool = False,
    ):
        super().__init__()
        for name, p in (
            ("shuffle_prob", shuffle_prob),
            ("nonlinear_prob", nonlinear_prob),
            ("paint_prob", paint_prob),
            ("inpaint_rate", inpaint_rate),
        ):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {p!r}")
        self.in_chans = in_chans
        self.corruption = {
            "shuffle_prob": shuffle_prob,
            "shuffle_blocks": shuffle_blocks,
            "nonlinear_prob": nonlinear_prob,
            "paint_prob": paint_prob,
            "inpaint_rate": inpaint_rate,
        }
        self.model_name = "genesis3d"
        self._attach(
            encoder, network, in_chans, decoder_dim, {"in_chans": in_chans, **self.corruption},
            "a restoration network must output the input's channels",
        )  # fmt: skip

    def corrupt_batch(
        self, x: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C, D, H, W) -> (original, corrupted), both min-max scaled to [0, 1] per sample."""
        B = x.shape[0]
        flat = x.float().reshape(B, -1)
        lo = flat.min(1).values.view(B, 1, 1, 1, 1)
        hi = flat.max(1).values.view(B, 1, 1, 1, 1)
        u = (x.float() - lo) / (hi - lo).clamp_min(1e-6)
        bad = torch.stack([corrupt(u[i], **self.corruption, generator=generator) for i in range(B)])
        return u, bad

    def restore(self, x: torch.Tensor) -> torch.Tensor:
        """Corrupted (B, C, D, H, W) -> restored, same shape."""
        return self.dense_output(x)

    def forward(
        self, batch: Any, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        """``batch``: (B, C, D, H, W) crops or a mapping with ``"image"``; returns the loss dict."""
        x = batch["image"] if isinstance(batch, Mapping) else batch
        if x.ndim != 5 or x.shape[1] != self.in_chans:
            raise ValueError(f"expected (B, {self.in_chans}, D, H, W) input, got {tuple(x.shape)}")
        target, bad = self.corrupt_batch(x, generator)
        pred = self.restore(bad.to(x.dtype))
        loss = F.mse_loss(pred.float(), target)
        return {"loss": loss, "baseline_loss": F.mse_loss(bad, target).detach()}
