"""``umit ingest SRC --out RAW``: DICOM / NIfTI / NRRD / MHA / collections / MedMNIST -> RAW."""

from __future__ import annotations

import argparse
import json

from umit.cli.common import add_config_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "ingest",
        help="read DICOM series, NIfTI/NRRD/MHA files, MSD/nnU-Net collections or MedMNIST .npz "
        "into canonical NIfTI + a SQLite catalog (resumable)",
        description=__doc__,
    )
    p.add_argument("src", help="source folder, dataset.json or MedMNIST .npz")
    p.add_argument("--out", required=True, help="RAW output folder (resumed if it exists)")
    p.add_argument("--workers", type=int, default=None, help="parallel loader processes")
    p.add_argument("--site", default=None, help="site label for items that have none")
    add_config_args(p)
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from umit.config import build_config
    from umit.ingest.run import IngestConfig, run

    cfg = build_config(
        IngestConfig,
        args.config,
        args.overrides,
        src=args.src,
        out=args.out,
        workers=args.workers,
        site=args.site,
    )
    result = run(cfg)
    print_summary(result)
    return 1 if result.failed else 0


def print_summary(result) -> None:
    from umit.ingest.catalog import CATALOG_NAME, Catalog
    from umit.ingest.run import failure_line, set_aside_line

    with Catalog(result.out / CATALOG_NAME) as cat:
        summary = cat.summary()
    print(
        f"ingest: {result.ingested} new item(s), {result.skipped} already done, {result.failed} failed "
        f"in {result.seconds:.1f} s ({result.items_per_second:.2f} items/s) -> {result.out}"
    )
    print(
        f"catalog: {summary['cases']} cases, {summary['series']} series/channels, "
        f"{summary['labeled_cases']} labeled"
    )
    for key in (
        "by_modality",
        "by_source_format",
        "by_split",
        "by_site",
        "by_sex",
        "by_age_band",
        "by_contrast",
    ):
        if summary[key] and set(summary[key]) != {"-"}:
            print(f"  {key[3:]:<14} {json.dumps(summary[key])}")
    if result.set_aside:
        print(
            f"set aside (not failures): localizer images of {len(result.set_aside)} series "
            "(table 'set_aside' in catalog.db)"
        )
    for row in result.set_aside[:20]:
        print(f"  SET ASIDE {set_aside_line(row)}")
    if len(result.set_aside) > 20:
        print(f"  ... and {len(result.set_aside) - 20} more (table 'set_aside' in catalog.db)")
    for f in result.failures[:20]:
        print(f"  FAILED {failure_line(f['source'], f['reason'])}")
    if len(result.failures) > 20:
        print(
            f"  ... and {len(result.failures) - 20} more failures (table 'failures' in catalog.db)"
        )
