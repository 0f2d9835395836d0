"""``umit pretrain``: self-supervised pretraining (method=mae|simclr|genesis|cross_sequence) on a preprocessed
store; torchrun-ready."""

from __future__ import annotations

import argparse

from umit.cli.common import add_config_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pretrain",
        help="self-supervised pretraining (MAE-3D, SimCLR-3D, Models Genesis, cross-sequence MRI) "
        "of an encoder on a "
        "preprocessed store "
        "(CPU or GPU, one or many processes with torchrun)",
        description=__doc__,
    )
    p.add_argument("--data", default=None, help="PREP folder (or data=PREP)")
    p.add_argument("--out", default=None, help="run folder (or out=DIR)")
    add_config_args(p)
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from umit.config import build_config
    from umit.ssl.pretrain import PretrainConfig, run
    from umit.train.distributed import is_main

    cfg = build_config(PretrainConfig, args.config, args.overrides, data=args.data, out=args.out)
    summary = run(cfg)
    if is_main():
        print(
            f"pretrain: {summary['steps']} steps on {summary['train_cases']} cases in "
            f"{summary['seconds']:.0f} s; train loss {summary['first_loss']:.4f} -> {summary['last_loss']:.4f}"
        )
        if summary["initial_val_loss"] is not None and summary["last_val_loss"] is not None:
            what = {
                "mae": "reconstruction",
                "simclr": "contrastive",
                "genesis": "restoration",
                "report_labels": "report-label BCE",
                "cross_sequence": "held-out sequence",
                "cross_phase": "cross-phase",
            }
            base = (summary.get("last_eval") or {}).get("val_baseline_loss")
            print(
                f"  validation {what[summary['method']]} loss {summary['initial_val_loss']:.4f} -> "
                f"{summary['last_val_loss']:.4f} ({summary['val_cases']} held-out cases)"
                + (f"; trivial baseline {base:.4f}" if base is not None else "")
            )
        last = summary.get("last_eval") or {}
        if "knn_acc" in last:
            print(
                f"  monitor: kNN acc {last['knn_acc']:.3f}, probe acc {last['probe_acc']:.3f}"
                + (f", probe AUC {last['probe_auc']:.3f}" if "probe_auc" in last else "")
            )
        for seq, v in ((summary.get("synthesis") or {}).get("targets") or {}).items():
            print(
                f"  synthesis of {seq} on {len(v['per_case'])} held-out case(s): PSNR "
                f"{v['model_psnr']:.2f} dB (intensity-matched baseline {v['baseline_psnr']:.2f}), "
                f"SSIM {v['model_ssim']:.3f} ({v['baseline_ssim']:.3f})"
            )
        print(f"  encoder: {summary['encoder']}")
    return 0
