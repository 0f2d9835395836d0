"""``umit demo``: the whole pipeline on built-in phantoms (no data, no network), with a report."""

from __future__ import annotations

import argparse

from umit.cli.common import add_config_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="run the pipeline end to end on built-in phantoms: ingest, preprocess, pretrain, "
        "fine-tune with few labels vs scratch vs CNN, evaluate per subgroup, report",
        description=__doc__,
    )
    p.add_argument("--out", default=None, help="output folder (default demo_out)")
    add_config_args(p)
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from umit.config import build_config
    from umit.demo import DemoConfig, run

    cfg = build_config(DemoConfig, args.config, args.overrides, out=args.out)
    s = run(cfg)
    c = s["catalog"]
    print(f"\nUMIT demo finished in {s['seconds']:.0f} s")
    print(f"  data      {c['cases']} CT phantoms, sites {c['by_site']}, sex {c['by_sex']}")
    p = s["pretrain"]
    first, last = p.get("initial_val_loss"), p.get("last_val_loss")
    if first is not None and last is not None:
        base = (p.get("last_eval") or {}).get("val_baseline_loss")
        print(
            f"  pretrain  cross-phase val loss {first:.4f} -> {last:.4f}"
            + ("" if base is None else f" (copying the input: {base:.4f})")
        )
    for arm, cells in s["table"].items():
        parts = ", ".join(f"{v['n_labeled']} labeled: Dice {v['mean']:.3f}" for v in cells.values())
        print(f"  {arm:<18} {parts}")
    print(f"  report    {s['report']}")
    return 1 if s["ingest_failed"] or s["preprocess_failed"] else 0
