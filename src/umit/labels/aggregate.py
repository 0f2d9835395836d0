"""``umit labels aggregate``: one consensus label from several raters' segmentations.

Given K label maps of one image (same grid, integer labels 0..N, 0 = background):

* **Majority vote**: per voxel the label most raters gave; a tie between labels goes to the
  lowest tied label value (so a 2-2 tie between background and an organ is background, the
  conservative choice).
* **STAPLE** (Warfield et al., 2004; SimpleITK's ``STAPLEImageFilter``), one structure at a
  time: for label ``l`` the raters' binary masks ``== l`` give the probability that the voxel
  truly is ``l`` and each rater's sensitivity and specificity for ``l``. The consensus is the
  label of highest probability where it is >= 0.5, else background. Per-rater sensitivity and
  specificity are reported per structure and averaged over structures.
* **Agreement**: per voxel the fraction of raters that gave the majority label (1 = unanimous).

Outputs (in ``out``): ``<case>_staple.nii.gz``, ``<case>_majority.nii.gz``,
``<case>_agreement.nii.gz`` (float), ``<case>_staple_prob.nii.gz`` (4D, one probability per
structure), ``raters.json`` (per-case, per-rater sensitivity / specificity); with ``raw`` the
chosen consensus is recorded in ``RAW/catalog.db`` as label source ``consensus_<method>`` for the
case (and, with ``activate``, becomes the case's label, the previous one kept as source
``original``).
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field

from umit.config import UmitConfig, save_config
from umit.data.io import image_suffix, read_image, write_image
from umit.data.meta import ImageMeta
from umit.errors import InputError, UmitError
from umit.ingest.catalog import Catalog
from umit.utils.fileio import atomic_path, atomic_write_json

log = logging.getLogger(__name__)

__all__ = [
    "AggregateConfig",
    "agreement_map",
    "majority_vote",
    "run",
    "staple",
]


class AggregateConfig(UmitConfig):
    """Settings of ``umit labels aggregate``."""

    inputs: list[Path]
    """Either the raters' label files of one image (two or more), or one folder holding one
    sub-folder per case, each with that case's rater files (``<case>/<rater>.nii.gz``)."""
    out: Path = Path("consensus")
    """Output folder."""
    case_id: str | None = None
    """Case id for a list of files (default: the first file's name); a folder's sub-folder
    names are the case ids."""
    raw: Path | None = None
    """A RAW folder whose catalog gets the consensus as a new label source of each case."""
    method: Literal["staple", "majority"] = "staple"
    """Which consensus goes into the catalog (both are always written)."""
    activate: bool = False
    """With ``raw``: make the consensus the case's label (``series.label_path``) so that
    ``umit preprocess`` trains on it; the previous label stays recorded as source ``original``."""
    max_iterations: int = Field(default=100, ge=1)
    """STAPLE EM iterations at most."""
    confidence_weight: float = Field(default=1.0, gt=0)
    """STAPLE confidence weight of the prior (SimpleITK's)."""


# ---------------------------------------------------------------------------------------------
# the methods (numpy in, numpy out)
# ---------------------------------------------------------------------------------------------
def _stack(raters: list[np.ndarray]) -> np.ndarray:
    if len(raters) < 2:
        raise ValueError(f"consensus needs at least 2 raters, got {len(raters)}")
    shapes = {r.shape for r in raters}
    if len(shapes) != 1:
        raise ValueError(f"raters' label maps differ in shape: {sorted(shapes)}")
    return np.stack([np.asarray(r).astype(np.int64) for r in raters])  # (K, X, Y, Z)


