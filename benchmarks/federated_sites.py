"""Federated vs local vs centralised segmentation fine-tuning on phantom sites (docs/federated.md).

    OMP_NUM_THREADS=1 python -m benchmarks.federated_sites \\
        --config benchmarks/federated_sites.yaml

The phantom CT sites differ in scanner (HU calibration), voxel spacing, noise, PSF and contrast
phase (``umit.data.phantoms.sites.CT_SITES``). From one PREP folder (``data``: the phantoms
preprocessed with one plan) the script derives, without copying voxels (``store.zarr`` is a
symlink, only ``index.json`` differs):

- ``prep/pooled``: every site, with per site ``n_test`` held-out test cases (``split=test``) and
  ``n_train[site]`` training cases (``split=train``); the other cases are ``split=unused``
  (excluded). Sites of different size: a large site and small ones.
- ``prep/<site>``: the same cases of one site only.

Arms, each with the same number of optimizer steps in total (``rounds * local_steps`` per site,
three sites):

- ``local``: ``umit finetune`` on one site's folder, ``rounds * local_steps`` steps, per site;
- ``fedavg`` / ``fedprox``: ``umit federated`` on ``prep/pooled`` split by the catalog ``site``,
  ``rounds`` rounds of ``local_steps`` steps at each site (FedProx with ``proximal_mu``);
- ``central``: ``umit finetune`` on the pooled data, ``3 * rounds * local_steps`` steps;
- ``atlas`` (floor, no training): the per-voxel majority label of the pooled training label maps
  (centre-aligned), pasted onto each test case.

Every trained model is scored on each site's own test cases (``umit evaluate``'s per-case
metrics); the table gives per site the mean test Dice over seeds (mean +- sd) and the paired
difference of every arm minus ``local`` with a hierarchical bootstrap CI over test cases and
seeds (``umit.eval.paired``). Writes ``results.json``, ``per_case/*.json`` and ``table.md`` into
``out``; finished cells are skipped on a rerun.

Classification with sites made by class ratio (``task: classification``, ``positive_fraction``;
``benchmarks/federated_adrenal.yaml``): a store without a ``site`` attribute (AdrenalMNIST3D) is
split into non-IID sites, site ``s`` drawing ``n_train[s]`` of the store's ``train`` cases with a
fraction ``positive_fraction[s]`` of positives (``finetune.label_key`` == 1). Every model is
scored on the store's own ``test`` split, shared by all sites (test AUC); each site's local model
is an arm of its own (``local_<site>``), and the floors are ``umit.eval.floors``' voxel-count
regression and random-feature probe trained on the pooled training cases.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml
from pydantic import Field

from umit.config import UmitConfig

ARMS = ("local", "fedavg", "fedprox", "central")
SHARED = "shared"  # site_test_cases' key of test cases shared by every site (class-ratio sites)
# the classification table's paired differences besides "minus every local arm"
SHARED_BASES = {"fedavg": ["central"], "fedprox": ["central", "fedavg"], "central": []}
SMALL_FILES = ("plan.json", "fingerprint.json", "config.yaml")


class SitesStudyConfig(UmitConfig):
    """Settings of the study (``benchmarks/federated_sites.yaml``)."""

    data: Path
    """PREP folder of the phantoms (one plan for every site; catalog attribute ``site``)."""
    task: Literal["segmentation", "classification"] = "segmentation"
    """Scored by test Dice per site (segmentation) or by AUC on a shared test split."""
    positive_fraction: dict[str, float] | None = None
    """Sites made by class ratio instead of read from ``site``: site -> fraction of positives
    (``finetune.label_key`` == 1) among its ``n_train`` cases, drawn from the store's ``train``
    split; the store's ``test`` split is the shared test set (``n_test`` unused)."""
    out: Path = Path("runs/fedsites")
    """Study folder: derived stores, cells, per-case rows, results.json, table.md."""
    split_seed: int = 0
    """Seed of each site's draw of test and training cases."""
    n_train: dict[str, int]
    """Training cases per site (the sites of the study, by their ``site`` value)."""
    n_test: int = Field(default=10, ge=1)
    """Held-out test cases per site."""
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2])
    """Training seeds (initialisation, data order); the same in every arm (paired)."""
    rounds: int = Field(default=10, ge=1)
    """Federated rounds."""
    local_steps: int = Field(default=20, ge=1)
    """Steps per site per round; local-only trains ``rounds * local_steps`` steps per site,
    centralised ``sites * rounds * local_steps`` on the pooled data."""
    proximal_mu: float = Field(default=0.01, ge=0)
    """FedProx's mu."""
    optimizer_state: Literal["keep", "reset"] = "keep"
    """``umit federated optimizer_state`` (``keep`` / ``reset``)."""
    n_boot: int = Field(default=2000, ge=1)
    """Bootstrap replicates of the paired differences."""
    finetune: dict[str, Any]
    """The ``umit finetune`` settings of every arm (without data, out, total steps)."""


