"""``umit audit privacy``: membership-inference attacks (loss and reference-calibrated) with attack
AUC and TPR at low FPR, and near-duplicates between members and non-members."""

from __future__ import annotations

import argparse

from umit.cli.common import add_config_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "audit",
        help="audit a trained model: 'privacy' = memorization (membership inference, duplicates)",
        description=__doc__,
    )
    audits = p.add_subparsers(dest="audit", metavar="AUDIT")
    q = audits.add_parser("privacy", help="membership-inference audit", description=__doc__)
    q.add_argument(
        "--model", default=None, help="best.pt of umit finetune, or an MAE run's latest.pt"
    )
    q.add_argument("--data", default=None, help="PREP folder")
    q.add_argument(
        "--members", default=None, help="member cases: train (default), val, a split, ..."
    )
    q.add_argument(
        "--nonmembers", default=None, help="non-member cases: test (default), unlabeled, ..."
    )
    q.add_argument("--reference", default=None, help="reference model for the calibrated attack")
    q.add_argument("--out", default=None, help="output folder")
    add_config_args(q)
    q.set_defaults(func=main)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def main(args: argparse.Namespace) -> int:
    from umit.config import build_config
    from umit.privacy.audit import AuditConfig, run

    cfg = build_config(
        AuditConfig,
        args.config,
        args.overrides,
        model=args.model,
        data=args.data,
        members=args.members,
        nonmembers=args.nonmembers,
        reference=args.reference,
        out=args.out,
    )
    r = run(cfg)
    print(f"audit privacy: {r['kind']} model {r['model']}")
    for name, a in r["attacks"].items():
        parts = []
        for key, v in a["metrics"].items():
            ci = f" [{v['ci_low']:.3f}, {v['ci_high']:.3f}]" if v["ci_low"] is not None else ""
            parts.append(f"{key} {v['value']:.3f}{ci}")
        print(
            f"  {name} ({a['n_members']} members / {a['n_nonmembers']} non-members): "
            + "; ".join(parts)
        )
    d = r["duplicates"]
    print(f"  near-duplicates (NCC >= {d['threshold']:g}): {len(d['pairs'])}")
    for w in r["warnings"][:10]:
        print(f"  warning: {w}")
    print(f"  report: {r['report']}")
    return 0
