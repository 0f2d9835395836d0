"""Training on non-expert labels: a model fine-tuned on the STAPLE consensus of five simulated
raters, on their majority vote, on one rater's labels, and on the truth (evidence for
``umit labels aggregate``, docs/trust.md).

The raters are those of ``benchmarks/consensus_phantoms.py``, now labelling a whole training set:
four honest raters, each with one systematic bias for all cases (every structure dilated by one
voxel, eroded by one, or neither, drawn once per rater), random misses (p = 0.15 per structure)
and boundary noise (30% of boundary voxels take a neighbour's label); one adversary swaps the
structure labels and shifts the map by 3 voxels. The raters' maps are fixed (``--rater-seed``);
training seeds vary the initialisation and data order. The ``one_rater`` arm at seed ``s`` trains
on honest rater ``s mod 4 + 1``, so its spread across seeds includes which rater it was.

The product path is used throughout: ``umit ingest`` of a phantom collection, ``umit labels
aggregate RATERS --raw RAW method=staple activate=true`` (the consensus becomes each training
case's label in the catalog), ``umit preprocess``, ``umit finetune``, ``umit evaluate``. Every arm
is scored on the same test phantoms against the truth.

  PYTHONPATH=src python benchmarks/consensus_training.py --src runs/phseg/src --out runs/consensus_train --jobs 2
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks import bias_mitigation
from benchmarks.bias_mitigation import run_cells
from benchmarks.consensus_phantoms import BIASES, adversary, dice_fg, honest
from umit.data.io import read_image, write_image
from umit.ingest.catalog import Catalog

ARMS = ("truth", "staple", "majority", "one_rater")
PREPROCESS = ["target_spacing=[1.6,1.6,2.0]", "scheme=ct_zscore", "workers=1"]
# the phantom study's CNN recipe (docs/evidence.md: 300 steps), 20 labeled phantoms
RECIPE = [
    r
    for r in bias_mitigation.RECIPE
    if not r.startswith(("train.total_steps", "train.warmup_steps", "exclude_splits"))
] + ["train.total_steps=300", "train.warmup_steps=30", "exclude_splits=[test]"]


def make_source(src: Path, out: Path, n_train: int) -> Path:
    """An MSD-style collection: the first ``n_train`` training phantoms and every test phantom of
    ``src`` (symlinks)."""
    dst = out / "src"
    if dst.exists():
        return dst
    tmp = out / "src.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        (tmp / sub).mkdir(parents=True)
    train = sorted((src / "labelsTr").glob("*.nii.gz"))[:n_train]
    for lab in train:
        case = lab.name[: -len(".nii.gz")]
        (tmp / "labelsTr" / lab.name).symlink_to(lab.resolve())
        img = src / "imagesTr" / f"{case}_0000.nii.gz"
        (tmp / "imagesTr" / img.name).symlink_to(img.resolve())
    for sub in ("imagesTs", "labelsTs"):
        for f in sorted((src / sub).glob("*.nii.gz")):
            (tmp / sub / f.name).symlink_to(f.resolve())
    if (src / "attributes.csv").is_file():
        shutil.copyfile(src / "attributes.csv", tmp / "attributes.csv")
    ds = json.loads((src / "dataset.json").read_text())
    keep = {f"./labelsTr/{f.name}" for f in train}
    ds["training"] = [t for t in ds["training"] if t["label"] in keep]
    ds["numTraining"] = len(ds["training"])
    (tmp / "dataset.json").write_text(json.dumps(ds, indent=1))
    tmp.rename(dst)
    return dst


def umit(*args: str) -> None:
    cmd = [sys.executable, "-m", "umit.cli.main", *args]
    print("$ umit", " ".join(args), flush=True)
    subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def prepare(args: argparse.Namespace) -> dict[str, dict]:
    """RAW + PREP per arm; returns the training labels' Dice vs the truth per arm."""
    src = make_source(args.src, args.out, args.n_train)
    quality: dict[str, dict] = {}
    raws = {arm: args.out / f"raw_{arm}" for arm in ("truth", "staple", "majority")}
    for raw in raws.values():
        if not raw.is_dir():
            umit("ingest", str(src), "--out", str(raw))
    names = {f.name[: -len(".nii.gz")] for f in (src / "labelsTr").glob("*.nii.gz")}
    with Catalog.open_raw(raws["truth"]) as cat:
        train = {c: recs[0].label_path for c, recs in sorted(cat.cases().items()) if c in names}
    if len(train) != len(names):
        raise SystemExit(f"catalog has {len(train)} of the {len(names)} training cases")
    raters_dir = args.out / "raters"
    rng = np.random.default_rng(args.rater_seed)
    biases = [BIASES[int(i)] for i in rng.integers(len(BIASES), size=4)]
    print("honest raters' biases:", biases, flush=True)
    truths, maps = {}, {}
    for case, rel in train.items():
        truth_img, meta = read_image(raws["truth"] / rel)
        truth = np.rint(truth_img).astype(np.int64)
        labels = [int(v) for v in np.unique(truth) if v]
        case_rng = np.random.default_rng([args.rater_seed, len(truths)])
        raters = [adversary(truth, labels, case_rng)]
        raters += [honest(truth, labels, case_rng, bias=b) for b in biases]
        truths[case], maps[case] = (truth, labels), raters
        d = raters_dir / case
        if not d.is_dir():
            d.mkdir(parents=True)
            for k, r in enumerate(raters):
                name = "adversary" if k == 0 else f"rater{k}"
                write_image(d / f"{name}.nii.gz", r.astype(np.uint8), meta)
    cons = args.out / "consensus"
    if not (cons / "raters.json").is_file():
        umit("labels", "aggregate", str(raters_dir), "--out", str(cons),
             "--raw", str(raws["staple"]), "method=staple", "activate=true")  # fmt: skip
    with Catalog.open_raw(raws["majority"]) as cat:
        for case in train:
            rel = Path("labels") / f"{case}__consensus_majority.nii.gz"
            shutil.copyfile(cons / f"{case}_majority.nii.gz", raws["majority"] / rel)
            cat.add_label_source(case, "consensus_majority", rel.as_posix(), activate=True)
    for k in range(1, 5):  # one raw per honest rater: the one_rater arm picks one per seed
        raw = args.out / f"raw_one_rater{k}"
        if not raw.exists():
            shutil.copytree(raws["truth"], raw, symlinks=True)
        with Catalog.open_raw(raw) as cat:
            for case in train:
                rel = Path("labels") / f"{case}__rater{k}.nii.gz"
                shutil.copyfile(raters_dir / case / f"rater{k}.nii.gz", raw / rel)
                cat.add_label_source(case, f"rater{k}", rel.as_posix(), activate=True)
    for name in ["truth", "staple", "majority"] + [f"one_rater{k}" for k in range(1, 5)]:
        raw = args.out / f"raw_{name}"
        prep = args.out / f"prep_{name}"
        if not (prep / "index.json").is_file():
            umit("preprocess", str(raw), "--out", str(prep), *PREPROCESS)
    for name, pick in [
        ("staple", lambda c: f"{c}_staple"),
        ("majority", lambda c: f"{c}_majority"),
    ]:
        quality[name] = _label_dice(
            truths, {c: read_image(cons / f"{pick(c)}.nii.gz")[0] for c in train}
        )
    for k in range(1, 5):
        quality[f"one_rater{k}"] = _label_dice(truths, {c: maps[c][k] for c in train})
    quality["adversary"] = _label_dice(truths, {c: maps[c][0] for c in train})
    quality["biases"] = dict(zip([f"rater{k}" for k in range(1, 5)], biases, strict=True))
    return quality


