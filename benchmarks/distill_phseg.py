"""Distillation evidence on the phantom CT segmentation (docs/distillation.md).

Teacher: a fine-tuned ``best.pt`` of the phantom data-efficiency study (ResUNet on 20 labeled
phantoms). Student: a small ResUNet, (a) trained directly on the teacher's 20 labels and (b)
distilled from the teacher, with the same steps and schedule, per seed. Then every model is
evaluated on the 16 test phantoms (``umit evaluate``), and teacher and student inference are
timed interleaved (whole test volumes through the sliding window, medians) in one process.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/distill_phseg.py --phase train --seeds 0 1 2
    ... --phase eval ; ... --phase time ; ... --phase table

Outputs under ``--out`` (default runs/distill_phseg): one run folder per arm and seed, their
``eval/summary.json``, ``timing.json`` and ``results.json`` / ``table.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

PHSEG = Path("/work/main/runs/phseg")
STUDENT = {"features": [4, 8, 16, 32], "blocks": 1}
# distilled arms: KD weights (GT has weight alpha, labeled-crop KL 1 - alpha)
ARMS = {
    "distill_u": {"alpha": 0.5, "kd_unlabeled_weight": 1.0},
    # KL weighted like the CE term of DiceCE (ce_weight 0.03): the Dice term keeps small organs
    "distill_w": {"alpha": 0.9, "kd_unlabeled_weight": 0.1},
    # both KL terms at the CE level (0.03 of the loss), T = 1
    "distill_c": {"alpha": 0.97, "kd_unlabeled_weight": 0.03, "temperature": 1.0},
}


def finetune_base(prep: Path) -> dict[str, Any]:
    """The data-efficiency study's fine-tuning settings (its config.yaml), 20 labels, label seed 0."""
    return {
        "data": str(prep),
        "task": "segmentation",
        "model": "resunet3d",
        "model_args": dict(STUDENT),
        "crop_size": [32, 32, 32],
        "samples_per_case": 4,
        "val_fraction": 0.05,
        "select": "last",
        "sw_batch_size": 4,
        "foreground_prob": 1.0,
        "ce_weight": 0.03,
        "label_count": 20,
        "label_seed": 0,
        "augment": {"flip_prob": 0.0, "intensity_scale": 0.0, "intensity_shift": 0.0},
        "train": {
            "total_steps": 300,
            "batch_size": 2,
            "lr": 0.003,
            "warmup_steps": 30,
            "eval_every": 300,
            "ckpt_every": 300,
            "log_every": 50,
            "progress": False,
            "device": "cpu",
            "tensorboard": False,
        },
    }


def train(args: argparse.Namespace) -> None:
    from umit.finetune.distill import DistillConfig
    from umit.finetune.distill import run as distill
    from umit.finetune.run import FinetuneConfig
    from umit.finetune.run import run as finetune
    from umit.train.checkpoint import load_artifact

    teacher_cases = load_artifact(args.teacher)["cases"]["train"]
    for seed in args.seeds:
        for arm in args.arms:
            out = args.out / arm / f"s{seed}"
            if (out / "best.pt").is_file():
                continue
            base = finetune_base(args.prep)
            base["out"] = str(out)
            base["train"] = {**base["train"], "seed": seed}
            if args.steps is not None:  # a longer schedule: warm-up 10%, checkpoint at the end
                base["train"] |= {
                    "total_steps": args.steps,
                    "warmup_steps": args.steps // 10,
                    "eval_every": args.steps,
                    "ckpt_every": args.steps,
                }
            t0 = time.perf_counter()
            if arm == "direct":
                s = finetune(FinetuneConfig.model_validate(base))
            else:
                kd = {
                    "teacher": str(args.teacher),
                    "temperature": 2.0,  # unless the arm sets it
                    "kd_unlabeled": True,
                    "unlabeled_cases": 60,
                    "teacher_cache": False,
                    **ARMS[arm],
                }
                s = distill(DistillConfig.model_validate({**base, **kd}))
            used = load_artifact(out / "best.pt")["cases"]["train"]
            if sorted(used) != sorted(teacher_cases):
                raise SystemExit(f"{out}: trained on other labels than the teacher")
            s.pop("history", None)
            s["wall_s"] = time.perf_counter() - t0
            (out / "summary.json").write_text(json.dumps(s, indent=1, default=str))
            print(arm, seed, f"{s['wall_s']:.0f} s", s.get("last_loss"), flush=True)


def evaluate_all(args: argparse.Namespace) -> None:
    from umit.eval.evaluate import EvaluateConfig
    from umit.eval.evaluate import run as evaluate

    models = [("teacher", args.teacher, args.out / "teacher_eval")]
    for arm in args.arms:
        for seed in args.seeds:
            run = args.out / arm / f"s{seed}"
            models.append((f"{arm}/s{seed}", run / "best.pt", run / "eval"))
    for name, model, out in models:
        if (out / "summary.json").is_file() or not Path(model).is_file():
            continue
        evaluate(
            EvaluateConfig(model=model, data=args.prep, out=out, n_boot=200, attributes=["sex"])
        )
        print("evaluated", name, flush=True)


