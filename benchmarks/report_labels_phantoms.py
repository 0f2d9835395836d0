"""Report labels end to end on CT phantoms with findings: labeler vs truth, classifiers trained on
report labels vs true labels, and ``method=report_labels`` pretraining -> few-label fine-tuning.

    OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python -m benchmarks.report_labels_phantoms \\
        --out runs/report_labels [--n 200 --n-test 60 --seeds 0 1 2 --steps 300] [--part all]

1. ``setup``: ``umit phantoms findings=true`` -> ``umit ingest`` -> ``umit labels from-reports``
   (joined by the MRN's keyed pseudonym) -> ``umit preprocess``; the drawn truth goes into the
   labels table too, as source ``truth`` (findings.csv), so both label sets feed the same code.
2. ``agreement``: per finding, report label vs truth (uncertain counted as present, and left out),
   Cohen's kappa, with Wilson 95% CIs; the floor is "always absent" (the majority class).
3. ``classify``: ``umit finetune task=classification`` on each finding's report labels vs its true
   labels (same cases, same seeds), test AUC against the truth (60 held-out phantoms), bootstrap CI.
4. ``pretrain``: ``umit pretrain method=report_labels`` on the training phantoms' report labels
   (all four findings), then fine-tuning on few true labels of one finding, pretrained vs scratch,
   paired by seed.

Writes ``results.json`` and ``table.md`` into ``--out``. Each finished cell is kept in
``cells/*.json``, so a rerun resumes.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np

FINDINGS = ("liver_lesion", "pleural_effusion", "splenomegaly", "kidney_cyst")
ENCODER = "vit3d_test_p8"  # C=48, depth 2: what ~30 core-minutes on a shared 2-core VM allow


def wilson(k: int, n: int) -> tuple[float, float]:
    if n == 0:
        return (math.nan, math.nan)
    p, z = k / n, 1.96
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return (mid - half, mid + half)


def kappa(a: list[int], b: list[int]) -> float:
    a_, b_ = np.asarray(a), np.asarray(b)
    po = float((a_ == b_).mean())
    pe = float(a_.mean() * b_.mean() + (1 - a_.mean()) * (1 - b_.mean()))
    return (po - pe) / (1 - pe) if pe < 1 else math.nan


def auc_ci(y: np.ndarray, s: np.ndarray, n_boot: int = 2000, seed: int = 0) -> dict[str, float]:
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(seed)
    base = float(roc_auc_score(y, s))
    boots = []
    for _ in range(n_boot):
        i = rng.integers(0, len(y), len(y))
        if len(set(y[i])) == 2:
            boots.append(roc_auc_score(y[i], s[i]))
    return {
        "auc": base,
        "lo": float(np.percentile(boots, 2.5)),
        "hi": float(np.percentile(boots, 97.5)),
    }


def setup(out: Path, n: int, n_test: int, workers: int) -> dict[str, Path]:
    from umit.data.phantoms import write_phantom_collection
    from umit.ingest.catalog import Catalog
    from umit.ingest.run import IngestConfig
    from umit.ingest.run import run as ingest
    from umit.labels.run import FromReportsConfig
    from umit.labels.run import run as from_reports
    from umit.labels.table import replace_labels
    from umit.preprocess.run import PreprocessConfig
    from umit.preprocess.run import run as preprocess

    src, raw, prep = out / "phantoms", out / "raw", out / "prep"
    if not (prep / "index.json").is_file():
        t = time.perf_counter()
        write_phantom_collection(
            src, n=n, n_test=n_test, seed=1, shape=(64, 64, 48), workers=workers, findings=True
        )
        ingest(IngestConfig(src=src, out=raw, workers=workers), progress=False)
        res = from_reports(FromReportsConfig(reports=src / "reports.csv", catalog=raw))
        assert not res.unmatched_rows, res.unmatched_rows
        with (src / "findings.csv").open() as f:
            truth = list(csv.DictReader(f))
        rows = [
            {
                "case_id": r["case_id"],
                "finding": k,
                "value": "present" if r[k] == "1" else "absent",
                "sentence_start": None,
                "sentence_end": None,
                "report_row": None,
                "source": "truth",
                "labeler": "phantom generator",
                "labeled_at": "",
            }
            for r in truth
            for k in FINDINGS
        ]
        with Catalog(raw / "catalog.db") as cat:
            replace_labels(cat, "truth", rows)
        preprocess(
            PreprocessConfig(raw=raw, out=prep, workers=workers, target_spacing=(2.4, 2.4, 3.0))
        )
        print(
            f"setup: {n}+{n_test} phantoms -> raw -> labels -> prep in {time.perf_counter() - t:.0f} s"
        )
    return {"src": src, "raw": raw, "prep": prep}


def keyword_labels(paths: dict[str, Path]) -> None:
    """Source ``keywords``: the plain keyword baseline, "present" whenever the report names the
    finding (a synonym or pattern of the vocabulary), whatever the context."""
    from umit.ingest.catalog import Catalog
    from umit.labels.context import split_sentences
    from umit.labels.table import read_labels, replace_labels
    from umit.labels.vocabulary import load_vocabulary

    if any(r["source"] == "keywords" for r in read_labels(paths["raw"], finding=FINDINGS[0])):
        return
    vocab = load_vocabulary()
    rows_by_report = {
        r["report_row"]: r["case_id"] for r in read_labels(paths["raw"], source="reports")
    }
    with (paths["src"] / "reports.csv").open() as f:
        reports = list(csv.DictReader(f))
    rows = []
    for i, rep in enumerate(reports, start=1):
        text = rep["text"]
        spans = split_sentences(text)
        for name in FINDINGS:
            hit = any(
                rx.search(text, a, b) for a, b in spans for rx in vocab.findings[name].mention
            )
            rows.append(
                {
                    "case_id": rows_by_report[i],
                    "finding": name,
                    "value": "present" if hit else "absent",
                    "sentence_start": None,
                    "sentence_end": None,
                    "report_row": i,
                    "source": "keywords",
                    "labeler": "keyword baseline",
                    "labeled_at": "",
                }
            )
    with Catalog(paths["raw"] / "catalog.db") as cat:
        replace_labels(cat, "keywords", rows)


def agreement(paths: dict[str, Path], source: str = "reports") -> dict[str, Any]:
    from umit.labels.table import read_labels

    truth = {
        (r["case_id"], r["finding"]): r["value"] == "present"
        for r in read_labels(paths["raw"], source="truth")
    }
    rep = {
        (r["case_id"], r["finding"]): r["value"] for r in read_labels(paths["raw"], source=source)
    }
    out = {}
    for f in FINDINGS:
        keys = [k for k in truth if k[1] == f]
        t = [int(truth[k]) for k in keys]
        r = [rep[k] for k in keys]
        as_present = [int(v in ("present", "uncertain")) for v in r]
        sure = [(ti, int(v == "present")) for ti, v in zip(t, r, strict=True) if v != "uncertain"]
        k1 = sum(a == b for a, b in zip(t, as_present, strict=True))
        k2 = sum(a == b for a, b in sure)
        out[f] = {
            "n": len(t),
            "prevalence": float(np.mean(t)),
            "agree_uncertain_as_present": k1 / len(t),
            "ci": wilson(k1, len(t)),
            "agree_excluding_uncertain": k2 / max(len(sure), 1),
            "n_uncertain": len(t) - len(sure),
            "n_not_mentioned": sum(v == "not_mentioned" for v in r),
            "kappa": kappa(t, as_present),
            "floor_always_absent": 1 - float(np.mean(t)),
            "false_present": sum(a == 0 and b == 1 for a, b in zip(t, as_present, strict=True)),
            "missed": sum(a == 1 and b == 0 for a, b in zip(t, as_present, strict=True)),
        }
    return out


def finetune_cell(
    paths: dict[str, Path],
    cells: Path,
    name: str,
    *,
    finding: str,
    source: str,
    seed: int,
    steps: int,
    label_count: int | None = None,
    pretrained: Path | None = None,
) -> dict[str, Any]:
    """One fine-tuning run; test AUC of the final model against the truth."""
    from umit.data.store import Store
    from umit.finetune.run import FinetuneConfig
    from umit.finetune.run import run as finetune
    from umit.inference.segment import predict_case_classification
    from umit.labels.table import LabelsTableConfig, table_targets
    from umit.train.checkpoint import load_model

    path = cells / f"{name}.json"
    if path.is_file():
        return json.loads(path.read_text())
    t = time.perf_counter()
    run_dir = cells / name
    cfg = FinetuneConfig.model_validate(
        {
            "data": paths["prep"],
            "out": run_dir,
            "task": "classification",
            "label_key": finding,
            "labels": {"catalog": str(paths["raw"]), "source": source, "uncertain": "present"},
            "model": "classifier",
            "model_args": {"encoder": ENCODER},
            "pretrained": pretrained,
            "crop_size": [32, 32, 32],
            "label_count": label_count,
            "label_seed": seed,
            "val_fraction": 0.2,
            "select": "last",
            "train": {
                "total_steps": steps,
                "batch_size": 8,
                "lr": 3e-4,
                "warmup_steps": max(1, steps // 10),
                "eval_every": steps,
                "seed": seed,
                "progress": False,
            },
        }
    )
    s = finetune(cfg)
    model, ckpt = load_model(run_dir / "best.pt")
    model.eval()
    store = Store(paths["prep"])
    truth = table_targets(LabelsTableConfig(catalog=paths["raw"], source="truth"), finding)
    test = sorted(c for c in store.case_ids if store.index[c].get("split") == "test")
    import torch

    with torch.no_grad():
        probs = np.array([predict_case_classification(model, store, c, (32, 32, 32)) for c in test])
    pos = ckpt["class_names"].index("1")
    y = np.array([truth[c] for c in test])
    res = {
        "name": name,
        "finding": finding,
        "source": source,
        "seed": seed,
        "label_count": label_count,
        "n_train": s["n_train"],
        "pretrained": str(pretrained) if pretrained else None,
        "test": auc_ci(y, probs[:, pos], seed=seed),
        "n_test": len(test),
        "seconds": time.perf_counter() - t,
    }
    # agreement of the training labels with the truth (what the model was taught)
    taught = table_targets(
        LabelsTableConfig(catalog=paths["raw"], source=source, uncertain="present"), finding
    )
    train = ckpt["cases"]["train"]
    res["train_label_agreement"] = float(np.mean([taught[c] == truth[c] for c in train]))
    path.write_text(json.dumps(res, indent=1))
    print(
        f"{name}: test AUC {res['test']['auc']:.3f} [{res['test']['lo']:.3f}, {res['test']['hi']:.3f}] in {res['seconds']:.0f} s"
    )
    return res


def pretrain_report_labels(
    paths: dict[str, Path], out: Path, steps: int, lr: float = 3e-4, tag: str = ""
) -> Path:
    from umit.ssl.pretrain import PretrainConfig
    from umit.ssl.pretrain import run as pretrain

    enc = out / f"pretrain_rl{tag}" / "encoder.pt"
    if enc.is_file():
        return enc
    s = pretrain(
        PretrainConfig.model_validate(
            {
                "data": paths["prep"],
                "out": out / f"pretrain_rl{tag}",
                "method": "report_labels",
                "model": ENCODER,
                "crop_size": [32, 32, 32],
                "samples_per_case": 1,
                "val_cases": 20,
                "val_crops": 20,
                "report_labels": {
                    "labels": {"catalog": str(paths["raw"]), "uncertain": "present"},
                    "findings": list(FINDINGS),
                },
                "train": {
                    "total_steps": steps,
                    "batch_size": 8,
                    "lr": lr,
                    "warmup_steps": max(1, steps // 10),
                    "eval_every": max(1, steps // 4),
                    "seed": 0,
                    "progress": False,
                },
            }
        )
    )
    (out / f"pretrain_rl{tag}" / "summary.json").write_text(json.dumps(s, indent=1, default=str))
    print(
        f"pretrain report_labels: val BCE {s['initial_val_loss']:.3f} -> {s['last_val_loss']:.3f}, baseline {s['last_eval'].get('val_baseline_loss')}"
    )
    return enc


def summarize(results: dict[str, Any]) -> str:
    """``table.md``: agreement, classifier AUCs per label source, few-label paired differences."""
    cells = results.get("cells", [])
    lines = ["## Classifiers trained on report / keyword / true labels (test AUC vs truth)", ""]
    lines += [
        "| finding | labels | train-label agreement | test AUC per seed | mean |",
        "|---|---|---|---|---|",
    ]
    groups: dict[tuple, list] = {}
    for c in cells:
        if c["name"].startswith("cls_"):
            groups.setdefault((c["finding"], c["source"]), []).append(c)
    for (f, src), cs in sorted(groups.items()):
        cs.sort(key=lambda c: c["seed"])
        aucs = [c["test"]["auc"] for c in cs]
        agree = np.mean([c["train_label_agreement"] for c in cs])
        lines.append(
            f"| {f} | {src} | {agree:.3f} | {', '.join(f'{a:.3f}' for a in aucs)} | {np.mean(aucs):.3f} |"
        )
    lines += ["", "## Few true labels: report_labels-pretrained vs scratch (pleural_effusion)", ""]
    lines += [
        "| labels | arm | test AUC per seed | mean | paired diff vs scratch, mean [t 95% CI] |",
        "|---|---|---|---|---|",
    ]
    few: dict[tuple, dict[int, float]] = {}
    for c in cells:
        if c["name"].startswith("few_"):
            arm = c["name"].rsplit("_s", 1)[0].split(f"n{c['label_count']}_", 1)[1]
            few.setdefault((c["label_count"], arm), {})[c["seed"]] = c["test"]["auc"]
    for (k, arm), by_seed in sorted(few.items()):
        seeds = sorted(by_seed)
        aucs = [by_seed[s_] for s_ in seeds]
        diff = ""
        scratch = few.get((k, "scratch"), {})
        if arm != "scratch" and all(s_ in scratch for s_ in seeds):
            d = np.array([by_seed[s_] - scratch[s_] for s_ in seeds])
            t = {2: 12.71, 3: 4.30, 4: 3.18, 5: 2.78}.get(len(d), 2.0)
            half = t * d.std(ddof=1) / math.sqrt(len(d)) if len(d) > 1 else math.nan
            diff = f"{d.mean():+.3f} [{d.mean() - half:+.3f}, {d.mean() + half:+.3f}]"
        lines.append(
            f"| {k} | {arm} | {', '.join(f'{a:.3f}' for a in aucs)} | {np.mean(aucs):.3f} | {diff} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/report_labels"))
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--n-test", type=int, default=60)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--pretrain-steps", type=int, default=600)
    ap.add_argument("--pretrain-lr", type=float, default=3e-4)
    ap.add_argument(
        "--pretrain-tag", default="", help="suffix of the pretraining run and its cells"
    )
    ap.add_argument("--few", type=int, nargs="+", default=[8, 16])
    ap.add_argument("--cls-findings", nargs="+", default=["pleural_effusion", "splenomegaly"])
    ap.add_argument("--part", choices=("all", "setup", "classify", "pretrain"), default="all")
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    out = args.out
    cells = out / "cells"
    cells.mkdir(parents=True, exist_ok=True)
    paths = setup(out, args.n, args.n_test, args.workers)
    results_path = out / "results.json"
    results: dict[str, Any] = json.loads(results_path.read_text()) if results_path.is_file() else {}
    results["machine"] = f"{platform.processor() or platform.machine()}, {platform.platform()}"
    keyword_labels(paths)
    results["agreement"] = agreement(paths)
    results["agreement_keywords"] = agreement(paths, "keywords")
    if args.part in ("all", "classify"):
        for f in args.cls_findings:
            for seed in args.seeds:
                for source in ("reports", "keywords", "truth"):
                    finetune_cell(
                        paths,
                        cells,
                        f"cls_{f}_{source}_s{seed}",
                        finding=f,
                        source=source,
                        seed=seed,
                        steps=args.steps,
                    )
    if args.part in ("all", "pretrain"):
        tag = args.pretrain_tag
        enc = pretrain_report_labels(paths, out, args.pretrain_steps, args.pretrain_lr, tag)
        for k in args.few:
            for seed in args.seeds:
                for arm, pre in ((f"pretrained{tag}", enc), ("scratch", None)):
                    finetune_cell(
                        paths,
                        cells,
                        f"few_pleural_effusion_n{k}_{arm}_s{seed}",
                        finding="pleural_effusion",
                        source="truth",
                        seed=seed,
                        steps=args.steps,
                        label_count=k,
                        pretrained=pre,
                    )
    results["cells"] = [json.loads(p.read_text()) for p in sorted(cells.glob("*.json"))]
    results["pretrain"] = {
        p.parent.name: json.loads(p.read_text())
        for p in sorted(out.glob("pretrain_rl*/summary.json"))
    }
    results_path.write_text(json.dumps(results, indent=1, default=str))
    (out / "table.md").write_text(summarize(results))
    for name in ("agreement", "agreement_keywords"):
        print(
            name, {f: round(v["agree_uncertain_as_present"], 3) for f, v in results[name].items()}
        )


if __name__ == "__main__":
    main()
