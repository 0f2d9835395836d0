"""Defacing of head MRI and CT: remove the face (and optionally the ears), never the brain.

No template is available offline, so the geometry comes from the image itself (in the spirit
of Quickshear, Schimke et al. 2011):

1. Head mask: intensity threshold (Otsu-based for MR, -500 HU for CT), largest component,
   closing and hole filling.
2. Brain mask: given by the user, or estimated -- MR: bright tissue inside the head, eroded to
   cut it from scalp, orbit fat and muscle, the largest piece grown back, closed and filled; CT:
   the largest 0..100 HU region whose outer shell is mostly bone (enclosed by the skull).
3. Face region, in RAS millimetres through the affine (so oblique and LPS-stored volumes are
   handled exactly): project the brain onto the sagittal (y, z) plane, take its convex hull and
   the hull edges whose outward normals point anterior-inferior (between ``FACE_ANGLES`` degrees
   below anterior); every voxel beyond one of those edges by more than ``margin_mm`` is face.
   Ears (optional): voxels lateral to the brain's width plus the margin, at ear height.
4. Removal mask = face region AND NOT (brain dilated by ``margin_mm``): the brain cannot be
   touched by construction, and this is asserted on the output voxels.
5. Check: an anterior depth map of the head surface (RAS grid, first head voxel seen from the
   front) before and after; over the face window we report the largest protrusion above a
   quadratic fit (the nose) and the high-frequency relief, which defacing must flatten.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage
from scipy.spatial import ConvexHull

from umit.data.io import image_suffix, is_image_file, read_image, write_image
from umit.data.meta import ImageMeta
from umit.errors import InputError
from umit.utils.fileio import atomic_path, atomic_write_json

logger = logging.getLogger(__name__)

__all__ = [
    "FACE_ANGLES",
    "DefaceResult",
    "deface",
    "deface_file",
    "depth_check",
    "estimate_brain_mask",
    "face_region",
    "guess_modality",
    "head_mask",
]

FACE_ANGLES: tuple[float, float] = (10.0, 50.0)
"""Hull edges whose outward normal lies this many degrees below anterior bound the face: 0 is
straight anterior (would shave the forehead), 90 straight inferior (would cut the whole neck)."""

_CORD_AREA_FRACTION = 0.12  # axial brain area below which the mask is spinal cord, not brain
_MIN_BRAIN_FRACTION = 0.03  # of the head volume
_MAX_BRAIN_FRACTION = 0.85
_MAX_VERTEX_GAP_MM = 30.0
_CSF_ALLOWANCE_MM = 4.0  # added around an estimated brain: the CSF layer it cannot see
_MR_EROSION_MM = (
    4.0,
    6.0,
    8.0,
    10.0,
)  # tried in turn until the brain comes loose  # head top to brain top (scalp + skull + CSF)  # a "brain" filling the head means no scalp/skull was found


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


# --------------------------------------------------------------------------------------------
# Small helpers


def _source(meta: ImageMeta, path: str | Path | None = None) -> str:
    return str(path) if path is not None else (meta.source or "<array>")


def _ball_erode(mask: np.ndarray, radius_mm: float, spacing: tuple) -> np.ndarray:
    """Erosion by a ball of ``radius_mm`` (Euclidean, anisotropic spacing)."""
    if radius_mm <= 0:
        return mask.copy()
    return ndimage.distance_transform_edt(mask, sampling=spacing) > radius_mm


def _ball_dilate(mask: np.ndarray, radius_mm: float, spacing: tuple) -> np.ndarray:
    """Dilation by a ball of ``radius_mm`` (Euclidean, anisotropic spacing)."""
    if radius_mm <= 0:
        return mask.copy()
    if not mask.any():
        return mask.copy()
    return ndimage.distance_transform_edt(~mask, sampling=spacing) <= radius_mm


def _largest_component(mask: np.ndarray) -> np.ndarray:
    labels, n = ndimage.label(mask)
    if n == 0:
        return mask.copy()
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(sizes.argmax())


def _otsu(values: np.ndarray, bins: int = 256) -> float:
    """Otsu threshold of a 1D sample."""
    values = values[np.isfinite(values)]
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        return lo
    hist, edges = np.histogram(values, bins=bins, range=(lo, hi))
    centers = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centers)
    mu0 = m0 / np.maximum(w0, 1)
    mu1 = (m0[-1] - m0) / np.maximum(w1, 1)
    between = w0 * w1 * (mu0 - mu1) ** 2
    return float(centers[int(between.argmax())])


def _axis_coord(meta: ImageMeta, shape: tuple, world_axis: int) -> np.ndarray:
    """World coordinate ``world_axis`` (0=x R, 1=y A, 2=z S) of every voxel, by broadcasting."""
    a = meta.affine
    i = np.arange(shape[0], dtype=np.float32)[:, None, None] * np.float32(a[world_axis, 0])
    j = np.arange(shape[1], dtype=np.float32)[None, :, None] * np.float32(a[world_axis, 1])
    k = np.arange(shape[2], dtype=np.float32)[None, None, :] * np.float32(a[world_axis, 2])
    return (i + j) + (k + np.float32(a[world_axis, 3]))


def _world_points(mask: np.ndarray, meta: ImageMeta) -> np.ndarray:
    """RAS mm coordinates ``(N, 3)`` of the true voxels of ``mask``."""
    idx = np.argwhere(mask).astype(np.float64)
    return idx @ meta.affine[:3, :3].T + meta.affine[:3, 3]


class _Coarse:
    """Block-averaged working grid (~``target_mm`` voxels) for the costly morphology.

    Coarse voxel ``c`` covers native voxels ``c * f .. c * f + f - 1`` per axis; its affine maps
    ``c`` to the centre of that block, so world positions stay exact.
    """

    def __init__(self, meta: ImageMeta, shape: tuple, target_mm: float = 2.0):
        self.shape = tuple(int(n) for n in shape[:3])
        self.factors = tuple(max(1, int(round(target_mm / s))) for s in meta.spacing)
        f = np.asarray(self.factors, dtype=np.float64)
        scale = np.eye(4)
        scale[:3, :3] = np.diag(f)
        scale[:3, 3] = (f - 1) / 2
        self.meta = meta.with_affine(meta.affine @ scale)
        self.diag_mm = float(np.linalg.norm(np.asarray(meta.spacing) * f))

    def _blocks(self, a: np.ndarray) -> np.ndarray:
        pad = [(0, (-n) % f) for n, f in zip(self.shape, self.factors, strict=True)]
        a = np.pad(a, pad, mode="edge")
        (n0, n1, n2), (f0, f1, f2) = a.shape, self.factors
        return a.reshape(n0 // f0, f0, n1 // f1, f1, n2 // f2, f2)  # (c0, f0, c1, f1, c2, f2)

    def mean(self, a: np.ndarray) -> np.ndarray:
        return self._blocks(np.asarray(a, dtype=np.float32)).mean(axis=(1, 3, 5))

    def any(self, m: np.ndarray) -> np.ndarray:
        return self._blocks(np.asarray(m, dtype=bool)).any(axis=(1, 3, 5))

    def up(self, m: np.ndarray) -> np.ndarray:
        """Native-grid copy of a coarse mask (each block takes its coarse voxel's value)."""
        for axis, f in enumerate(self.factors):
            m = np.repeat(m, f, axis=axis)
        return np.ascontiguousarray(m[: self.shape[0], : self.shape[1], : self.shape[2]])


def guess_modality(array: np.ndarray, meta: ImageMeta) -> str:
    """ "CT" or "MR": the header's modality, else CT when a large share of voxels is < -500."""
    if meta.modality in ("CT", "MR"):
        return meta.modality
    sample = np.asarray(array).ravel()[:: max(1, array.size // 200_000)]
    return "CT" if np.mean(sample < -500) > 0.05 else "MR"


# --------------------------------------------------------------------------------------------
# Masks


def head_mask(
    array: np.ndarray,
    meta: ImageMeta,
    modality: str,
    threshold: float | None = None,
) -> tuple[np.ndarray, float]:
    """Head (foreground) mask and the threshold used.

    MR: a third of the Otsu threshold of the whole volume (keeps dark skin and bone inside the
    surface while the noise floor stays out). CT: -500 HU (soft tissue vs air). Then the largest
    connected component, a 2-voxel closing and 3D hole filling.
    """
    data = np.asarray(array, dtype=np.float32)
    if threshold is None:
        if modality == "CT":
            threshold = -500.0
        else:
            sample = data.ravel()[:: max(1, data.size // 2_000_000)]
            threshold = _otsu(sample) / 3.0
    fg = data > threshold
    if not fg.any():
        return fg, float(threshold)
    fg = ndimage.binary_opening(fg, iterations=1)  # drop single-voxel noise and thin ghosts
    fg = _largest_component(fg)
    fg = ndimage.binary_closing(fg, iterations=2) | fg
    fg = ndimage.binary_fill_holes(fg)
    return fg, float(threshold)


def _tissue_mode(values: np.ndarray) -> float:
    """Most frequent intensity of a head's voxels (brain tissue dominates a head MR)."""
    lo, hi = np.percentile(values, [5.0, 99.5])
    hist, edges = np.histogram(values, bins=128, range=(float(lo), float(hi)))
    hist = ndimage.gaussian_filter1d(hist.astype(np.float64), 2.0)
    i = int(hist.argmax())
    return float(0.5 * (edges[i] + edges[i + 1]))


def _trim_waist(brain: np.ndarray, meta: ImageMeta) -> np.ndarray:
    """Cut a mask below the level of its largest axial (RAS z) area where the area drops below
    ``_CORD_AREA_FRACTION`` of it: drops the spinal cord (and what hangs on it) below the brain."""
    pts_z = _world_points(brain, meta)[:, 2]
    if pts_z.size == 0:
        return brain
    bin_mm = 2.0
    zmin = float(pts_z.min())
    counts = np.bincount(((pts_z - zmin) / bin_mm).astype(int))
    peak = int(counts.argmax())
    below = np.nonzero(counts[:peak] < _CORD_AREA_FRACTION * counts[peak])[0]
    if below.size == 0:
        return brain
    z_cut = zmin + (int(below.max()) + 1) * bin_mm
    return brain & (_axis_coord(meta, brain.shape, 2) >= z_cut)


def estimate_brain_mask(
    array: np.ndarray, meta: ImageMeta, head: np.ndarray, modality: str
) -> np.ndarray:
    """Heuristic brain (intracranial) mask; generous rather than tight.

    MR (T1-like contrast): voxels between the CSF/grey-matter threshold and 2x the head's
    most frequent intensity (brain tissue dominates a head), eroded by 4 mm (cuts the brain
    from scalp fat, orbits and muscle; 6-10 mm when the largest piece still reaches the bottom
    of the head), the spinal cord trimmed, the largest piece grown back within the band, closed
    by 6 mm (sulcal CSF), hole-filled (ventricles), then grown by ``_CSF_ALLOWANCE_MM`` (the
    CSF layer T1 cannot tell from bone).
    CT: 0..100 HU, eroded by 3 mm; the largest piece whose outer shell is mostly bone (> 250 HU),
    grown back and filled.

    Raises:
        InputError: no brain-like region was found, or it fills the head (no scalp/skull).
    """
    data = np.asarray(array, dtype=np.float32)
    sp = meta.spacing
    source = _source(meta)
    if modality == "CT":
        band = head & (data > 0) & (data < 100)
        bone = data > 250
        core = _ball_erode(band, 3.0, sp)
        labels, n = ndimage.label(core)
        if n == 0:
            raise InputError(source, "no soft tissue (0..100 HU) inside the head: not a head CT?")
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        chosen = 0
        for lab in np.argsort(sizes)[::-1][:8]:
            if lab == 0 or sizes[lab] == 0:
                break
            comp = labels == lab
            grown = _ball_dilate(comp, 3.0 + 2.0, sp) & band
            shell = _ball_dilate(grown, 2.0, sp) & ~grown
            if shell.any() and float(np.mean(bone[shell] | ~head[shell])) > 0.5:
                chosen = int(lab)
                break
        if chosen == 0:
            raise InputError(
                source, "no soft tissue enclosed by bone found: not a head CT (no skull)?"
            )
        brain = _ball_dilate(labels == chosen, 5.0, sp) & band
    else:
        inside = data[head]
        if inside.size == 0:
            raise InputError(source, "empty head mask")
        sample = inside[:: max(1, inside.size // 2_000_000)]
        mode = _tissue_mode(sample)
        # Lower bound: between CSF/bone and grey matter (Otsu below the mode), or 0.6 x mode
        # when that is lower; the mode may be white matter, and grey matter darker by bias.
        darker = sample[sample < mode]
        low = min(0.6 * mode, _otsu(darker)) if darker.size > 100 else 0.6 * mode
        band = head & (data > low) & (data < 2.0 * mode)
        head_z = _world_points(head, meta)[:, 2]
        z_floor = float(head_z.min()) + 0.1 * float(np.ptp(head_z))
        dist = ndimage.distance_transform_edt(band, sampling=sp)
        for radius in _MR_EROSION_MM:
            core = _largest_component(dist > radius)
            core = _largest_component(_trim_waist(core, meta))
            # A brain that still reaches the bottom of the head hangs on a bridge (brainstem
            # into neck tissue of brain-like intensity): erode harder to cut it.
            if not core.any() or _world_points(core, meta)[:, 2].min() > z_floor:
                break
        if not core.any():
            raise InputError(source, "no bright tissue region inside the head: not a head MR?")
        brain = _ball_dilate(core, radius + 1.0, sp) & band
    brain = _ball_erode(_ball_dilate(brain, 6.0, sp), 6.0, sp) | brain
    brain = ndimage.binary_fill_holes(brain) & head
    if brain.any():
        # The brain's top lies under scalp, skull and CSF only (~10-20 mm): a "brain" far
        # below the vertex is the face or neck, which the cut would then spare or worse.
        gap = float(_world_points(head, meta)[:, 2].max() - _world_points(brain, meta)[:, 2].max())
        if gap > _MAX_VERTEX_GAP_MM:
            raise InputError(
                source,
                f"implausible brain estimate: its top lies {gap:.0f} mm below the top of the "
                f"head (expected < {_MAX_VERTEX_GAP_MM:.0f} mm); pass a brain mask (--brain-mask)",
            )
    frac = float(brain.sum()) / max(1, int(head.sum()))
    if frac < _MIN_BRAIN_FRACTION:
        raise InputError(
            source,
            f"no brain found (estimated brain is {100 * frac:.1f}% of the head): not a head "
            "image, or pass a brain mask (--brain-mask)",
        )
    if frac > _MAX_BRAIN_FRACTION:
        raise InputError(
            source,
            f"no scalp/skull layer around the estimated brain ({100 * frac:.0f}% of the head): "
            "not a head image, or pass a brain mask (--brain-mask)",
        )
    if modality == "CT":
        return brain  # the 0..100 HU band holds the CSF already
    # The T1 tissue mask misses the CSF around the brain (as dark as bone): grow it by a CSF
    # allowance so that the whole intracranial space is protected.
    return _ball_dilate(brain, _CSF_ALLOWANCE_MM, sp) & head


# --------------------------------------------------------------------------------------------
# Face region


def _hull_edges(points_2d: np.ndarray) -> list[tuple[np.ndarray, float]]:
    """Edges of the 2D convex hull as (outward unit normal, offset): n . p <= offset inside."""
    pts = np.unique(np.round(points_2d, 1), axis=0)
    hull = ConvexHull(pts)
    return [(eq[:2].copy(), float(-eq[2])) for eq in hull.equations]


def face_region(
    meta: ImageMeta,
    shape: tuple[int, int, int],
    brain: np.ndarray,
    margin_mm: float = 5.0,
    ears: bool = False,
    angles: tuple[float, float] = FACE_ANGLES,
    brain_meta: ImageMeta | None = None,
    pad_mm: float = 0.0,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Voxels on the face side of the brain's sagittal convex hull (plus ears when asked).

    Args:
        meta: Geometry of the output grid; the face is found in RAS mm, so any stored
            orientation works.
        shape: Output grid shape.
        brain: Brain mask (the spinal cord below the brain is trimmed before the hull).
        margin_mm: Distance kept between the brain hull and the cut.
        ears: Also remove voxels lateral to the brain at ear height.
        angles: Range of hull normals (degrees below anterior) that bound the face.
        brain_meta: Geometry of ``brain`` when it lies on another (coarser) grid than ``meta``.
        pad_mm: Extra distance added to the hull (half a coarse voxel's diagonal, so that the
            hull of block centres still contains every native brain voxel).

    Returns:
        ``(region, info)``: the boolean region (not yet excluding the dilated brain) and the
        planes used.
    """
    if not 0.0 <= angles[0] < angles[1] <= 90.0:
        raise ValueError(f"angles must satisfy 0 <= lo < hi <= 90 degrees, got {angles!r}")
    brain_meta = brain_meta or meta
    trimmed = _trim_waist(brain, brain_meta)
    pts = _world_points(trimmed, brain_meta)
    if len(pts) < 4:
        raise InputError(_source(meta), "brain mask too small to fit the face cut")
    yz = pts[:, 1:3]
    edges = _hull_edges(yz)
    margin_mm = margin_mm + pad_mm
    y = _axis_coord(meta, shape, 1)
    z = _axis_coord(meta, shape, 2)
    region = np.zeros(shape, dtype=bool)
    planes = []
    lo, hi = angles
    # Support lines at the two limiting angles as well, so that a hull with no edge normal in
    # the range (a very short face side) still gives a cut.
    extra = []
    for phi in (lo, hi):
        n = np.array([math.cos(math.radians(phi)), -math.sin(math.radians(phi))])
        extra.append((n, float((yz @ n).max())))
    for n, off in [*edges, *extra]:
        phi = math.degrees(math.atan2(-n[1], n[0]))
        if not (lo - 1e-6 <= phi <= hi + 1e-6):
            continue
        region |= (y * np.float32(n[0]) + z * np.float32(n[1])) > np.float32(off + margin_mm)
        planes.append({"angle_below_anterior_deg": round(phi, 2), "offset_mm": round(off, 2)})
    info: dict[str, Any] = {
        "planes": planes,
        "brain_z_min_after_cord_trim_mm": float(yz[:, 1].min()),
    }
    if ears:
        x = _axis_coord(meta, shape, 0)
        xs = pts[:, 0]
        xc = 0.5 * (float(xs.min()) + float(xs.max()))
        half = 0.5 * (float(xs.max()) - float(xs.min()))
        # Height of the brain's widest level; the pinna spans from there down ~70 mm.
        zb = np.round(pts[:, 2] / 2.0)
        widths = {}
        for level in np.unique(zb):
            sel = xs[zb == level]
            widths[level] = float(sel.max() - sel.min())
        z_wide = 2.0 * float(max(widths, key=widths.get))
        y_min, y_max = float(yz[:, 0].min()), float(yz[:, 0].max())
        length = y_max - y_min
        y_mid = 0.5 * (y_min + y_max)
        ear = (
            (np.abs(x - np.float32(xc)) > np.float32(half + margin_mm))
            & (z < np.float32(z_wide + 10.0))
            & (z > np.float32(z_wide - 70.0))
            & (y > np.float32(y_mid - 0.35 * length))
            & (y < np.float32(y_mid + 0.15 * length))
        )
        region |= ear
        info["ears"] = {
            "lateral_beyond_mm": round(half + margin_mm, 2),
            "z_range_mm": [round(z_wide - 70.0, 2), round(z_wide + 10.0, 2)],
        }
    return region, info


# --------------------------------------------------------------------------------------------
# Depth-map check


def _ras_resample_codes(codes: np.ndarray, meta: ImageMeta, mask_any: np.ndarray, step: float):
    """Nearest-neighbour resample of a uint8 code volume onto an axis-aligned RAS grid.

    Returns the RAS volume ``(nx, ny, nz)`` and its per-axis world coordinates.
    """
    pts = _world_points(
        ndimage.binary_dilation(mask_any, iterations=1) ^ ndimage.binary_erosion(mask_any)
        if mask_any.any()
        else mask_any,
        meta,
    )
    lo = pts.min(0) - 2 * step
    hi = pts.max(0) + 2 * step
    axes = [np.arange(a, b + step, step) for a, b in zip(lo, hi, strict=True)]
    inv = np.linalg.inv(meta.affine)
    out = np.zeros(tuple(len(a) for a in axes), dtype=np.uint8)
    gx, gz = np.meshgrid(axes[0], axes[2], indexing="ij")  # (nx, nz)
    for jy, yv in enumerate(axes[1]):  # slab by slab: bounded memory
        w = np.stack([gx, np.full_like(gx, yv), gz, np.ones_like(gx)]).reshape(4, -1)
        ijk = (inv @ w)[:3]
        out[:, jy, :] = ndimage.map_coordinates(codes, ijk, order=0, cval=0).reshape(gx.shape)
    return out, axes


def _surface_y(vol_bit: np.ndarray, y_axis: np.ndarray) -> np.ndarray:
    """Per (x, z) column: the most anterior y (mm) of the set voxels; NaN where none."""
    has = vol_bit.any(axis=1)
    last = vol_bit.shape[1] - 1 - np.argmax(vol_bit[:, ::-1, :], axis=1)
    return np.where(has, y_axis[last], np.nan)


def _tophat(h: np.ndarray, valid: np.ndarray, step: float) -> np.ndarray:
    """What sticks out of anterior surface heights ``h`` above a 30 mm-disc grey opening (mm).

    The opening removes bumps narrower than a face feature, so the white top-hat holds the nose,
    lips, brows and chin; a planar cut leaves (almost) nothing. Empty columns get the most
    posterior height.
    """
    floor = float(np.nanmin(h[valid])) if valid.any() else 0.0
    filled = np.where(valid, h, floor)
    # Pits narrower than 20 mm (dark bone, eyes or sinuses the cut lays open, which a
    # threshold rendering shows as holes) are closed first: they are not facial relief.
    filled = ndimage.grey_closing(filled, footprint=_disc(10.0 / step), mode="nearest")
    return filled - ndimage.grey_opening(filled, footprint=_disc(15.0 / step), mode="nearest")


def _disc(radius: float) -> np.ndarray:
    r = max(1, int(round(radius)))
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    return (xx * xx + yy * yy) <= r * r


def _relief(tophat: np.ndarray, sel: np.ndarray) -> dict[str, float]:
    if not sel.any():
        return {"max_protrusion_mm": 0.0, "relief_rms_mm": 0.0}
    values = tophat[sel]
    return {
        "max_protrusion_mm": float(values.max()),
        "relief_rms_mm": float(np.sqrt(np.mean(values**2))),
    }


def depth_check(
    head_before: np.ndarray,
    head_after: np.ndarray,
    removed: np.ndarray,
    meta: ImageMeta,
    step: float | None = None,
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Anterior depth maps of the head surface before/after and their relief over the face.

    The face window is the set of (x, z) columns whose anterior surface voxel was removed. The
    depth map is the distance (mm) from the most anterior head point to the surface along -y.

    Returns:
        ``(figures, maps)``: JSON-ready figures and the 2D maps ("before", "after", "window").
    """
    step = float(step or max(1.0, min(meta.spacing)))
    codes = (
        head_before.astype(np.uint8)
        | (head_after.astype(np.uint8) << 1)
        | ((removed & head_before).astype(np.uint8) << 2)
    )
    vol, axes = _ras_resample_codes(codes, meta, head_before, step)
    h0 = _surface_y(vol & 1 > 0, axes[1])
    h1 = _surface_y(vol & 2 > 0, axes[1])
    # Was the anterior surface voxel of the column removed?
    has = np.isfinite(h0)
    jy = np.clip(np.round((np.nan_to_num(h0) - axes[1][0]) / step).astype(int), 0, len(axes[1]) - 1)
    surf_removed = np.take_along_axis(vol, jy[:, None, :], axis=1)[:, 0, :] & 4 > 0
    window = ndimage.binary_opening(has & surf_removed, iterations=2)
    # Statistics away from the window's rim, where the silhouette's edge would dominate.
    core = ndimage.binary_erosion(window, iterations=max(1, int(round(5.0 / step))))
    valid1 = np.isfinite(h1)
    th0 = _tophat(h0, has, step)
    th1 = _tophat(h1, valid1, step)
    front = float(np.nanmax(h0)) if has.any() else 0.0
    figures: dict[str, Any] = {
        "grid_step_mm": step,
        "face_window_area_cm2": float(window.sum() * step * step / 100.0),
        "face_window_emptied_fraction": float((window & ~valid1).sum() / max(1, window.sum())),
        "before": _relief(th0, core),
        "after": _relief(th1, core & valid1),
    }
    both = core & valid1
    if both.sum() > 12 and th0[both].std() > 0 and th1[both].std() > 0:
        figures["feature_correlation"] = float(np.corrcoef(th0[both], th1[both])[0, 1])
    if core.any() and th0[core].sum() > 0:
        # Facial relief still in place: where the surface stuck out before, does it still?
        # Cavities the cut opens (nose, mouth) are dips, so they do not count.
        kept = np.where(valid1, np.minimum(th0, th1), 0.0)
        figures["relief_retained_fraction"] = float(kept[core].sum() / th0[core].sum())
        # The strongest protrusion of the face before defacing (nose tip, lips or chin).
        ix, iz = np.unravel_index(int(np.argmax(np.where(core, th0, -np.inf))), th0.shape)
        figures["strongest_feature"] = {
            "x_mm": float(axes[0][ix]),
            "z_mm": float(axes[2][iz]),
            "protrusion_before_mm": float(th0[ix, iz]),
            "protrusion_after_mm": float(th1[ix, iz]) if valid1[ix, iz] else 0.0,
            "surface_moved_back_mm": float(h0[ix, iz] - h1[ix, iz]) if valid1[ix, iz] else None,
        }
    maps = {
        "before": front - h0,
        "after": front - h1,
        "window": window,
        "extent": np.array([axes[0][0], axes[0][-1], axes[2][0], axes[2][-1]]),
    }
    return figures, maps


def save_depth_png(path: str | Path, maps: dict[str, np.ndarray], title: str = "") -> Path:
    """Before/after anterior depth maps (matplotlib, Agg), written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    ext = maps["extent"]
    vmax = float(
        np.nanpercentile(np.concatenate([maps["before"].ravel(), maps["after"].ravel()]), 99)
    )
    fig, axs = plt.subplots(1, 2, figsize=(9, 5), constrained_layout=True)
    for ax, key in zip(axs, ("before", "after"), strict=True):
        im = ax.imshow(
            maps[key].T,
            origin="lower",
            cmap="viridis_r",
            vmin=0,
            vmax=vmax,
            extent=(ext[1], ext[0], ext[2], ext[3]),  # viewer faces the patient: R on the left
        )
        ax.contour(
            maps["window"].T.astype(float),
            levels=[0.5],
            colors="w",
            linewidths=0.8,
            origin="lower",
            extent=(ext[1], ext[0], ext[2], ext[3]),
        )
        ax.set_title(f"{key}: depth from the front (mm)")
        ax.set_xlabel("x (mm, patient right on the left)")
        ax.set_ylabel("z (mm, superior up)")
    fig.colorbar(im, ax=axs, shrink=0.8)
    if title:
        fig.suptitle(title)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=80)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------
# Defacing


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


# --------------------------------------------------------------------------------------------
# Files


def _stem(path: Path) -> str:
    suffix = image_suffix(path)
    return path.name[: -len(suffix)] if suffix else path.name


def _out_suffix(path: Path) -> str:
    suffix = image_suffix(path)
    return suffix if suffix in (".nii", ".nii.gz", ".nrrd", ".mha") else ".nii.gz"


def deface_file(
    path: str | Path,
    out_dir: str | Path,
    brain_mask: str | Path | None = None,
    *,
    ears: bool = False,
    margin_mm: float = 5.0,
    modality: str | None = None,
    png: bool = True,
    save_brain_mask: bool = False,
) -> dict[str, Any]:
    """Deface one image file or DICOM folder; write volume, removed mask, report and PNG.

    Outputs in ``out_dir`` (each written atomically, with the input's exact geometry):
    ``<name>_defaced<ext>``, ``<name>_face_mask<ext>`` (uint8), ``<name>_deface.json`` and
    ``<name>_depth.png``; with ``save_brain_mask`` also ``<name>_brain_mask<ext>`` (the brain
    that was protected, for audit). ``<ext>`` is the input's suffix, ``.nii.gz`` for DICOM and
    detached-header formats.

    Returns:
        The report (also written as JSON).
    """
    path = Path(path)
    out_dir = Path(out_dir)
    array, meta = read_image(path)
    mask = None
    if brain_mask is not None:
        mask_arr, mask_meta = read_image(brain_mask)
        if mask_arr.shape[:3] != array.shape[:3]:
            raise InputError(
                brain_mask,
                f"brain mask shape {mask_arr.shape} differs from the image's {array.shape} "
                f"({path})",
            )
        offset = float(np.abs(mask_meta.affine - meta.affine).max())
        if offset > 1e-3:
            raise InputError(
                brain_mask,
                f"brain mask geometry differs from the image's ({path}): affines differ by up "
                f"to {offset:.3g} mm; resample the mask onto the image grid first",
            )
        mask = (mask_arr if mask_arr.ndim == 3 else mask_arr[..., 0]) > 0
    meta.source = str(path)
    try:
        result = deface(array, meta, mask, ears=ears, margin_mm=margin_mm, modality=modality)
    except InputError as exc:
        if exc.path is None or exc.path != str(path):
            raise InputError(path, exc.problem) from exc
        raise
    stem = _stem(path) if path.is_file() else path.name
    ext = _out_suffix(path) if path.is_file() else ".nii.gz"
    defaced_path = out_dir / f"{stem}_defaced{ext}"
    mask_path = out_dir / f"{stem}_face_mask{ext}"
    write_image(defaced_path, result.image, meta, dtype=array.dtype)
    write_image(mask_path, result.removed.astype(np.uint8), meta)
    report = dict(result.report)
    report["outputs"] = {"defaced": str(defaced_path), "removed_mask": str(mask_path)}
    if save_brain_mask:
        brain_path = out_dir / f"{stem}_brain_mask{ext}"
        write_image(brain_path, result.brain.astype(np.uint8), meta)
        report["outputs"]["brain_mask"] = str(brain_path)
    if png and result.depth_maps:
        png_path = out_dir / f"{stem}_depth.png"
        save_depth_png(png_path, result.depth_maps, title=f"{stem}: anterior depth map")
        report["outputs"]["depth_png"] = str(png_path)
    report["brain_mask"] = str(brain_mask) if brain_mask is not None else "estimated"
    atomic_write_json(out_dir / f"{stem}_deface.json", report)
    return report


def find_inputs(path: str | Path) -> list[Path]:
    """The volumes under ``path``: itself if a file or a DICOM folder, else the image files and
    sub-folders it holds (each sub-folder read as one DICOM series)."""
    path = Path(path)
    if not path.exists():
        raise InputError(path, "no such file or folder")
    if path.is_file():
        return [path]
    files = sorted(p for p in path.iterdir() if is_image_file(p))
    dirs = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    if files or dirs:
        return [*files, *dirs]
    return [path]  # a folder of DICOM files
