"""The face region: what lies anterior-inferior of the brain's sagittal convex hull.

Computed in RAS millimetres through the affine (so oblique and LPS-stored volumes are handled
exactly): the hull edges whose outward normals lie between ``FACE_ANGLES`` degrees below anterior
bound the face, and every voxel beyond one of them by more than the margin is face; optionally the
ears (lateral to the brain's width plus the margin, at ear height).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy import ndimage
from scipy.spatial import ConvexHull

from umit.data.meta import ImageMeta
from umit.errors import InputError
from umit.privacy.deface._common import _axis_coord, _source, _world_points
from umit.privacy.deface.masks import _trim_waist

FACE_ANGLES: tuple[float, float] = (10.0, 50.0)
"""Hull edges whose outward normal lies this many degrees below anterior bound the face: 0 is
straight anterior (would shave the forehead), 90 straight inferior (would cut the whole neck)."""

ORBIT_DEPTH_MM = 40.0
"""How far behind the brain's frontal pole the orbit region reaches: the globe (~24 mm) lies
under the frontal lobe, its back 30-35 mm behind the pole (measured on the real child T1)."""
BROW_HEIGHT_MM = 15.0
"""Height above the frontal lobes' floor (the orbital roofs) up to which the brows are removed."""
ORBIT_FLOOR_MM = 45.0
"""Depth below the frontal lobes' floor down to which the orbit region reaches (orbit floor
~30 mm below the roof; below it the face cut takes over)."""
_FLOOR_PERCENTILE = 5.0  # of the anterior brain's heights: its floor, robust to a few stray voxels
_FRONT_SLAB_MM = 20.0  # the anterior slab of the brain whose floor and width define the orbits


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


def orbit_region(
    meta: ImageMeta,
    shape: tuple[int, int, int],
    brain: np.ndarray,
    margin_mm: float = 5.0,
    brain_meta: ImageMeta | None = None,
    bin_mm: float = 2.0,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Orbits, lids and brows: what lies under the frontal lobes and in front of them, low.

    The brain's convex hull bridges the concave orbital surface of the frontal lobes (the
    temporal lobes fill the projection below it), so the hull cut leaves the back of the eyes,
    the upper lids and the brows. This region adds, within ``ORBIT_DEPTH_MM`` behind the frontal
    pole and within the frontal lobes' width (+ margin):

    - under the brain: every voxel below the lowest brain voxel of its (x, y) column, down to
      ``ORBIT_FLOOR_MM`` below the frontal lobes' floor (the eyes, the orbits' fat and muscle);
    - in front of the brain (columns without brain): every voxel up to ``BROW_HEIGHT_MM`` above
      that floor (lids, brows, the bridge of the nose).

    The caller removes only what lies outside the brain dilated by the margin, so the brain is
    never touched whatever this region holds.

    Args:
        meta: Geometry of the output grid.
        shape: Output grid shape.
        brain: Brain mask (the spinal cord below the brain is trimmed first).
        margin_mm: Margin added to the lateral extent.
        brain_meta: Geometry of ``brain`` when it lies on another (coarser) grid.
        bin_mm: Size of the (x, y) bins of the brain's floor map.

    Returns:
        ``(region, info)``: the boolean region and its limits in RAS mm.
    """
    brain_meta = brain_meta or meta
    pts = _world_points(_trim_waist(brain, brain_meta), brain_meta)
    if len(pts) < 4:
        raise InputError(_source(meta), "brain mask too small to place the orbits")
    y_pole = float(pts[:, 1].max())
    front = pts[pts[:, 1] > y_pole - _FRONT_SLAB_MM]
    z_floor = float(np.percentile(front[:, 2], _FLOOR_PERCENTILE))
    x_lo = float(front[:, 0].min()) - margin_mm
    x_hi = float(front[:, 0].max()) + margin_mm
    y_back = y_pole - ORBIT_DEPTH_MM
    z_top, z_bottom = z_floor + BROW_HEIGHT_MM, z_floor - ORBIT_FLOOR_MM
    info = {
        "frontal_pole_y_mm": round(y_pole, 2),
        "frontal_floor_z_mm": round(z_floor, 2),
        "y_from_mm": round(y_back, 2),
        "z_range_mm": [round(z_bottom, 2), round(z_top, 2)],
        "x_range_mm": [round(x_lo, 2), round(x_hi, 2)],
    }
    # Lowest brain height per (x, y) bin; +inf where a column holds no brain. A 3 x 3 minimum
    # filter closes gaps between the brain's sample points (a lower floor only removes less).
    nx = int(np.ceil((x_hi - x_lo) / bin_mm)) + 1
    ny = int(np.ceil(ORBIT_DEPTH_MM / bin_mm)) + 1
    sel = (pts[:, 1] > y_back) & (pts[:, 0] > x_lo) & (pts[:, 0] < x_hi)
    ix = ((pts[sel, 0] - x_lo) / bin_mm).astype(int)
    iy = ((pts[sel, 1] - y_back) / bin_mm).astype(int)
    floor = np.full((nx, ny), np.inf, dtype=np.float32)
    np.minimum.at(floor, (ix, iy), pts[sel, 2].astype(np.float32))
    floor = ndimage.minimum_filter(floor, size=3, mode="nearest")
    floor = np.minimum(floor, np.float32(z_top))  # no brain in the column: up to the brows

    y = _axis_coord(meta, shape, 1)
    z = _axis_coord(meta, shape, 2)
    box = (y > np.float32(y_back)) & (z > np.float32(z_bottom)) & (z < np.float32(z_top))
    x = _axis_coord(meta, shape, 0)
    box &= (x > np.float32(x_lo)) & (x < np.float32(x_hi))
    idx = np.nonzero(box)
    bx = np.clip(((x[idx] - x_lo) / bin_mm).astype(int), 0, nx - 1)
    by = np.clip(((y[idx] - y_back) / bin_mm).astype(int), 0, ny - 1)
    region = np.zeros(shape, dtype=bool)
    region[idx] = z[idx] < floor[bx, by]
    return region, info
