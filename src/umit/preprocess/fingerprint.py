"""Dataset fingerprint (as in nnU-Net): spacings, shapes and foreground intensity statistics.

Geometry comes from the NIfTI headers of every case (cheap); intensities from a deterministic
sample of at most ``max_cases`` cases, each contributing up to ``voxels_per_case`` randomly drawn
foreground voxels per channel. Foreground is ``label > 0`` when the case has a label, else the body
(> -500 HU for CT, nonzero for MR; or ``> threshold`` when one is given).

Default target spacing (nnU-Net's rule): the per-axis median spacing; but when the coarsest
median axis is more than 3x the finest (thick slices), that axis takes the 10th percentile of
its spacings instead, never finer than the coarsest of the other axes.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from umit.errors import InputError
from umit.ingest.catalog import SeriesRecord
from umit.preprocess.normalize import body_mask
from umit.preprocess.resample import ras_geometry, read_nifti, same_geometry, spacing_of

ANISOTROPY_RATIO = 3.0
ANISOTROPIC_PERCENTILE = 10.0


def stable_seed(*parts: Any) -> list[int]:
    """Seed material that is the same in every process (Python's ``hash`` is salted per process)."""
    return [zlib.crc32(str(p).encode()) for p in parts]


def channel_names(records: list[SeriesRecord]) -> list[str]:
    return [r.channel_name or f"channel{r.channel}" for r in records]


def target_spacing_rule(spacings: np.ndarray) -> tuple[tuple[float, float, float], int | None]:
    """nnU-Net's default target spacing from per-case spacings (N, 3); returns (spacing, aniso axis)."""
    spacings = np.asarray(spacings, dtype=np.float64).reshape(-1, 3)
    target = np.median(spacings, axis=0)
    worst = int(np.argmax(target))
    if target[worst] > ANISOTROPY_RATIO * float(np.min(target)):
        others = max(float(target[a]) for a in range(3) if a != worst)
        target[worst] = max(
            float(np.percentile(spacings[:, worst], ANISOTROPIC_PERCENTILE)), others
        )
        return tuple(float(t) for t in target), worst
    return tuple(float(t) for t in target), None


def sample_case_ids(case_ids: Iterable[str], max_cases: int, seed: int = 0) -> list[str]:
    """A deterministic random subset of at most ``max_cases`` ids (all of them if fewer)."""
    ids = sorted(case_ids)
    if max_cases <= 0 or len(ids) <= max_cases:
        return ids
    rng = np.random.default_rng(seed)
    return sorted(ids[i] for i in rng.choice(len(ids), size=max_cases, replace=False))


def case_fingerprint(
    case_id: str,
    records: list[SeriesRecord],
    raw: str | Path,
    *,
    intensities: bool,
    voxels_per_case: int = 100_000,
    seed: int = 0,
    threshold: float | None = None,
) -> dict[str, Any]:
    """Geometry (from the header of channel 0) and, if asked, sampled foreground intensities.

    Returns ``{"spacing", "shape"}`` in RAS axis order, plus ``"values"`` (one float32 array per
    channel) and ``"label_values"`` when ``intensities``; or ``{"error": reason}``.
    """
    raw = Path(raw)
    try:
        _, affine, shape = read_nifti(raw / records[0].image_path, header_only=True)
        ras_affine, ras_shape = ras_geometry(affine, shape)
        out: dict[str, Any] = {"spacing": list(spacing_of(ras_affine)), "shape": list(ras_shape)}
        if not intensities:
            return out
        arrays = []
        for rec in records:
            arr, aff, shp = read_nifti(raw / rec.image_path, dtype=np.float32)
            if not same_geometry(shp, aff, shape, affine):
                raise InputError(
                    raw / rec.image_path,
                    f"geometry differs from channel 0 ({records[0].image_path})",
                )
            arrays.append(arr)
        fg = None
        label_values: list[int] = []
        if records[0].label_path:
            lab, laff, lshp = read_nifti(raw / records[0].label_path)
            if same_geometry(lshp, laff, shape, affine):
                lab = np.asarray(lab)
                label_values = sorted(int(v) for v in np.unique(lab))
                if np.any(lab > 0):
                    fg = lab > 0
        rng = np.random.default_rng([seed, *stable_seed(case_id)])
        values = []
        for rec, arr in zip(records, arrays, strict=True):
            mask = fg if fg is not None else body_mask(arr, rec.modality, threshold)
            picked = np.asarray(arr)[mask]
            if picked.size > voxels_per_case:
                picked = picked[rng.integers(0, picked.size, size=voxels_per_case)]
            values.append(picked.astype(np.float32))
        out.update(values=values, label_values=label_values)
        return out
    except InputError as exc:
        return {"error": str(exc)}


def _case_fingerprint_job(args: tuple) -> tuple[str, dict[str, Any]]:
    case_id, records, raw, kwargs = args
    return case_id, case_fingerprint(case_id, records, raw, **kwargs)


def compute_fingerprint(
    raw: str | Path,
    cases: dict[str, list[SeriesRecord]],
    *,
    max_cases: int = 50,
    voxels_per_case: int = 100_000,
    seed: int = 0,
    threshold: float | None = None,
    map_fn: Callable = map,
) -> dict[str, Any]:
    """Fingerprint of the catalog's cases (see the module docstring).

    Args:
        raw: The RAW folder (catalog paths are relative to it).
        cases: ``Catalog.cases()``.
        max_cases: At most this many cases are read for intensities (0: all).
        voxels_per_case: Foreground voxels drawn per case and channel.
        seed: Seed of the case and voxel sampling (the fingerprint is deterministic).
        threshold: Body threshold for cases without a label (None: modality default).
        map_fn: ``map``-like function used to spread cases over processes (e.g. ``pool.map``).
    """
    if not cases:
        raise InputError(raw, "the catalog lists no cases")
    ids = sorted(cases)
    first = cases[ids[0]]
    names = channel_names(first)
    sampled = set(sample_case_ids(ids, max_cases, seed))
    kwargs = dict(voxels_per_case=voxels_per_case, seed=seed, threshold=threshold)
    jobs = [(cid, cases[cid], str(raw), {**kwargs, "intensities": cid in sampled}) for cid in ids]
    per_case: dict[str, Any] = {}
    unreadable: dict[str, str] = {}
    values: list[list[np.ndarray]] = [[] for _ in names]
    label_values: set[int] = set()
    for cid, fp in map_fn(_case_fingerprint_job, jobs):
        if "error" in fp:
            unreadable[cid] = fp["error"]
            continue
        per_case[cid] = {"spacing": fp["spacing"], "shape": fp["shape"]}
        if "values" in fp and len(fp["values"]) == len(names):
            for c, v in enumerate(fp["values"]):
                values[c].append(v)
            label_values.update(fp["label_values"])
    if not per_case:
        raise InputError(
            raw, f"no readable case for the fingerprint; e.g. {next(iter(unreadable.values()))}"
        )
    spacings = np.array([per_case[c]["spacing"] for c in sorted(per_case)])
    shapes = np.array([per_case[c]["shape"] for c in sorted(per_case)])
    target, aniso_axis = target_spacing_rule(spacings)
    channels = []
    for c, (name, rec) in enumerate(zip(names, first, strict=True)):
        v = np.concatenate(values[c]) if values[c] else np.zeros(0, np.float32)
        stats: dict[str, Any] = {
            "name": name,
            "modality": rec.modality or "unknown",
            "n_voxels": int(v.size),
        }
        if v.size:
            p_lo, p_hi = np.percentile(v, [0.5, 99.5])
            stats.update(
                mean=float(v.mean(dtype=np.float64)),
                std=float(v.std(dtype=np.float64)),
                p00_5=float(p_lo),
                p99_5=float(p_hi),
                min=float(v.min()),
                max=float(v.max()),
            )
        channels.append(stats)
    return {
        "n_cases": len(ids),
        "n_sampled": len(sampled),
        "median_spacing": [float(x) for x in np.median(spacings, axis=0)],
        "min_spacing": [float(x) for x in spacings.min(axis=0)],
        "max_spacing": [float(x) for x in spacings.max(axis=0)],
        "target_spacing": list(target),
        "anisotropic_axis": aniso_axis,
        "median_shape": [float(x) for x in np.median(shapes, axis=0)],
        "channels": channels,
        "label_values": sorted(label_values),
        "unreadable": unreadable,
        "seed": seed,
        "cases": per_case,
    }
