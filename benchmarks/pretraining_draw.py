"""How much does the pretraining run move a fine-tuned cell, against which labels were drawn?

Reads a ``umit data-efficiency`` ``results.json`` whose arms are ``<prefix>_run<k>``: the same
recipe fine-tuned from pretraining run k, at every seed (a fully crossed seed x run design, one
cell each). Per prefix and budget it prints the seed x run table and a two-way random-effects
decomposition without replication (the classic ANOVA estimators):

    score[s, r] = mu + seed[s] + run[r] + residual[s, r]
    var_seed = (MS_seed - MS_res) / R,  var_run = (MS_run - MS_res) / S,  var_res = MS_res

clipped at 0. ``var_run`` is the variance that a study sharing ONE pretraining run across its
seeds leaves out of its CI. Also printed: the mean over runs per seed, and a bootstrap over seeds
of the mean pretrained - reference difference when ``--reference ARM`` (e.g. scratch at 2n) is
in another results.json with the same seeds.

    PYTHONPATH=src python benchmarks/pretraining_draw.py runs/adrenal/evidence_draw/results.json \
        --reference runs/adrenal/evidence_reps/results.json:cnn_scratch:2
"""

from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from pathlib import Path

import numpy as np

from umit.eval.shift import bootstrap_mean


def two_way_components(scores: np.ndarray) -> dict[str, float]:
    """Random-effects variance components of a seeds x runs table, one observation per cell.

    Returns the mean, the three mean squares and the components (seed, run, residual), each
    component clipped at 0 as the ANOVA estimator can go negative.
    """
    if scores.ndim != 2 or min(scores.shape) < 2:
        raise ValueError(f"need a seeds x runs table with at least 2 of each, got {scores.shape}")
    if not np.isfinite(scores).all():
        raise ValueError("the seeds x runs table has missing cells (NaN)")
    n_seed, n_run = scores.shape
    mu = scores.mean()
    seed_means, run_means = scores.mean(axis=1), scores.mean(axis=0)
    ss_seed = n_run * ((seed_means - mu) ** 2).sum()
    ss_run = n_seed * ((run_means - mu) ** 2).sum()
    resid = scores - seed_means[:, None] - run_means[None, :] + mu
    ss_res = (resid**2).sum()
    ms_seed, ms_run = ss_seed / (n_seed - 1), ss_run / (n_run - 1)
    ms_res = ss_res / ((n_seed - 1) * (n_run - 1))
    return {
        "mean": float(mu),
        "ms_seed": float(ms_seed),
        "ms_run": float(ms_run),
        "ms_res": float(ms_res),
        "var_seed": float(max(0.0, (ms_seed - ms_res) / n_run)),
        "var_run": float(max(0.0, (ms_run - ms_res) / n_seed)),
        "var_res": float(ms_res),
    }


def cell_scores(results: dict, metric: str) -> dict[tuple[str, str, int], float]:
    """``(arm, budget, seed) -> test metric`` of every scored cell in a results.json."""
    return {
        (c["arm"], c["budget"], int(c["seed"])): float(c["test"][metric])
        for c in results["cells"]
        if c.get("test") and metric in c["test"]
    }


def crossed_tables(
    scores: dict[tuple[str, str, int], float],
) -> dict[tuple[str, str], tuple[list[int], list[int], np.ndarray]]:
    """``(prefix, budget) -> (seeds, runs, seeds x runs table)`` for arms named ``<prefix>_run<k>``."""
    grouped: dict[tuple[str, str], dict[tuple[int, int], float]] = defaultdict(dict)
    for (arm, budget, seed), v in scores.items():
        m = re.fullmatch(r"(.+)_run(\d+)", arm)
        if m:
            grouped[(m.group(1), budget)][(seed, int(m.group(2)))] = v
    out = {}
    for key, cells in grouped.items():
        seeds = sorted({s for s, _ in cells})
        runs = sorted({r for _, r in cells})
        table = np.array([[cells.get((s, r), np.nan) for r in runs] for s in seeds])
        out[key] = (seeds, runs, table)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("results", type=Path)
    p.add_argument("--metric", default="auc")
    p.add_argument(
        "--reference",
        help="RESULTS.json:ARM:FACTOR, the arm at FACTOR x the budget (e.g. scratch at 2n)",
    )
    p.add_argument("--n-boot", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    tables = crossed_tables(cell_scores(json.loads(args.results.read_text()), args.metric))
    if not tables:
        raise SystemExit(f"{args.results}: no arms named <prefix>_run<k>")
    ref_scores: dict[tuple[str, str, int], float] = {}
    if args.reference:
        parts = args.reference.rsplit(":", 2)
        if len(parts) != 3 or not parts[2].isdigit():
            raise SystemExit(f"--reference {args.reference!r}: expected RESULTS.json:ARM:FACTOR")
        ref_path, ref_arm, factor = parts
        ref_scores = cell_scores(json.loads(Path(ref_path).read_text()), args.metric)
    for (prefix, budget), (seeds, runs, table) in sorted(tables.items()):
        comp = two_way_components(table)
        print(f"\n## {prefix} at {budget}: test {args.metric}, seeds {seeds} x runs {runs}")
        for s, row in zip(seeds, table, strict=True):
            print(
                f"  seed {s}: " + "  ".join(f"{v:.3f}" for v in row) + f"   mean {row.mean():.3f}"
            )
        print(
            f"  mean {comp['mean']:.3f}; sd: seed {np.sqrt(comp['var_seed']):.3f}, "
            f"run {np.sqrt(comp['var_run']):.3f}, residual {np.sqrt(comp['var_res']):.3f}; "
            f"within-seed sd across runs (pooled) "
            f"{np.sqrt(np.mean(table.var(axis=1, ddof=1))):.3f}"
        )
        if ref_scores:
            n = int(budget[1:]) * int(factor) if budget.startswith("n") else None
            ref_budget = f"n{n}" if n is not None else budget
            ref = [ref_scores.get((ref_arm, ref_budget, s)) for s in seeds]
            if any(v is None for v in ref):
                print(f"  (no {ref_arm} at {ref_budget} for every seed)")
                continue
            diffs = table.mean(axis=1) - np.array(ref)
            diag = (
                np.array([table[i, i] for i in range(min(table.shape))])
                - np.array(ref)[: min(table.shape)]
            )
            ci = bootstrap_mean(list(diffs), args.n_boot, args.seed)
            lo, hi = ci["ci_low"], ci["ci_high"]
            print(
                f"  mean over runs - {ref_arm} at {ref_budget}: {diffs.mean():+.3f} [{lo:+.3f}, {hi:+.3f}] "
                f"(seeds resampled); diagonal (seed i from run i): {diag.mean():+.3f}"
            )


if __name__ == "__main__":
    main()
