"""``umit deid SRC --out DST`` (PS3.15 Annex E de-identification) and ``umit deid --check DIR``.

De-identify: every DICOM file under SRC is written to DST/<study>/<series>/<instance>.dcm with
the Basic Profile applied (plus the chosen options), one audit record per file in DST/audit/ and
DST/deid_report.json. Files that may carry burned-in text are rejected (default) or masked.
Exit status 1 when any file failed.

Check: every DICOM file under DIR is scanned for residual identifiers; exit status 1 (with a
per-file listing of attribute and category, never the value) when any is found.
"""

from __future__ import annotations

import argparse
import sys

from umit.cli.common import add_config_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "deid",
        help="de-identify DICOM (PS3.15 Annex E Basic Profile + options), or --check a folder "
        "for residual identifiers",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("src", nargs="?", default=None, help="DICOM file or folder to de-identify")
    p.add_argument("--out", default=None, help="output folder (must not be inside SRC)")
    p.add_argument(
        "--check",
        metavar="DIR",
        default=None,
        help="scan DIR for residual identifiers instead of de-identifying",
    )
    p.add_argument(
        "--options",
        default=None,
        help="comma-separated profile options: retain-modified-dates (alias retain-dates), "
        "retain-patient-characteristics, retain-device-identity, retain-institution-identity, "
        "clean-descriptors, retain-safe-private (vendor diffusion/timing private elements; "
        "see docs/deid.md)",
    )
    p.add_argument(
        "--burned-in",
        choices=("reject", "mask"),
        default=None,
        help="files that may carry burned-in text: reject (default) or mask (blank regions)",
    )
    p.add_argument(
        "--mask-band",
        type=float,
        default=None,
        help="top fraction of rows blanked by --burned-in mask (default 0.1)",
    )
    p.add_argument(
        "--mask-rect",
        action="append",
        default=None,
        metavar="X0,Y0,X1,Y1",
        help="extra rectangle (pixels) blanked by --burned-in mask; repeatable",
    )
    p.add_argument(
        "--secret",
        default=None,
        help="key file or folder for UID/date/patient pseudonyms (default: .umit_secret beside "
        "--out); use RAW/.umit_secret to match `umit ingest`",
    )
    p.add_argument(
        "--keep-private",
        action="append",
        default=None,
        metavar="CREATOR:GGGG:EE",
        help="keep this private attribute too (user safelist, matched by creator and element "
        "offset in any block); repeatable",
    )
    add_config_args(p)
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from umit.errors import InputError

    if args.check is not None:
        if args.src is not None or args.out is not None:
            raise InputError(None, "--check DIR takes no SRC and no --out")
        return check_main(args.check)
    if args.src is None or args.out is None:
        raise InputError(None, "give SRC and --out DST to de-identify, or --check DIR")
    from umit.config import build_config
    from umit.deid.engine import DeidConfig, run

    rects = None
    if args.mask_rect:
        try:
            rects = [[int(v) for v in r.split(",")] for r in args.mask_rect]
        except ValueError:
            raise InputError(
                None, f"--mask-rect needs X0,Y0,X1,Y1 integers, got {args.mask_rect}"
            ) from None
    cfg = build_config(
        DeidConfig,
        args.config,
        args.overrides,
        src=args.src,
        out=args.out,
        options=[o for o in args.options.split(",") if o.strip()] if args.options else None,
        burned_in=args.burned_in,
        mask_band=args.mask_band,
        mask_rects=rects,
        secret=args.secret,
        keep_private=args.keep_private,
    )
    result = run(cfg)
    print(
        f"deid: {result.written} of {result.files} DICOM file(s) de-identified, "
        f"{result.failed} failed, {result.burned_in_masked} burned-in masked, "
        f"{result.non_dicom} non-DICOM skipped in {result.seconds:.1f} s -> {result.out}"
    )
    print(f"  key: {result.secret_path} (keep it; never share it with the data)")
    for path, reason in result.failures[:50]:
        print(f"  FAILED {path}: {reason}")
    if result.failed > 50:
        print(f"  ... and {result.failed - 50} more (deid_report.json lists them by source key)")
    return 1 if result.failed else 0


def check_main(folder: str) -> int:
    from umit.deid.check import check_folder

    report = check_folder(folder)
    for f in report.flagged:
        print(f"{f.path}: {len(f.findings)} residual identifier(s)")
        for x in f.findings:
            print(f"  [{x.category}] {x.path}: {x.reason}")
    for path, problem in report.unreadable:
        print(f"{path}: unreadable: {problem}")
    cats = ", ".join(f"{k} {v}" for k, v in sorted(report.by_category().items())) or "none"
    print(
        f"deid --check: {len(report.files)} DICOM file(s), {len(report.flagged)} with residual "
        f"identifiers ({cats}), {len(report.unreadable)} unreadable, {report.non_dicom} "
        f"non-DICOM skipped in {report.seconds:.1f} s",
        file=sys.stdout,
    )
    if not report.files and not report.unreadable:
        print(f"deid --check: no DICOM files under {folder}", file=sys.stderr)
        return 1
    return 0 if report.passed else 1
