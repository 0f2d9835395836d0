"""``umit deface``: remove the face (and optionally the ears) from head MRI/CT, never the brain.

Example::

    umit deface scans/head_t1.nii.gz --out defaced/ --margin-mm 5 --ears
    umit deface dicom/series_folder --out defaced/
    umit deface folder_of_volumes/ --out defaced/        # batch: failures recorded, batch goes on

writes, per volume, ``<name>_defaced.nii.gz`` (input geometry and dtype), ``<name>_face_mask.nii.gz``
(the removed voxels), ``<name>_deface.json`` (fractions and the depth-map check) and
``<name>_depth.png``; plus ``deface_summary.json`` and the resolved ``config.yaml`` in ``--out``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from umit.cli.common import add_config_args
from umit.config import UmitConfig, build_config, save_config
from umit.errors import InputError
from umit.privacy.deface import deface_file, find_inputs
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

    A volume that fails (unreadable, no head, no brain found) is recorded with its reason and
    the batch goes on; nothing already written is lost or half-written.
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


def _main(args: argparse.Namespace) -> int:
    cfg = build_config(
        DefaceConfig,
        args.config,
        args.overrides,
        input=args.input,
        out=args.out,
        brain_mask=args.brain_mask,
        ears=True if args.ears else None,
        margin_mm=args.margin_mm,
        modality=args.modality,
        save_brain_mask=True if args.save_brain_mask else None,
    )
    start = time.perf_counter()
    summary = run(cfg)
    for item in summary["failed"]:
        print(f"umit deface: failed: {item['error']}")
    print(
        f"umit deface: defaced {len(summary['defaced'])} of {summary['n_inputs']} volume(s) "
        f"into {cfg.out} in {time.perf_counter() - start:.1f} s "
        f"({len(summary['failed'])} failed; see {SUMMARY_NAME})"
    )
    return 1 if summary["failed"] else 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "deface",
        help="remove the face (and ears) from head MRI/CT without touching the brain",
        description="Deface head MRI/CT volumes: the face side of the brain's convex hull "
        "(plus a margin) is set to background; the brain, dilated by the margin, is never "
        "touched. Writes the defaced volume, the removed-region mask, a JSON report and a "
        "before/after depth-map PNG per volume.",
    )
    parser.add_argument("input", nargs="?", default=None, help="image file, DICOM folder or folder")
    parser.add_argument("--out", default=None, help="output folder (required here or in --config)")
    parser.add_argument("--brain-mask", default=None, help="brain mask on the input's grid")
    parser.add_argument("--ears", action="store_true", help="also remove the ears")
    parser.add_argument(
        "--margin-mm", type=float, default=None, help="gap kept around the brain in mm (5)"
    )
    parser.add_argument(
        "--save-brain-mask", action="store_true", help="also write the protected brain mask"
    )
    parser.add_argument(
        "--modality", choices=("auto", "CT", "MR"), default=None, help="intensity model (auto)"
    )
    add_config_args(parser)
    parser.set_defaults(func=_main)
