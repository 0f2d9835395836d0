"""Missing MRI sequences: a learned "absent" embedding per input channel.

Convention: a channel that is absent from a sample is NaN in the input tensor (all of its
voxels, or, for masked patches, some). :class:`AbsentChannels` turns that into something a
network can use, in two places:

- in image space, every absent voxel of channel ``c`` becomes a learned value ``fill[c]``
  (the only option for a CNN: through its first convolution a constant input is a learned
  per-feature offset, exact away from the borders, so a CNN gets one learned bias vector per
  absent channel);
- in token space, where the encoder has a linear input projection (``patch_embed`` of the ViT
  and Swin encoders), a learned vector ``embed[c]`` (width of the tokens) weighted by the
  fraction of channel ``c`` that is absent in the sample is added to every token: the
  transformer then knows *which* sequence is missing, not only that its voxels hold ``fill``.

:class:`AbsentChannelModel` (registered as ``absent_channels``) wraps any task model with it and
with channel dropout at training time (each channel of each sample is dropped with
probability ``drop_prob``, never all of them). :class:`DropChannels` drops named channels at
inference (``umit evaluate drop_channels=[FLAIR]``): NaN for a model that handles absent
channels, else the normalised mean (0) in their place.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from umit.models.registry import create_model, register_model

__all__ = ["AbsentChannelModel", "AbsentChannels", "DropChannels", "absent_fraction"]


def absent_fraction(x: torch.Tensor) -> torch.Tensor:
    """(B, C, D, H, W) with NaN where absent -> (B, C) fraction of absent voxels per channel."""
    return torch.isnan(x).flatten(2).float().mean(-1)


class AbsentChannels(nn.Module):
    """Learned fill value (image space) and embedding (token space) of each absent channel.

    Args:
        in_chans: input channels C.
        embed_dim: token width of the encoder's input projection (None: image space only).
    """

    def __init__(self, in_chans: int, embed_dim: int | None = None):
        super().__init__()
        if in_chans < 1:
            raise ValueError(f"in_chans must be >= 1, got {in_chans}")
        self.in_chans = in_chans
        self.fill = nn.Parameter(torch.zeros(in_chans))
        self.embed = nn.Parameter(torch.zeros(in_chans, embed_dim)) if embed_dim else None
        self._frac: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, D, H, W) with NaN where absent -> filled input (the fraction absent per
        channel is kept for the token hook of the next encoder call)."""
        if x.ndim != 5 or x.shape[1] != self.in_chans:
            raise ValueError(f"expected (B, {self.in_chans}, D, H, W) input, got {tuple(x.shape)}")
        nan = torch.isnan(x)
        self._frac = nan.flatten(2).float().mean(-1)  # (B, C)
        fill = self.fill.to(x.dtype).view(1, -1, 1, 1, 1).expand_as(x)
        return torch.where(nan, fill, x)

    def token_offset(self) -> torch.Tensor | None:
        """(B, embed_dim) learned offset of the last input's absent channels (None: no embed)."""
        if self.embed is None or self._frac is None:
            return None
        return self._frac.to(self.embed.dtype) @ self.embed  # (B, C) @ (C, E) -> (B, E)

    def attach(self, encoder: nn.Module) -> bool:
        """Adds the token offset to the output of ``encoder.patch_embed`` (tokens last-dim
        ``embed_dim``: ViT (B, L, E), Swin (B, d, h, w, E)); False when there is none."""
        pe = getattr(encoder, "patch_embed", None)
        if self.embed is None or pe is None:
            return False

        def hook(_module: nn.Module, _args: Any, out: torch.Tensor) -> torch.Tensor:
            off = self.token_offset()
            self._frac = None  # one input, one encoder call: a direct encoder call adds nothing
            if off is None or off.shape[0] != out.shape[0]:
                return out
            shape = (off.shape[0],) + (1,) * (out.ndim - 2) + (off.shape[1],)
            return out + off.to(out.dtype).view(shape)  # (B, E) broadcast over the tokens

        pe.register_forward_hook(hook)
        return True


