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
from umit.privacy.deface.face import face_region, orbit_region
from umit.privacy.deface.masks import brain_rim, estimate_brain_mask, guess_modality, head_mask
from umit.privacy.deface.plausible import (
    ImplausibleResult,
    check_contrast,
    check_head_shape,
    check_result,
)


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
    eyes: bool = True,
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
        eyes: Also remove the orbits, lids and brows (:func:`orbit_region`); False keeps them
            (only the hull cut, which leaves the back of the eyes, the upper lids and brows).
        margin_mm: Gap kept between the brain and the cut, and the brain dilation protected.
        modality: "CT" or "MR"; from ``meta`` or the intensities when None.
        check: Compute the depth-map check (costs a RAS resampling) and refuse a result it
            finds implausible.

    Raises:
        InputError: 2D/empty input, intensities that are not a scan's (windowed CT, masks), no
            head or not a head's shape, no brain found, mismatched brain mask.
        ImplausibleResult: (an InputError) the depth check says the cut did not deface a face;
            the exception carries the result for inspection.
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
    check_contrast(base, modality, source)
    head, threshold = head_mask(base, meta, modality)
    head_frac = float(head.mean())
    if head.sum() < 1000 or head_frac < 0.01:
        raise InputError(source, f"no head found (foreground is {100 * head_frac:.2f}% of voxels)")
    shape = check_head_shape(head, meta, source)
    coarse = _Coarse(meta, base.shape)
    base_c = coarse.mean(base)
    head_c = coarse.mean(head) > 0.5
    brain, brain_c = _brain(brain_mask, base.shape, base_c, head, head_c, coarse, modality, source)
    region, info = face_region(
        meta,
        base.shape,
        brain_c,
        margin_mm,
        ears,
        brain_meta=coarse.meta,
        pad_mm=coarse.diag_mm / 2,
    )
    if eyes:
        orbits, info["orbits"] = orbit_region(
            meta, base.shape, brain_c, margin_mm, brain_meta=coarse.meta
        )
        region |= orbits
    guard, guard_c, allowance = brain, brain_c, 0.0
    if brain_mask is None and modality == "MR":
        # A T1 estimate may stop short of thick CSF: protect the dark rim it may have missed.
        rim_c = brain_rim(base_c, coarse.meta, head_c, brain_c)
        guard, guard_c = brain | (coarse.up(rim_c) & head), brain_c | rim_c
    elif brain_mask is None:
        # A CT estimate misses brain that shares a thick slice with bone (partial volume):
        # keep one more slice thickness away from it.
        allowance = max(meta.spacing)
    removed = region & ~_protected(
        guard, guard_c, coarse, margin_mm + allowance, meta.spacing, region
    )
    assert not (removed & brain).any()

    fill = _fill_value(base_c, head_c, coarse.meta, bool(np.issubdtype(array.dtype, np.integer)))
    out = array.copy()
    out[removed] = np.asarray(fill).astype(array.dtype)
    altered = (out != array) if array.ndim == 3 else (out != array).any(axis=3)
    n_brain_altered = int((altered & brain).sum())
    assert n_brain_altered == 0, "defacing altered brain voxels"

    report = _report(source, modality, array, meta, head, brain, region, removed, n_brain_altered)
    report.update(
        margin_mm=margin_mm,
        ears=ears,
        eyes=eyes,
        brain_mask="estimated" if brain_mask is None else "given",
        head_threshold=threshold,
        fill_value=float(fill),
        head_shape=shape,
    )
    report.update(info)  # the planes, and with --ears the ear cut ("ears" then holds its limits)
    result = DefaceResult(out, removed, brain, head, float(fill), report)
    if check:
        head_after, _ = head_mask(
            out.mean(axis=3) if out.ndim == 4 else out, meta, modality, threshold
        )
        figures, maps = depth_check(head, head_after, removed, meta)
        report["depth_check"] = figures
        result.depth_maps = maps
        reasons = check_result(report)
        if reasons:
            report["implausible"] = reasons
            raise ImplausibleResult(source, "implausible defacing: " + "; ".join(reasons), result)
    report["seconds"] = round(time.perf_counter() - t0, 2)
    return result


