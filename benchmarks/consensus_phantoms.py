"""Consensus of simulated non-expert raters on phantom CT labels (evidence for
``umit labels aggregate``, docs/trust.md).

Each honest rater has a systematic bias (over-segmentation: every structure dilated by one voxel;
under-segmentation: eroded by one; or none), misses each structure with probability 0.15, and
moves boundary voxels (each boundary voxel takes a random neighbour's label with probability
0.3). One adversarial rater swaps the structures' labels (a fixed random permutation) and shifts
the map by 3 voxels. Pools of 3, 5 and 9 raters (one adversary in each) label each test case;
mean foreground Dice vs the truth (over the 9 structures) of STAPLE, majority vote, the mean
honest rater and the best honest rater, with a 95% bootstrap CI over cases.

  PYTHONPATH=src python benchmarks/consensus_phantoms.py --labels RAW/labels --n 20 --out runs/consensus
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

from umit.data.io import read_image
from umit.labels.aggregate import majority_vote, staple

BIASES = ("over", "under", "none")


def dice_fg(pred: np.ndarray, truth: np.ndarray, labels: list[int]) -> float:
    out = []
    for lab in labels:
        p, t = pred == lab, truth == lab
        out.append(2 * (p & t).sum() / max(p.sum() + t.sum(), 1))
    return float(np.mean(out))


def grow(label: np.ndarray, labels: list[int], step: int) -> np.ndarray:
    """Dilate (step > 0) or erode (step < 0) every structure by one voxel."""
    out = label.copy()
    for lab in labels:
        m = label == lab
        if step > 0:
            out[ndimage.binary_dilation(m) & (label == 0)] = lab
        else:
            out[m & ~ndimage.binary_erosion(m)] = 0
    return out


def honest(
    truth: np.ndarray, labels: list[int], rng: np.random.Generator, bias: str | None = None
) -> np.ndarray:
    """One honest rater's map: ``bias`` (over / under / none; drawn from ``rng`` when None), random
    misses and boundary noise."""
    if bias is None:
        bias = BIASES[rng.integers(len(BIASES))]
    r = grow(truth, labels, +1) if bias == "over" else truth.copy()
    if bias == "under":
        r = grow(truth, labels, -1)
    for lab in labels:  # random misses
        if rng.random() < 0.15:
            r[r == lab] = 0
    edge = ndimage.grey_dilation(r, size=3) != ndimage.grey_erosion(r, size=3)
    pick = edge & (rng.random(r.shape) < 0.3)
    shift = rng.integers(-1, 2, size=(3, int(pick.sum())))
    idx = np.argwhere(pick).T
    nb = np.clip(idx + shift, 0, np.array(r.shape)[:, None] - 1)
    r[tuple(idx)] = r[tuple(nb)]
    return r


def adversary(truth: np.ndarray, labels: list[int], rng: np.random.Generator) -> np.ndarray:
    perm = dict(zip(labels, rng.permutation(labels), strict=True))
    r = np.zeros_like(truth)
    for a, b in perm.items():
        r[truth == a] = b
    return np.roll(r, 3, axis=(0, 1))


def boot_ci(x: np.ndarray, rng: np.random.Generator, n: int = 2000) -> list[float]:
    reps = rng.choice(x, size=(n, len(x)), replace=True).mean(1)
    return [float(np.percentile(reps, 2.5)), float(np.percentile(reps, 97.5))]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--labels", type=Path, required=True)
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("runs/consensus"))
    args = ap.parse_args()
    files = sorted(args.labels.glob("*.nii.gz"))[-args.n :]  # the last cases (test split)
    rng = np.random.default_rng(args.seed)
    rows = []
    t0 = time.perf_counter()
    for f in files:
        truth = np.rint(read_image(f)[0]).astype(np.int64)
        labels = [int(v) for v in np.unique(truth) if v]
        pool = [adversary(truth, labels, rng)] + [honest(truth, labels, rng) for _ in range(8)]
        for k in (3, 5, 9):
            raters = pool[:k]
            st = staple(raters)
            row = {
                "case": f.name,
                "raters": k,
                "staple": dice_fg(st["consensus"], truth, labels),
                "majority": dice_fg(majority_vote(raters), truth, labels),
                "rater_mean": float(np.mean([dice_fg(r, truth, labels) for r in raters[1:]])),
                "rater_best": float(np.max([dice_fg(r, truth, labels) for r in raters[1:]])),
                "adversary": dice_fg(raters[0], truth, labels),
                "adversary_sens": float(np.mean([v[0] for v in st["sensitivity"].values()])),
                "honest_sens": float(np.mean([np.mean(v[1:]) for v in st["sensitivity"].values()])),
            }
            rows.append(row)
        print(f"{f.name}: done ({time.perf_counter() - t0:.0f} s)", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    table = {}
    for k in (3, 5, 9):
        sub = [r for r in rows if r["raters"] == k]
        table[k] = {
            m: {
                "mean": float(np.mean([r[m] for r in sub])),
                "ci": boot_ci(np.array([r[m] for r in sub]), rng),
            }
            for m in (
                "staple",
                "majority",
                "rater_mean",
                "rater_best",
                "adversary",
                "adversary_sens",
                "honest_sens",
            )
        }
        diff = np.array([r["staple"] - r["majority"] for r in sub])
        table[k]["staple_minus_majority"] = {"mean": float(diff.mean()), "ci": boot_ci(diff, rng)}
    (args.out / "consensus.json").write_text(json.dumps({"rows": rows, "table": table}, indent=1))
    print(f"{len(files)} cases, seed {args.seed}, {time.perf_counter() - t0:.0f} s")
    print(
        "| raters | STAPLE | majority | STAPLE - majority | mean honest rater | best honest rater | adversary |"
    )
    print("|---|---|---|---|---|---|---|")
    for k, t in table.items():

        def c(m, t=t):
            return f"{t[m]['mean']:.3f} [{t[m]['ci'][0]:.3f}, {t[m]['ci'][1]:.3f}]"

        print(
            f"| {k} | {c('staple')} | {c('majority')} | {c('staple_minus_majority')} | {c('rater_mean')} | {c('rater_best')} | {t['adversary']['mean']:.3f} |"
        )
    print(
        "STAPLE sensitivity (mean over structures): adversary",
        {k: round(t["adversary_sens"]["mean"], 3) for k, t in table.items()},
        "honest",
        {k: round(t["honest_sens"]["mean"], 3) for k, t in table.items()},
    )


if __name__ == "__main__":
    main()