# ---------------------------------------------------------------------------------------------
# the site stores
# ---------------------------------------------------------------------------------------------
def derive_stores(cfg: dict[str, Any], out: Path) -> dict[str, Path]:
    """``prep/pooled`` and ``prep/<site>``: symlinked voxels, an index with this study's splits."""
    src = Path(cfg["data"]).resolve()
    index = json.loads((src / "index.json").read_text())
    cases = index["cases"]
    if cfg.get("positive_fraction"):
        split, site_of = class_ratio_sites(cfg, cases, src)
    else:
        split, site_of = attribute_sites(cfg, cases, src), {}
    folders = {"pooled": out / "prep" / "pooled"} | {s: out / "prep" / s for s in cfg["n_train"]}
    for name, folder in folders.items():
        folder.mkdir(parents=True, exist_ok=True)
        link = folder / "store.zarr"
        if not (link.is_symlink() or link.exists()):
            link.symlink_to(src / "store.zarr", target_is_directory=True)
        for f in SMALL_FILES:
            if (src / f).is_file():
                shutil.copy2(src / f, folder / f)
        keep = {}
        for c, v in cases.items():
            v = (
                v
                | {"split": split.get(c, "unused")}
                | ({"site": site_of[c]} if c in site_of else {})
            )
            if name == "pooled" or v.get("site") == name:
                keep[c] = v
        tmp = folder / "index.json.tmp"
        tmp.write_text(json.dumps({**index, "cases": keep}, indent=1))
        os.replace(tmp, folder / "index.json")
    return folders


def attribute_sites(cfg: dict[str, Any], cases: dict[str, dict], src: Path) -> dict[str, str]:
    """case -> ``test`` / ``train``: per site (catalog ``site``) ``n_test`` + ``n_train`` cases."""
    rng = np.random.default_rng(int(cfg.get("split_seed", 0)))
    split: dict[str, str] = {}
    for site, n_train in cfg["n_train"].items():
        ids = sorted(c for c, v in cases.items() if v.get("site") == site and v.get("has_label"))
        need = n_train + int(cfg["n_test"])
        if len(ids) < need:
            raise ValueError(f"{src}: site {site} has {len(ids)} labeled cases, {need} needed")
        order = [ids[i] for i in rng.permutation(len(ids))]
        split |= {c: "test" for c in order[: cfg["n_test"]]}
        split |= {c: "train" for c in order[cfg["n_test"] : need]}
    return split


def class_ratio_sites(
    cfg: dict[str, Any], cases: dict[str, dict], src: Path
) -> tuple[dict[str, str], dict[str, str]]:
    """(case -> split, case -> site) of non-IID sites made by class ratio.

    Site ``s`` draws ``round(n_train[s] * positive_fraction[s])`` positives and the rest
    negatives from the store's ``train`` cases, without replacement across sites (sites in
    sorted order); the store's ``test`` cases keep ``test`` and get no site (shared).
    """
    from umit.data.cases import case_label

    key = cfg["finetune"].get("label_key", "target")
    fractions = cfg["positive_fraction"]
    if set(fractions) != set(cfg["n_train"]):
        raise ValueError(
            f"positive_fraction sites {sorted(fractions)} differ from n_train's {sorted(cfg['n_train'])}"
        )
    labels = {c: str(case_label(v, key)) for c, v in cases.items()}
    pools = {
        y: sorted(c for c, v in cases.items() if v.get("split") == "train" and labels[c] == str(y))
        for y in (0, 1)
    }
    rng = np.random.default_rng(int(cfg.get("split_seed", 0)))
    pools = {y: [ids[i] for i in rng.permutation(len(ids))] for y, ids in pools.items()}
    split = {c: "test" for c, v in cases.items() if v.get("split") == "test"}
    if not split:
        raise ValueError(f"{src}: no case has split 'test' (the shared test set)")
    site_of: dict[str, str] = {}
    for site in sorted(cfg["n_train"]):
        n = int(cfg["n_train"][site])
        n_pos = round(n * float(fractions[site]))
        for y, k in ((1, n_pos), (0, n - n_pos)):
            if len(pools[y]) < k:
                raise ValueError(
                    f"{src}: site {site} needs {k} training cases with {key} = {y}, "
                    f"{len(pools[y])} are left"
                )
            drawn, pools[y] = pools[y][:k], pools[y][k:]
            split |= {c: "train" for c in drawn}
            site_of |= {c: site for c in drawn}
    return split, site_of