def _label_dice(truths: dict, maps: dict) -> dict[str, float]:
    d = [dice_fg(np.rint(maps[c]).astype(np.int64), *truths[c]) for c in truths]
    return {"mean": float(np.mean(d)), "min": float(np.min(d)), "n": len(d)}


def prep_of(out: Path, arm: str, seed: int) -> Path:
    return out / (f"prep_one_rater{seed % 4 + 1}" if arm == "one_rater" else f"prep_{arm}")


def cell_cmds(out: Path, arm: str, seed: int) -> list[list[str]]:
    run = out / "cells" / f"{arm}_s{seed}"
    prep = prep_of(out, arm, seed)
    py = [sys.executable, "-m", "umit.cli.main"]
    ft = py + ["finetune", "--data", str(prep), "--out", str(run / "run"), *RECIPE,
               f"train.seed={seed}"]  # fmt: skip
    # scored on the truth: the test phantoms' labels are the same original files in every PREP
    ev = py + ["evaluate", "--model", str(run / "run" / "best.pt"), "--data", str(prep),
               f"out={run / 'eval'}", "attributes=[site]", "case_figures=false",
               "explain_figures=false", f"seed={seed}", "n_boot=500"]  # fmt: skip
    return [ft, ev]


def summarize(out: Path, seeds: list[int], quality: dict) -> dict:
    """Test Dice per arm (mean ± sd over seeds) and paired differences against ``truth`` with a
    bootstrap CI over test cases and seeds."""
    per_case: dict[tuple[str, int], dict[str, float]] = {}
    for arm in ARMS:
        for s in seeds:
            f = out / "cells" / f"{arm}_s{s}" / "eval" / "per_case.csv"
            if not f.is_file():
                continue
            lines = f.read_text().splitlines()
            head = lines[0].split(",")
            i, j = head.index("case_id"), head.index("dice_mean")
            per_case[(arm, s)] = {r.split(",")[i]: float(r.split(",")[j]) for r in lines[1:]}
    rng = np.random.default_rng(0)
    table = {}
    for arm in ARMS:
        vals = [np.mean(list(per_case[(arm, s)].values())) for s in seeds if (arm, s) in per_case]
        row = {"mean": float(np.mean(vals)) if vals else None,
               "sd": float(np.std(vals, ddof=1)) if len(vals) > 1 else None,
               "per_seed": [round(float(v), 4) for v in vals]}  # fmt: skip
        paired = [s for s in seeds if (arm, s) in per_case and ("truth", s) in per_case]
        if arm != "truth" and paired:
            cases = sorted(per_case[("truth", paired[0])])
            d = np.array(
                [[per_case[(arm, s)][c] - per_case[("truth", s)][c] for c in cases] for s in paired]
            )  # fmt: skip  (seeds, cases)
            reps = []
            for _ in range(2000):  # hierarchical: seeds, then cases
                si = rng.integers(len(paired), size=len(paired))
                ci = rng.integers(len(cases), size=len(cases))
                reps.append(d[si][:, ci].mean())
            row["minus_truth"] = [float(d.mean()), *np.percentile(reps, [2.5, 97.5]).tolist()]
        table[arm] = row
    result = {"table": table, "label_quality": quality, "seeds": seeds}
    (out / "consensus_training.json").write_text(json.dumps(result, indent=1))
    q = {"truth": 1.0, "staple": quality["staple"]["mean"],
         "majority": quality["majority"]["mean"],
         "one_rater": float(np.mean([quality[f"one_rater{s % 4 + 1}"]["mean"] for s in seeds]))}  # fmt: skip
    print("| trained on | training labels' Dice vs truth | test Dice (mean ± sd) | per seed | "
          "minus truth (95% CI) |")  # fmt: skip
    print("|---|---|---|---|---|")
    for arm, row in table.items():
        if row["mean"] is None:
            continue
        sd = f" ± {row['sd']:.3f}" if row["sd"] is not None else ""
        mt = row.get("minus_truth")
        mt_txt = f"{mt[0]:+.3f} [{mt[1]:+.3f}, {mt[2]:+.3f}]" if mt else ""
        per = row["per_seed"]
        if arm == "one_rater":  # which rater each seed trained on, and its labels' quality
            per = [
                f"{v} (rater{s % 4 + 1}: {quality['biases'][f'rater{s % 4 + 1}']}, "
                f"{quality[f'one_rater{s % 4 + 1}']['mean']:.3f})"
                for s, v in zip(seeds, per, strict=False)
            ]
        print(f"| {arm} | {q[arm]:.3f} | {row['mean']:.3f}{sd} | {per} | {mt_txt} |")
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--src", type=Path, required=True, help="phantom collection (MSD layout)")
    ap.add_argument("--out", type=Path, default=Path("runs/consensus_train"))
    ap.add_argument("--n-train", type=int, default=20)
    ap.add_argument("--rater-seed", type=int, default=0)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--arms", nargs="+", default=list(ARMS))
    ap.add_argument("--jobs", type=int, default=2)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    qfile = args.out / "label_quality.json"
    if qfile.is_file():
        quality = json.loads(qfile.read_text())
    else:
        quality = prepare(args)
        qfile.write_text(json.dumps(quality, indent=1))
    print(f"data ready in {time.perf_counter() - t0:.0f} s: {quality}", flush=True)
    cells = []
    for seed in args.seeds:
        for arm in args.arms:
            run = args.out / "cells" / f"{arm}_s{seed}"
            run.mkdir(parents=True, exist_ok=True)
            if not (run / "eval" / "per_case.csv").is_file():
                cells.append((str(run), cell_cmds(args.out, arm, seed)))
    run_cells(cells, args.jobs, {**os.environ, "OMP_NUM_THREADS": "1"})
    print(f"all done in {time.perf_counter() - t0:.0f} s", flush=True)
    summarize(args.out, args.seeds, quality)


if __name__ == "__main__":
    main()
