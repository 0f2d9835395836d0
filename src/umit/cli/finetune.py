"""``umit finetune``: segmentation or classification, from a pretrained encoder or from scratch."""

from __future__ import annotations

import argparse

from umit.cli.common import add_config_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "finetune",
        help="fine-tune UNETR / SwinUNETR / CNN baselines (segmentation) or classifiers on a "
        "preprocessed store, optionally with few labels",
        description=__doc__,
    )
    p.add_argument("--data", default=None, help="PREP folder (or data=PREP)")
    p.add_argument("--out", default=None, help="run folder")
    p.add_argument("--pretrained", default=None, help="encoder.pt from umit pretrain")
    p.add_argument("--label-fraction", dest="label_fraction", type=float, default=None)
    p.add_argument("--label-count", dest="label_count", type=int, default=None)
    p.add_argument(
        "--dp",
        action="store_true",
        help="differentially private training (DP-SGD, Opacus) = dp.enabled=true; set "
        "dp.target_epsilon=8 dp.delta=... dp.max_grad_norm=1",
    )
    add_config_args(p)
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from umit.config import build_config
    from umit.finetune.run import FinetuneConfig, run
    from umit.train.distributed import is_main

    cfg = build_config(
        FinetuneConfig,
        args.config,
        [*args.overrides, "dp.enabled=true"] if args.dp else args.overrides,
        data=args.data,
        out=args.out,
        pretrained=args.pretrained,
        label_fraction=args.label_fraction,
        label_count=args.label_count,
    )
    s = run(cfg)
    if is_main():
        print(
            f"finetune: {s['steps']} steps on {s['n_train']} labeled cases ({s['n_unlabeled']} left unlabeled, "
            f"{s['n_val']} validation) in {s['seconds']:.0f} s; loss {s['first_loss']:.4f} -> {s['last_loss']:.4f}"
        )
        print(f"  best: {s['best']}  model: {s['model']}")
        if s.get("dp"):
            from umit.train.dp import format_dp

            print(f"  privacy: {format_dp(s['dp'])}")
    return 0