def site_test_cases(folder: Path) -> dict[str, list[str]]:
    """site -> its held-out test cases."""
    cases = json.loads((folder / "index.json").read_text())["cases"]
    out: dict[str, list[str]] = {}
    for c, v in sorted(cases.items()):
        if v["split"] == "test":
            out.setdefault(v.get("site") or SHARED, []).append(c)
    return out


# ---------------------------------------------------------------------------------------------
# the arms
# ---------------------------------------------------------------------------------------------
def finetune_section(cfg: dict[str, Any], seed: int) -> dict[str, Any]:
    """The arms' ``umit finetune`` settings: the study's cases only (``unused`` excluded)."""
    section = json.loads(json.dumps(cfg["finetune"]))
    section["exclude_splits"] = sorted({*section.get("exclude_splits", []), "test", "unused"})
    section.setdefault("train", {})["seed"] = seed
    section["train"]["progress"] = False
    return section


def train_local(cfg, folder: Path, out: Path, seed: int, steps: int) -> Path:
    from umit.finetune.run import FinetuneConfig
    from umit.finetune.run import run as finetune

    section = finetune_section(cfg, seed)
    section["train"] |= {"total_steps": steps, "eval_every": None, "ckpt_every": steps}
    finetune(FinetuneConfig.model_validate(section | {"data": folder, "out": out}))
    return out / "best.pt"


def train_federated(cfg, pooled: Path, out: Path, seed: int, strategy: str) -> Path:
    from umit.federated.config import FederatedConfig
    from umit.federated.run import run as federated

    section = finetune_section(cfg, seed)
    section["train"] |= {"eval_every": None}
    fed = FederatedConfig.model_validate(
        {
            "task": "finetune",
            "data": pooled,
            "site_key": "site",
            "out": out,
            "rounds": cfg["rounds"],
            "local_steps": cfg["local_steps"],
            "strategy": strategy,
            "proximal_mu": cfg["proximal_mu"] if strategy == "fedprox" else 0.0,
            "optimizer_state": cfg["optimizer_state"],
            "evaluate": False,
            "finetune": section,
        }
    )
    federated(fed)
    return out / "best.pt"


def score(model_path: Path, folder: Path, cases: list[str]) -> list[dict[str, Any]]:
    """Per-case rows of a ``best.pt``: Dice (``umit evaluate``'s sliding-window prediction) or,
    for a classifier, the case's class index (``label``) and positive-class ``score``."""
    from umit.data.cases import case_label
    from umit.data.store import Store
    from umit.inference.segment import predict_case_classification, predict_case_segmentation
    from umit.train.checkpoint import InferenceSpec, load_model

    model, ckpt = load_model(model_path)
    spec = InferenceSpec.model_validate(ckpt["spec"])
    store = Store(folder)
    rows = []
    if spec.task == "classification":
        names = list(ckpt["class_names"])
        for c in cases:
            probs = predict_case_classification(model, store, c, tuple(spec.roi_size))
            label = str(case_label(store.index[c], ckpt.get("label_key", "target")))
            rows.append({"case_id": c, "label": names.index(label), "score": float(probs[1])})
        return rows
    labels = sorted(int(v) for v in (ckpt.get("label_names") or {}).values() if int(v) > 0)
    for c in cases:
        pred = predict_case_segmentation(model, store, c, spec)
        ref = np.asarray(store.case(c).read_label())
        rows.append({"case_id": c, **dice_row(pred, ref, store.case(c).spacing, labels)})
    return rows


def dice_row(pred, ref, spacing, labels: list[int]) -> dict[str, float]:
    """``dice_<label>`` and their mean (over labels defined in the reference or prediction)."""
    from umit.metrics import segmentation_metrics

    per = segmentation_metrics(pred, ref, spacing, labels or None, metrics=("dice",))
    row = {f"dice_{lab}": float(m["dice"]) for lab, m in per.items()}
    vals = [v for v in row.values() if np.isfinite(v)]
    return row | {"dice_mean": float(np.mean(vals)) if vals else float("nan")}


