"""Apply a preprocessing plan to voxels in memory: the one code path shared by ``umit preprocess``
(which reads RAW NIfTI and writes the store) and ``umit predict`` (which reads any input and feeds
the model), so a model sees exactly the data it was trained on.

Steps: reorient to RAS (flips/permutations only), crop to the foreground (+ margin), normalize
per channel, resample to the target spacing. The returned geometry record is what
:func:`umit.preprocess.resample.restore_original` needs to map a result back onto the input grid.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from umit.data.meta import translate_affine
from umit.data.plan import Plan
from umit.errors import InputError
from umit.preprocess.normalize import body_mask, normalize_channel
from umit.preprocess.resample import (
    foreground_bbox,
    reorient_to_ras,
    resample_factors,
    resample_image,
    resample_label,
    scale_affine,
    spacing_of,
)


def apply_plan(
    arrays: list[np.ndarray],
    affine: np.ndarray,
    plan: Plan,
    *,
    label: np.ndarray | None = None,
    source: str | Path | None = None,
) -> tuple[np.ndarray, np.ndarray | None, dict[str, Any]]:
    """Preprocess one case's channels (all on one grid) with ``plan``.

    Args:
        arrays: one (X, Y, Z) float32 array per plan channel, in stored (input) orientation.
        affine: their voxel -> RAS+ mm affine.
        plan: the preprocessing plan (of the store, or saved in a model checkpoint).
        label: optional (X, Y, Z) integer label on the same grid; kept inside the crop.
        source: the input's path, named in errors.

    Returns:
        ``(image, label, geometry)``: image (C, X', Y', Z') in ``plan.image_dtype`` on the
        store grid, the label resampled with nearest neighbour (or None), and the geometry and
        normalization record (shape, spacing, affine, crop, scale, original grid, pad values).

    Raises:
        InputError: wrong number of channels, channels of different shapes, values that overflow
            the storage dtype.
    """
    if len(arrays) != len(plan.channels):
        raise InputError(
            source,
            f"{len(arrays)} channel(s) given; the plan expects {len(plan.channels)} "
            f"({', '.join(plan.channel_names)})",
        )
    orig_shape = tuple(int(n) for n in arrays[0].shape)
    for a in arrays:
        if a.ndim != 3 or tuple(a.shape) != orig_shape:
            raise InputError(
                source, f"channels must be 3D arrays of one shape, got {[x.shape for x in arrays]}"
            )
    orig_affine = np.asarray(affine, dtype=np.float64)
    # 1. reorient to RAS (flips/permutations only)
    ras = [reorient_to_ras(np.asarray(a, np.float32), orig_affine) for a in arrays]
    arrays, ras_affine = [a for a, _ in ras], ras[0][1]
    if label is not None:
        label, _ = reorient_to_ras(label, orig_affine)
    ras_shape = arrays[0].shape
    # 2. crop to the foreground (+ margin); the label is always kept inside the crop
    bbox = tuple((0, n) for n in ras_shape)
    if plan.crop_foreground:
        mask = np.zeros(ras_shape, dtype=bool)
        for arr, ch in zip(arrays, plan.channels, strict=True):
            mask |= body_mask(arr, ch.modality, plan.foreground_threshold)
        if label is not None:
            mask |= label > 0
        margin = tuple(int(math.ceil(plan.crop_margin_mm / s)) for s in spacing_of(ras_affine))
        bbox = foreground_bbox(mask, margin) or bbox
        del mask
    crop = tuple(slice(lo, hi) for lo, hi in bbox)
    arrays = [a[crop] for a in arrays]
    if label is not None:
        label = label[crop]
    cropped_affine = translate_affine(ras_affine, [lo for lo, _ in bbox])
    # 3. normalize (before resampling, as nnU-Net does)
    pads, stats = [], []
    for c, ch in enumerate(plan.channels):
        arrays[c], pad, st = normalize_channel(arrays[c], ch, plan.foreground_threshold)
        pads.append(pad)
        stats.append(st)
    # 4. resample to the target spacing (skipped per axis where spacing already matches)
    s, new_shape = resample_factors(
        arrays[0].shape, spacing_of(cropped_affine), plan.target_spacing
    )
    image = np.empty((len(arrays), *new_shape), dtype=plan.image_dtype)
    for c in range(len(arrays)):
        image[c] = resample_image(arrays[c], s, new_shape, plan.interpolation_order)
        arrays[c] = None  # free as we go
    if not np.all(np.isfinite(image)):
        raise InputError(
            source, f"normalized values overflow {plan.image_dtype}; use image_dtype=float32"
        )
    if label is not None:
        label = resample_label(label, s, new_shape)
    store_affine = scale_affine(cropped_affine, s)
    geometry = {
        "shape": [int(n) for n in image.shape],
        "spacing": list(spacing_of(store_affine)),
        "affine": store_affine.tolist(),
        "orientation": plan.orientation,
        "channel_names": plan.channel_names,
        "modalities": [ch.modality for ch in plan.channels],
        "pad_values": [float(np.asarray(p, dtype=plan.image_dtype)) for p in pads],
        "norm_stats": stats,
        "original_shape": list(orig_shape),
        "original_affine": orig_affine.tolist(),
        "original_spacing": list(spacing_of(orig_affine)),
        "ras_shape": [int(n) for n in ras_shape],
        "crop_bbox": [[int(lo), int(hi)] for lo, hi in bbox],
        "resample_scale": [float(x) for x in s],
    }
    return image, label, geometry
