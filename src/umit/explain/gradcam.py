"""Grad-CAM (Selvaraju et al., 2017) for models without global attention (CNNs, Swin).

The target layer is the encoder's deepest feature level, found through the feature API's
``feature_info[-1]["module"]`` (so no model-specific names here). Its activations A (B, C, d, h,
w) and the gradient of a scalar score with respect to them give channel weights
``w_c = mean_{d,h,w} dS/dA_c`` and the map ``relu(sum_c w_c A_c)`` on the feature grid, which the
caller resamples to the input window.

Scores: classification, the logit of one class; segmentation, the sum of one class's logits
over a region of the output (Seg-Grad-CAM, Vinogradova et al., 2020).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["gradcam", "target_layer"]


def target_layer(model: nn.Module) -> tuple[nn.Module, int]:
    """The deepest feature module of the model's encoder and its channel count."""
    encoder = getattr(model, "encoder", model)
    info = getattr(encoder, "feature_info", None)
    if not info:
        raise ValueError(
            f"{type(model).__name__} exposes no feature_info: Grad-CAM needs the feature API"
        )
    return encoder.get_submodule(info[-1]["module"]), int(info[-1]["num_chs"])


def _channels_first(a: torch.Tensor, num_chs: int) -> torch.Tensor:
    """(B, C, d, h, w) or channel-last (B, d, h, w, C) -> (B, C, d, h, w)."""
    if a.ndim == 5 and a.shape[1] == num_chs:
        return a
    if a.ndim == 5 and a.shape[-1] == num_chs:
        return a.permute(0, 4, 1, 2, 3)
    raise ValueError(
        f"Grad-CAM needs a 5D feature map with {num_chs} channels, got {tuple(a.shape)}"
    )


def gradcam(
    model: nn.Module,
    x: torch.Tensor,
    score: Callable[[torch.Tensor], torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Grad-CAM of ``score(model(x))`` at the deepest encoder level.

    Args:
        model: the network (eval mode).
        x: (1, C_in, D, H, W) input window.
        score: output -> scalar to explain.

    Returns:
        ``(cam, output)``: cam (D, H, W) >= 0, trilinearly resampled to the window and scaled to
        max 1 (all zeros when no channel raises the score), and the model's detached output.
    """
    layer, num_chs = target_layer(model)
    saved: dict[str, torch.Tensor] = {}

    def hook(_m: nn.Module, _args: tuple, output: torch.Tensor) -> None:
        if isinstance(output, (tuple, list)):
            output = output[0]
        output.retain_grad()
        saved["a"] = output

    handle = layer.register_forward_hook(hook)
    try:
        with torch.enable_grad():
            x = x.detach().requires_grad_(False)
            out = model(x)
            s = score(out)
            if s.ndim != 0:
                raise ValueError(f"the Grad-CAM score must be a scalar, got shape {tuple(s.shape)}")
            s.backward()
    finally:
        handle.remove()
    if "a" not in saved or saved["a"].grad is None:
        raise ValueError(f"{type(model).__name__}: the target layer was not used by the forward")
    a = _channels_first(saved["a"].detach(), num_chs)
    g = _channels_first(saved["a"].grad.detach(), num_chs)
    w = g.mean(dim=(2, 3, 4), keepdim=True)  # (B, C, 1, 1, 1)
    cam = F.relu((w * a).sum(dim=1, keepdim=True))  # (B, 1, d, h, w)
    cam = F.interpolate(cam, size=tuple(x.shape[2:]), mode="trilinear", align_corners=False)[0, 0]
    peak = cam.max()
    cam = cam / peak if peak > 0 else cam
    model.zero_grad(set_to_none=True)
    return cam, out.detach()
