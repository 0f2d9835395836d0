"""Defacing on disk: one image file or DICOM folder in, volume, mask, report and PNG out.

``deface_file`` reads a volume (and an optional brain mask on its exact grid), defaces it and
writes every output atomically with the input's geometry; ``find_inputs`` lists the volumes of a
file or folder for a batch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from umit.data.io import image_suffix, is_image_file, read_image, write_image
from umit.errors import InputError
from umit.ingest.read import read_volume
from umit.privacy.deface.check import save_depth_png
from umit.privacy.deface.plausible import ImplausibleResult
from umit.privacy.deface.volume import deface
from umit.utils.fileio import atomic_write_json


def _stem(path: Path) -> str:
    suffix = image_suffix(path)
    return path.name[: -len(suffix)] if suffix else path.name


def _out_suffix(path: Path) -> str:
    suffix = image_suffix(path)
    return suffix if suffix in (".nii", ".nii.gz", ".nrrd", ".mha") else ".nii.gz"


def deface_file(
    path: str | Path,
    out_dir: str | Path,
    brain_mask: str | Path | None = None,
    *,
    ears: bool = False,
    eyes: bool = True,
    margin_mm: float = 5.0,
    modality: str | None = None,
    png: bool = True,
    save_brain_mask: bool = False,
) -> dict[str, Any]:
    """Deface one image file or DICOM folder; write volume, removed mask, report and PNG.

    Outputs in ``out_dir`` (each written atomically, with the input's exact geometry):
    ``<name>_defaced<ext>``, ``<name>_face_mask<ext>`` (uint8), ``<name>_deface.json`` and
    ``<name>_depth.png``; with ``save_brain_mask`` also ``<name>_brain_mask<ext>`` (the brain
    that was protected, for audit). ``<ext>`` is the input's suffix, ``.nii.gz`` for DICOM and
    detached-header formats. A result the depth check finds implausible writes only its report
    (``"status": "failed"``) and depth map, and raises.

    Returns:
        The report (also written as JSON).
    """
    path = Path(path)
    out_dir = Path(out_dir)
    array, meta = read_volume(path)
    mask = None
    if brain_mask is not None:
        mask_arr, mask_meta = read_image(brain_mask)
        if mask_arr.shape[:3] != array.shape[:3]:
            raise InputError(
                brain_mask,
                f"brain mask shape {mask_arr.shape} differs from the image's {array.shape} "
                f"({path})",
            )
        offset = float(np.abs(mask_meta.affine - meta.affine).max())
        if offset > 1e-3:
            raise InputError(
                brain_mask,
                f"brain mask geometry differs from the image's ({path}): affines differ by up "
                f"to {offset:.3g} mm; resample the mask onto the image grid first",
            )
        mask = (mask_arr if mask_arr.ndim == 3 else mask_arr[..., 0]) > 0
    meta.source = str(path)
    stem = _stem(path) if path.is_file() else path.name
    ext = _out_suffix(path) if path.is_file() else ".nii.gz"
    try:
        result = deface(
            array, meta, mask, ears=ears, eyes=eyes, margin_mm=margin_mm, modality=modality
        )
    except ImplausibleResult as exc:
        # Keep what explains the refusal (report, depth map), never the defaced image.
        out_dir.mkdir(parents=True, exist_ok=True)
        report = {**exc.result.report, "status": "failed", "error": exc.problem}
        if png and exc.result.depth_maps:
            save_depth_png(out_dir / f"{stem}_depth.png", exc.result.depth_maps, title=stem)
        atomic_write_json(out_dir / f"{stem}_deface.json", report)
        raise InputError(path, f"{exc.problem} (report: {stem}_deface.json)") from exc
    except InputError as exc:
        if exc.path is None or exc.path != str(path):
            raise InputError(path, exc.problem) from exc
        raise
    defaced_path = out_dir / f"{stem}_defaced{ext}"
    mask_path = out_dir / f"{stem}_face_mask{ext}"
    write_image(defaced_path, result.image, meta, dtype=array.dtype)
    write_image(mask_path, result.removed.astype(np.uint8), meta)
    report = dict(result.report)
    report["outputs"] = {"defaced": str(defaced_path), "removed_mask": str(mask_path)}
    if save_brain_mask:
        brain_path = out_dir / f"{stem}_brain_mask{ext}"
        write_image(brain_path, result.brain.astype(np.uint8), meta)
        report["outputs"]["brain_mask"] = str(brain_path)
    if png and result.depth_maps:
        png_path = out_dir / f"{stem}_depth.png"
        save_depth_png(png_path, result.depth_maps, title=f"{stem}: anterior depth map")
        report["outputs"]["depth_png"] = str(png_path)
    report["brain_mask"] = str(brain_mask) if brain_mask is not None else "estimated"
    report["status"] = "defaced"
    atomic_write_json(out_dir / f"{stem}_deface.json", report)
    return report


def find_inputs(path: str | Path) -> list[Path]:
    """The volumes under ``path``: itself if a file or a DICOM folder, else the image files and
    sub-folders it holds (each sub-folder read as one DICOM series)."""
    path = Path(path)
    if not path.exists():
        raise InputError(path, "no such file or folder")
    if path.is_file():
        return [path]
    files = sorted(p for p in path.iterdir() if is_image_file(p))
    dirs = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    if files or dirs:
        return [*files, *dirs]
    return [path]  # a folder of DICOM files
