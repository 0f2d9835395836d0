"""A trivial floor for the phantom segmentation study: label every test voxel by position alone.

For each seed, the labeled phantoms a data-efficiency cell would draw (same pool, same seeded
subset) vote per voxel, their grids aligned at the array centre (the preprocessed phantoms differ
by a few voxels along one axis); ties go to the lower label. The atlas is scored on the test
phantoms with the same mean foreground Dice as ``umit evaluate`` (labels 1..9, a label absent
from both prediction and reference skipped). No image intensity is read: what a model scores
above this floor is what it learned from the image.

    PYTHONPATH=src python benchmarks/phseg_atlas_floor.py runs/phseg/prep --count 2 --seeds 0 1 2 3 4

With ``--eval-cases`` it is the floor of a held-out selection instead: those phantoms are kept
out of the labeled draw (as ``eval_cases`` of ``umit data-efficiency`` keeps them) and scored in
place of the test split, which is then not read.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from umit.data.store import Store
from umit.finetune.run import FinetuneConfig, split_finetune_cases
from umit.metrics import segmentation_metrics


def fit_to(a: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """``a`` centre-cropped / zero-padded to ``shape``."""
    out = np.zeros(shape, a.dtype)
    src, dst = [], []
    for n, m in zip(a.shape, shape, strict=True):
        lo_a, lo_o = max(0, (n - m) // 2), max(0, (m - n) // 2)
        k = min(n, m)
        src.append(slice(lo_a, lo_a + k))
        dst.append(slice(lo_o, lo_o + k))
    out[tuple(dst)] = a[tuple(src)]
    return out


def atlas_for(labels: list[np.ndarray], shape: tuple[int, ...], n_labels: int) -> np.ndarray:
    """Per-voxel majority label of ``labels`` on ``shape`` (ties: the lower label)."""
    votes = np.zeros((n_labels, *shape), np.int16)
    for lab in labels:
        lab = fit_to(lab, shape)
        for k in range(n_labels):
            votes[k] += lab == k
    return votes.argmax(0).astype(np.uint8)  # argmax takes the first maximum


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("prep", type=Path)
    p.add_argument("--count", type=int, default=2)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--val-fraction", type=float, default=0.05)
    p.add_argument("--eval-cases", nargs="+", default=None, help="score these held-out cases")
    p.add_argument("--out", type=Path, default=None, help="write the per-seed results here (JSON)")
    args = p.parse_args()
    store = Store(args.prep)
    names = {int(v): k for k, v in (store.plan.labels or {}).items() if int(v) > 0}
    n_labels = max(names) + 1
    per_seed = {}
    for seed in args.seeds:
        ft = FinetuneConfig(
            data=args.prep,
            label_count=args.count,
            label_seed=seed,
            val_fraction=args.val_fraction,
            exclude_cases=args.eval_cases or [],
        )
        cases = split_finetune_cases(store, ft)
        scored = args.eval_cases or cases["test"]
        labeled = [np.asarray(store.case(c).read_label()) for c in cases["train"]]
        scores = []
        for c in scored:
            ref = np.asarray(store.case(c).read_label())
            pred = atlas_for(labeled, ref.shape, n_labels)
            m = segmentation_metrics(
                pred, ref, store.case(c).spacing, sorted(names), metrics=("dice",)
            )
            vals = [v["dice"] for v in m.values() if v["dice"] == v["dice"]]
            scores.append(float(np.mean(vals)))
        per_seed[seed] = {"labeled": cases["train"], "dice": float(np.mean(scores))}
        where = "held-out" if args.eval_cases else "test"
        print(f"seed {seed}: labeled {cases['train']}: {where} Dice {np.mean(scores):.3f}")
    d = np.array([v["dice"] for v in per_seed.values()])
    sd = d.std(ddof=1) if d.size > 1 else 0.0
    print(f"atlas floor, {args.count} labeled: {d.mean():.3f} ± {sd:.3f} ({d.size} seeds)")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(per_seed, indent=1))


if __name__ == "__main__":
    main()
