"""``umit evaluate``: a fine-tuned model on a split of a preprocessed store, overall and per subgroup.

Per case: Dice, HD95 and normalized surface Dice per label (segmentation, on the store grid with
its spacing), or class probabilities (classification). Then overall and per-subgroup metrics
(any index attribute: sex, age band, site, scanner, contrast) with bootstrap 95% CIs, group sizes,
the largest gap between groups and small-group warnings. Writes ``per_case.csv``,
``summary.json``, ``subgroups.csv`` and ``report.md`` / ``report.html`` (plots, slice overlays).
"""

from __future__ import annotations

import csv
import io
import logging
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field

from umit.config import UmitConfig, save_config
from umit.data.cases import case_label
from umit.data.store import Store
from umit.errors import InputError
from umit.eval.report import (
    Section,
    Table,
    fmt_ci,
    plot_slice_overlays,
    subgroup_section,
    write_report,
)
from umit.eval.subgroup import MetricSpec, analyze_subgroups, write_subgroup_csv
from umit.inference.segment import predict_case_classification, predict_case_segmentation
from umit.metrics import segmentation_metrics
from umit.train.checkpoint import InferenceSpec, load_model
from umit.train.dp import format_dp
from umit.utils.fileio import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)

DEFAULT_ATTRIBUTES = ["sex", "age_band", "site", "manufacturer", "contrast"]


class EvaluateConfig(UmitConfig):
    """Settings of ``umit evaluate``."""

    model: Path
    """Fine-tuned model (``best.pt`` from ``umit finetune``)."""
    data: Path
    """Preprocessed store (PREP) holding the cases to evaluate."""
    out: Path | None = None
    """Output folder (default: ``<model folder>/eval_<split>``)."""
    split: str = "test"
    """Store split to evaluate (``all`` for every case with a reference)."""
    attributes: list[str] = Field(default_factory=lambda: list(DEFAULT_ATTRIBUTES))
    """Index attributes to break results down by (those absent from the store are skipped)."""
    n_boot: int = Field(default=1000, ge=1)
    """Bootstrap replicates for the confidence intervals."""
    min_group_size: int = Field(default=10, ge=1)
    """Groups smaller than this are flagged too small to judge."""
    nsd_tolerance_mm: float = Field(default=2.0, gt=0)
    """Tolerance of the normalized surface Dice."""
    overlays: int = Field(default=4, ge=0)
    """Cases shown as slice overlays in the report (segmentation)."""
    seed: int = 0
    """Seed of the bootstrap."""


def _rows_to_csv(rows: list[dict[str, Any]]) -> str:
    cols: list[str] = []
    for r in rows:
        cols.extend(k for k in r if k not in cols)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols)
    w.writeheader()
    for r in rows:
        w.writerow(
            {
                k: (
                    r.get(k)
                    if not isinstance(r.get(k), list)
                    else " ".join(f"{v:.6g}" for v in r[k])
                )
                for k in cols
            }
        )
    return buf.getvalue()


def evaluate_cases(
    model, ckpt: dict[str, Any], store, cases: list[str], cfg: EvaluateConfig
) -> tuple[list[dict], list[dict]]:
    """Per-case rows (metrics + attributes) and overlay material."""
    spec = InferenceSpec.model_validate(ckpt["spec"])
    task = spec.task
    rows, overlays = [], []
    names = list(ckpt.get("class_names") or [])
    for c in cases:
        entry = store.index[c]
        row: dict[str, Any] = {
            "case_id": c,
            **{a: entry.get(a) for a in cfg.attributes if a in entry},
        }
        if task == "segmentation":
            pred = predict_case_segmentation(model, store, c, spec)
            ref = np.asarray(store.case(c).read_label())
            labels = (
                sorted(int(k) for k in (ckpt.get("label_names") or {}).values() if int(k) > 0)
                or None
            )
            per = segmentation_metrics(
                pred, ref, store.case(c).spacing, labels, nsd_tolerance_mm=cfg.nsd_tolerance_mm
            )
            for lab, m in per.items():
                for k, v in m.items():
                    row[f"{k}_{lab}"] = v
            for k in ("dice", "hd95", "nsd"):
                vals = [m[k] for m in per.values() if m[k] == m[k] and np.isfinite(m[k])]
                row[f"{k}_mean"] = float(np.mean(vals)) if vals else float("nan")
            if len(overlays) < cfg.overlays:
                overlays.append(
                    {
                        "case_id": c,
                        "image": np.asarray(store.case(c).read()[0], np.float32),
                        "pred": pred,
                        "ref": ref,
                    }
                )
        else:
            label = str(case_label(entry, ckpt.get("label_key", "target")))
            if label not in names:
                continue
            probs = predict_case_classification(model, store, c, tuple(spec.roi_size))
            row["label"] = names.index(label)
            row["score"] = float(probs[1]) if len(names) == 2 else [float(p) for p in probs]
            row["pred"] = names[int(np.argmax(probs))]
        rows.append(row)
    return rows, overlays


