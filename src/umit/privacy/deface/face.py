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
from scipy.spatial import ConvexHull

from umit.data.meta import ImageMeta
from umit.errors import InputError
from umit.privacy.deface._common import _axis_coord, _source, _world_points
from umit.privacy.deface.masks import _trim_waist

FACE_ANGLES: tuple[float, float] = (10.0, 50.0)
"""Hull edges whose outward normal lies this many degrees below anterior bound the face: 0 is
straight anterior (would shave the forehead), 90 straight inferior (would cut the whole neck)."""


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
