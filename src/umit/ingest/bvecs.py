"""FSL ``.bval`` / ``.bvec`` files beside a written diffusion NIfTI.

FSL's format: ``.bval`` is one line of b-values (s/mm^2), ``.bvec`` three lines (x, y, z) of unit
gradient directions, one column per volume, ``0 0 0`` for b=0. The vectors are in the image's
voxel frame, not the scanner's: component ``a`` is the direction's projection on voxel axis ``a``
of the written NIfTI. FSL reads every image in radiological voxel order, so when the NIfTI
affine has a positive determinant (neurological storage) it flips the x voxel axis, and the
x component of each bvec is negated (FSL FDT documentation; dipy and MRtrix undo it the same way).

umit writes DICOM series in their stored order (``i`` along a row, ``j`` down a column, ``k``
along row cosine x column cosine, the affine's determinant positive), so here
``bvec = (-g.row_cosine, g.column_cosine, g.slice_normal)`` for a gradient ``g`` in LPS. dcm2niix
writes ``(g.row, -g.column, g.normal)`` for the same data because it flips the rows of the image
(its affine's determinant is negative): the two files differ, and each maps back to ``g``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from umit.data.meta import LPS_TO_RAS
from umit.utils.fileio import atomic_write_text


def fsl_bvecs(directions_lps: Sequence[Sequence[float]], affine: np.ndarray) -> np.ndarray:
    """Gradient directions (patient frame, LPS) -> FSL bvecs of an image with RAS ``affine``.

    Args:
        directions_lps: ``(n, 3)`` unit vectors (zeros for b=0 / isotropic volumes).
        affine: The written image's 4x4 RAS affine.

    Returns:
        ``(3, n)``: rows x, y, z; columns the volumes.
    """
    g = np.asarray(directions_lps, dtype=np.float64).reshape(-1, 3)
    linear = np.asarray(affine, dtype=np.float64)[:3, :3]
    axes_ras = linear / np.linalg.norm(linear, axis=0)  # unit voxel axes, RAS, as columns
    axes_lps = LPS_TO_RAS[:3, :3] @ axes_ras  # diag(-1, -1, 1) is its own inverse
    vecs = g @ axes_lps  # (n, 3): projection of each direction on each voxel axis
    if np.linalg.det(linear) > 0:  # FSL reads it radiologically: x voxel axis reversed
        vecs[:, 0] = -vecs[:, 0]
    norms = np.linalg.norm(vecs, axis=1, keepdims=True)
    vecs = np.divide(vecs, norms, out=np.zeros_like(vecs), where=norms > 1e-9)
    return vecs.T


def _number(v: float) -> str:
    v = 0.0 if abs(v) < 5e-7 else float(v)  # no "-0.000000"
    return f"{v:.6f}".rstrip("0").rstrip(".")


def write_fsl_gradients(
    image_path: Path,
    b_values: Sequence[float],
    directions_lps: Sequence[Sequence[float]] | None,
    affine: np.ndarray,
) -> dict[str, Path]:
    """Write ``<stem>.bval`` (and ``<stem>.bvec`` when the directions are known) beside a NIfTI.

    Args:
        image_path: The written ``.nii`` / ``.nii.gz`` (its volumes in the order of ``b_values``).
        b_values: One per volume.
        directions_lps: One unit vector per volume in the DICOM patient frame, or None.
        affine: The written image's RAS affine (the bvecs follow its voxel axes).

    Returns:
        ``{"bval": path[, "bvec": path]}``, each written atomically.
    """
    name = image_path.name
    stem = name[: -len(".nii.gz")] if name.endswith(".nii.gz") else image_path.stem
    out = {"bval": image_path.with_name(f"{stem}.bval")}
    atomic_write_text(out["bval"], " ".join(_number(b) for b in b_values) + "\n")
    if directions_lps is not None:
        if len(directions_lps) != len(b_values):
            raise ValueError(f"{len(directions_lps)} directions for {len(b_values)} b-values")
        vecs = fsl_bvecs(directions_lps, affine)
        out["bvec"] = image_path.with_name(f"{stem}.bvec")
        atomic_write_text(out["bvec"], "".join(" ".join(map(_number, row)) + "\n" for row in vecs))
    return out