def run(cfg: EvaluateConfig) -> dict[str, Any]:
    """Evaluate; returns the summary (overall metrics with CIs, subgroup results, paths)."""

    model, ckpt = load_model(cfg.model)
    store = Store(cfg.data)
    task = ckpt["task"]
    cases = [
        c for c in store.case_ids if cfg.split == "all" or store.index[c].get("split") == cfg.split
    ]
    if task == "segmentation":
        cases = [c for c in cases if store.index[c].get("has_label")]
    if not cases:
        raise InputError(cfg.data, f"no cases with a reference in split {cfg.split!r}")
    out = cfg.out or Path(cfg.model).parent / f"eval_{cfg.split}"
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out, name="evaluate_config.yaml")
    rows, overlays = evaluate_cases(model, ckpt, store, cases, cfg)
    attributes = [a for a in cfg.attributes if any(r.get(a) is not None for r in rows)]
    if task == "segmentation":
        labels = sorted(
            {
                k.split("_", 1)[1]
                for r in rows
                for k in r
                if k.startswith("dice_") and k != "dice_mean"
            }
        )
        metrics = [
            MetricSpec.mean("dice_mean", "dice"),
            MetricSpec.mean("hd95_mean", "hd95", higher_is_better=False),
            MetricSpec.mean("nsd_mean", "nsd"),
        ]
        metrics += [MetricSpec.mean(f"dice_{lab}") for lab in labels]
    else:
        metrics = [MetricSpec.auc(), MetricSpec.accuracy(), MetricSpec.balanced_accuracy()]
        if len(ckpt.get("class_names") or []) == 2:
            metrics.append(MetricSpec.ece())
    result = analyze_subgroups(
        rows,
        metrics,
        attributes,
        n_boot=cfg.n_boot,
        seed=cfg.seed,
        min_group_size=cfg.min_group_size,
    )
    atomic_write_text(out / "per_case.csv", _rows_to_csv(rows))
    write_subgroup_csv(result, out / "subgroups.csv")
    summary = {
        "model": str(cfg.model),
        "data": str(cfg.data),
        "split": cfg.split,
        "task": task,
        "n_cases": len(rows),
        "result": result,
        "dp": ckpt.get("dp"),
    }
    atomic_write_json(out / "summary.json", summary)
    overall = result["overall"]
    table = Table(
        header=["metric", "value (95% CI)", "cases"],
        rows=[
            [m, fmt_ci(v["value"], v["ci_low"], v["ci_high"]), v.get("n_with_value")]
            for m, v in overall.items()
        ],
        caption=f"{task} on split '{cfg.split}' ({len(rows)} cases)",
    )
    sections = [Section(title="Overall", tables=[table], warnings=list(result.get("warnings", [])))]
    if ckpt.get("dp"):  # trained with DP-SGD: state the guarantee next to the metrics
        sections.append(Section(title="Differential privacy", text=format_dp(ckpt["dp"])))
    if attributes:
        sections.append(subgroup_section(result))
    if overlays:
        label_names = (
            {int(v): k for k, v in (ckpt.get("label_names") or {}).items()}
            if ckpt.get("label_names")
            else None
        )
        fig = (
            plot_slice_overlays(overlays) if label_names is None else plot_slice_overlays(overlays)
        )
        sections.append(Section(title="Predictions", figures=[fig]))
    paths = write_report(out, f"UMIT evaluation: {Path(cfg.model).parent.name}", sections)
    summary["report"] = str(paths["html"])
    summary["out"] = str(out)
    return summary
