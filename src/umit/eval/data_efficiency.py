"""``umit data-efficiency``: label-fraction curves, pretrained vs scratch vs CNN baseline.

For every label fraction x seed x arm, fine-tune on a seeded, stratified subset of the training
labels (nested across fractions), evaluate on the fixed test split, and record the result in
``cells/<arm>/f<fraction>_s<seed>/result.json``. Finished cells are not recomputed, so a killed
experiment resumes. The table (mean ± std over seeds) and the plot of metric versus labeled
fraction go to ``table.md``, ``results.json`` and ``report.html``.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field

from umit.config import UmitConfig, deep_merge, save_config
from umit.data.store import Store
from umit.errors import InputError
from umit.eval.evaluate import EvaluateConfig
from umit.eval.evaluate import run as evaluate
from umit.eval.report import Section, plot_curves, write_report
from umit.finetune.run import FinetuneConfig
from umit.finetune.run import run as finetune
from umit.utils.fileio import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)


class ArmConfig(UmitConfig):
    """One compared model."""

    model: str
    """Registered model name."""
    model_args: dict[str, Any] = Field(default_factory=dict)
    """Model keyword arguments."""
    pretrained: Path | None = None
    """Encoder checkpoint to start from (None: from scratch)."""
    finetune: dict[str, Any] = Field(default_factory=dict)
    """Arm-specific fine-tuning overrides (e.g. a different learning rate)."""


class DataEfficiencyConfig(UmitConfig):
    """Settings of ``umit data-efficiency``."""

    data: Path
    """Preprocessed store with a test split."""
    out: Path = Path("runs/data_efficiency")
    """Experiment folder (resumable)."""
    fractions: list[float] = Field(default_factory=lambda: [0.01, 0.05, 0.1, 0.25, 0.5, 1.0])
    """Labeled fractions of the training cases."""
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2])
    """Seeds (label subset, initialization, data order)."""
    arms: dict[str, ArmConfig] = Field(default_factory=dict)
    """Compared models, e.g. pretrained / scratch / cnn."""
    finetune: dict[str, Any] = Field(default_factory=dict)
    """Fine-tuning settings shared by all arms (FinetuneConfig fields)."""
    metric: str | None = None
    """Headline metric (default: dice for segmentation, auc for classification)."""
    extra_metrics: list[str] | None = None
    """Further metrics tabulated beside the headline one (default: hd95 and nsd for
    segmentation; accuracy and balanced_accuracy for classification)."""
    n_boot: int = Field(default=200, ge=1)
    """Bootstrap replicates of each cell's test evaluation."""


def cell_dir(out: Path, arm: str, fraction: float, seed: int) -> Path:
    return out / "cells" / arm / f"f{fraction:g}_s{seed}"


def run_cell(
    cfg: DataEfficiencyConfig, arm_name: str, arm: ArmConfig, fraction: float, seed: int
) -> dict[str, Any]:
    """Fine-tune and evaluate one cell (skipped when its result exists)."""

    folder = cell_dir(cfg.out, arm_name, fraction, seed)
    done = folder / "result.json"
    if done.is_file():
        return json.loads(done.read_text())
    settings = deep_merge(cfg.finetune, arm.finetune)  # an arm may override single train keys
    train = dict(settings.pop("train", {}))
    train["seed"] = seed
    ft = FinetuneConfig.model_validate(
        {
            **settings,
            "data": cfg.data,
            "out": folder / "run",
            "model": arm.model,
            "model_args": arm.model_args,
            "pretrained": arm.pretrained,
            "label_fraction": fraction,
            "label_seed": seed,
            "train": {**train, "resume": "auto"},
        }
    )
    t0 = time.perf_counter()
    fsum = finetune(ft)
    esum = evaluate(
        EvaluateConfig(
            model=Path(fsum["model"]), data=cfg.data, out=folder / "eval", n_boot=cfg.n_boot
        )
    )
    overall = {k: v["value"] for k, v in esum["result"]["overall"].items()}
    result = {
        "arm": arm_name,
        "fraction": fraction,
        "seed": seed,
        "n_labeled": fsum["n_train"],
        "n_test": esum["n_cases"],
        "test": overall,
        "best_val": fsum["best"],
        "seconds": time.perf_counter() - t0,
    }
    atomic_write_json(done, result)
    return result


