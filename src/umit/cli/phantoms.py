"""``umit phantoms``: write synthetic CT and/or MRI phantom collections that ``umit ingest`` reads.

Example::

    umit phantoms --n 50 --out data/phantoms --modality both --seed 0 workers=2

writes ``data/phantoms/ct`` and ``data/phantoms/mr`` (nnU-Net v2-style: dataset.json, imagesTr,
labelsTr, attributes.csv) and the resolved config as ``data/phantoms/config.yaml``.
"""

from __future__ import annotations

import argparse
import time

from umit.cli.common import add_config_args
from umit.config import build_config
from umit.data.phantoms.stage import PhantomsConfig, run


def _main(args: argparse.Namespace) -> int:
    cfg = build_config(
        PhantomsConfig,
        args.config,
        args.overrides,
        out=args.out,
        n=args.n,
        modality=args.modality,
        seed=args.seed,
    )
    start = time.perf_counter()
    out = run(cfg)
    kinds = "CT + MR" if cfg.modality == "both" else cfg.modality.upper()
    print(
        f"umit phantoms: wrote {cfg.n} training + {cfg.n_test} test {kinds} case(s) per modality "
        f"to {out} in {time.perf_counter() - start:.1f} s"
    )
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "phantoms",
        help="write synthetic CT/MRI phantom collections (the demo's and tests' data)",
        description="Write nnU-Net v2-style collections of procedural CT torso and/or MRI head "
        "phantoms with labels and subject attributes, ready for `umit ingest`.",
    )
    parser.add_argument("--out", default=None, help="output folder (required here or in --config)")
    parser.add_argument("--n", type=int, default=None, help="training cases per modality (50)")
    parser.add_argument(
        "--modality", choices=("ct", "mr", "both"), default=None, help="which phantoms (ct)"
    )
    parser.add_argument("--seed", type=int, default=None, help="collection seed (0)")
    add_config_args(parser)
    parser.set_defaults(func=_main)
