"""``umit labels aggregate``: several raters' segmentations of one image -> STAPLE and
majority-vote consensus, per-rater sensitivity / specificity, a per-voxel agreement map; with
--raw the consensus becomes a label source of the case in RAW/catalog.db.

  umit labels aggregate r1.nii.gz r2.nii.gz r3.nii.gz --out CONS --case-id case_007
  umit labels aggregate RATERS/ --out CONS --raw RAW method=staple activate=true

``register_aggregate(labels_subparsers)`` adds the ``aggregate`` action to ``umit labels``.
"""

from __future__ import annotations

import argparse

from umit.cli.common import add_config_args


def register_aggregate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "aggregate",
        help="consensus (STAPLE, majority vote) of several raters' label maps",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "inputs", nargs="*", help="rater label files of one image, or one folder of case folders"
    )
    p.add_argument("--out", default=None, help="output folder (default: consensus)")
    p.add_argument("--case-id", default=None, help="case id of a list of files")
    p.add_argument("--raw", default=None, help="RAW folder whose catalog gets the consensus")
    add_config_args(p)
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from pathlib import Path

    from umit.config import build_config
    from umit.labels.aggregate import AggregateConfig, run

    # both positionals take many words: key=value words that are not files are overrides
    words = list(args.inputs or [])
    settings = [w for w in words if "=" in w and not Path(w).exists()]
    inputs = [w for w in words if w not in settings]
    cfg = build_config(
        AggregateConfig,
        args.config,
        [*settings, *args.overrides],
        inputs=inputs or None,
        out=args.out,
        case_id=args.case_id,
        raw=args.raw,
    )
    s = run(cfg)
    print(
        f"labels aggregate: {len(s['cases'])} case(s), {len(s['failures'])} failed, "
        f"{s['catalog_rows']} catalog row(s) in {s['seconds']:.1f} s -> {s['out']}"
    )
    for row in s["cases"]:
        sens = ", ".join(f"{r['mean_sensitivity']:.2f}" for r in row["raters"])
        print(
            f"  {row['case_id']}: agreement {row['mean_agreement']:.3f}; rater sensitivity {sens}"
        )
    for case, why in s["failures"].items():
        print(f"  FAILED {case}: {why}")
    return 1 if s["failures"] else 0
