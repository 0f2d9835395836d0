"""``umit export``: a fine-tuned ``best.pt`` -> one self-describing ONNX file.

The graph takes ``image`` ``(B, C, X, Y, Z)`` float32 (preprocessed, as the torch model does) and
returns ``output``: logits ``(B, K, X, Y, Z)`` for segmentation (the full-resolution head of a
deep-supervised model) or ``(B, K)`` for classification. Everything ``umit predict`` needs rides
in the model's ``metadata_props`` (:data:`META_KEYS`): the preprocessing plan and the inference
spec of ``best.pt`` (ROI, overlap, channels, class and label names), the source model's name,
arguments and hash, the exporter used, which axes are dynamic and the verification result. So
``umit predict IN --model M.onnx`` needs nothing else.

Exporters: ``torch.onnx.export(..., dynamo=True)`` first; only if it fails, the TorchScript
exporter, and the failure is logged and stored (``umit.exporter`` / ``umit.exporter_note``).

Dynamic axes: the batch always (sliding-window batches vary). The spatial axes only for models
whose graph does not depend on the input size: convolutional networks (ResUNet, ResNet). A ViT
(UNETR, ViT classifiers) adds a learned position table tied to the token grid of the training ROI
(resampling it to another grid is shape-dependent Python, frozen at trace time), and a Swin
(SwinUNETR) chooses its window, shift mask and padding in Python from the grid size: their graphs
take the ROI only, which is all the sliding window feeds them. A spatially dynamic export is
checked at a second size, and exported static when onnxruntime disagrees with torch there.

Every export is verified before it is written: onnxruntime's output on random inputs (the example
batch, batch 1, and the second size when spatial axes are dynamic) must equal torch's within
``atol`` (default 1e-4), else nothing is written and the difference is reported.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field
from torch import nn

from umit import __version__
from umit.config import UmitConfig
from umit.errors import InputError, UmitError
from umit.inference.segment import full_resolution
from umit.models.swin3d import SwinTransformer3D
from umit.models.vit3d import ViT3D
from umit.train.checkpoint import InferenceSpec, load_model
from umit.utils.fileio import atomic_path

log = logging.getLogger(__name__)

ONNX_FORMAT = "umit-onnx"
ONNX_FORMAT_VERSION = 1
INPUT_NAME = "image"
OUTPUT_NAME = "output"
META_KEYS = (
    "umit.format",
    "umit.format_version",
    "umit.spec",
    "umit.plan",
    "umit.model_name",
    "umit.model_args",
    "umit.source",
    "umit.exporter",
    "umit.exporter_note",
    "umit.dynamic",
    "umit.verified",
    "umit.versions",
)
Exporter = Literal["auto", "dynamo", "torchscript"]


class ExportError(UmitError):
    """The model could not be exported, or the exported graph disagrees with torch."""


class ExportConfig(UmitConfig):
    """Settings of ``umit export``."""

    model: Path
    """``best.pt`` from ``umit finetune`` (weights, plan and inference spec)."""
    out: Path
    """The ONNX file to write (``.onnx``)."""
    format: Literal["onnx"] = "onnx"
    """Export format (ONNX only)."""
    exporter: Exporter = "auto"
    """``auto``: ``torch.onnx.export(dynamo=True)``, the TorchScript exporter only if that fails;
    ``dynamo`` or ``torchscript`` to force one (no fallback)."""
    dynamic_spatial: bool | None = None
    """Dynamic spatial axes: ``None`` = where the model allows it (convolutional networks; see
    the module docstring), ``false`` = the ROI only, ``true`` = ask for them (still verified)."""
    opset: int | None = Field(default=None, ge=13)
    """ONNX opset (default: the exporter's)."""
    atol: float = Field(default=1e-4, gt=0)
    """Largest |onnxruntime - torch| accepted in the verification."""
    example_batch: int = Field(default=2, ge=2)
    """Batch of the example input (2 or more, so that the batch axis is not specialised to 1)."""


class _Graph(nn.Module):
    """What is exported: the model's full-resolution output, one tensor."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return full_resolution(self.model(image))


def spatial_policy(model: nn.Module) -> tuple[bool, str]:
    """Whether ``model``'s graph can take any spatial size, and why (see the module docstring)."""
    for m in model.modules():
        if isinstance(m, ViT3D):
            return False, (
                "ViT encoder: its learned position table is tied to the ROI's token grid "
                "(resampling it for another grid is shape-dependent Python, fixed at export)"
            )
        if isinstance(m, SwinTransformer3D):
            return False, (
                "Swin encoder: window size, shift masks and padding are chosen in Python from "
                "the grid size, so the graph holds the ROI's"
            )
    return True, "convolutional network: any size its down-sampling divides"


def _short(exc: BaseException) -> str:
    """One line of an exporter's (often page-long) error: its exception summary."""
    text = str(exc)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for i, ln in enumerate(lines):
        if ln.startswith("## Exception summary") and i + 1 < len(lines):
            return f"{type(exc).__name__}: {lines[i + 1]}"[:400]
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:400]