def _votes(stack: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(K, *S) rater labels -> (N, *S) vote counts for each label value in ``labels``."""
    return np.stack([(stack == lab).sum(0) for lab in labels])


def majority_vote(raters: list[np.ndarray]) -> np.ndarray:
    """Per-voxel most frequent label; ties go to the lowest tied label value."""
    stack = _stack(raters)
    labels = np.unique(stack)
    return labels[np.argmax(_votes(stack, labels), axis=0)].astype(np.uint8)  # first max wins


def agreement_map(raters: list[np.ndarray]) -> np.ndarray:
    """Per-voxel fraction of raters that gave the majority label."""
    stack = _stack(raters)
    return (stack == majority_vote(raters)[None]).mean(0).astype(np.float32)


def staple(
    raters: list[np.ndarray],
    max_iterations: int = 100,
    confidence_weight: float = 1.0,
) -> dict[str, Any]:
    """Per-structure binary STAPLE (SimpleITK).

    Returns:
        ``consensus`` (uint8 label map), ``prob`` ({label: float32 map}), ``sensitivity`` and
        ``specificity`` ({label: [one per rater]}).
    """
    import SimpleITK as sitk

    stack = _stack(raters)
    labels = [int(v) for v in np.unique(stack) if v != 0]
    prob: dict[int, np.ndarray] = {}
    sens: dict[int, list[float]] = {}
    spec: dict[int, list[float]] = {}
    for lab in labels:
        f = sitk.STAPLEImageFilter()
        f.SetForegroundValue(1.0)
        f.SetMaximumIterations(int(max_iterations))
        f.SetConfidenceWeight(float(confidence_weight))
        images = [sitk.GetImageFromArray((r == lab).astype(np.uint8)) for r in stack]
        p = sitk.GetArrayFromImage(f.Execute(images)).astype(np.float32)
        prob[lab] = p
        sens[lab] = [float(v) for v in f.GetSensitivity()]
        spec[lab] = [float(v) for v in f.GetSpecificity()]
    consensus = np.zeros(stack.shape[1:], np.uint8)
    if labels:
        p = np.stack([prob[lab] for lab in labels])  # (N, *S)
        best = p.argmax(0)
        consensus = np.where(p.max(0) >= 0.5, np.asarray(labels)[best], 0).astype(np.uint8)
    return {"consensus": consensus, "prob": prob, "sensitivity": sens, "specificity": spec}


# ---------------------------------------------------------------------------------------------
# files, catalog and the command
# ---------------------------------------------------------------------------------------------
def _case_groups(cfg: AggregateConfig) -> dict[str, list[Path]]:
    """case id -> rater files."""
    for p in cfg.inputs:
        if not p.exists():
            raise InputError(p, "no such file or folder")
    if len(cfg.inputs) == 1 and cfg.inputs[0].is_dir():
        root = cfg.inputs[0]
        groups = {
            d.name: sorted(f for f in d.iterdir() if f.is_file() and image_suffix(f))
            for d in sorted(root.iterdir())
            if d.is_dir()
        }
        groups = {k: v for k, v in groups.items() if v}
        if not groups:
            raise InputError(root, "no case sub-folders with rater label files")
        return groups
    files = [p for p in cfg.inputs if p.is_file()]
    if len(files) != len(cfg.inputs):
        raise InputError(cfg.inputs[0], "give rater files, or one folder of case sub-folders")
    name = cfg.case_id or files[0].name[: -len(image_suffix(files[0]) or "")]
    return {name: files}


def _read_raters(files: list[Path]) -> tuple[list[np.ndarray], ImageMeta]:
    if len(files) < 2:
        raise InputError(files[0] if files else None, "consensus needs at least 2 rater files")
    arrays, meta0 = [], None
    for f in files:
        a, meta = read_image(f)
        if a.ndim != 3:
            raise InputError(f, f"a label map must be 3D, got shape {a.shape}")
        if not np.allclose(a, np.rint(a)) or a.min() < 0 or a.max() > 255:
            raise InputError(f, "not a label map: values must be integers 0..255")
        if meta0 is None:
            meta0 = meta
        elif a.shape != arrays[0].shape or not np.allclose(meta.affine, meta0.affine, atol=1e-3):
            raise InputError(
                f,
                f"grid differs from {files[0].name} (shape {a.shape} vs {arrays[0].shape}, or "
                "affine): the raters must label the same image grid",
            )
        arrays.append(np.rint(a).astype(np.int64))
    return arrays, meta0  # type: ignore[return-value]


def aggregate_case(cfg: AggregateConfig, case: str, files: list[Path]) -> dict[str, Any]:
    """One case: write the consensus maps, return its per-rater record."""
    raters, meta = _read_raters(files)
    st = staple(raters, cfg.max_iterations, cfg.confidence_weight)
    mv = majority_vote(raters)
    ag = agreement_map(raters)
    paths = {
        "staple": write_image(cfg.out / f"{case}_staple.nii.gz", st["consensus"], meta, np.uint8),
        "majority": write_image(cfg.out / f"{case}_majority.nii.gz", mv, meta, np.uint8),
        "agreement": write_image(cfg.out / f"{case}_agreement.nii.gz", ag, meta, np.float32),
    }
    if st["prob"]:
        probs = np.stack(list(st["prob"].values()), axis=-1)
        paths["staple_prob"] = write_image(
            cfg.out / f"{case}_staple_prob.nii.gz", probs, meta, np.float32
        )
    raters_out = []
    for k, f in enumerate(files):
        sens = {str(lab): v[k] for lab, v in st["sensitivity"].items()}
        spec = {str(lab): v[k] for lab, v in st["specificity"].items()}
        raters_out.append(
            {
                "file": str(f),
                "sensitivity": sens,
                "specificity": spec,
                "mean_sensitivity": float(np.mean(list(sens.values()))) if sens else None,
                "mean_specificity": float(np.mean(list(spec.values()))) if spec else None,
            }
        )
    return {
        "case_id": case,
        "outputs": {k: str(v) for k, v in paths.items()},
        "labels": sorted(int(v) for v in st["prob"]),
        "mean_agreement": float(ag.mean()),
        "raters": raters_out,
    }


def record_in_catalog(cfg: AggregateConfig, rows: list[dict[str, Any]]) -> int:
    """Add each case's consensus to ``cfg.raw``'s catalog as a label source; returns how many."""
    assert cfg.raw is not None
    source = f"consensus_{cfg.method}"
    n = 0
    with Catalog.open_raw(cfg.raw) as cat:
        known = cat.cases()
        for row in rows:
            case = row["case_id"]
            if case not in known:
                raise InputError(cfg.raw / "catalog.db", f"case {case!r} is not in the catalog")
            # a copy inside RAW, so the catalog's paths stay relative to it
            rel = Path("labels") / f"{case}__{source}.nii.gz"
            with atomic_path(cfg.raw / rel) as tmp:
                shutil.copyfile(row["outputs"][cfg.method], tmp)
            cat.add_label_source(
                case,
                source,
                rel.as_posix(),
                details={"n_raters": len(row["raters"]), "mean_agreement": row["mean_agreement"]},
                activate=cfg.activate,
            )
            n += 1
    return n


def run(cfg: AggregateConfig) -> dict[str, Any]:
    """Aggregate every case; returns a summary (cases, failures, catalog rows, seconds).

    Raises:
        InputError: missing inputs, or a RAW folder without a catalog or without a case.
    """
    groups = _case_groups(cfg)
    if cfg.raw is not None:
        Catalog.open_raw(cfg.raw).close()  # fail before any work
    cfg.out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, cfg.out, "aggregate_config.yaml")
    t0 = time.perf_counter()
    rows, failures = [], {}
    for case, files in groups.items():
        try:
            rows.append(aggregate_case(cfg, case, files))
        except (UmitError, ValueError, OSError) as exc:
            failures[case] = str(exc)
            log.error("labels aggregate: %s failed: %s", case, exc)
    atomic_write_json(cfg.out / "raters.json", rows)
    n_cat = record_in_catalog(cfg, rows) if cfg.raw is not None and rows else 0
    if failures:
        atomic_write_json(cfg.out / "failures.json", failures)
    return {
        "cases": rows,
        "failures": failures,
        "catalog_rows": n_cat,
        "out": str(cfg.out),
        "seconds": round(time.perf_counter() - t0, 3),
    }
