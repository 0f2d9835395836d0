"""Robustness under shift on phantom CT segmentation (evidence for ``umit evaluate shift=...``,
docs/trust.md): the phantom study's fine-tuned models (20 labels; UNETR from MAE, UNETR from
scratch, ResUNet CNN) on the test split under every perturbation at graded strengths, through
``umit evaluate`` (evaluation only).

  PYTHONPATH=src python benchmarks/shift_phantoms.py --cells runs/phseg/evidence/cells \
      --prep runs/phseg/prep --out runs/shift --seeds 0 --cases 8 --strengths 0.5 1.0

Any other models (e.g. AdrenalMNIST3D classifiers): ``--model NAME=RUN/best.pt`` (repeatable)
instead of ``--cells``; a binary classifier's table is its AUC (``umit evaluate``'s ``auc``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from umit.eval.shift import headline_curves


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cells", type=Path, help="data-efficiency cells: <arm>/<budget>_s<seed>")
    ap.add_argument("--model", action="append", default=[], help="NAME=PATH of a best.pt")
    ap.add_argument("--prep", type=Path, required=True)
    ap.add_argument("--out", type=Path, default=Path("runs/shift"))
    ap.add_argument("--arms", nargs="+", default=["unetr_mae", "unetr_scratch", "resunet"])
    ap.add_argument("--budget", default="n20")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--cases", type=int, default=8)
    ap.add_argument("--strengths", type=float, nargs="+", default=[0.5, 1.0])
    args = ap.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if args.model:
        models = {n: Path(m) for n, _, m in (x.partition("=") for x in args.model)}
    elif args.cells:
        models = {
            f"{arm}_s{seed}": args.cells / arm / f"{args.budget}_s{seed}" / "run" / "best.pt"
            for seed in args.seeds
            for arm in args.arms
        }
    else:
        ap.error("give --cells or --model NAME=PATH")
    table = {}
    for name, model in models.items():
        seed = int(name.rsplit("_s", 1)[1]) if not args.model else args.seeds[0]
        out = args.out / name
        if not (out / "shift.json").is_file():
            t0 = time.perf_counter()
            cmd = [sys.executable, "-m", "umit.cli.main", "evaluate", "--model", str(model),
                   "--data", str(args.prep), f"out={out}", "shift=[all]",
                   f"shift_strengths={json.dumps(args.strengths)}", f"shift_cases={args.cases}",
                   "case_figures=false", "n_boot=2000", f"seed={seed}"]  # fmt: skip
            subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
            print(f"{name}: {time.perf_counter() - t0:.0f} s", flush=True)
        found = json.loads((out / "shift.json").read_text())["perturbations"]
        curves, _ = headline_curves(found, "dice")  # a binary classifier's rows: its AUC
        table[name] = {
            k: {s: e | {"changed": found[k][s].get("changed", 1.0)} for s, e in by_s.items()}
            for k, by_s in curves.items()
        }
    (args.out / "shift_table.json").write_text(json.dumps(table, indent=1))
    kinds = sorted(next(iter(table.values())))
    names = list(table)
    print("| perturbation | strength | " + " | ".join(names) + " |")
    print("|---|---|" + "---|" * len(names))
    print("| none (clean) | 0 | " + " | ".join(
        f"{table[n][kinds[0]]['0']['mean']:.3f} [{table[n][kinds[0]]['0']['ci_low']:.3f}, "
        f"{table[n][kinds[0]]['0']['ci_high']:.3f}]" for n in names) + " |")  # fmt: skip
    for k in kinds:
        for s in args.strengths:
            cells = []
            for n in names:
                e = table[n][k][f"{s:g}"]
                c = e["change"]
                if e["changed"] == 0:
                    cells.append("n/a (no image changed)")
                else:
                    cells.append(f"{c['mean']:+.3f} [{c['ci_low']:+.3f}, {c['ci_high']:+.3f}]")
            print(f"| {k} | {s:g} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
