"""The ``umit deface`` stage: its settings (``DefaceConfig``) and the batch ``run``.

Lives with the defacing code rather than in the CLI so that it can be called without importing
:mod:`umit.cli`; ``umit.cli.deface`` only parses the command line, calls ``run`` and prints.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from umit.config import UmitConfig, save_config
from umit.errors import InputError
from umit.privacy.deface.files import deface_file, find_inputs
from umit.utils.fileio import atomic_write_json

SUMMARY_NAME = "deface_summary.json"


class DefaceConfig(UmitConfig):
    """Settings of ``umit deface``."""

    input: Path
    """An image file (NIfTI, NRRD, MetaImage), a DICOM series folder, or a folder of those."""

    out: Path
    """Output folder for the defaced volumes, removed-region masks, reports and PNGs."""

    brain_mask: Path | None = None
    """Brain mask on the input's grid (single input only); estimated from the image when None."""

    ears: bool = False
    """Also remove the ears (voxels lateral to the brain at ear height)."""

    eyes: bool = True
    """Also remove the eyes, lids and brows (the orbits under and in front of the frontal lobes);
    False keeps what the hull cut leaves of them."""

    margin_mm: float = Field(5.0, ge=0.0, le=50.0)
    """Gap (mm) kept between the brain and the cut; the brain dilated by it is never touched."""

    modality: Literal["auto", "CT", "MR"] = "auto"
    """Intensity model for the head and brain masks; auto: the header, else the intensities."""

    png: bool = True
    """Write the before/after anterior depth-map PNG of each volume."""

    save_brain_mask: bool = False
    """Also write the brain mask that was protected (``<name>_brain_mask``), for audit."""


def run(cfg: DefaceConfig) -> dict[str, Any]:
    """Deface every volume of ``cfg.input``; return (and write) the batch summary.

    A volume that fails (unreadable, not a head, no brain found, an implausible result) is
    recorded with its reason and the batch goes on; nothing already written is lost or
    half-written.
    """
    inputs = find_inputs(cfg.input)
    if cfg.brain_mask is not None and len(inputs) > 1:
        raise InputError(
            cfg.brain_mask,
            f"a brain mask fits one volume, but {cfg.input} holds {len(inputs)} volumes",
        )
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out)
    done, failed = [], []
    for path in inputs:
        try:
            report = deface_file(
                path,
                out,
                cfg.brain_mask,
                ears=cfg.ears,
                eyes=cfg.eyes,
                margin_mm=cfg.margin_mm,
                modality=None if cfg.modality == "auto" else cfg.modality,
                png=cfg.png,
                save_brain_mask=cfg.save_brain_mask,
            )
        except InputError as exc:
            failed.append({"input": str(path), "error": str(exc)})
            continue
        done.append(
            {
                "input": str(path),
                "removed_head_fraction": report["removed_head_fraction"],
                "brain_voxels_altered": report["brain_voxels_altered"],
                **report["outputs"],
            }
        )
    summary = {"n_inputs": len(inputs), "defaced": done, "failed": failed}
    atomic_write_json(out / SUMMARY_NAME, summary)
    return summary
