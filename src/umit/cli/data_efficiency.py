"""``umit data-efficiency``: label-fraction curves (pretrained vs scratch vs CNN), resumable."""

from __future__ import annotations

import argparse

from umit.cli.common import add_config_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "data-efficiency",
        help="label-fraction x seed x arm experiment on the fixed test split; table, plot, report",
        description=__doc__,
    )
    p.add_argument("--data", default=None, help="PREP folder with a test split")
    p.add_argument("--out", default=None, help="experiment folder (resumed if it exists)")
    add_config_args(p)
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from umit.config import build_config
    from umit.eval.data_efficiency import DataEfficiencyConfig, run

    cfg = build_config(
        DataEfficiencyConfig, args.config, args.overrides, data=args.data, out=args.out
    )
    s = run(cfg)
    print(s["markdown"])
    print(f"report: {s['report']}")
    return 0
