"""Bias mitigation on phantom CT segmentation (evidence for ``umit finetune balance_by=site``,
docs/trust.md).

One site (``site_b``: thin in-plane, 3 mm slices, sharp kernel, the noisiest) is 5% of the
training cases (2 of 40; 19 each from site_a and site_c); 15 held-out cases per site (never
trained on) are the evaluation set. A small ResUNet (16-32-64-128) is fine-tuned for 200 steps
on 32³ crops (the phantom study's CNN recipe) with no mitigation, group-balanced sampling, and
group-reweighted loss, 3 seeds each; ``umit evaluate`` gives per-site Dice with bootstrap CIs
and the largest gap between sites with its CI.

The store is the phantom study's (read only): a PREP view (symlinks + a new ``index.json``
whose splits say train / test / unused) is written under ``--out``.

  PYTHONPATH=src python benchmarks/bias_mitigation.py --prep runs/phseg/prep --out runs/bias --jobs 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ARMS = {
    "none": [],
    "sample": ["balance_by=site", "balance=sample"],
    "reweight": ["balance_by=site", "balance=reweight"],
}
RECIPE = [
    "model=resunet3d",
    "model_args={features: [16, 32, 64, 128]}",
    "crop_size=[32,32,32]",
    "foreground_prob=1.0",
    "ce_weight=0.03",
    "val_fraction=0",
    "select=last",
    "sw_batch_size=4",
    "train.total_steps=200",
    "train.warmup_steps=20",
    "train.lr=0.003",
    "train.batch_size=2",
    "train.eval_every=1000",
    "train.num_workers=0",
    "exclude_splits=[test,unused]",
]


def make_view(
    prep: Path, out: Path, minority: str, n_minor: int, n_major: int, n_eval: int
) -> Path:
    view = out / "prep"
    view.mkdir(parents=True, exist_ok=True)
    for name in os.listdir(prep):
        if name != "index.json" and not (view / name).exists():
            (view / name).symlink_to((prep / name).resolve())
    index = json.loads((prep / "index.json").read_text())
    cases = index["cases"]
    rng = np.random.default_rng(0)
    by_site: dict[str, list[str]] = {}
    for c, rec in sorted(cases.items()):
        if rec.get("has_label"):
            by_site.setdefault(rec["site"], []).append(c)
    split = {}
    for site, ids in by_site.items():
        ids = list(rng.permutation(ids))
        n_train = n_minor if site == minority else n_major
        for c in ids[:n_eval]:
            split[c] = "test"
        for c in ids[n_eval : n_eval + n_train]:
            split[c] = "train"
    for c, rec in cases.items():
        rec["split"] = split.get(c, "unused")
    (view / "index.json").write_text(json.dumps(index))
    counts = {
        s: {k: sum(1 for c in ids if split.get(c) == k) for k in ("train", "test")}
        for s, ids in by_site.items()
    }
    print("view:", counts, flush=True)
    return view


def cell_cmds(view: Path, out: Path, arm: str, seed: int) -> list[list[str]]:
    run = out / "cells" / f"{arm}_s{seed}"
    py = [sys.executable, "-m", "umit.cli.main"]
    ft = py + ["finetune", "--data", str(view), "--out", str(run / "run"), *RECIPE,
               f"train.seed={seed}", *ARMS[arm]]  # fmt: skip
    ev = py + ["evaluate", "--model", str(run / "run" / "best.pt"), "--data", str(view),
               f"out={run / 'eval'}", "attributes=[site]", "case_figures=false", f"seed={seed}"]  # fmt: skip
    return [ft, ev]


def run_cells(cells, jobs: int, env) -> None:
    pending = list(cells)
    running: list[tuple[str, subprocess.Popen, list]] = []
    while pending or running:
        while pending and len(running) < jobs:
            name, cmds = pending.pop(0)
            log = open(Path(name).parent / (Path(name).name + ".log"), "a")  # noqa: SIM115
            p = subprocess.Popen(cmds[0], stdout=log, stderr=subprocess.STDOUT, env=env)
            running.append((name, p, cmds[1:]))
        time.sleep(2)
        for item in list(running):
            name, p, rest = item
            if p.poll() is None:
                continue
            running.remove(item)
            if p.returncode != 0:
                print(f"{name}: failed ({p.returncode})", flush=True)
                continue
            if rest:
                log = open(Path(name).parent / (Path(name).name + ".log"), "a")  # noqa: SIM115
                running.append(
                    (
                        name,
                        subprocess.Popen(rest[0], stdout=log, stderr=subprocess.STDOUT, env=env),
                        rest[1:],
                    )
                )
            else:
                print(f"{name}: done", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prep", type=Path, required=True)
    ap.add_argument("--out", type=Path, default=Path("runs/bias"))
    ap.add_argument("--minority", default="site_b")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--arms", nargs="+", default=list(ARMS))
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--summarize-only", action="store_true")
    args = ap.parse_args()
    view = make_view(args.prep, args.out, args.minority, 2, 19, 15)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cells = []
    for seed in args.seeds:
        for arm in args.arms:
            run = args.out / "cells" / f"{arm}_s{seed}"
            run.mkdir(parents=True, exist_ok=True)
            if (run / "eval" / "summary.json").is_file():
                continue
            cells.append((str(run), cell_cmds(view, args.out, arm, seed)))
    t0 = time.perf_counter()
    if args.summarize_only:
        summarize(args.out, args.arms, args.seeds)
        return
    run_cells(cells, args.jobs, env)
    print(f"cells done in {time.perf_counter() - t0:.0f} s", flush=True)
    summarize(args.out, args.arms, args.seeds)


def summarize(out: Path, arms, seeds) -> None:
    """Per-site Dice and the largest site gap (bootstrap CIs from ``umit evaluate``), per cell,
    and the change from ``none`` per site (paired by seed)."""
    cells = {}
    for arm in arms:
        for seed in seeds:
            f = out / "cells" / f"{arm}_s{seed}" / "eval" / "summary.json"
            if f.is_file():
                cells[(arm, seed)] = json.loads(f.read_text())["result"]
    rows = {}
    print(
        "| arm | seed | overall Dice | "
        + " | ".join(f"{s}" for s in ("site_a", "site_b", "site_c"))
        + " | largest gap (high - low) |"
    )
    print("|---|---|---|---|---|---|---|")
    for (arm, seed), res in cells.items():
        site = res["attributes"]["site"]
        per = {g["group"]: g["metrics"]["dice"] for g in site["groups"]}
        gap = site["gaps"].get("dice", {})
        o = res["overall"]["dice"]
        rows[f"{arm}_s{seed}"] = {"overall": o, "per_site": per, "gap": gap}

        def f(m):
            return f"{m['value']:.3f} [{m['ci_low']:.3f}, {m['ci_high']:.3f}]"

        gtxt = f"{f(gap)} ({gap.get('high_group')} - {gap.get('low_group')})" if gap else "-"
        print(
            f"| {arm} | {seed} | {f(o)} | "
            + " | ".join(f(per[s]) for s in sorted(per))
            + f" | {gtxt} |"
        )
    (out / "bias_summary.json").write_text(json.dumps(rows, indent=1))
    print(f"{len(cells)} cells -> {out / 'bias_summary.json'}")


if __name__ == "__main__":
    main()