def token_width(encoder: nn.Module | None) -> int | None:
    """Width of the tokens out of ``encoder.patch_embed`` (None: no linear input projection)."""
    pe = getattr(encoder, "patch_embed", None) if encoder is not None else None
    proj = getattr(pe, "proj", None)
    return int(proj.out_channels) if isinstance(proj, nn.Conv3d) else None


def drop_random_channels(x: torch.Tensor, prob: float, generator=None) -> torch.Tensor:
    """Sets each channel of each sample to NaN with probability ``prob``; one channel (drawn
    at random) is always kept."""
    B, C = x.shape[:2]
    if prob <= 0 or C < 2:
        return x
    drop = torch.rand(B, C, generator=generator) < prob
    keep = torch.randint(0, C, (B,), generator=generator)
    drop[torch.arange(B), keep] = False
    drop = drop.to(x.device).view(B, C, 1, 1, 1)
    return x.masked_fill(drop, float("nan"))


class AbsentChannelModel(nn.Module):
    """Any task model with a learned "absent" embedding per channel and channel dropout.

    Args:
        net: the task model (UNETR, SwinUNETR, ResUNet, classifier, ...).
        in_chans: input channels.
        drop_prob: training-time probability of dropping each channel of a sample.
    """

    handles_absent_channels = True

    def __init__(self, net: nn.Module, in_chans: int, drop_prob: float = 0.0):
        super().__init__()
        if not 0.0 <= drop_prob < 1.0:
            raise ValueError(f"drop_prob must be in [0, 1), got {drop_prob!r}")
        self.net = net
        self.drop_prob = drop_prob
        encoder = getattr(net, "encoder", None)
        self.absent = AbsentChannels(in_chans, token_width(encoder))
        self.token_embedding = self.absent.attach(encoder) if encoder is not None else False

    @property
    def encoder(self) -> nn.Module:
        return self.net.encoder

    def no_weight_decay(self) -> set[str]:
        inner = getattr(self.net, "no_weight_decay", lambda: set())()
        return {f"net.{n}" for n in inner} | {"absent.fill", "absent.embed"}

    def layer_id_fn(self) -> Callable[[str], int]:
        """The task model's layer ids under ``net.``; the absent embeddings go with the stem."""
        from umit.models.heads import wrapped_layer_id_fn  # noqa: PLC0415 (heads imports registry)

        return wrapped_layer_id_fn(self.net)

    def forward(self, x: torch.Tensor) -> Any:
        if self.training and self.drop_prob > 0:
            x = drop_random_channels(x, self.drop_prob)
        return self.net(self.absent(x))


@register_model
def absent_channels(
    model: str, model_args: dict[str, Any] | None = None, drop_prob: float = 0.0, **kwargs: Any
) -> AbsentChannelModel:
    """``create_model("absent_channels", model="unetr", model_args={...}, drop_prob=0.3)``."""
    args = {**(model_args or {}), **kwargs}
    if "in_chans" not in args:
        raise ValueError("absent_channels needs the model's in_chans (in model_args)")
    net = create_model(model, **args)
    return AbsentChannelModel(net, int(args["in_chans"]), drop_prob)


class DropChannels(nn.Module):
    """Inference with some channels missing: ``model`` sees them as NaN (a model that handles
    absent channels) or as 0, the mean of a z-scored channel (any other model).

    Args:
        model: the model.
        drop: indices of the channels to drop.
    """

    def __init__(self, model: nn.Module, drop: Sequence[int]):
        super().__init__()
        self.model = model
        self.drop = sorted({int(i) for i in drop})
        self.fill = float("nan") if getattr(model, "handles_absent_channels", False) else 0.0

    def forward(self, x: torch.Tensor) -> Any:
        x = x.clone()
        x[:, self.drop] = self.fill
        return self.model(x)
