"""Affine and geometry: slice normal, slice positions, the mean slice step and the RAS affine.

The affine is built from ImageOrientationPatient, PixelSpacing, the first slice's position and
the mean step vector between slices, which keeps a gantry tilt (the step need not be parallel to
the slice normal). Conventions: see :mod:`umit.ingest.dicom`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from umit.data.meta import LPS_TO_RAS
from umit.ingest.dicom.frames import _Frame


def slice_normal(iop: Sequence[float]) -> np.ndarray:
    """Unit normal of the image plane: row cosine x column cosine (DICOM LPS world).

    Args:
        iop: ImageOrientationPatient, six direction cosines (row direction, column direction).
    """
    iop = np.asarray([float(v) for v in iop], dtype=np.float64)
    if iop.shape != (6,):
        raise ValueError(f"ImageOrientationPatient needs 6 values, got {iop.shape[0]}")
    normal = np.cross(iop[:3], iop[3:])
    norm = np.linalg.norm(normal)
    if not np.isfinite(norm) or norm < 1e-6:
        raise ValueError(f"ImageOrientationPatient {iop.tolist()} has parallel row/column axes")
    return normal / norm


def _slice_positions(frames: list[_Frame], groups: list[np.ndarray]) -> np.ndarray:
    """One ImagePositionPatient per slice (K, 3): the mean over its time points, which share it
    within tolerance."""
    return np.stack([np.mean([frames[i].ipp for i in g], axis=0) for g in groups])


def _mean_step(ipps: np.ndarray) -> np.ndarray:
    """Mean step vector from one slice to the next (keeps gantry tilt)."""
    return (ipps[-1] - ipps[0]) / (len(ipps) - 1)


def _affine(
    iop: np.ndarray, pixel_spacing: tuple[float, float], step: np.ndarray, origin: np.ndarray
) -> np.ndarray:
    """RAS affine of voxel ``(i, j, k)``: ``i`` along a row, ``j`` down a column, ``k`` by ``step``.

    Args:
        iop: ImageOrientationPatient (row cosine, column cosine).
        pixel_spacing: PixelSpacing (row spacing, column spacing).
        step: Slice step vector, LPS mm.
        origin: Position of the first voxel, LPS mm.
    """
    row_cos = iop[:3] / np.linalg.norm(iop[:3])
    col_cos = iop[3:] / np.linalg.norm(iop[3:])
    lps = np.eye(4)
    lps[:3, 0] = row_cos * pixel_spacing[1]  # i runs along a row: column spacing
    lps[:3, 1] = col_cos * pixel_spacing[0]  # j runs down a column: row spacing
    lps[:3, 2] = step
    lps[:3, 3] = origin
    return LPS_TO_RAS @ lps