@torch.no_grad()
def time_models(args: argparse.Namespace) -> None:
    """Interleaved timing: for each test case, teacher then student (order alternating), whole
    volume through the sliding window exactly as evaluate/predict run it; medians."""
    from umit.data.store import Store
    from umit.inference.segment import predict_case_segmentation
    from umit.train.checkpoint import load_model

    torch.set_num_threads(1)
    store = Store(args.prep)
    test = [c for c in store.case_ids if store.index[c].get("split") == "test"]
    teacher, tart = load_model(args.teacher)
    student, sart = load_model(args.out / args.arms[-1] / f"s{args.seeds[0]}" / "best.pt")
    from umit.train.checkpoint import InferenceSpec

    specs = {
        "teacher": InferenceSpec.model_validate(tart["spec"]),
        "student": InferenceSpec.model_validate(sart["spec"]),
    }
    nets = {"teacher": teacher, "student": student}
    for name in nets:  # warm-up
        predict_case_segmentation(nets[name], store, test[0], specs[name])
    times: dict[str, list[float]] = {"teacher": [], "student": []}
    for rep in range(args.reps):
        for i, case in enumerate(test):
            order = ["teacher", "student"] if (i + rep) % 2 == 0 else ["student", "teacher"]
            for name in order:
                t0 = time.perf_counter()
                predict_case_segmentation(nets[name], store, case, specs[name])
                times[name].append(time.perf_counter() - t0)
    params = {k: sum(p.numel() for p in v.parameters()) for k, v in nets.items()}
    med = {k: statistics.median(v) for k, v in times.items()}
    res = {
        "cases": len(test),
        "reps": args.reps,
        "median_s": med,
        "iqr_s": {
            k: [float(np.percentile(v, 25)), float(np.percentile(v, 75))] for k, v in times.items()
        },
        "speedup": med["teacher"] / med["student"],
        "params": params,
        "param_ratio": params["teacher"] / params["student"],
        "threads": torch.get_num_threads(),
    }
    (args.out / "timing.json").write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))


def table(args: argparse.Namespace) -> None:
    """Test Dice per model, paired differences (hierarchical bootstrap over cases and seeds),
    parameter ratio and speed-up -> results.json and table.md."""
    from umit.eval.paired import paired_difference, read_per_case

    teacher = read_per_case(args.out / "teacher_eval" / "per_case.csv")
    arms: dict[str, dict[int, list]] = {}
    for arm in args.arms:
        for seed in args.seeds:
            p = args.out / arm / f"s{seed}" / "eval" / "per_case.csv"
            if p.is_file():
                arms.setdefault(arm, {})[seed] = read_per_case(p)

    def mean_dice(rows: list) -> float:
        return float(np.nanmean([float(r["dice_mean"]) for r in rows]))

    t_dice = mean_dice(teacher)
    res: dict[str, Any] = {"teacher": {"dice": t_dice, "n_cases": len(teacher)}, "arms": {}}
    lines = [
        "| model | test Dice (16 phantoms), per seed | mean ± sd | of teacher |",
        "|---|---|---|---|",
        f"| teacher (ResUNet 16-128, n20 seed 0) | {t_dice:.3f} | - | 100% |",
    ]
    for arm, by_seed in arms.items():
        d = {s: mean_dice(rows) for s, rows in by_seed.items()}
        vals = list(d.values())
        sd = float(np.std(vals, ddof=1)) if len(vals) > 1 else float("nan")
        res["arms"][arm] = {"per_seed": d, "mean": float(np.mean(vals)), "sd": sd}
        per = ", ".join(f"s{s} {v:.3f}" for s, v in d.items())
        lines.append(
            f"| student {arm} | {per} | {np.mean(vals):.3f} ± {sd:.3f} | "
            f"{np.mean(vals) / t_dice:.1%} |"
        )
    lines += ["", "| a - b (test Dice) | a | b | diff [95% CI] | seeds |", "|---|---|---|---|---|"]
    pairs = []
    base = args.arms[0]  # the directly trained student
    for arm in args.arms[1:]:
        if arm in arms and base in arms:
            pairs.append((arm, arms[arm], base, arms[base]))
    for arm, by_seed in arms.items():
        pairs.append((arm, by_seed, "teacher", {s: teacher for s in by_seed}))
    res["paired"] = []
    for an, a, bn, b in pairs:
        pd = paired_difference(a, b, "dice", n_boot=2000)
        res["paired"].append({"a": an, "b": bn, **pd})
        lines.append(
            f"| {an} - {bn} | {pd['a_mean']:.3f} | {pd['b_mean']:.3f} | {pd['diff']:+.3f} "
            f"[{pd['ci_low']:+.3f}, {pd['ci_high']:+.3f}] | {pd['n_seeds']} |"
        )
    timing_path = args.out / "timing.json"
    if timing_path.is_file():
        t = json.loads(timing_path.read_text())
        res["timing"] = t
        lines += [
            "",
            f"Inference (whole test volumes, sliding window, 1 thread, interleaved, "
            f"{t['cases'] * t['reps']} volumes each): teacher median {t['median_s']['teacher']:.3f} s, "
            f"student {t['median_s']['student']:.3f} s: speed-up {t['speedup']:.2f}x; parameters "
            f"{t['params']['teacher']:,} vs {t['params']['student']:,} ({t['param_ratio']:.1f}x).",
        ]
    (args.out / "results.json").write_text(json.dumps(res, indent=1, default=str))
    (args.out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--phase", choices=["train", "eval", "time", "table"], required=True)
    p.add_argument("--prep", type=Path, default=PHSEG / "prep")
    p.add_argument(
        "--teacher", type=Path, default=PHSEG / "evidence/cells/resunet/n20_s0/run/best.pt"
    )
    p.add_argument("--out", type=Path, default=Path("runs/distill_phseg"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--arms", nargs="+", default=["direct", "distill_u"])
    p.add_argument("--reps", type=int, default=1)
    p.add_argument(
        "--steps", type=int, default=None, help="training steps (default: the study's 300)"
    )
    args = p.parse_args()
    {"train": train, "eval": evaluate_all, "time": time_models, "table": table}[args.phase](args)


if __name__ == "__main__":
    main()
