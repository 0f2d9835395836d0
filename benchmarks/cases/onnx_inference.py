"""Inference backends of ``umit predict``: torch vs onnxruntime on the same exported model.

The ``sliding_window`` case's UNETR (same sizes, same CT-like volume, same inferer settings) runs
under our ``SlidingWindowInferer`` twice: with the torch module (side ``ours``) and with the ONNX
graph ``umit export`` writes of the same weights, through :class:`umit.inference.onnx_backend.
OnnxModel` (side ``onnxruntime``, CPU execution provider, as many intra-op threads as torch).
Everything around the network (windows, blending, argmax) is the same code, so the ratio is the
two runtimes' speed on this network. The export (dynamo, dynamic batch, the ROI's spatial size) is
done once per size and cached under the temp dir; its time is in ``info.export_s``. The numerics
compare the logits of one window batch (``max abs Δ``). The speed-up column is onnxruntime's time
over torch's: above 1, torch is faster. In ``[bf16 autocast]`` rows torch runs under bf16 autocast
while the ONNX graph stays fp32 (onnxruntime has no autocast), i.e. each backend at its best.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.cases._common import n_params, quiet
from benchmarks.cases.sliding_window import E2E_SIZES, OVERLAP, SW_BATCH, _ct
from benchmarks.harness import Case, Side

CLASSES = 14


def _model(c):
    from umit.models import UNETR, ViT3D
    from umit.models.monai_compat import vit3d_args_from_monai

    torch.manual_seed(0)
    enc = ViT3D(**vit3d_args_from_monai(1, c["roi"], 16, hidden_size=c["width"],
                                        mlp_dim=4 * c["width"], num_heads=c["heads"]))  # fmt: skip
    return UNETR(enc, out_channels=CLASSES, feature_size=c["feature"]).eval()


def _exported(model, c, size: str) -> tuple[Path, float]:
    """The ONNX export of ``model`` for this size, cached in the temp dir (seconds, 0 if cached)."""
    from umit.inference.export import export_onnx
    from umit.train.checkpoint import InferenceSpec

    key = hashlib.sha256(
        json.dumps({**c, "classes": CLASSES, "torch": torch.__version__}, sort_keys=True).encode()
    ).hexdigest()[:12]
    path = Path(tempfile.gettempdir()) / f"umit_bench_unetr_{size}_{key}.onnx"
    if path.exists():
        return path, 0.0
    t = time.perf_counter()
    spec = InferenceSpec(roi_size=(c["roi"],) * 3, channels=["image"], num_outputs=CLASSES)
    export_onnx(model, path, spec=spec, plan={"channels": [{"name": "image"}]})
    return path, time.perf_counter() - t


def make(size: str = "full", device: str = "cpu") -> Case:
    """Our UNETR + our inferer, torch module vs onnxruntime graph of the same weights."""
    quiet()
    if device != "cpu":
        raise ValueError("onnx_sliding_window compares CPU backends (onnxruntime runs on the CPU)")
    c = E2E_SIZES[size]

    def build(side: str, reference_weights: bool = True) -> Side:
        from umit.inference.onnx_backend import OnnxModel
        from umit.inference.sliding_window import SlidingWindowInferer, num_windows

        model = _model(c)
        roi = (c["roi"],) * 3
        info = {"params": n_params(model), "windows": num_windows(c["volume"], roi, OVERLAP)}
        if side == "onnxruntime":
            path, export_s = _exported(model, c, size)
            net = OnnxModel(path)
            info.update(export_s=round(export_s, 1), exporter=net.exporter, file=path.name)
        elif side == "ours":
            net = model
        else:
            raise ValueError(f"unknown side {side!r}")
        x = _ct(c["volume"])
        inferer = SlidingWindowInferer(roi, overlap=OVERLAP, mode="gaussian",
                                       sw_batch_size=SW_BATCH, output="argmax", device="cpu")  # fmt: skip
        window = torch.randn(SW_BATCH, 1, *roi, generator=torch.Generator().manual_seed(2))

        @torch.no_grad()
        def step():
            return inferer(net, x)

        @torch.no_grad()
        def output():
            return net(window).float()

        @torch.no_grad()
        def warm():
            net(torch.zeros(SW_BATCH, 1, *roi))

        return Side(step, output, info=info, warm=warm)

    return Case(
        name="onnx_sliding_window",
        title="predict backend: torch vs onnxruntime, UNETR sliding window",
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
        sides=("ours", "onnxruntime"),
        reps=3 if size != "full" else 1,
        warmup=1,
        count_flops=False,
        notes=__doc__.split("\n\n", 1)[1].strip(),
    )