def _export_dynamo(
    graph: nn.Module, x: torch.Tensor, path: Path, spatial: bool, opset: int | None
) -> None:
    auto = torch.export.Dim.AUTO
    dims = {0: auto, **({2: auto, 3: auto, 4: auto} if spatial else {})}
    kwargs: dict[str, Any] = {"opset_version": opset} if opset else {}
    program = torch.onnx.export(
        graph,
        (x,),
        dynamo=True,
        dynamic_shapes={INPUT_NAME: dims},
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        verbose=False,
        **kwargs,
    )
    program.save(str(path))


def _export_torchscript(
    graph: nn.Module, x: torch.Tensor, path: Path, spatial: bool, opset: int | None
) -> None:
    names = {0: "batch", **({2: "x", 3: "y", 4: "z"} if spatial else {})}
    torch.onnx.export(
        graph,
        (x,),
        str(path),
        dynamo=False,
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        dynamic_axes={INPUT_NAME: names, OUTPUT_NAME: {0: "batch"}},
        opset_version=opset or 18,
    )


_EXPORTERS = {"dynamo": _export_dynamo, "torchscript": _export_torchscript}


def _session(path: Path) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def graph_input_shape(path_or_session: Any) -> list[int | str | None]:
    """The ``image`` input's shape in a graph: ints for static axes, names for dynamic ones."""
    sess = path_or_session if hasattr(path_or_session, "get_inputs") else _session(path_or_session)
    return list(sess.get_inputs()[0].shape)


def _max_diff(graph: nn.Module, sess: Any, x: torch.Tensor) -> float:
    with torch.no_grad():
        ref = graph(x).float().numpy()
    got = sess.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0]
    if got.shape != ref.shape:
        raise ValueError(f"onnxruntime output shape {got.shape} != torch {ref.shape}")
    return float(np.abs(got.astype(np.float32) - ref).max())


def _verify(
    graph: nn.Module, path: Path, shapes: list[tuple[int, ...]], seed: int = 0
) -> dict[str, float]:
    """Max |onnxruntime - torch| per input shape (raises what onnxruntime raises)."""
    sess = _session(path)
    gen = torch.Generator().manual_seed(seed)
    return {
        "x".join(map(str, s)): _max_diff(graph, sess, torch.randn(*s, generator=gen))
        for s in shapes
    }


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _versions() -> dict[str, str]:
    import onnx
    import onnxruntime

    out = {"umit": str(__version__), "torch": str(torch.__version__), "onnx": onnx.__version__}
    out["onnxruntime"] = onnxruntime.__version__
    try:
        import onnxscript

        out["onnxscript"] = onnxscript.__version__
    except ImportError:  # only the dynamo exporter needs it
        pass
    return out


def _write_metadata(src: Path, dst: Path, meta: dict[str, str]) -> None:
    import onnx

    proto = onnx.load(str(src))
    del proto.metadata_props[:]
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.doc_string = f"umit {meta['umit.model_name']} exported by {meta['umit.exporter']}"
    onnx.save(proto, str(dst))


