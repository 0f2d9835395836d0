"""``deface``: remove the face (and ears) of one in-memory volume, never a brain voxel.

Ties the steps together -- head mask, brain mask (given or estimated on the coarse grid), face
region, removal = face AND NOT (brain dilated by the margin), background fill -- asserts on the
output voxels that the brain is untouched, and runs the depth-map check. ``DefaceResult`` holds
what it produced.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from umit.data.meta import ImageMeta
from umit.errors import InputError
from umit.privacy.deface._common import _ball_dilate, _Coarse, _source
from umit.privacy.deface.check import depth_check
from umit.privacy.deface.face import face_region
from umit.privacy.deface.masks import estimate_brain_mask, guess_modality, head_mask


@dataclass
class DefaceResult:
    """What :func:`deface` produced for one volume.

    Attributes:
        image: Defaced voxels, same shape and dtype as the input.
        removed: Boolean mask of the voxels set to ``fill_value``.
        brain: The brain mask used (given or estimated).
        head: The head mask of the input.
        fill_value: Background value written into removed voxels.
        report: JSON-ready figures (fractions, depth-map check, parameters).
        depth_maps: The anterior depth maps ("before", "after", "window", "extent") when the
            check ran; :func:`save_depth_png` draws them.
    """

    image: np.ndarray
    removed: np.ndarray
    brain: np.ndarray
    head: np.ndarray
    fill_value: float
    report: dict[str, Any] = field(default_factory=dict)
    depth_maps: dict[str, np.ndarray] = field(default_factory=dict)


def _check_input(array: np.ndarray, source: str) -> np.ndarray:
    array = np.asarray(array)
    if array.ndim == 4 and array.shape[3] == 1:
        array = array[..., 0]
    if array.ndim != 3 and array.ndim != 4:
        raise InputError(source, f"expected a 3D volume, got an array of shape {array.shape}")
    if min(array.shape[:3]) < 8:
        raise InputError(
            source, f"2D image or thin slab of shape {array.shape}: defacing needs a 3D head"
        )
    if not np.isfinite(array).all():
        raise InputError(source, "image has NaN/Inf voxels")
    if array.size == 0 or float(array.max()) == float(array.min()):
        raise InputError(source, "empty volume (all voxels equal): nothing to deface")
    return array


def deface(
    array: np.ndarray,
    meta: ImageMeta,
    brain_mask: np.ndarray | None = None,
    *,
    ears: bool = False,
    margin_mm: float = 5.0,
    modality: str | None = None,
    check: bool = True,
) -> DefaceResult:
    """Remove the face (and ears) of a head volume, leaving every brain voxel bit-identical.

    Args:
        array: ``(i, j, k)`` volume, or ``(i, j, k, c)`` channels (masks come from their mean).
        meta: Geometry (RAS affine) of ``array``.
        brain_mask: Optional boolean brain mask on the same grid; estimated when None.
        ears: Also remove the ears.
        margin_mm: Gap kept between the brain and the cut, and the brain dilation protected.
        modality: "CT" or "MR"; from ``meta`` or the intensities when None.
        check: Compute the depth-map check (costs a RAS resampling).

    Raises:
        InputError: 2D/empty input, no head, no brain found, mismatched brain mask.
    """
    source = _source(meta)
    if margin_mm < 0 or not math.isfinite(margin_mm):
        raise ValueError(f"margin_mm must be a non-negative number, got {margin_mm!r}")
    t0 = time.perf_counter()
    array = _check_input(array, source)
    modality = (modality or guess_modality(array, meta)).upper()
    if modality not in ("CT", "MR"):
        raise ValueError(f"modality must be 'CT' or 'MR', got {modality!r}")
    base = array.mean(axis=3) if array.ndim == 4 else array
    head, threshold = head_mask(base, meta, modality)
    head_frac = float(head.mean())
    if head.sum() < 1000 or head_frac < 0.01:
        raise InputError(source, f"no head found (foreground is {100 * head_frac:.2f}% of voxels)")
    coarse = _Coarse(meta, base.shape)
    head_c = coarse.mean(head) > 0.5
    if brain_mask is None:
        brain_c = estimate_brain_mask(coarse.mean(base), coarse.meta, head_c, modality)
        brain = coarse.up(brain_c) & head
        brain_source = "estimated"
    else:
        brain = np.asarray(brain_mask)
        if brain.shape != base.shape:
            raise InputError(
                source, f"brain mask shape {brain.shape} differs from the image's {base.shape}"
            )
        brain = brain > 0
        if not brain.any():
            raise InputError(source, "brain mask is empty")
        brain_c = coarse.any(brain)
        brain_source = "given"
    region, info = face_region(
        meta,
        base.shape,
        brain_c,
        margin_mm,
        ears,
        brain_meta=coarse.meta,
        pad_mm=coarse.diag_mm / 2,
    )
    # Every native voxel within margin_mm of a brain voxel lies in a coarse block within
    # margin_mm + one block diagonal of a brain block: a superset of the native dilation.
    protected = coarse.up(_ball_dilate(brain_c, margin_mm + coarse.diag_mm, coarse.meta.spacing))
    protected |= brain
    removed = region & ~protected
    assert not (removed & brain).any()

    fill = _fill_value(
        coarse.mean(base), head_c, coarse.meta, bool(np.issubdtype(array.dtype, np.integer))
    )
    out = array.copy()
    out[removed] = np.asarray(fill).astype(array.dtype)
    altered = (out != array) if array.ndim == 3 else (out != array).any(axis=3)
    n_brain_altered = int((altered & brain).sum())
    assert n_brain_altered == 0, "defacing altered brain voxels"

    face_head = region & head
    report: dict[str, Any] = {
        "source": source,
        "modality": modality,
        "shape": list(array.shape),
        "spacing_mm": [round(s, 4) for s in meta.spacing],
        "orientation": meta.orientation,
        "margin_mm": margin_mm,
        "ears": ears,
        "brain_mask": brain_source,
        "head_threshold": threshold,
        "fill_value": float(fill),
        "head_voxels": int(head.sum()),
        "brain_voxels": int(brain.sum()),
        "brain_volume_ml": float(brain.sum() * np.prod(meta.spacing) / 1000.0),
        "removed_voxels": int(removed.sum()),
        "removed_head_voxels": int((removed & head).sum()),
        "removed_head_fraction": float((removed & head).sum() / head.sum()),
        "removed_head_volume_ml": float((removed & head).sum() * np.prod(meta.spacing) / 1000.0),
        "face_region_head_voxels": int(face_head.sum()),
        "face_region_removed_fraction": float((removed & head).sum() / max(1, face_head.sum())),
        "brain_voxels_altered": n_brain_altered,
        "brain_altered_fraction": n_brain_altered / max(1, int(brain.sum())),
        **info,
    }
    result = DefaceResult(out, removed, brain, head, float(fill), report)
    if check:
        head_after, _ = head_mask(
            out.mean(axis=3) if out.ndim == 4 else out, meta, modality, threshold
        )
        figures, maps = depth_check(head, head_after, removed, meta)
        report["depth_check"] = figures
        result.depth_maps = maps
    report["seconds"] = round(time.perf_counter() - t0, 2)
    return result


def _fill_value(base: np.ndarray, head: np.ndarray, meta: ImageMeta, integer: bool) -> float:
    """Background value: median of the voxels well outside the head (air), else the minimum."""
    outside = ~_ball_dilate(head, 5.0, meta.spacing)
    value = float(base.min()) if outside.sum() < 100 else float(np.median(base[outside]))
    return float(round(value)) if integer else value
