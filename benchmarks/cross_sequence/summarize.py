"""Tables of the cross-sequence evidence (runs of run_evidence.sh) for docs/pretraining.md.

PYTHONPATH=src python benchmarks/cross_sequence/summarize.py runs/xseq
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from umit.eval.paired import paired_difference, read_per_case

ARMS = ["unetr_xseq", "unetr_mae", "unetr_scratch", "resunet"]
BUDGETS = ["n1", "n2"]


def cells(eff: Path, arm: str, budget: str) -> dict[int, list[dict]]:
    out = {}
    for d in sorted((eff / "cells" / arm).glob(f"{budget}_s*")):
        p = d / "eval" / "per_case.csv"
        if p.is_file():
            out[int(d.name.split("_s")[1])] = read_per_case(p)
    return out


def dice_table(tables: dict[str, dict[str, dict]], what: str) -> list[str]:
    """Mean test Dice per arm and budget: mean ± sd over replicates (folds or seeds)."""
    lines = [f"| arm | {' | '.join(BUDGETS)} |", "|---|" + "---|" * len(BUDGETS)]
    for arm in ARMS:
        row = []
        for b in BUDGETS:
            reps = tables.get(arm, {}).get(b, {})
            means = [np.nanmean([float(r["dice_mean"]) for r in rows]) for rows in reps.values()]
            row.append(
                f"{np.mean(means):.3f} ± {np.std(means):.3f} ({len(means)} {what})"
                if means
                else "-"
            )
        lines.append(f"| {arm} | {' | '.join(row)} |")
    return lines


def diff_table(tables: dict[str, dict[str, dict]]) -> list[str]:
    lines = ["| a - b | budget | a - b (95% CI) |", "|---|---|---|"]
    for b_arm in ARMS[1:]:
        for b in BUDGETS:
            ta, tb = tables.get("unetr_xseq", {}).get(b), tables.get(b_arm, {}).get(b)
            if not ta or not tb:
                continue
            res = paired_difference(ta, tb, "dice_mean", n_boot=2000, seed=0)
            lines.append(
                f"| unetr_xseq - {b_arm} | {b} | {res['diff']:+.3f} "
                f"[{res['ci_low']:+.3f}, {res['ci_high']:+.3f}] |"
            )
    return lines


def synthesis_table(files: list[Path]) -> list[str]:
    rows: dict[str, list[dict]] = {}
    for f in files:
        for seq, v in json.loads(f.read_text())["targets"].items():
            rows.setdefault(seq, []).extend(v["per_case"])
    lines = [
        "| predicted | cases | PSNR model | PSNR population | PSNR oracle "
        "| SSIM model | SSIM population | SSIM oracle | L1 model | L1 population | L1 oracle |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for seq, rs in rows.items():

        def m(k, rs=rs):
            return np.mean([r.get(k, np.nan) for r in rs])

        cells = [
            f"{m(f'{who}_{metric}'):.{digits}f}"
            for metric, digits in (("psnr", 2), ("ssim", 3), ("l1", 3))
            for who in ("model", "population", "baseline")
        ]
        lines.append(f"| {seq} | {len(rs)} | " + " | ".join(cells) + " |")
    return lines


def dropout_table(folds: list[Path]) -> list[str]:
    lines = [
        "| model | all sequences | FLAIR missing | T1c missing |",
        "|---|---|---|---|",
    ]
    models = {
        "channel_dropout=0 (zeros for a missing sequence)": "eff/cells/unetr_xseq/n2_s0/run",
        "channel_dropout=0.5 (learned absent embedding)": "cd0.5",
    }
    for label, sub in models.items():
        row = []
        for d in ("none", "FLAIR", "T1c"):
            vals = []
            for f in folds:
                p = f / sub / f"eval_{d}" / "per_case.csv"
                if p.is_file():
                    vals += [float(r["dice_mean"]) for r in read_per_case(p)]
            row.append(f"{np.nanmean(vals):.3f} (n={len(vals)})" if vals else "-")
        lines.append(f"| {label} | {' | '.join(row)} |")
    return lines


def main(root: Path) -> None:
    brats_folds = sorted((root / "brats" / "runs").glob("fold*"))
    brats: dict[str, dict[str, dict]] = {}
    for k, fold in enumerate(brats_folds):
        for arm in ARMS:
            for b in BUDGETS:
                for seed, rows in cells(fold / "eff", arm, b).items():
                    brats.setdefault(arm, {}).setdefault(b, {})[(k, seed)] = rows
    print("## BRATS tumour Dice (3-fold subject CV, 2 test subjects per fold)\n")
    print("\n".join(dice_table(brats, "fold x seed cells")))
    # folds hold disjoint test subjects: per seed, pool the 6 subjects of the folds (a seed = a
    # replicate), so the CI resamples seeds and subjects
    pooled: dict[str, dict[str, dict]] = {}
    for arm, budgets in brats.items():
        for b, reps in budgets.items():
            seeds = sorted({s for _, s in reps})
            pooled.setdefault(arm, {})[b] = {
                s: [r for (k, s2), rows in sorted(reps.items()) if s2 == s for r in rows]
                for s in seeds
                if all((k, s) in reps for k in range(len(brats_folds)))
            }
    print("\n" + "\n".join(diff_table(pooled)))
    ph = root / "phantoms" / "runs" / "eff"
    phantoms = {arm: {b: cells(ph, arm, b) for b in BUDGETS} for arm in ARMS}
    print("\n## MR phantom lesion Dice (6 test subjects)\n")
    print("\n".join(dice_table(phantoms, "seeds")))
    print("\n" + "\n".join(diff_table(phantoms)))
    print("\n## Synthesis on held-out subjects: BRATS\n")
    print("\n".join(synthesis_table(sorted(root.glob("brats/runs/fold*/xseq/synthesis.json")))))
    print("\n## Synthesis on held-out subjects: phantoms\n")
    print("\n".join(synthesis_table(sorted(root.glob("phantoms/runs/xseq/synthesis.json")))))
    print("\n## Missing sequence at inference (BRATS, 2 labeled, test Dice pooled over folds)\n")
    print("\n".join(dropout_table(brats_folds)))


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/xseq"))