def atlas_rows(pooled: Path, tests: dict[str, list[str]]) -> list[dict[str, Any]]:
    """Floor: per-voxel majority label of the pooled training label maps, centre-aligned."""
    from umit.data.store import Store

    store = Store(pooled)
    train = [c for c, v in store.index.items() if v["split"] == "train"]
    labels = [np.asarray(store.case(c).read_label()) for c in train]
    labels = [x[0] if x.ndim == 4 else x for x in labels]
    grid = tuple(max(x.shape[i] for x in labels) for i in range(3))
    k = int(max(x.max() for x in labels)) + 1
    counts = np.zeros((k, *grid), np.int32)
    for x in labels:
        off = [(g - s) // 2 for g, s in zip(grid, x.shape, strict=True)]
        sl = tuple(slice(o, o + s) for o, s in zip(off, x.shape, strict=True))
        for lab in range(k):
            counts[(lab, *sl)] += x == lab
    atlas = counts.argmax(0)
    rows = []
    for site_cases in tests.values():
        for c in site_cases:
            case = store.case(c)
            ref = np.asarray(case.read_label())
            ref = ref[0] if ref.ndim == 4 else ref
            pred = np.zeros_like(ref)
            src, dst = [], []
            for g, s in zip(grid, ref.shape, strict=True):
                o = (g - s) // 2
                if o >= 0:
                    src.append(slice(o, o + s))
                    dst.append(slice(0, s))
                else:
                    src.append(slice(0, g))
                    dst.append(slice(-o, -o + g))
            pred[tuple(dst)] = atlas[tuple(src)]
            rows.append({"case_id": c, **dice_row(pred, ref, case.spacing, list(range(1, k)))})
    return rows


def classification_floor_rows(cfg, pooled: Path) -> dict[str, list[dict[str, Any]]]:
    """Floors of the classification study: ``umit.eval.floors`` (voxel-count regression, random
    feature probe) fitted on the pooled training cases, scored on the shared test cases."""
    from umit.eval.floors import floor_rows
    from umit.finetune.run import FinetuneConfig

    section = finetune_section(cfg, 0) | {"data": pooled, "out": pooled / "unused"}
    return floor_rows(FinetuneConfig.model_validate(section), seed=0)


def run_cell(cfg, folders, out: Path, arm: str, seed: int, site: str | None) -> Path:
    """Train one arm for one seed (and one site for ``local``); score it; returns the rows file."""
    name = f"{arm}_{site}_s{seed}" if site else f"{arm}_s{seed}"
    rows_file = out / "per_case" / f"{name}.json"
    if rows_file.is_file():
        return rows_file
    steps = cfg["rounds"] * cfg["local_steps"]
    run_dir = out / "cells" / name
    if run_dir.exists():
        shutil.rmtree(run_dir)  # a cell killed half-way starts over
    started = time.perf_counter()
    if arm == "local":
        model = train_local(cfg, folders[site], run_dir, seed, steps)
    elif arm == "central":
        model = train_local(cfg, folders["pooled"], run_dir, seed, len(cfg["n_train"]) * steps)
    else:
        model = train_federated(cfg, folders["pooled"], run_dir, seed, arm)
    trained = time.perf_counter() - started
    tests = site_test_cases(folders["pooled"])
    rows = []
    for s, cases in tests.items():
        if site is None or s in (site, SHARED):
            rows += [r | {"site": s} for r in score(model, folders["pooled"], cases)]
    rows_file.parent.mkdir(parents=True, exist_ok=True)
    record = {"arm": arm, "seed": seed, "site": site, "train_s": trained, "rows": rows}
    record["score_s"] = time.perf_counter() - started - trained
    rows_file.write_text(json.dumps(record, indent=1))
    for f in run_dir.glob("**/*.pt"):  # keep best.pt only: the rest is large and not needed
        if f.name != "best.pt":
            f.unlink()
    logging.info("%s: trained in %.0f s, scored in %.0f s", name, trained, record["score_s"])
    return rows_file


# ---------------------------------------------------------------------------------------------
# the table
# ---------------------------------------------------------------------------------------------
def summarize(cfg, out: Path, folders) -> dict[str, Any]:
    from umit.eval.paired import paired_difference

    tests = site_test_cases(folders["pooled"])
    per: dict[str, dict[str, dict[int, list]]] = {}  # arm -> site -> seed -> rows
    seconds: dict[str, list[float]] = {}
    for f in sorted((out / "per_case").glob("*.json")):
        rec = json.loads(f.read_text())
        if rec["arm"] in ("atlas", "floors"):
            continue
        seconds.setdefault(rec["arm"], []).append(rec["train_s"])
        for r in rec["rows"]:
            per.setdefault(rec["arm"], {}).setdefault(r["site"], {}).setdefault(rec["seed"], [])
            per[rec["arm"]][r["site"]][rec["seed"]].append(r)
    atlas = json.loads((out / "per_case" / "atlas.json").read_text())["rows"]
    sites = sorted(tests)
    result: dict[str, Any] = {"sites": {}, "train_seconds": seconds}
    for site in sites + ["all"]:
        ss = sites if site == "all" else [site]
        entry: dict[str, Any] = {"n_test": sum(len(tests[s]) for s in ss)}
        ids = {c for s in ss for c in tests[s]}
        entry["atlas"] = float(np.mean([r["dice_mean"] for r in atlas if r["case_id"] in ids]))

        def tables(arm, ss=ss):
            seeds = sorted(set.intersection(*(set(per.get(arm, {}).get(s, {})) for s in ss)))
            return {sd: [r for s in ss for r in per[arm][s][sd]] for sd in seeds}

        for arm in ARMS:
            t = tables(arm)
            if not t:
                continue
            means = [float(np.mean([r["dice_mean"] for r in rows])) for rows in t.values()]
            entry[arm] = {
                "mean": float(np.mean(means)),
                "sd": float(np.std(means, ddof=1)) if len(means) > 1 else None,
                "seeds": len(means),
            }
            for base in ("local", "fedavg") if arm == "fedprox" else ("local",):
                if arm != base and tables(base):
                    entry[arm][f"minus_{base}"] = paired_difference(
                        t, tables(base), "dice", n_boot=cfg.get("n_boot", 2000), seed=0
                    )
        result["sites"][site] = entry
    return result


def markdown(cfg, result) -> str:
    n = cfg["n_train"]
    head = "| site (train / test cases) | atlas floor | " + " | ".join(ARMS) + " |"
    lines = [head, "|---" * (len(ARMS) + 2) + "|"]
    for site, e in result["sites"].items():
        label = f"{site} ({n[site]} / {e['n_test']})" if site in n else f"all ({e['n_test']} test)"
        cells = [f"{e['atlas']:.3f}"]
        for arm in ARMS:
            a = e.get(arm)
            if a is None:
                cells.append("-")
            elif a["sd"] is None:
                cells.append(f"{a['mean']:.3f} (1 seed)")
            else:
                cells.append(f"{a['mean']:.3f} ± {a['sd']:.3f} ({a['seeds']})")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "| site | a - b | Dice difference (95% CI) | CI excludes 0 | seeds |",
        "|---|---|---|---|---|",
    ]
    for site, e in result["sites"].items():
        for arm, base in [(a, "local") for a in ARMS[1:]] + [("fedprox", "fedavg")]:
            d = (e.get(arm) or {}).get(f"minus_{base}")
            if d and d["diff"] is not None:
                ci = f"[{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]"
                row = f"| {site} | {arm} - {base} | {d['diff']:+.3f} {ci} | {d['excludes_zero']} |"
                lines.append(f"{row} {d['n_seeds']} |")
    return "\n".join(lines) + "\n"


