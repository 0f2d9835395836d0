"""``umit preprocess RAW --out PREP``: plan + chunked Zarr store from an ingested RAW folder."""

from __future__ import annotations

import argparse

from umit.cli.common import add_config_args
from umit.config import build_config
from umit.preprocess.run import PreprocessConfig, PreprocessResult, run

__all__ = ["PreprocessConfig", "PreprocessResult", "main", "register", "run"]


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "preprocess",
        help="fingerprint, plan and write the chunked training store",
        description="Reorient to RAS, crop, normalize and resample every case of RAW into "
        "PREP/store.zarr (resumable: a rerun skips finished cases). Exit status 1 if any case "
        "failed (see PREP/failures.json).",
    )
    parser.add_argument(
        "raw", help="RAW folder written by `umit ingest` (catalog.db, images/, labels/)"
    )
    parser.add_argument("--out", required=True, help="PREP folder to write")
    parser.add_argument(
        "--workers", type=int, default=None, help="worker processes (default min(2, CPUs))"
    )
    add_config_args(parser)
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    cfg = build_config(
        PreprocessConfig,
        args.config,
        args.overrides,
        raw=args.raw,
        out=args.out,
        workers=args.workers,
    )
    result = run(cfg)
    print(f"umit preprocess: {result.summary()}")
    return 1 if result.failed else 0
