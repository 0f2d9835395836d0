"""``umit evaluate``: per-case metrics, overall and per subgroup with bootstrap CIs, and a report."""

from __future__ import annotations

import argparse

from umit.cli.common import add_config_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="evaluate a fine-tuned model on a store split: Dice/HD95/NSD or AUC/ACC/ECE, per "
        "subgroup with bootstrap CIs, Markdown/HTML report",
        description=__doc__,
    )
    p.add_argument("--model", default=None, help="best.pt from umit finetune")
    p.add_argument("--data", default=None, help="PREP folder")
    p.add_argument("--split", default=None, help="split to evaluate (default test)")
    add_config_args(p)
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from umit.config import build_config
    from umit.eval.evaluate import EvaluateConfig, run
    from umit.eval.report import display_names, subgroup_notes

    cfg = build_config(
        EvaluateConfig,
        args.config,
        args.overrides,
        model=args.model,
        data=args.data,
        split=args.split,
    )
    s = run(cfg)
    print(f"evaluate: {s['n_cases']} cases of split '{s['split']}' ({s['task']})")
    structures = {int(k): v for k, v in (s.get("structures") or {}).items()}
    names = display_names(list(s["result"]["overall"]), structures)
    width = max(18, *(len(n) for n in names.values()))
    for key, v in s["result"]["overall"].items():
        lo, hi = v.get("ci_low"), v.get("ci_high")
        ci = f" [{lo:.3f}, {hi:.3f}]" if lo is not None and hi is not None else ""
        value = f"{v['value']:.4f}{ci}" if v["value"] is not None else "-"
        print(f"  {names[key]:<{width}} {value}")
    for w in subgroup_notes(s["result"], names):
        print(f"  warning: {w}")
    print(f"  report: {s['report']}")
    return 0
