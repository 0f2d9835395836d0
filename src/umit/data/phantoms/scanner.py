"""Scanner simulation shared by the CT and MR phantoms: grid, PSF, noise scaling, orientation.

Geometry: ``shape`` is the grid, in RAS order (x: right-left, y: anterior-posterior, z: head-foot),
of the field of view sampled at the modality's reference spacing (``CT_REFERENCE_SPACING``,
``MR_REFERENCE_SPACING``). The physical field of view, and with it the anatomy in millimetres, is
therefore the same for every site; each site samples it at its own spacing, so the stored array
shape follows the site's spacing (and is permuted to the site's stored orientation). We keep the
field of view rather than the array shape fixed because the anatomy must not change size with the
scanner: after ``umit preprocess`` resamples every case to one spacing, organs of one subject have
the same size whichever site scanned them, and what differs between sites is what differs between
real scanners (spacing, orientation, PSF, noise, calibration), not a scale factor the phantom
invented. The CT reference spacing sits between the site spacings, so the mean array size over
sites is close to ``shape``.

Also holds ``Phantom``, the record an acquisition returns (stored arrays, labels, geometry).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import nibabel as nib
import numpy as np
from scipy import ndimage

from umit.data.meta import ImageMeta
from umit.data.phantoms._common import _check_modality
from umit.data.phantoms.sites import CT_SITES, MR_SITES, SiteProtocol, SubjectAttributes

# Spacing (mm, RAS x, y, z) at which ``shape`` is measured; see the module docstring.
CT_REFERENCE_SPACING: tuple[float, float, float] = (1.2, 1.2, 2.0)
MR_REFERENCE_SPACING: tuple[float, float, float] = (1.0, 1.0, 1.0)

_MIN_AXIS = 16
_MAX_AXIS = 512


@dataclass
class Phantom:
    """One synthetic subject: co-registered channels, a label map and their geometry.

    Attributes:
        images: Channel name -> ``(i, j, k)`` array in stored orientation (CT: int16 HU;
            MR: float32 arbitrary positive units), in ``meta.channel_names`` order.
        label: ``(i, j, k)`` uint8 label map on the same grid.
        meta: Affine (voxel -> RAS mm), modality, source ``phantom:<kind>:<seed>``, channel
            names, and ``extra`` = the subject attributes as a dict.
        label_names: Label value -> name (``CT_LABELS`` or ``MR_LABELS``).
        attributes: The subject attributes.
    """

    images: dict[str, np.ndarray]
    label: np.ndarray
    meta: ImageMeta
    label_names: dict[int, str]
    attributes: SubjectAttributes

    def stacked(self) -> np.ndarray:
        """Channel-first float32 array ``(C, i, j, k)`` in ``meta.channel_names`` order."""
        names = self.meta.channel_names or tuple(self.images)
        return np.stack([self.images[n].astype(np.float32) for n in names])


def check_shape(shape: Any) -> tuple[int, int, int]:
    """Validate a phantom ``shape`` (three ints, each 16..512) and return it as a tuple."""
    try:
        dims = tuple(shape)
    except TypeError:
        raise ValueError(f"shape must be three integers, got {shape!r}") from None
    if len(dims) != 3 or not all(
        isinstance(d, (int, np.integer)) and not isinstance(d, bool) for d in dims
    ):
        raise ValueError(f"shape must be three integers, got {shape!r}")
    if any(d < _MIN_AXIS or d > _MAX_AXIS for d in dims):
        raise ValueError(
            f"shape must have {_MIN_AXIS}..{_MAX_AXIS} voxels on every axis, got {tuple(dims)}"
        )
    return tuple(int(d) for d in dims)  # type: ignore[return-value]


def site_grid_shape(shape: tuple[int, int, int], modality: str, site: str) -> tuple[int, int, int]:
    """Stored array shape of a phantom of requested ``shape`` acquired at ``site``."""
    modality = _check_modality(modality)
    sites = CT_SITES if modality == "ct" else MR_SITES
    if site not in sites:
        raise ValueError(f"unknown {modality.upper()} site {site!r}; known: {sorted(sites)}")
    ras = _ras_grid_shape(check_shape(shape), modality, sites[site])
    ornt = _storage_ornt(sites[site].orientation)
    return tuple(int(ras[int(ax)]) for ax in ornt[:, 0].argsort())  # type: ignore[return-value]


def _ras_grid_shape(shape: tuple[int, int, int], modality: str, proto: SiteProtocol) -> tuple:
    ref = CT_REFERENCE_SPACING if modality == "ct" else MR_REFERENCE_SPACING
    return tuple(
        max(8, int(round(n * r / s))) for n, r, s in zip(shape, ref, proto.spacing, strict=True)
    )


class _Grid:
    """Canonical RAS voxel grid with normalized anatomical coordinates.

    ``x[i]``, ``y[j]``, ``z[k]`` are 1D float32 coordinates of voxel centres in anatomy units
    (``mm / scale`` per axis); organs are described in these units, so they do not depend on the
    site's spacing.
    """

    def __init__(self, n: tuple, spacing: tuple, scale: tuple):
        self.n = tuple(int(v) for v in n)
        self.spacing = tuple(float(s) for s in spacing)
        self.scale = tuple(float(s) for s in scale)
        self.axes = [
            ((np.arange(m, dtype=np.float64) - (m - 1) / 2) * s / c).astype(np.float32)
            for m, s, c in zip(self.n, self.spacing, self.scale, strict=True)
        ]
        self.x = self.axes[0][:, None, None]
        self.y = self.axes[1][None, :, None]
        self.z = self.axes[2][None, None, :]

    def box(self, center: tuple, radius: tuple) -> tuple[slice, slice, slice]:
        """Index slices covering ``center +- radius`` (anatomy units), clipped to the grid."""
        out = []
        for ax, c, r in zip(self.axes, center, radius, strict=True):
            lo = int(np.searchsorted(ax, c - r, side="left"))
            hi = int(np.searchsorted(ax, c + r, side="right"))
            out.append(slice(lo, max(lo, hi)))
        return tuple(out)  # type: ignore[return-value]

    def coords(self, sl: tuple[slice, slice, slice]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return (
            self.axes[0][sl[0]][:, None, None],
            self.axes[1][sl[1]][None, :, None],
            self.axes[2][sl[2]][None, None, :],
        )

    def ellipsoid(
        self, center: tuple, axes: tuple, angle: float = 0.0
    ) -> tuple[tuple[slice, slice, slice], np.ndarray]:
        """Quadratic form ``q`` (< 1 inside) of an ellipsoid rotated by ``angle`` about z.

        Returns the bounding-box slices and ``q`` on that box.
        """
        r = max(axes[0], axes[1]) if angle else axes[0]
        ry = max(axes[0], axes[1]) if angle else axes[1]
        sl = self.box(center, (r, ry, axes[2]))
        x, y, z = self.coords(sl)
        dx, dy = x - center[0], y - center[1]
        if angle:
            c, s = math.cos(angle), math.sin(angle)
            dx, dy = dx * c + dy * s, -dx * s + dy * c
        q2 = (dx / axes[0]) ** 2 + (dy / axes[1]) ** 2
        return sl, q2 + ((z - center[2]) / axes[2]) ** 2

    def to_index(self, pts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Nearest voxel indices of points ``(N, 3)`` in anatomy units and an in-grid mask."""
        idx = np.empty(pts.shape, dtype=np.int64)
        for a in range(3):
            m = self.n[a]
            idx[:, a] = np.rint(pts[:, a] * self.scale[a] / self.spacing[a] + (m - 1) / 2)
        ok = np.all((idx >= 0) & (idx < np.asarray(self.n)), axis=1)
        return idx, ok

    def affine(self, world_center: tuple) -> np.ndarray:
        aff = np.diag([*self.spacing, 1.0])
        aff[:3, 3] = np.asarray(world_center) - (np.asarray(self.n) - 1) / 2 * np.asarray(
            self.spacing
        )
        return aff


