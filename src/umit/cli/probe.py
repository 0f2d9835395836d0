"""``umit probe``: linear-probe and kNN accuracy of a frozen encoder (vs. random init)."""

from __future__ import annotations

import argparse

from umit.cli.common import add_config_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "probe",
        help="linear-probe and kNN evaluation of a frozen (pretrained) encoder on a labeled store",
        description=__doc__,
    )
    p.add_argument("--encoder", default=None, help="encoder.pt from umit pretrain")
    p.add_argument("--data", default=None, help="PREP folder with a per-case label")
    p.add_argument(
        "--label", dest="label_key", default=None, help="index key to predict (default target)"
    )
    add_config_args(p)
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from umit.config import build_config
    from umit.eval.probes import ProbeConfig, run

    cfg = build_config(
        ProbeConfig,
        args.config,
        args.overrides,
        encoder=args.encoder,
        data=args.data,
        label_key=args.label_key,
    )
    res = run(cfg)
    print(
        f"probe '{res['label_key']}': {res['n_train']} train / {res['n_test']} test cases, classes {res['classes']}"
    )
    for name in ("pretrained", "random_init"):
        if name in res:
            parts = [
                f"{probe} acc {m['accuracy']:.3f}" + (f" auc {m['auc']:.3f}" if "auc" in m else "")
                for probe, m in res[name].items()
            ]
            print(f"  {name:<12} " + " | ".join(parts))
    print(f"  written {res['written']}")
    return 0
