"""``umit deface`` on the real head MR (``../shared/data/head_mr_dicom_sag_anon``), per setting.

    python -m benchmarks.deface_real_mr [--shared ../shared/data] [--settings default,keep_eyes]

No labels exist for this scan, so the figures are the report's own (head removed, depth check,
brain voxels altered in the estimated mask) plus two approximations made here:

- **globes**: each eye's vitreous is dark on T1; starting from a point placed by hand in each
  orbit (RAS mm ``GLOBE_SEEDS``), the centroid of the dark voxels (< 0.35 x the head's median)
  within 12 mm is iterated three times, and the globe is the 10.5 mm ball around it (a child's
  eye is ~21-22 mm across). Reported: the share of each ball removed.
- **brow band**: on the anterior depth maps, the columns 15-50 mm either side of the midline and
  3-18 mm above the orbital roofs' level (z, RAS mm) where the brows lie on this scan; reported:
  the share of them whose surface moved back by 3 mm or more.

No test asserts on these numbers; they feed docs/defacing.md.
"""

from __future__ import annotations

import argparse
import inspect
import time
from pathlib import Path

import numpy as np

GLOBE_SEEDS = ((27.0, 37.0, -13.0), (-27.0, 37.0, -13.0))
SETTINGS = {
    "default": {},
    "margin_2": {"margin_mm": 2.0},
    "margin_10": {"margin_mm": 10.0},
    "ears": {"ears": True},
    "keep_eyes": {"eyes": False},
}


def _globes(array: np.ndarray, meta) -> list[np.ndarray]:
    from umit.privacy.deface._common import _axis_coord

    x, y, z = (_axis_coord(meta, array.shape, a) for a in range(3))
    dark = array < 0.35 * float(np.median(array[array > 100]))
    balls = []
    for seed in GLOBE_SEEDS:
        c = np.asarray(seed)
        for _ in range(3):
            sel = ((x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2 < 12.0**2) & dark
            c = np.array([x[sel].mean(), y[sel].mean(), z[sel].mean()])
        balls.append((x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2 < 10.5**2)
    return balls


def _brow_band(maps: dict) -> float:
    ext, before, after = maps["extent"], maps["before"], maps["after"]
    xs = np.linspace(ext[0], ext[1], before.shape[0])
    zs = np.linspace(ext[2], ext[3], before.shape[1])
    xx, zz = np.meshgrid(xs, zs, indexing="ij")
    sel = (np.abs(xx) >= 15) & (np.abs(xx) <= 50) & (zz >= 3) & (zz <= 18) & np.isfinite(before)
    moved = np.where(np.isfinite(after), after - before, np.inf)[sel]
    return float(np.mean(moved >= 3.0))


def main(argv: list[str] | None = None) -> None:
    from umit.ingest.read import read_volume
    from umit.privacy.deface import deface

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shared", type=Path, default=Path("../shared/data"))
    ap.add_argument("--settings", default=",".join(SETTINGS))
    args = ap.parse_args(argv)
    array, meta = read_volume(args.shared / "head_mr_dicom_sag_anon")
    meta.source = "head_mr_dicom_sag_anon"
    balls = _globes(array, meta)
    known = inspect.signature(deface).parameters  # an older deface lacks some settings
    for name in args.settings.split(","):
        kwargs = SETTINGS[name]
        if any(k not in known for k in kwargs):
            print(f"{name}: not supported by this deface")
            continue
        t0 = time.perf_counter()
        r = deface(array, meta, **kwargs)
        rep, dc = r.report, r.report["depth_check"]
        tip = dc["strongest_feature"]
        print(
            f"{name}: head removed {100 * rep['removed_head_fraction']:.2f}% "
            f"({rep['removed_head_volume_ml']:.0f} mL); globes removed "
            f"{', '.join(f'{r.removed[b].mean():.3f}' for b in balls)}; brow band moved "
            f"{_brow_band(r.depth_maps):.2f}; relief RMS {dc['before']['relief_rms_mm']:.2f} -> "
            f"{dc['after']['relief_rms_mm']:.2f} mm, retained "
            f"{100 * dc['relief_retained_fraction']:.1f}%, after max "
            f"{dc['after']['max_protrusion_mm']:.0f} mm; nose tip {tip['protrusion_before_mm']:.0f}"
            f" -> {tip['protrusion_after_mm']:.0f} mm, moved back {tip['surface_moved_back_mm']}"
            f" mm; brain {rep['brain_volume_ml']:.0f} mL, altered {rep['brain_voxels_altered']};"
            f" {time.perf_counter() - t0:.0f} s"
        )


if __name__ == "__main__":
    main()