def summarize_shared(cfg, out: Path) -> dict[str, Any]:
    """Classification on a shared test split: per arm (each site's local model an arm of its own,
    ``local_<site>``) the test AUC over seeds, and the paired difference (hierarchical bootstrap
    over test cases and seeds) of each of fedavg / fedprox / central minus every local arm, and
    the pairs of ``SHARED_BASES`` (fedprox minus fedavg, either minus central)."""
    from umit.eval.paired import full_metric, paired_difference

    runs: dict[str, dict[int, list]] = {}  # arm name -> seed -> rows
    seconds: dict[str, list[float]] = {}
    for f in sorted((out / "per_case").glob("*.json")):
        rec = json.loads(f.read_text())
        if rec["arm"] == "floors":
            continue
        name = f"local_{rec['site']}" if rec["arm"] == "local" else rec["arm"]
        runs.setdefault(name, {})[rec["seed"]] = rec["rows"]
        seconds.setdefault(name, []).append(rec["train_s"])
    floors = json.loads((out / "per_case" / "floors.json").read_text())["rows"]
    result: dict[str, Any] = {
        "metric": "auc",
        "floors": {k: full_metric(rows, "auc") for k, rows in floors.items()},
        "arms": {},
        "train_seconds": seconds,
    }
    order = [f"local_{s}" for s in sorted(cfg["n_train"])] + list(ARMS[1:])
    for name in (n for n in order if n in runs):
        aucs = [full_metric(rows, "auc") for rows in runs[name].values()]
        entry: dict[str, Any] = {
            "mean": float(np.mean(aucs)),
            "sd": float(np.std(aucs, ddof=1)) if len(aucs) > 1 else None,
            "seeds": len(aucs),
            "minus": {},
        }
        if not name.startswith("local_"):
            bases = [n for n in order if n.startswith("local_")] + SHARED_BASES[name]
            for base in (b for b in bases if b in runs):
                entry["minus"][base] = paired_difference(
                    runs[name], runs[base], "auc", n_boot=cfg.get("n_boot", 2000), seed=0
                )
        result["arms"][name] = entry
    return result


