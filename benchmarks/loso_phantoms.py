"""Leave-one-site-out on phantom CT segmentation (evidence for ``umit evaluate loso=true``,
docs/trust.md).

The three phantom sites differ in scanner calibration, spacing, noise, kernel and contrast mix.
For each site ``s`` a ResUNet (the bias study's recipe, 200 steps) is trained on 20 cases from
each of the two other sites (``loso_<s>``), and one on 13 cases from every site (``all``, 39
cases, about the same number). Every model is scored by ``umit evaluate loso=true`` on the same
15 held-out cases per site. The question per site: how much Dice does a site lose when none of
its cases were in training? Paired by test case and seed: Dice of ``loso_<s>`` on site ``s``
minus Dice of ``all`` on site ``s`` (hierarchical bootstrap over seeds and cases).

  PYTHONPATH=src python benchmarks/loso_phantoms.py --prep runs/phseg/prep --out runs/loso --jobs 2
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.bias_mitigation import RECIPE, make_view, run_cells

SITES = ("site_a", "site_b", "site_c")
N_EVAL = 15


def views(prep: Path, out: Path) -> dict[str, Path]:
    """One PREP view per arm: ``all`` (13 training cases per site), ``loso_<s>`` (20 from each
    other site, none from ``s``). The test cases are the same in every view (same seed)."""
    found = {"all": make_view(prep, out / "all", "none", 0, 13, N_EVAL)}
    for s in SITES:
        found[f"loso_{s}"] = make_view(prep, out / f"loso_{s}", s, 0, 20, N_EVAL)
    return found


def cell_cmds(view: Path, run: Path, seed: int) -> list[list[str]]:
    py = [sys.executable, "-m", "umit.cli.main"]
    ft = py + ["finetune", "--data", str(view), "--out", str(run / "run"), *RECIPE,
               f"train.seed={seed}"]  # fmt: skip
    ev = py + ["evaluate", "--model", str(run / "run" / "best.pt"), "--data", str(view),
               f"out={run / 'eval'}", "attributes=[site]", "loso=true", "case_figures=false",
               "explain_figures=false", f"seed={seed}", "n_boot=500"]  # fmt: skip
    return [ft, ev]


def per_case(run: Path) -> dict[str, tuple[str, float]]:
    with open(run / "eval" / "per_case.csv") as f:
        return {r["case_id"]: (r["site"], float(r["dice_mean"])) for r in csv.DictReader(f)}


def summarize(out: Path, seeds: list[int]) -> dict:
    """Per site: Dice when trained with all sites, when left out, and the paired difference."""
    rng = np.random.default_rng(0)
    rows = {}
    for s in SITES:
        pairs = []  # (seed, case): (all, loso)
        for seed in seeds:
            a, b = out / "cells" / f"all_s{seed}", out / "cells" / f"loso_{s}_s{seed}"
            if not (
                (a / "eval" / "per_case.csv").is_file() and (b / "eval" / "per_case.csv").is_file()
            ):
                continue
            pa, pb = per_case(a), per_case(b)
            pairs.append([(pa[c][1], pb[c][1]) for c in sorted(pa) if pa[c][0] == s])
        if not pairs:
            continue
        d = np.array([[lo - al for al, lo in p] for p in pairs])  # (seeds, cases)
        reps = [d[rng.integers(len(d), size=len(d))][:, rng.integers(d.shape[1], size=d.shape[1])].mean()
                for _ in range(2000)]  # fmt: skip
        rows[s] = {
            "all": float(np.mean([[al for al, _ in p] for p in pairs])),
            "left_out": float(np.mean([[lo for _, lo in p] for p in pairs])),
            "left_out_minus_all": [float(d.mean()), *np.percentile(reps, [2.5, 97.5]).tolist()],
            "seeds": len(pairs),
            "cases": int(d.shape[1]),
        }
    # the evaluate loso summary of each left-out model (unseen - seen sites, unpaired)
    for s in SITES:
        for seed in seeds:
            f = out / "cells" / f"loso_{s}_s{seed}" / "eval" / "shift.json"
            if f.is_file() and s in rows:
                u = json.loads(f.read_text())["leave_one_site_out"].get("unseen_minus_seen")
                rows[s].setdefault("evaluate_unseen_minus_seen", []).append(u)
    (out / "loso_summary.json").write_text(json.dumps(rows, indent=1))
    print(
        "| site | trained with all sites | site left out of training | left out - all (95% CI) | seeds x cases |"
    )
    print("|---|---|---|---|---|")
    for s, r in rows.items():
        m, lo, hi = r["left_out_minus_all"]
        print(f"| {s} | {r['all']:.3f} | {r['left_out']:.3f} | {m:+.3f} [{lo:+.3f}, {hi:+.3f}] | "
              f"{r['seeds']} x {r['cases']} |")  # fmt: skip
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prep", type=Path, required=True)
    ap.add_argument("--out", type=Path, default=Path("runs/loso"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--jobs", type=int, default=2)
    args = ap.parse_args()
    found = views(args.prep, args.out)
    cells = []
    for seed in args.seeds:
        for arm, view in found.items():
            run = args.out / "cells" / f"{arm}_s{seed}"
            run.mkdir(parents=True, exist_ok=True)
            if not (run / "eval" / "per_case.csv").is_file():
                cells.append((str(run), cell_cmds(view, run, seed)))
    t0 = time.perf_counter()
    run_cells(cells, args.jobs, {**os.environ, "OMP_NUM_THREADS": "1"})
    print(f"cells done in {time.perf_counter() - t0:.0f} s", flush=True)
    summarize(args.out, args.seeds)


if __name__ == "__main__":
    main()
