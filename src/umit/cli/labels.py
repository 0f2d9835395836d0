"""``umit labels``: per-case finding labels in the catalog, with one sub-command per source.

Example::

    umit labels from-reports reports.csv --catalog RAW [vocab=my_findings.yaml] [key=study_uid]

reads the reports, labels each vocabulary finding present / absent / uncertain / not_mentioned
(ConText rules: negation, uncertainty, history, experiencer) and replaces the catalog's
``labels`` rows of source "reports";

    umit labels aggregate r1.nii.gz r2.nii.gz r3.nii.gz --out CONS --case-id case_007

builds the consensus of several raters' label maps (STAPLE, majority vote). Sub-commands
register in ``SUBCOMMANDS``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from umit.cli.common import add_config_args
from umit.cli.labels_aggregate import register_aggregate


def _from_reports(args: argparse.Namespace) -> int:
    from umit.config import build_config
    from umit.labels.run import FromReportsConfig, run

    cfg = build_config(
        FromReportsConfig, args.config, args.overrides, reports=args.reports, catalog=args.catalog
    )
    res = run(cfg)
    print(
        f"umit labels from-reports: {res.labeled_reports} of {res.reports} report(s) labeled "
        f"{res.labeled_cases} case(s) (key {res.key}; {res.rows_written} label rows; {res.labeler})"
    )
    for finding, counts in res.counts.items():
        shown = ", ".join(f"{v} {n}" for v, n in sorted(counts.items()))
        print(f"  {finding}: {shown}")
    for what, rows in (
        ("matched no case", res.unmatched_rows),
        ("had no text", res.empty_rows),
        ("repeated a case", res.duplicate_rows),
    ):
        if rows:
            more = ", ..." if len(rows) > 20 else ""
            print(f"  {len(rows)} report(s) {what}: rows {', '.join(map(str, rows[:20]))}{more}")
    return 1 if res.unmatched_rows or res.empty_rows else 0


def _register_from_reports(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "from-reports",
        help="labels from free-text radiology reports (ConText rules over a findings vocabulary)",
        description="Label each finding of a vocabulary in each report (present / absent / "
        "uncertain / not_mentioned) and write them to the catalog's labels table. Exits 1 when "
        "some reports match no case or have no text (listed by row number).",
    )
    p.add_argument("reports", nargs="?", default=None, help="CSV/TSV/JSONL file of reports")
    p.add_argument("--catalog", default=None, help="RAW folder (or its catalog.db)")
    add_config_args(p)
    p.set_defaults(func=_from_reports)


SUBCOMMANDS: dict[str, Callable[[argparse._SubParsersAction], None]] = {
    "from-reports": _register_from_reports,
    "aggregate": register_aggregate,
}
"""Sub-command name -> function adding its parser (and ``func``) to the ``labels`` subparsers."""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "labels",
        help="per-case labels in the catalog (from-reports: radiology reports; aggregate: rater consensus)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="labels_command", metavar="SUBCOMMAND")
    for add in SUBCOMMANDS.values():
        add(sub)
    parser.set_defaults(func=lambda args: (parser.print_help(), 2)[1])