def export_onnx(
    model: nn.Module,
    out: str | Path,
    *,
    spec: InferenceSpec,
    plan: dict[str, Any] | None,
    exporter: Exporter = "auto",
    dynamic_spatial: bool | None = None,
    opset: int | None = None,
    atol: float = 1e-4,
    example_batch: int = 2,
    source: dict[str, Any] | None = None,
    model_name: str | None = None,
    model_args: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Export ``model`` (in fp32, on the CPU) to ``out`` with its plan and spec as metadata.

    Returns:
        The metadata written (values JSON-decoded), plus ``seconds``.

    Raises:
        ExportError: every exporter failed, or onnxruntime disagrees with torch beyond ``atol``
            (nothing is written then).
    """
    import onnxruntime  # noqa: F401  (fail early, before minutes of tracing, when missing)

    out = Path(out)
    t0 = time.perf_counter()
    label = str((source or {}).get("file") or getattr(model, "model_name", "model"))
    graph = _Graph(copy.deepcopy(model).float().cpu().eval())  # tracing may cache in modules
    channels = len(spec.channels) or int(getattr(model, "in_chans", 0) or 1)
    roi = tuple(int(s) for s in spec.roi_size)
    x = torch.randn(example_batch, channels, *roi, generator=torch.Generator().manual_seed(0))
    allowed, why = spatial_policy(model)
    spatial = allowed if dynamic_spatial is None else bool(dynamic_spatial)
    if dynamic_spatial is not None:
        why = "as configured" if spatial else f"as configured ({why})"
    order = ["dynamo", "torchscript"] if exporter == "auto" else [exporter]
    notes: list[str] = []
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.export.tmp")
    try:
        for name in order:
            try:
                _EXPORTERS[name](graph, x, tmp, spatial, opset)
            except Exception as exc:  # exporters fail in many ways; the next one is tried
                notes.append(f"{name} exporter failed: {_short(exc)}")
                log.warning("export: the %s exporter failed on %s: %s", name, label, _short(exc))
                continue
            used = name
            break
        else:
            raise ExportError(f"{label}: no exporter succeeded: {'; '.join(notes)}")
        shapes = [tuple(x.shape), (1, *x.shape[1:])]
        if spatial:
            second = (1, channels, 2 * roi[0], *roi[1:])
            try:
                diffs = _verify(graph, tmp, [second])
                if max(diffs.values()) > atol:
                    raise ValueError(f"max |diff| {max(diffs.values()):.3g} at {second}")
            except Exception as exc:  # the graph does not generalise: export the ROI only
                note = f"spatial axes made static: the dynamic graph failed at {second} ({_short(exc)})"
                notes.append(note)
                log.warning("export: %s", note)
                spatial, why = False, note
                _EXPORTERS[used](graph, x, tmp, spatial, opset)
            else:
                shapes.append(second)
        try:
            diffs = _verify(graph, tmp, shapes)
        except Exception as exc:
            raise ExportError(
                f"{label}: onnxruntime cannot run the exported graph: {_short(exc)}"
            ) from exc
        worst = max(diffs.values())
        if not worst <= atol:
            raise ExportError(
                f"{label}: onnxruntime differs from torch by {worst:.3g} > atol "
                f"{atol:g} ({diffs}); nothing written"
            )
        in_shape = graph_input_shape(tmp)
        meta: dict[str, Any] = {
            "umit.format": ONNX_FORMAT,
            "umit.format_version": ONNX_FORMAT_VERSION,
            "umit.spec": spec.model_dump(mode="json"),
            "umit.plan": plan,
            "umit.model_name": model_name or getattr(model, "model_name", type(model).__name__),
            "umit.model_args": model_args or {},
            "umit.source": source or {},
            "umit.exporter": used,
            "umit.exporter_note": "; ".join(notes),
            "umit.dynamic": {
                "batch": not isinstance(in_shape[0], int),
                "spatial": all(not isinstance(s, int) for s in in_shape[2:]),
                "input_shape": [s if isinstance(s, int) else str(s) for s in in_shape],
                "why": why,
            },
            "umit.verified": {"atol": atol, "max_abs_diff": diffs},
            "umit.versions": _versions(),
        }
        encoded = {k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}
        with atomic_path(out) as final_tmp:
            _write_metadata(tmp, final_tmp, encoded)
    finally:
        tmp.unlink(missing_ok=True)
        tmp.with_name(tmp.name + ".data").unlink(missing_ok=True)
    meta["seconds"] = time.perf_counter() - t0
    log.info(
        "export: %s -> %s (%s exporter, dynamic %s, max |onnxruntime - torch| %.2g)",
        label,
        out,
        used,
        meta["umit.dynamic"],
        worst,
    )
    return meta


def run(cfg: ExportConfig) -> dict[str, Any]:
    """Export ``cfg.model`` to ``cfg.out``; returns the metadata written and ``seconds``.

    Raises:
        InputError: the model file is missing or not a fine-tuned model; ``out`` is not .onnx.
        ExportError: see :func:`export_onnx`.
    """
    if cfg.out.suffix != ".onnx":
        raise InputError(cfg.out, "the output of --format onnx must end in .onnx")
    model, art = load_model(cfg.model)
    spec = InferenceSpec.model_validate(art["spec"])
    if not art.get("plan"):
        raise InputError(cfg.model, "the model file carries no preprocessing plan")
    if not spec.channels:
        spec = spec.model_copy(
            update={"channels": [c["name"] for c in art["plan"].get("channels", [])]}
        )
    return export_onnx(
        model,
        cfg.out,
        spec=spec,
        plan=dict(art["plan"]),
        exporter=cfg.exporter,
        dynamic_spatial=cfg.dynamic_spatial,
        opset=cfg.opset,
        atol=cfg.atol,
        example_batch=cfg.example_batch,
        source={"file": str(cfg.model), "sha256": _file_sha256(cfg.model)},
        model_name=art.get("model_name"),
        model_args=dict(art.get("model_args") or {}),
    )
