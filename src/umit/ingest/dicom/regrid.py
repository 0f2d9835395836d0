"""Resampling a stack with non-uniform slice spacing onto a uniform grid (opt-in).

Clinical head CTs often change slice spacing part-way (e.g. 4.2 mm through the skull base, then
7.4 mm). Such a stack has no single affine, so by default it is refused; with
``resample_nonuniform`` it is resampled here: the new slices lie at the smallest spacing along
the slice normal, from the first slice on, and each is the linear interpolation of the two
original slices around it at their true positions. The in-plane grid is kept. The slices'
in-plane offsets (gantry tilt) are linear in the position along the normal
(:func:`~umit.ingest.dicom.stacks._check_aligned`), so interpolating voxel ``(i, j)`` between two
slices follows the sheared line through them and the new step vector keeps the tilt.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from umit.errors import GeometryError
from umit.ingest.dicom.stacks import POSITION_TOLERANCE_MM, describe_runs, spacing_runs

MAX_RESAMPLE_GROWTH = 4.0
"""Refuse a resampling that would make more than this many times the original slices."""


@dataclass
class Regridded:
    """A stack resampled onto uniform slices.

    Attributes:
        array: Voxels, float32, the slice axis (2) resampled.
        step: Step vector between the new slices, LPS mm (its normal component is ``spacing``).
        spacing: The new slice spacing along the normal, mm.
        transform: What was done, for the catalog and the log, e.g. ``"resampled nonuniform
            slices 4.2/7.4 mm -> 4.2 mm (26 -> 35 slices)"``.
    """

    array: np.ndarray
    step: np.ndarray
    spacing: float
    transform: str


def regrid_slices(
    array: np.ndarray,
    ipps: np.ndarray,
    pos: np.ndarray,
    max_relative_deviation: float,
    where: Path,
) -> Regridded:
    """Resample ``array`` along its slice axis onto uniform slices at the smallest spacing.

    Args:
        array: Voxels ``(i, j, k[, t or c])``, slices sorted by ascending ``pos``.
        ipps: Slice positions (K, 3), LPS mm, on one line (checked by the caller).
        pos: Their distances along the slice normal, ascending.
        max_relative_deviation: Steps within this relative deviation form one spacing run.
        where: Folder named in errors.

    Raises:
        GeometryError: the smallest spacing would multiply the slice count by more than
            :data:`MAX_RESAMPLE_GROWTH` (a stray slice close to another, not a protocol change).
    """
    runs = spacing_runs(pos, max_relative_deviation)
    spacing = min(r.spacing for r in runs)
    extent = float(pos[-1] - pos[0])
    n_new = int(np.floor(extent / spacing + 1e-6)) + 1
    n_old = len(pos)
    if n_new > MAX_RESAMPLE_GROWTH * n_old:
        raise GeometryError(
            where,
            f"resample_nonuniform: the smallest slice spacing {spacing:.4g} mm would make "
            f"{n_new} slices from {n_old} (more than {MAX_RESAMPLE_GROWTH:g}x); spacing changes: "
            f"{describe_runs(runs)}",
        )
    targets = pos[0] + spacing * np.arange(n_new)
    out = np.empty(array.shape[:2] + (n_new,) + array.shape[3:], dtype=np.float32)
    for m, z in enumerate(targets):
        k = int(np.clip(np.searchsorted(pos, z, side="right") - 1, 0, n_old - 2))
        w = (z - pos[k]) / (pos[k + 1] - pos[k])
        if abs(z - pos[k]) < POSITION_TOLERANCE_MM:  # on an original slice: take it as is
            w = 0.0
        elif abs(pos[k + 1] - z) < POSITION_TOLERANCE_MM:
            w = 1.0
        lo = array[:, :, k].astype(np.float64)
        hi = array[:, :, k + 1].astype(np.float64)
        out[:, :, m] = (1.0 - w) * lo + w * hi
    step = (ipps[-1] - ipps[0]) * (spacing / extent)
    distinct = "/".join(dict.fromkeys(f"{r.spacing:.4g}" for r in runs))
    transform = (
        f"resampled nonuniform slices {distinct} mm -> {spacing:.4g} mm ({n_old} -> {n_new} slices)"
    )
    return Regridded(out, step, spacing, transform)
