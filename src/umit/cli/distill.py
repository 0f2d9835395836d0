"""``umit distill``: a teacher (fine-tuned best.pt or pretrained encoder.pt) -> a small student."""

from __future__ import annotations

import argparse

from umit.cli.common import add_config_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "distill",
        help="distill a fine-tuned model or a pretrained encoder into a small student (logit KL "
        "at temperature T, projected feature matching, plus the ground-truth loss)",
        description=__doc__,
    )
    p.add_argument("--teacher", default=None, help="best.pt (or encoder.pt) of the teacher")
    p.add_argument("--data", default=None, help="PREP folder (or data=PREP)")
    p.add_argument("--out", default=None, help="run folder (best.pt of the student)")
    p.add_argument("--label-count", dest="label_count", type=int, default=None)
    p.add_argument("--label-fraction", dest="label_fraction", type=float, default=None)
    add_config_args(p)
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from umit.config import build_config
    from umit.finetune.distill import DistillConfig, run
    from umit.train.distributed import is_main

    cfg = build_config(
        DistillConfig,
        args.config,
        args.overrides,
        teacher=args.teacher,
        data=args.data,
        out=args.out,
        label_count=args.label_count,
        label_fraction=args.label_fraction,
    )
    s = run(cfg)
    if is_main():
        ratio = s["params_teacher"] / max(1, s["params_student"])
        print(
            f"distill: {s['steps']} steps on {s['n_train']} labeled + {s['n_unlabeled']} unlabeled "
            f"cases in {s['seconds']:.0f} s; loss {s['first_loss']:.4f} -> {s['last_loss']:.4f}; "
            f"student {s['params_student']:,} params ({ratio:.1f}x fewer than the teacher)"
        )
        cache = s["cache"]
        print(
            "  teacher cache: "
            + (
                f"{cache['dir']} ({cache['computed']} draws computed, {cache['reused']} reused)"
                if cache["used"]
                else f"off ({cache['reason']})"
            )
        )
        print(f"  best: {s['best']}  model: {s['model']}")
    return 0
