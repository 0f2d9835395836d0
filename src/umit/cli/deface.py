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

from umit.cli.common import add_config_args
from umit.config import build_config
from umit.privacy.deface.stage import SUMMARY_NAME, DefaceConfig, run


def _main(args: argparse.Namespace) -> int:
    cfg = build_config(
        DefaceConfig,
        args.config,
        args.overrides,
        input=args.input,
        out=args.out,
        brain_mask=args.brain_mask,
        ears=True if args.ears else None,
        eyes=False if args.keep_eyes else None,
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
        "--keep-eyes",
        action="store_true",
        help="keep the eyes, lids and brows (removed by default)",
    )
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
