"""DP-SGD utility/privacy trade-off: test AUC and membership-inference AUC at several epsilons.

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python -m benchmarks.dp_tradeoff \\
        --data /work/exp/adr/prep --out /tmp/dp_tradeoff

For each epsilon (``inf`` = no DP) the script fine-tunes the same classifier from scratch on the
same seeded, stratified subset of ``--train-cases`` training cases (``umit finetune``, one item per
case, fixed steps and expected batch size; under DP: Poisson batches, per-sample clipping, noise
calibrated to the epsilon), then

* evaluates the final model on the test split (``umit evaluate``: ROC AUC with a bootstrap CI),
* audits it (``umit audit privacy``): loss-attack AUC and TPR at 1 % FPR, members = its training
  cases, non-members = the test split, bootstrap CIs.

A small training set trained for many epochs is deliberately prone to memorization, so the
non-private model shows a measurable membership signal. Writes ``results.json`` and
``table.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import time
from pathlib import Path
from typing import Any


def run_one(args: argparse.Namespace, eps: float) -> dict[str, Any]:
    from umit.eval.evaluate import EvaluateConfig
    from umit.eval.evaluate import run as evaluate
    from umit.finetune.run import FinetuneConfig
    from umit.finetune.run import run as finetune
    from umit.privacy.audit import AuditConfig
    from umit.privacy.audit import run as audit

    name = "nodp" if math.isinf(eps) else f"eps{eps:g}"
    out = args.out / name
    cfg = FinetuneConfig.model_validate(
        {
            "data": args.data,
            "out": out,
            "task": "classification",
            "model": "classifier",
            "model_args": {"encoder": args.encoder},
            "crop_size": [args.size] * 3,
            "samples_per_case": 1,
            "label_count": args.train_cases,
            "augment": {"flip_prob": 0.0, "intensity_scale": 0.0, "intensity_shift": 0.0},
            "dp": {
                "enabled": not math.isinf(eps),
                "target_epsilon": 1.0 if math.isinf(eps) else eps,
                "max_grad_norm": args.clip,
            },
            "train": {
                "total_steps": args.steps,
                "batch_size": args.batch,
                "lr": args.lr,
                "warmup_steps": args.steps // 10,
                "weight_decay": 0.0,
                "eval_every": args.steps,  # the final model is the one evaluated and audited
                "log_every": max(args.steps // 5, 1),
                "ckpt_every": None,
                "progress": False,
                "resume": None,
                "device": "cpu",
                "seed": args.seed,
            },
        }
    )
    t0 = time.time()
    s = finetune(cfg)
    t_train = time.time() - t0
    ev = evaluate(
        EvaluateConfig(
            model=s["model"], data=args.data, split="test", n_boot=args.n_boot, attributes=[]
        )
    )
    au = audit(
        AuditConfig(
            model=s["model"],
            data=args.data,
            out=out / "audit",
            members="train",
            nonmembers="test",
            n_boot=args.n_boot,
            seed=args.seed,
        )
    )
    loss = au["attacks"]["loss"]
    return {
        "epsilon_target": None if math.isinf(eps) else eps,
        "dp": s["dp"],
        "train_seconds": t_train,
        "first_loss": s["first_loss"],
        "last_loss": s["last_loss"],
        "test_auc": ev["result"]["overall"]["auc"],
        "test_accuracy": ev["result"]["overall"]["accuracy"],
        "mia_auc": loss["metrics"]["auc"],
        "mia_tpr_at_1pct_fpr": loss["metrics"]["tpr@1%fpr"],
        "mia_advantage": loss["metrics"]["advantage"],
        "n_members": loss["n_members"],
        "n_nonmembers": loss["n_nonmembers"],
    }


def _ci(v: dict[str, Any]) -> str:
    lo, hi = v.get("ci_low"), v.get("ci_high")
    ci = f" [{lo:.3f}, {hi:.3f}]" if lo is not None and hi is not None else ""
    return f"{v['value']:.3f}{ci}"


def table(rows: list[dict[str, Any]]) -> str:
    head = (
        "| target ε | spent ε (δ) | noise σ | test AUC [95% CI] | test acc | MIA AUC [95% CI] "
        "| MIA TPR @ 1% FPR | final train loss | train s |\n|---|---|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for r in rows:
        dp = r["dp"]
        if dp:
            target = f"{r['epsilon_target']:g}"
            spent = f"{dp['epsilon']:.2f} ({dp['delta']:.1e})"
            sigma = f"{dp['noise_multiplier']:.2f}"
        else:
            target, spent, sigma = "∞ (no DP)", "∞", "0"
        lines.append(
            f"| {target} | {spent} | {sigma} | {_ci(r['test_auc'])} "
            f"| {r['test_accuracy']['value']:.3f} | {_ci(r['mia_auc'])} "
            f"| {_ci(r['mia_tpr_at_1pct_fpr'])} | {r['last_loss']:.3f} | {r['train_seconds']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, default=Path("/work/exp/adr/prep"))
    p.add_argument("--out", type=Path, default=Path("/tmp/dp_tradeoff"))
    p.add_argument("--epsilons", default="inf,8,2,0.5")
    p.add_argument("--train-cases", type=int, default=128)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--encoder", default="vit3d_test_p16")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--n-boot", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for e in args.epsilons.split(","):
        r = run_one(args, float(e))
        rows.append(r)
        print(json.dumps({k: r[k] for k in ("epsilon_target", "test_auc", "mia_auc")}), flush=True)
        (args.out / "results.json").write_text(
            json.dumps(
                {
                    "args": {k: str(v) for k, v in vars(args).items()},
                    "machine": platform.node(),
                    "rows": rows,
                },
                indent=1,
            )
        )
    md = table(rows)
    (args.out / "table.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
