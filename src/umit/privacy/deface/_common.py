"""Private helpers shared by the defacing steps: morphology in millimetres, Otsu, world
coordinates, and the coarse working grid on which the costly morphology runs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy import ndimage

from umit.data.meta import ImageMeta


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