def _brain(
    brain_mask: np.ndarray | None,
    shape: tuple,
    base_c: np.ndarray,
    head: np.ndarray,
    head_c: np.ndarray,
    coarse: _Coarse,
    modality: str,
    source: str,
) -> tuple[np.ndarray, np.ndarray]:
    """The brain on the native and the coarse grid: the given mask, or the estimate."""
    if brain_mask is None:
        brain_c = estimate_brain_mask(base_c, coarse.meta, head_c, modality)
        return coarse.up(brain_c) & head, brain_c
    brain = np.asarray(brain_mask)
    if brain.shape != shape:
        raise InputError(source, f"brain mask shape {brain.shape} differs from the image's {shape}")
    brain = brain > 0
    if not brain.any():
        raise InputError(source, "brain mask is empty")
    return brain, coarse.any(brain)


def _report(
    source: str,
    modality: str,
    array: np.ndarray,
    meta: ImageMeta,
    head: np.ndarray,
    brain: np.ndarray,
    region: np.ndarray,
    removed: np.ndarray,
    n_brain_altered: int,
) -> dict[str, Any]:
    """The figures of one cut (JSON-ready)."""
    ml = float(np.prod(meta.spacing)) / 1000.0
    removed_head = int((removed & head).sum())
    face_head = int((region & head).sum())
    return {
        "source": source,
        "modality": modality,
        "shape": list(array.shape),
        "spacing_mm": [round(s, 4) for s in meta.spacing],
        "orientation": meta.orientation,
        "head_voxels": int(head.sum()),
        "brain_voxels": int(brain.sum()),
        "brain_volume_ml": float(brain.sum() * ml),
        "removed_voxels": int(removed.sum()),
        "removed_head_voxels": removed_head,
        "removed_head_fraction": removed_head / int(head.sum()),
        "removed_head_volume_ml": removed_head * ml,
        "face_region_head_voxels": face_head,
        "face_region_removed_fraction": removed_head / max(1, face_head),
        "brain_voxels_altered": n_brain_altered,
        "brain_altered_fraction": n_brain_altered / max(1, int(brain.sum())),
    }


def _protected(
    brain: np.ndarray,
    brain_c: np.ndarray,
    coarse: _Coarse,
    margin_mm: float,
    spacing: tuple,
    candidates: np.ndarray,
) -> np.ndarray:
    """Voxels never removed: within ``margin_mm`` of a brain voxel (exactly, near the cut).

    Every native voxel within ``margin_mm`` of a brain voxel lies in a coarse block within
    ``margin_mm`` + one block diagonal of a brain block, so the coarse dilation is a cheap
    superset. Where it spares a candidate voxel, the exact native distance decides instead,
    computed in the bounding box of those voxels grown by the margin (so that every brain voxel
    within the margin of the box is in it).
    """
    protected = coarse.up(_ball_dilate(brain_c, margin_mm + coarse.diag_mm, coarse.meta.spacing))
    protected |= brain
    unsure = candidates & protected & ~brain
    if not unsure.any():
        return protected
    idx = np.nonzero(unsure)
    lo = [int(i.min()) for i in idx]
    hi = [int(i.max()) + 1 for i in idx]
    pad = [int(math.ceil(margin_mm / s)) + 1 for s in spacing]
    outer = tuple(
        slice(max(0, a - p), min(n, b + p))
        for a, b, p, n in zip(lo, hi, pad, brain.shape, strict=True)
    )
    inner = tuple(slice(a - o.start, b - o.start) for a, b, o in zip(lo, hi, outer, strict=True))
    exact = _ball_dilate(brain[outer], margin_mm, spacing)[inner]
    box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    protected[box] = np.where(unsure[box], exact, protected[box])
    return protected


def _fill_value(base: np.ndarray, head: np.ndarray, meta: ImageMeta, integer: bool) -> float:
    """Background value: median of the voxels well outside the head (air), else the minimum."""
    outside = ~_ball_dilate(head, 5.0, meta.spacing)
    value = float(base.min()) if outside.sum() < 100 else float(np.median(base[outside]))
    return float(round(value)) if integer else value