def _kernel_gain(sigma: float, truncate: float) -> float:
    """``sqrt(sum(w**2))`` of scipy's 1D Gaussian kernel: how much it shrinks white noise."""
    radius = int(truncate * sigma + 0.5)
    if radius == 0 or sigma <= 0:
        return 1.0
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    w = np.exp(-0.5 / sigma**2 * x**2)
    w /= w.sum()
    return float(np.sqrt(np.sum(w**2)))


def _psf(img: np.ndarray, sigma_vox: list[float], truncate: float = 3.0) -> np.ndarray:
    return ndimage.gaussian_filter(img, sigma_vox, mode="nearest", truncate=truncate)


def _storage_ornt(axcodes: str) -> np.ndarray:
    start = nib.orientations.axcodes2ornt(("R", "A", "S"))
    return nib.orientations.ornt_transform(start, nib.orientations.axcodes2ornt(tuple(axcodes)))


def _to_storage(
    arrays: dict[str, np.ndarray], label: np.ndarray, affine: np.ndarray, axcodes: str
) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """Reorient canonical RAS arrays to ``axcodes`` and update the affine to match."""
    ornt = _storage_ornt(axcodes)
    new_affine = affine @ nib.orientations.inv_ornt_aff(ornt, label.shape)

    def apply(a: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(nib.orientations.apply_orientation(a, ornt))

    images = {k: apply(v) for k, v in arrays.items()}
    return images, apply(label), new_affine
