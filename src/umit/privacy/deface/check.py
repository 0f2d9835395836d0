"""The depth-map check: did defacing flatten the face?

An anterior depth map of the head surface (RAS grid, first head voxel seen from the front) before
and after; over the face window we report the largest protrusion above the smooth surface (the
nose) and the high-frequency relief, which defacing must flatten; ``save_depth_png`` draws both.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from umit.data.meta import ImageMeta
from umit.privacy.deface._common import _world_points
from umit.utils.fileio import atomic_path


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
    import matplotlib  # optional heavy: only for the PNG

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after matplotlib.use('Agg')

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
