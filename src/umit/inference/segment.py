"""A model applied to one preprocessed volume: sliding-window segmentation, centred classification.

The one code path shared by fine-tuning validation, ``umit evaluate``, ``umit predict`` and the
privacy audit, so a number measured in validation is the number a user gets.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from umit.data.cases import centred_input
from umit.inference.sliding_window import SlidingWindowInferer
from umit.train.checkpoint import InferenceSpec


def full_resolution(out: torch.Tensor | list | tuple) -> torch.Tensor:
    """The full-resolution output of a model (deep supervision returns a list, finest first)."""
    return out[0] if isinstance(out, list | tuple) else out


@torch.no_grad()
def segment_volume(
    model: Callable[[torch.Tensor], Any],
    image: np.ndarray,
    roi_size: tuple[int, int, int],
    *,
    overlap: float = 0.5,
    sw_batch_size: int = 2,
    padding_value: float = 0.0,
    precision: str = "fp32",
    tta_flips: list[tuple[int, ...]] | tuple = (),
    device: torch.device | None = None,
) -> np.ndarray:
    """(C, X, Y, Z) image -> (X, Y, Z) uint8 argmax label map by sliding-window inference.

    ``model`` is a torch module or any callable on ``(n, C, *roi)`` tensors (e.g. an
    :class:`~umit.inference.onnx_backend.OnnxModel`)."""
    inferer = SlidingWindowInferer(
        roi_size=roi_size,
        overlap=overlap,
        sw_batch_size=sw_batch_size,
        precision=precision,
        output="argmax",
        device=device,
        tta_flips=tta_flips,
        padding_value=padding_value,
    )
    x = torch.from_numpy(np.asarray(image, np.float32))[None]  # (1, C, X, Y, Z)
    out = inferer(lambda t: full_resolution(model(t)), x)
    return np.asarray(out[0, 0] if out.ndim == 5 else out[0]).astype(np.uint8)


def predict_case_segmentation(
    model: torch.nn.Module, store: Any, case_id: str, spec: InferenceSpec
) -> np.ndarray:
    """Label map (X, Y, Z) of a store case by sliding-window inference with ``spec``'s ROI."""
    case = store.case(case_id)
    return segment_volume(
        model,
        np.asarray(case.read(), np.float32),
        tuple(spec.roi_size),
        overlap=spec.overlap,
        sw_batch_size=spec.sw_batch_size,
        padding_value=float(case.pad_values[0]) if case.pad_values else 0.0,
        device=next(model.parameters()).device,
    )


@torch.no_grad()
def predict_case_classification(
    model: torch.nn.Module, store: Any, case_id: str, size: tuple[int, int, int]
) -> np.ndarray:
    """Class probabilities of a store case, centred and padded to ``size``."""
    x = centred_input(store, case_id, size)[None].to(next(model.parameters()).device)
    return model(x).float().softmax(1)[0].cpu().numpy()
