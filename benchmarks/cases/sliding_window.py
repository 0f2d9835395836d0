"""Sliding-window inference of a CT volume: our ``SlidingWindowInferer`` vs MONAI's
``sliding_window_inference``, both returning the label map (argmax over the classes).

Same windows (MONAI's scan-interval rule), same Gaussian importance map, same ``sw_batch_size``;
the numerics compare the two label maps (voxel agreement and mean Dice over the classes present).
Two cases:

* ``sliding_window`` (end to end): our UNETR under our inferer vs MONAI's UNETR (same weights)
  under MONAI's inferer. The time is mostly the network (ours is faster in the forward pass:
  SDPA attention, GEMM 1x1x1 convolutions, group-norm instance norm); the memory is mostly the
  blending buffers.
* ``sliding_window_blend``: the issue's geometry (512x512x300 CT, ROI 96³, overlap 0.5, 14
  classes) with the same cheap stand-in network on both sides (a 1x1x1 convolution to 14
  classes), which isolates what the inferer itself costs: MONAI accumulates into a full-volume
  (14, X, Y, Z) float32 buffer plus a count map, divides the whole volume and the caller takes an
  argmax over it; ours keeps a ring of one ROI length along the slab axis and finalises slabs to
  uint8 labels as soon as no later window can reach them (see ``umit.inference.sliding_window``).
  A stand-in network is not a win in itself: it only shows the blending overhead without the
  network time that would dominate both sides on a CPU.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from benchmarks.cases._common import n_params, quiet
from benchmarks.harness import Case, Side

E2E_SIZES: dict[str, dict[str, Any]] = {
    "tiny": {"volume": (40, 40, 36), "roi": 32, "width": 48, "heads": 3, "feature": 8},
    "small": {"volume": (160, 160, 96), "roi": 64, "width": 384, "heads": 6, "feature": 16},
    # ROI 96³ and a ViT-B UNETR as the issue; the volume is cut to 192x192x144 (18 windows) so a
    # CPU run takes minutes: the 512x512x300 is 600 windows of ~2-3 s each per side
    "full": {"volume": (192, 192, 144), "roi": 96, "width": 768, "heads": 12, "feature": 16},
}
BLEND_SIZES: dict[str, dict[str, Any]] = {
    "tiny": {"volume": (64, 64, 48), "roi": 32},
    "small": {"volume": (256, 256, 150), "roi": 96},
    "full": {"volume": (512, 512, 300), "roi": 96},
}
CLASSES = 14
OVERLAP = 0.5
SW_BATCH = 2


def _ct(shape, seed=0) -> torch.Tensor:
    """A CT-like volume (1, 1, X, Y, Z): an ellipsoid body with organs and noise, roughly z-scored."""
    g = torch.Generator().manual_seed(seed)
    axes = [torch.linspace(-1, 1, n) for n in shape]
    X, Y, Z = torch.meshgrid(*axes, indexing="ij")
    body = (X / 0.9) ** 2 + (Y / 0.7) ** 2 < 1
    vol = torch.where(body, 0.0, -3.0)
    for cx, cy, r, v in ((0.3, 0.1, 0.25, 1.0), (-0.35, 0.0, 0.2, 1.5), (0.0, -0.4, 0.15, 2.5)):
        vol = torch.where((X - cx) ** 2 + (Y - cy) ** 2 + (Z * 0.5) ** 2 < r**2, v, vol)
    vol = vol + 0.3 * torch.randn(shape, generator=g)
    return vol[None, None].contiguous()


def _agreement(outputs: dict[str, Any]) -> dict[str, float]:
    if "ours" not in outputs or "monai" not in outputs:
        return {}
    a, b = outputs["ours"].to(torch.int64), outputs["monai"].to(torch.int64)
    dice = []
    for k in torch.unique(torch.cat([a.unique(), b.unique()])).tolist():
        pa, pb = a == k, b == k
        dice.append(2 * (pa & pb).sum().item() / max(pa.sum().item() + pb.sum().item(), 1))
    return {
        "label_mismatch_voxels_ours_vs_monai": int((a != b).sum().item()),
        "label_agreement_ours_vs_monai": (a == b).float().mean().item(),
        "mean_dice_ours_vs_monai": float(np.mean(dice)),
    }


def _window_flops(model: nn.Module, roi: int) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(SW_BATCH, 1, roi, roi, roi))
    return int(counter.get_total_flops()) // SW_BATCH


def _sides(side, ref_model, ours_model, c, device) -> Side:
    from monai.inferers import sliding_window_inference

    from umit.inference.sliding_window import SlidingWindowInferer, num_windows

    roi = (c["roi"],) * 3
    x = _ct(c["volume"])
    n_win = num_windows(tuple(c["volume"]), roi, OVERLAP)
    if side == "monai":
        model = ref_model.to(device).eval()

        @torch.no_grad()
        def step():
            out = sliding_window_inference(x, roi, SW_BATCH, model, overlap=OVERLAP,
                                           mode="gaussian", sw_device=device, device="cpu")  # fmt: skip
            return out.argmax(1).to(torch.uint8)
    elif side == "ours":
        model = ours_model.to(device).eval()
        inferer = SlidingWindowInferer(roi, overlap=OVERLAP, mode="gaussian",
                                       sw_batch_size=SW_BATCH, output="argmax", device=device)  # fmt: skip

        def step():
            return inferer(model, x)
    else:
        raise ValueError(f"unknown side {side!r}")

    def warm():
        with torch.no_grad():
            model(torch.zeros(SW_BATCH, 1, *roi, device=device))

    return Side(step, info={"windows": n_win, "params": n_params(model)}, warm=warm,
                flops=lambda: _window_flops(model, c["roi"]) * n_win, compare_last=True)  # fmt: skip


def make(size: str = "full", device: str = "cpu") -> Case:
    """End to end: our UNETR + our inferer vs MONAI's UNETR + ``sliding_window_inference``."""
    quiet()
    c = E2E_SIZES[size]

    def build(side: str, reference_weights: bool = True) -> Side:
        from monai.networks.nets import UNETR as MonaiUNETR

        from umit.models import UNETR, ViT3D
        from umit.models.monai_compat import vit3d_args_from_monai
        from umit.models.unetr import convert_monai_unetr_state_dict

        torch.manual_seed(0)
        ref = ours = None
        if side == "monai" or reference_weights:
            ref = MonaiUNETR(1, CLASSES, c["roi"], feature_size=c["feature"],
                             hidden_size=c["width"], mlp_dim=4 * c["width"],
                             num_heads=c["heads"])  # fmt: skip
        if side == "ours":
            enc = ViT3D(**vit3d_args_from_monai(1, c["roi"], 16, hidden_size=c["width"],
                                                mlp_dim=4 * c["width"], num_heads=c["heads"]))  # fmt: skip
            ours = UNETR(enc, out_channels=CLASSES, feature_size=c["feature"])
            if ref is not None:
                ours.load_state_dict(convert_monai_unetr_state_dict(ref.state_dict()), strict=True)
            ref = None
        return _sides(side, ref, ours, c, device)

    return Case(
        name="sliding_window",
        title="sliding-window inference, UNETR (end to end)",
        config={
            **c,
            "classes": CLASSES,
            "overlap": OVERLAP,
            "sw_batch_size": SW_BATCH,
            "mode": "gaussian",
            "output": "argmax labels",
            "device": device,
        },  # fmt: skip
        build=build,
        reps=1 if size != "tiny" else 1,
        warmup=1,
        numerics=_agreement,
        notes=__doc__.split("\n\n", 1)[1].strip(),
    )


def make_blend(size: str = "full", device: str = "cpu") -> Case:
    """The issue's volume and ROI with a 1x1x1-conv stand-in network on both sides."""
    quiet()
    c = BLEND_SIZES[size]

    def build(side: str, reference_weights: bool = True) -> Side:
        torch.manual_seed(0)
        net = nn.Conv3d(1, CLASSES, 1)
        return _sides(side, net, net, c, device)

    return Case(
        name="sliding_window_blend",
        title="sliding-window blending overhead (1x1x1-conv stand-in network)",
        config={
            **c,
            "classes": CLASSES,
            "overlap": OVERLAP,
            "sw_batch_size": SW_BATCH,
            "mode": "gaussian",
            "output": "argmax labels",
            "network": "Conv3d(1, 14, 1)",
            "device": device,
        },  # fmt: skip
        build=build,
        reps=3 if size != "full" else 2,
        warmup=1,
        numerics=_agreement,
        notes=__doc__.split("\n\n", 1)[1].strip(),
    )
