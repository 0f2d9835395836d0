"""Test Dice of a phantom segmentation study by contrast phase: was the scored phantom's phase
among the labeled phantoms' phases? (docs/evidence.md, "Which phantoms the kidneys are missed on")

For every finished cell of a ``umit data-efficiency`` folder, the labeled phantoms are recomputed
from the cell's resolved config (the same ``split_finetune_cases`` the run used) and each scored
phantom of ``eval/per_case.csv`` is put in the "phase labeled" or the "phase not labeled" group.
Per arm and budget: the number of scored phantoms, mean Dice over the organs, and the two kidneys.

  PYTHONPATH=src python benchmarks/phseg_phase_breakdown.py runs/phseg/evidence_n1 [--out F.json]
"""

from __future__ import annotations

import argparse
import csv
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import yaml

from umit.data.store import Store
from umit.finetune.run import FinetuneConfig, split_finetune_cases

COLUMNS = ("dice_mean", "dice_6", "dice_7")  # all organs, left kidney, right kidney


def breakdown(study: Path) -> dict[str, dict[str, dict[str, float]]]:
    """``{arm/budget: {"labeled"|"not_labeled": {n, dice, kidney_left, kidney_right}}}``."""
    groups: dict[tuple[str, str], list[tuple[float, ...]]] = defaultdict(list)
    stores: dict[str, Store] = {}
    for cell in sorted((study / "cells").glob("*/*")):
        per_case, config = cell / "eval" / "per_case.csv", cell / "run" / "config.yaml"
        if not (per_case.is_file() and config.is_file()):
            continue
        cfg = FinetuneConfig(**yaml.safe_load(config.read_text()))
        store = stores.setdefault(str(cfg.data), Store(cfg.data))
        labeled = split_finetune_cases(store, cfg)["train"]
        phases = {store.index[c].get("contrast") for c in labeled}
        key = f"{cell.parent.name}/{cell.name.split('_s')[0]}"
        for row in csv.DictReader(per_case.open()):
            seen = "labeled" if row["contrast"] in phases else "not_labeled"
            groups[(key, seen)].append(tuple(float(row[c]) for c in COLUMNS))
    out: dict[str, dict[str, dict[str, float]]] = defaultdict(dict)
    for (key, seen), rows in sorted(groups.items()):
        a = np.asarray(rows)
        out[key][seen] = {
            "n": len(rows),
            "dice": float(a[:, 0].mean()),
            "kidney_left": float(np.nanmean(a[:, 1])),
            "kidney_right": float(np.nanmean(a[:, 2])),
        }
    return dict(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("study", type=Path, help="a umit data-efficiency out folder")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    table = breakdown(args.study)
    print("| arm / budget | phase of the scored phantom | n | Dice | left kidney | right kidney |")
    print("|---|---|---|---|---|---|")
    for key, parts in table.items():
        for seen, v in parts.items():
            print(
                f"| {key} | {seen.replace('_', ' ')} | {v['n']} | {v['dice']:.3f} | "
                f"{v['kidney_left']:.3f} | {v['kidney_right']:.3f} |"
            )
    if args.out:
        args.out.write_text(json.dumps(table, indent=1))


if __name__ == "__main__":
    main()
