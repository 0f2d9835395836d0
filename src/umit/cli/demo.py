"""``umit demo``: run the whole pipeline on generated phantoms and print where things are."""

from __future__ import annotations

import argparse

from umit.cli.common import add_config_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="run the pipeline end to end on built-in phantoms (no data, no network)",
        description=__doc__,
    )
    p.add_argument("--out", default=None, help="output folder (default demo_out)")
    add_config_args(p)
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from umit.config import build_config
    from umit.demo import DemoConfig, run
    from umit.ingest.catalog import CATALOG_NAME, Catalog

    cfg = build_config(DemoConfig, args.config, args.overrides, out=args.out)
    summary = run(cfg)
    print(f"\nUMIT demo finished in {summary['seconds']:.0f} s; outputs in {summary['out']}/")
    failed = 0
    for kind in ("ct", "mr"):
        if kind not in summary:
            continue
        s = summary[kind]
        failed += s["ingest_failed"] + s["preprocess_failed"]
        with Catalog(s["raw"] + "/" + CATALOG_NAME) as cat:
            cs = cat.summary()
        print(
            f"  {kind.upper()}: {s['phantoms']} phantoms -> catalog {s['raw']}/catalog.db "
            f"({cs['cases']} cases, {cs['series']} series, {cs['labeled_cases']} labeled, "
            f"{cs['failures']} failed) -> store {s['prep']}/store.zarr ({s['preprocessed']} cases)"
        )
        for col in ("by_site", "by_sex", "by_age_band", "by_contrast"):
            print(f"      {col[3:]:<9} {cs[col]}")
    return 1 if failed else 0