def summarize(results: list[dict[str, Any]], metric: str) -> dict[str, dict[str, dict[str, float]]]:
    """{arm: {fraction: {mean, std, n, n_labeled}}} of the headline metric over seeds."""
    table: dict[str, dict[str, dict[str, float]]] = {}
    for r in results:
        cell = table.setdefault(r["arm"], {}).setdefault(
            f"{r['fraction']:g}", {"values": [], "n_labeled": r["n_labeled"]}
        )
        v = r["test"].get(metric)
        if v is not None and v == v:
            cell["values"].append(float(v))
    for arm in table.values():
        for cell in arm.values():
            vals = cell.pop("values")
            cell.update(
                mean=float(np.mean(vals)) if vals else float("nan"),
                std=float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0,
                n=len(vals),
            )
    return table


def _has_values(table: dict) -> bool:
    return any(c["n"] for cells in table.values() for c in cells.values())


def markdown_table(table: dict, fractions: list[float], metric: str) -> str:
    head = "| arm | " + " | ".join(f"{f:g}" for f in fractions) + " |"
    lines = [
        f"Test {metric} (mean ± std over seeds; labeled training cases in brackets)",
        "",
        head,
        "|---" * (len(fractions) + 1) + "|",
    ]
    for arm, cells in table.items():
        row = []
        for f in fractions:
            c = cells.get(f"{f:g}")
            row.append(
                "-"
                if c is None
                else f"{c['mean']:.3f} ± {c['std']:.3f} ({c['n_labeled']}, n={c['n']})"
            )
        lines.append(f"| {arm} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def run(cfg: DataEfficiencyConfig) -> dict[str, Any]:
    """Run every missing cell, then write the table, results and report."""

    if not cfg.arms:
        raise InputError(None, "data-efficiency needs at least one arm (arms.<name>.model=...)")
    store = Store(cfg.data)
    if not any(store.index[c].get("split") == "test" for c in store.case_ids):
        raise InputError(cfg.data, "the store has no 'test' split to evaluate on")
    cfg.out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, cfg.out)
    results = []
    cells = [(a, f, s) for f in cfg.fractions for s in cfg.seeds for a in cfg.arms]
    for i, (arm, fraction, seed) in enumerate(cells):
        log.info("cell %d/%d: %s, fraction %g, seed %d", i + 1, len(cells), arm, fraction, seed)
        results.append(run_cell(cfg, arm, cfg.arms[arm], fraction, seed))
    task = (cfg.finetune or {}).get("task", "segmentation")
    metric = cfg.metric or ("dice" if task == "segmentation" else "auc")
    table = summarize(results, metric)
    extra = cfg.extra_metrics
    if extra is None:
        extra = ["hd95", "nsd"] if task == "segmentation" else ["accuracy", "balanced_accuracy"]
    tables = {m: summarize(results, m) for m in [metric, *extra] if m != metric}
    md = "\n".join(
        [markdown_table(table, cfg.fractions, metric)]
        + [markdown_table(t, cfg.fractions, m) for m, t in tables.items() if _has_values(t)]
    )
    atomic_write_json(
        cfg.out / "results.json",
        {"metric": metric, "table": table, "other_tables": tables, "cells": results},
    )
    atomic_write_text(cfg.out / "table.md", md)
    series = {
        arm: np.array([[cells.get(f"{f:g}", {}).get("mean", np.nan) for f in cfg.fractions]])
        for arm, cells in table.items()
    }
    runs = {
        arm: np.array(
            [
                [
                    next(
                        (
                            r["test"].get(metric, np.nan)
                            for r in results
                            if r["arm"] == arm and r["fraction"] == f and r["seed"] == s
                        ),
                        np.nan,
                    )
                    for f in cfg.fractions
                ]
                for s in cfg.seeds
            ]
        )
        for arm in table
    }
    fig = plot_curves(
        cfg.fractions,
        runs or series,
        xlabel="labeled fraction of training cases",
        ylabel=metric,
        title="Label efficiency",
        log_x=True,
    )
    paths = write_report(
        cfg.out,
        "UMIT label-fraction experiment",
        [Section(title="Test metric vs labeled fraction", text=md, figures=[fig])],
    )
    return {
        "out": str(cfg.out),
        "metric": metric,
        "table": table,
        "markdown": md,
        "report": str(paths["html"]),
    }
