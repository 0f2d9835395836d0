"""UNETR / SwinUNETR training steps: ours vs MONAI's network of the same configuration.

MONAI's network is built first (seeded) and its weights are converted into ours
(``convert_monai_unetr_state_dict`` / ``convert_monai_swin_unetr_state_dict``), so both compute the
same function: ``max_abs_diff`` is the deviation of the logits on one input (eval, no grad). The
step is forward + cross-entropy on a fixed random label map + backward (the AdamW step is the
same code for both and left out; it is timed once as ``info.adamw_step_s``).

What differs (no change in what is computed): the encoder's attention is
``scaled_dot_product_attention`` (MONAI: ``einsum`` + softmax); the decoder's 3x3x3 convolutions
compute their weight gradient on a pre-padded input on CPU and 1x1x1 convolutions run as a GEMM
(``umit.models.blocks.conv3d``); instance norm runs as a C-group ``group_norm``; norm + leaky ReLU
and the residual add run in place. The ablation side ``ours_stock_conv`` is ours with
``blocks.conv3d`` replaced by plain ``F.conv3d``: it isolates the custom convolution path.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.cases._common import eval_output, n_params, quiet, time_adamw_step, train_step
from benchmarks.harness import Case, Side

UNETR_SIZES: dict[str, dict[str, Any]] = {
    "tiny": {"img": 32, "width": 48, "depth": 12, "heads": 3, "feature": 8, "classes": 3},
    "small": {"img": 64, "width": 384, "depth": 12, "heads": 6, "feature": 16, "classes": 14},
    "full": {"img": 96, "width": 768, "depth": 12, "heads": 12, "feature": 16, "classes": 14},
}
SWIN_SIZES: dict[str, dict[str, Any]] = {
    "tiny": {"img": 64, "classes": 3},  # the 1/32 level needs more than one voxel
    "small": {"img": 64, "classes": 14},
    "full": {"img": 96, "classes": 14},
}


def _stock_conv3d(x, weight, bias=None, stride=(1, 1, 1), padding=(0, 0, 0)):
    return F.conv3d(x, weight, bias, tuple(stride), tuple(padding))


def _with_stock_conv(fn):
    """Runs ``fn`` with ``umit.models.blocks.conv3d`` replaced by ``F.conv3d`` (the ablation)."""
    from umit.models import blocks

    def run():
        saved = blocks.conv3d
        blocks.conv3d = _stock_conv3d
        try:
            return fn()
        finally:
            blocks.conv3d = saved

    return run


def _monai_unetr(c):
    from monai.networks.nets import UNETR

    return UNETR(1, c["classes"], c["img"], feature_size=c["feature"], hidden_size=c["width"],
                 mlp_dim=4 * c["width"], num_heads=c["heads"], proj_type="conv",
                 norm_name="instance", res_block=True)  # fmt: skip


def _ours_unetr(c, ref):
    from umit.models import UNETR, ViT3D
    from umit.models.monai_compat import vit3d_args_from_monai
    from umit.models.unetr import convert_monai_unetr_state_dict

    # MONAI's UNETR always has 12 blocks (a hidden constant)
    enc = ViT3D(**vit3d_args_from_monai(1, c["img"], 16, hidden_size=c["width"],
                                        mlp_dim=4 * c["width"], num_layers=12,
                                        num_heads=c["heads"]))  # fmt: skip
    model = UNETR(enc, out_channels=c["classes"], feature_size=c["feature"])
    if ref is not None:
        model.load_state_dict(convert_monai_unetr_state_dict(ref.state_dict()), strict=True)
    return model


def _monai_swin(c, fs):
    from monai.networks.nets import SwinUNETR

    return SwinUNETR(in_channels=1, out_channels=c["classes"], feature_size=fs)


def _ours_swin(c, fs, ref):
    from umit.models import SwinTransformer3D, SwinUNETR
    from umit.models.monai_compat import swin3d_args_from_monai
    from umit.models.swin_unetr import convert_monai_swin_unetr_state_dict

    enc = SwinTransformer3D(**swin3d_args_from_monai(in_channels=1, feature_size=fs))
    model = SwinUNETR(enc, out_channels=c["classes"])
    if ref is not None:
        model.load_state_dict(convert_monai_swin_unetr_state_dict(ref.state_dict()), strict=True)
    return model


def _make(name, title, c, monai_fn, ours_fn, size, device, reps, warmup, ablation=True) -> Case:
    quiet()
    shape = (1, 1, c["img"], c["img"], c["img"])

    def build(side: str, reference_weights: bool = True) -> Side:
        torch.manual_seed(0)
        ref = monai_fn() if side == "monai" or reference_weights else None
        gen = torch.Generator().manual_seed(1)
        x = torch.randn(shape, generator=gen).to(device)
        y = torch.randint(0, c["classes"], (1, *shape[2:]), generator=gen).to(device)
        if side == "monai":
            model = ref
        elif side in ("ours", "ours_stock_conv"):
            model = ours_fn(ref)
            del ref
        else:
            raise ValueError(f"unknown side {side!r}")
        model = model.to(device).train()
        step = train_step(model, lambda: F.cross_entropy(model(x), y))
        output = eval_output(model, lambda: model(x))
        if side == "ours_stock_conv":
            step, output = _with_stock_conv(step), None
        info = {"params": n_params(model)}
        if side == "ours" and reference_weights:  # not in the peak-memory child
            info["adamw_step_s"] = time_adamw_step(model)
        return Side(step, output, info)

    return Case(
        name=name,
        title=title,
        config={**c, "input": list(shape), "loss": "cross_entropy", "device": device},
        build=build,
        sides=("ours", "monai", "ours_stock_conv")
        if ablation and device == "cpu"
        else ("ours", "monai"),
        reps=reps,
        warmup=warmup,
        notes=__doc__.split("\n\n", 1)[1].strip(),
    )


def make_unetr(size: str = "full", device: str = "cpu") -> Case:
    c = dict(UNETR_SIZES[size])
    return _make("unetr", "UNETR training step (fwd+bwd)", c, lambda: _monai_unetr(c),
                 lambda ref: _ours_unetr(c, ref), size, device,
                 reps={"tiny": 1, "small": 3, "full": 3}[size], warmup=1)  # fmt: skip


def make_swin_unetr(size: str = "full", device: str = "cpu", feature_size: int = 24) -> Case:
    c = {**SWIN_SIZES[size], "feature": feature_size}
    reps = {"tiny": 1, "small": 3, "full": 3 if feature_size <= 24 else 2}[size]
    return _make(f"swin_unetr_fs{feature_size}",
                 f"SwinUNETR fs{feature_size} training step (fwd+bwd)", c,
                 lambda: _monai_swin(c, feature_size),
                 lambda ref: _ours_swin(c, feature_size, ref), size, device, reps=reps,
                 warmup=1, ablation=feature_size <= 24 or size != "full")  # fmt: skip
