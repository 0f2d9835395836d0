"""The onnxruntime backend of ``umit predict``: an exported ``M.onnx`` as a callable model.

:class:`OnnxModel` reads the plan and the inference spec from the graph's metadata (written by
:mod:`umit.inference.export`) and maps ``(n, C, *roi)`` float tensors to the graph's output, so
the sliding-window inferer, the pre- and post-processing and the writers of ``umit predict`` are
the torch backend's, unchanged. It runs on the CPU, with as many threads as torch uses.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from umit.errors import InputError
from umit.inference.export import INPUT_NAME, ONNX_FORMAT, ONNX_FORMAT_VERSION, OUTPUT_NAME

REQUIRED_META = ("umit.spec", "umit.plan")


def _json_meta(path: Path, meta: dict[str, str], key: str) -> Any:
    try:
        return json.loads(meta[key])
    except (KeyError, ValueError) as exc:
        raise InputError(path, f"ONNX metadata {key!r} is missing or not JSON ({exc})") from None


class OnnxModel:
    """A umit ONNX export, loaded into an onnxruntime session.

    Attributes:
        spec: the inference spec (dict, as in ``best.pt``); plan: the preprocessing plan (dict);
        model_name, exporter, dynamic: from the metadata; input_shape: the graph's input shape
        (ints for static axes).

    Raises:
        InputError: naming the file when it is missing, not an ONNX model, lacks umit's metadata
            (not written by ``umit export``), or its input does not fit its plan's channels.
    """

    def __init__(self, path: str | Path, threads: int | None = None):
        self.path = path = Path(path)
        if not path.is_file():
            raise InputError(path, "ONNX model not found")
        if path.suffix in (".pt", ".pth", ".ckpt"):
            raise InputError(
                path,
                "is a PyTorch checkpoint, not an ONNX model: export it first with "
                f"`umit export --model {path} --format onnx --out M.onnx`, or use --backend torch",
            )
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise InputError(
                path, "onnxruntime is not installed: pip install 'umit[onnx]'"
            ) from exc
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or torch.get_num_threads()
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own types for a bad protobuf
            first = (str(exc).strip().splitlines() or [""])[0][:300]
            raise InputError(path, f"not a readable ONNX model ({first})") from None
        meta = dict(self.session.get_modelmeta().custom_metadata_map)
        missing = [k for k in REQUIRED_META if k not in meta]
        if missing:
            raise InputError(
                path,
                f"ONNX model without umit metadata ({', '.join(missing)} missing): export it with "
                "`umit export --model best.pt --format onnx --out M.onnx`, which stores the plan "
                "and inference spec predict needs",
            )
        fmt = meta.get("umit.format")
        if fmt != ONNX_FORMAT:
            raise InputError(path, f"umit.format is {fmt!r}, expected {ONNX_FORMAT!r}")
        version = int(meta.get("umit.format_version", "1"))
        if version > ONNX_FORMAT_VERSION:
            raise InputError(
                path,
                f"umit ONNX format version {version} is newer than this umit reads "
                f"({ONNX_FORMAT_VERSION}); upgrade umit",
            )
        self.spec: dict[str, Any] = _json_meta(path, meta, "umit.spec")
        self.plan: dict[str, Any] = _json_meta(path, meta, "umit.plan")
        self.model_name = meta.get("umit.model_name", "unknown")
        self.exporter = meta.get("umit.exporter", "unknown")
        self.dynamic = json.loads(meta.get("umit.dynamic", "{}") or "{}")
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        names = [i.name for i in inputs]
        if names != [INPUT_NAME] or OUTPUT_NAME not in [o.name for o in outputs]:
            raise InputError(
                path,
                f"graph inputs {names} / outputs {[o.name for o in outputs]}: expected "
                f"[{INPUT_NAME!r}] -> {OUTPUT_NAME!r}",
            )
        self.input_shape = list(inputs[0].shape)
        n_plan = len(self.plan.get("channels") or [])
        if len(self.input_shape) != 5:
            raise InputError(
                path, f"graph input has shape {self.input_shape}; expected (B, C, X, Y, Z)"
            )
        c = self.input_shape[1]
        if isinstance(c, int) and n_plan and c != n_plan:
            raise InputError(
                path,
                f"graph input takes {c} channel(s) but its plan lists {n_plan} "
                f"({', '.join(ch.get('name', '?') for ch in self.plan['channels'])})",
            )

    def __repr__(self) -> str:
        return f"OnnxModel({str(self.path)!r}, {self.model_name}, input {self.input_shape})"

    def _run(self, x: np.ndarray) -> np.ndarray:
        return self.session.run([OUTPUT_NAME], {INPUT_NAME: x})[0]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``(n, C, *spatial)`` -> the graph's output as a float32 CPU tensor."""
        arr = np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())
        want = self.input_shape
        for axis in range(1, 5):
            if isinstance(want[axis], int) and arr.shape[axis] != want[axis]:
                raise InputError(
                    self.path,
                    f"input of shape {tuple(arr.shape)} does not fit the graph's {want} (axis "
                    f"{axis} is fixed at {want[axis]})",
                )
        b = want[0]
        if not isinstance(b, int) or arr.shape[0] == b:
            return torch.from_numpy(self._run(arr))
        parts = []  # a static-batch graph: run it on chunks of its batch, the last one padded
        for i in range(0, arr.shape[0], b):
            chunk = arr[i : i + b]
            n = chunk.shape[0]
            if n < b:
                chunk = np.concatenate([chunk, np.zeros((b - n, *chunk.shape[1:]), chunk.dtype)])
            parts.append(self._run(chunk)[:n])
        return torch.from_numpy(np.concatenate(parts))
