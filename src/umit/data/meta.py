"""Image metadata that travels with voxels: affine (RAS world), spacing, orientation, provenance.

Convention (the same as nibabel and MONAI): a volume array is indexed ``(i, j, k)`` for spatial
images or ``(i, j, k, t)`` for 4D series, and ``affine`` maps the homogeneous voxel index
``(i, j, k, 1)`` to RAS+ world millimetres. Channel-first arrays used for training are
``(C, i, j, k)`` with the same affine.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import nibabel as nib
import numpy as np

# LPS (DICOM / ITK world) <-> RAS (NIfTI world): flip the first two world axes.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass
class ImageMeta:
    """Geometry and provenance of one image.

    Attributes:
        affine: 4x4 float64 matrix from voxel index to RAS+ world coordinates in mm.
        source: Where the voxels came from (a file or folder path); used in every error message.
        modality: "CT", "MR", "PT", "SEG" or "unknown".
        channel_names: Names of the channels for multi-channel images (e.g. ("T1", "FLAIR")).
        extra: Non-identifying acquisition metadata (manufacturer, model, body part, sex, age
            band, contrast, ...). Never patient names, IDs, dates of birth or institutions.
    """

    affine: np.ndarray
    source: str = ""
    modality: str = "unknown"
    channel_names: tuple[str, ...] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        affine = np.asarray(self.affine, dtype=np.float64)
        if affine.shape != (4, 4):
            raise ValueError(f"affine must be 4x4, got shape {affine.shape} ({self.source})")
        if not np.all(np.isfinite(affine)):
            raise ValueError(f"affine has non-finite values ({self.source})")
        self.affine = affine

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along i, j, k (norms of the affine's first three columns)."""
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0))

    @property
    def direction(self) -> np.ndarray:
        """3x3 matrix of unit column vectors: the RAS direction of each voxel axis."""
        return self.affine[:3, :3] / np.asarray(self.spacing)

    @property
    def origin(self) -> np.ndarray:
        """RAS world position of voxel (0, 0, 0) in mm."""
        return self.affine[:3, 3].copy()

    @property
    def orientation(self) -> str:
        """Three-letter orientation code of the voxel axes, e.g. "RAS" or "LPS" (nibabel)."""
        return "".join(nib.orientations.aff2axcodes(self.affine))

    def with_affine(self, affine: np.ndarray) -> ImageMeta:
        """A copy with a new affine (used by every crop, flip and resample)."""
        return replace(self, affine=np.asarray(affine, dtype=np.float64), extra=dict(self.extra))


def affine_from_lps(direction: np.ndarray, spacing: np.ndarray, origin: np.ndarray) -> np.ndarray:
    """Build a RAS affine from ITK/DICOM-style LPS direction (3x3 columns), spacing and origin."""
    lps = np.eye(4)
    lps[:3, :3] = np.asarray(direction, dtype=np.float64) @ np.diag(np.asarray(spacing, float))
    lps[:3, 3] = np.asarray(origin, dtype=np.float64)
    return LPS_TO_RAS @ lps


def lps_from_affine(affine: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split a RAS affine into ITK/DICOM-style LPS (direction, spacing, origin)."""
    lps = LPS_TO_RAS @ np.asarray(affine, dtype=np.float64)
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    direction = lps[:3, :3] / spacing
    return direction, spacing, lps[:3, 3].copy()


def translate_affine(affine: np.ndarray, start) -> np.ndarray:
    """Affine of a crop starting at voxel ``start``: the origin moves to old voxel ``start``."""
    shift = np.eye(4)
    shift[:3, 3] = np.asarray(start, dtype=np.float64)
    return np.asarray(affine, dtype=np.float64) @ shift