def markdown_shared(cfg, result) -> str:
    """The classification study's tables: AUC per arm, then the paired differences."""
    n, frac = cfg["n_train"], cfg["positive_fraction"]
    lines = ["| arm | trained on | test AUC (mean ± sd, seeds) |", "|---|---|---|"]
    for name, e in result["arms"].items():
        site = name.removeprefix("local_")
        where = f"{n[site]} cases, {frac[site]:.0%} positive" if site in n else "all sites"
        sd = "" if e["sd"] is None else f" ± {e['sd']:.3f}"
        lines.append(f"| {name} | {where} | {e['mean']:.3f}{sd} ({e['seeds']}) |")
    for name, auc in result["floors"].items():
        lines.append(f"| {name} (floor) | all sites' training cases | {auc:.3f} |")
    lines += [
        "",
        "| a - b | AUC difference (95% CI) | CI excludes 0 | seeds |",
        "|---|---|---|---|",
    ]
    for name, e in result["arms"].items():
        for base, d in e["minus"].items():
            if d["diff"] is not None:
                ci = f"[{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]"
                row = f"| {name} - {base} | {d['diff']:+.3f} {ci} | {d['excludes_zero']} |"
                lines.append(f"{row} {d['n_seeds']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", type=Path, required=True)
    p.add_argument("--data", type=Path, help="override the config's data (PREP folder)")
    p.add_argument("--out", type=Path, help="override the config's out")
    p.add_argument("--seeds", type=int, nargs="*", help="override the config's seeds")
    p.add_argument("--arms", nargs="*", choices=ARMS, help="only these arms (default: all)")
    p.add_argument("--summarize-only", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for name in ("umit.train", "umit.finetune", "flwr"):
        logging.getLogger(name).setLevel(logging.WARNING)
    values = yaml.safe_load(args.config.read_text())
    values |= {k: v for k, v in {"data": args.data, "out": args.out}.items() if v is not None}
    cfg = SitesStudyConfig.model_validate(values).model_dump(mode="json")
    out = Path(cfg["out"])
    seeds = args.seeds if args.seeds is not None else cfg["seeds"]
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    folders = derive_stores(cfg, out)
    tests = site_test_cases(folders["pooled"])
    shared = cfg["task"] == "classification"
    floor_file = out / "per_case" / ("floors.json" if shared else "atlas.json")
    if not floor_file.is_file():
        floor_file.parent.mkdir(parents=True, exist_ok=True)
        if shared:
            rows = classification_floor_rows(cfg, folders["pooled"])
        else:
            rows = atlas_rows(folders["pooled"], tests)
        record = {"arm": "floors" if shared else "atlas", "seed": 0, "site": None, "rows": rows}
        floor_file.write_text(json.dumps(record))
    if not args.summarize_only:
        for seed in seeds:
            for arm in args.arms or ARMS:
                for site in sorted(cfg["n_train"]) if arm == "local" else [None]:
                    run_cell(cfg, folders, out, arm, seed, site)
    result = summarize_shared(cfg, out) if shared else summarize(cfg, out, folders)
    table = markdown_shared(cfg, result) if shared else markdown(cfg, result)
    result["config"] = {k: str(v) if isinstance(v, Path) else v for k, v in cfg.items()}
    result["machine"] = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    (out / "results.json").write_text(json.dumps(result, indent=1))
    (out / "table.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
