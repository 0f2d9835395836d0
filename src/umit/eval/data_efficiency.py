"""``umit data-efficiency``: label-budget curves, pretrained vs scratch vs CNN baseline.

For every label budget x seed x arm, fine-tune on a seeded, stratified subset of the training
labels (nested across budgets), evaluate on the fixed test split, and record the result in
``cells/<arm>/<budget>_s<seed>/result.json``. A budget is a fraction of the training cases
(``fractions``, folder ``f0.1``) or a count of cases (``counts``, folder ``n24``; a count at least
the size of the pool is ``all``). Finished cells are not recomputed, so a killed experiment
resumes. ``steps_per_budget`` fixes one schedule per budget for every arm.

Optional extras: ``floors`` (classification: logistic regression on the foreground voxel count and
a linear probe on random-init features, on the same labeled subsets; :mod:`umit.eval.floors`) and
``comparisons`` (paired differences a - b of the headline metric per budget, optionally against
``b`` at ``b_budget_factor`` times the budget, with a hierarchical bootstrap CI over test cases
and seeds; :mod:`umit.eval.paired`). The table (mean ± std over seeds), the comparisons and the
plot of metric versus budget go to ``table.md``, ``results.json`` and ``report.html``; the plot's
error bars are mean ± sd over seeds, or a cell's bootstrap 95% CI over test cases where a point
has one seed (:func:`label_efficiency_figure`).
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import time
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import Field, model_validator

from umit.config import UmitConfig, config_to_dict, deep_merge, save_config
from umit.data.store import Store
from umit.errors import InputError
from umit.eval.evaluate import EvaluateConfig, _rows_to_csv
from umit.eval.evaluate import run as evaluate
from umit.eval.floors import FLOOR_PROBE, FLOOR_VOXELS, floor_rows
from umit.eval.paired import full_metric, paired_difference, read_per_case
from umit.eval.report import Figure, Section, Table, display_name, plot_curves, write_report
from umit.finetune.run import FinetuneConfig, labeled_cases, split_finetune_cases
from umit.finetune.run import run as finetune
from umit.train.loop import OUTPUT_KEYS
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
    pretrained_by_seed: dict[int, Path] | None = None
    """One pretraining replicate per seed, instead of ``pretrained``: seed k's cell starts from
    ``pretrained_by_seed[k]`` (e.g. the output of ``umit pretrain ... train.seed=k``). The paired
    bootstrap resamples seeds, so its CI then covers the pretraining draw as well as the
    fine-tuning one; with a single checkpoint it covers fine-tuning only."""
    harmonise_by_seed: dict[int, Path] | None = None
    """One cross-phase network per seed put frozen in front of the model (fine-tuning's
    ``harmonise``; one for every seed: ``finetune.harmonise``). Like ``pretrained_by_seed``, it
    is the arm's pretraining run for ``cluster_by_pretraining``."""
    finetune: dict[str, Any] = Field(default_factory=dict)
    """Arm-specific fine-tuning overrides (e.g. a different learning rate)."""
    seeds: list[int] | None = None
    """A subset of the experiment's seeds for this arm (a costly arm on fewer seeds); paired
    comparisons use the seeds both arms have."""

    @model_validator(mode="after")
    def _one_source(self) -> ArmConfig:
        if self.pretrained is not None and self.pretrained_by_seed is not None:
            raise ValueError("give pretrained or pretrained_by_seed, not both")
        if self.harmonise_by_seed is not None and "harmonise" in self.finetune:
            raise ValueError("give finetune.harmonise or harmonise_by_seed, not both")
        for name in ("pretrained_by_seed", "harmonise_by_seed"):
            by_seed = getattr(self, name)
            if by_seed is not None and self.seeds is not None:
                missing = sorted(set(self.seeds) - set(by_seed))
                if missing:
                    raise ValueError(f"{name} has no checkpoint for seeds {missing}")
        return self

    @staticmethod
    def _for_seed(by_seed: dict[int, Path], seed: int, name: str) -> Path:
        if seed not in by_seed:
            raise InputError(
                None,
                f"{name} has no checkpoint for seed {seed} (it has seeds {sorted(by_seed)})",
            )
        return by_seed[seed]

    def checkpoint(self, seed: int) -> Path | None:
        """The checkpoint seed ``seed``'s cell starts from (None: from scratch)."""
        if self.pretrained_by_seed is None:
            return self.pretrained
        return self._for_seed(self.pretrained_by_seed, seed, "pretrained_by_seed")

    def harmoniser(self, seed: int) -> Path | None:
        """The cross-phase network in front of seed ``seed``'s model (None: none, or the one
        of ``finetune.harmonise``)."""
        if self.harmonise_by_seed is None:
            return None
        return self._for_seed(self.harmonise_by_seed, seed, "harmonise_by_seed")

    def pretraining_run(self, seed: int) -> str:
        """What seed ``seed``'s cell owes to pretraining ("" for nothing): its checkpoint and
        its harmonising network, the pretraining runs a paired bootstrap clusters by."""
        front = self.harmoniser(seed) or self.finetune.get("harmonise")
        parts = [str(p) for p in (self.checkpoint(seed), front) if p is not None]
        return "+".join(parts)


class ComparisonConfig(UmitConfig):
    """Arm ``a`` at budget n against arm ``b`` at ``b_budget_factor`` x n (same seeds)."""

    a: str
    """The arm expected to be better (e.g. a pretrained one)."""
    b: str
    """The reference arm (e.g. scratch, or a floor)."""
    b_budget_factor: float = Field(default=1.0, gt=0)
    """``b`` is taken at this multiple of ``a``'s budget (2: pretrained at n vs scratch at 2n)."""


@dataclass(frozen=True)
class Budget:
    """One label budget: table column ``key``, cell folder prefix ``folder``."""

    key: str
    folder: str
    fraction: float | None = None
    count: int | None = None
    size: int = 0
    """Labeled cases it asks for (the whole pool for ``all``)."""


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
    tabulate_only: bool = False
    """Run nothing: tabulate the cells (and floors) already finished, e.g. while some still
    run in other processes or when a budget of time ran out; missing cells are left out."""
    only_arms: list[str] | None = None
    """Run only these arms' cells now (e.g. two processes splitting the arms); the tables cover
    the cells this call ran or found finished. A later call without it tabulates everything."""
    finetune: dict[str, Any] = Field(default_factory=dict)
    """Fine-tuning settings shared by all arms (FinetuneConfig fields)."""
    metric: str | None = None
    """Headline metric (default: dice for segmentation, auc for classification)."""
    extra_metrics: list[str] | None = None
    """Further metrics tabulated beside the headline one (default: hd95 and nsd for
    segmentation; accuracy and balanced_accuracy for classification)."""
    n_boot: int = Field(default=200, ge=1)
    """Bootstrap replicates of each cell's test evaluation."""
    counts: list[int] | None = None
    """Label budgets as numbers of labeled training cases (replaces ``fractions``); a count at
    least the size of the training pool means all labels (column ``all``)."""
    steps_per_budget: dict[str, int] | None = None
    """Fixed fine-tuning steps per budget for every arm, keyed by the budget's column name
    (``n24``, ``all``, or a fraction such as ``0.1``); overrides ``train.total_steps`` (also an
    arm's). Budgets not listed keep the shared ``finetune.train.total_steps``."""
    comparisons: list[ComparisonConfig] = Field(default_factory=list)
    """Paired differences a - b of the headline metric with a hierarchical bootstrap CI."""
    floors: bool = False
    """Classification: add the voxel-count and random-init linear-probe floors."""
    floor_encoder_arm: str | None = None
    """Arm whose architecture the random-init probe uses (default: the first arm)."""
    n_boot_paired: int = Field(default=2000, ge=10)
    """Bootstrap replicates of each paired comparison."""
    cluster_by_pretraining: bool = True
    """Where ``pretrained_by_seed`` gives several seeds one checkpoint (fewer pretraining runs
    than seeds), resample the pretraining runs, each with its seeds, instead of the seeds one by
    one: the seeds of one run are not independent draws, and treating them so narrows the CI.
    No effect with one run per seed, or one shared run (:func:`umit.eval.paired.seed_groups`)."""
    eval_cases: list[str] | None = None
    """Score every cell on these training-pool case ids instead of the test split, and keep
    them out of fine-tuning (labeled subsets and validation): a fixed held-out set on which to
    choose a recipe without touching the test set. Test-split ids are refused."""
    eval_split: str | None = None
    """Score on every labeled case of this split instead (e.g. the official ``val``): the same
    as listing them in ``eval_cases``. Not ``test``; not together with ``eval_cases``."""
    workers: int = Field(default=1, ge=1)
    """Cells run at once, each in its own process with one torch thread (1: one after the
    other in this process, with its threads). On a CPU, 2 single-thread cells beat 1 cell with
    2 threads; results are the same either way (seeded per cell)."""


def _as_budget(fraction: float | Budget) -> Budget:
    if isinstance(fraction, Budget):
        return fraction
    return Budget(key=f"{fraction:g}", folder=f"f{fraction:g}", fraction=fraction)


def cell_dir(out: Path, arm: str, budget: float | Budget, seed: int) -> Path:
    return out / "cells" / arm / f"{_as_budget(budget).folder}_s{seed}"


def pool_size(cfg: DataEfficiencyConfig, store: Store) -> int:
    """Training cases a budget draws from (after the validation hold-out)."""
    settings = dict(cfg.finetune)
    settings.pop("train", None)
    ft = FinetuneConfig.model_validate(
        {**settings, "data": cfg.data, "label_seed": 0, **held_out(cfg, settings)}
    )
    return len(split_finetune_cases(store, ft)["train"])


def held_out(cfg: DataEfficiencyConfig, settings: dict[str, Any]) -> dict[str, list[str]]:
    """``exclude_cases`` for the fine-tuning settings: theirs plus ``eval_cases`` (or nothing)."""
    if cfg.eval_cases is None:
        return {}
    return {"exclude_cases": sorted({*settings.get("exclude_cases", []), *cfg.eval_cases})}


def resolve_eval_split(cfg: DataEfficiencyConfig, store: Store) -> DataEfficiencyConfig:
    """``cfg`` with ``eval_split`` turned into the ``eval_cases`` of that split (labeled ones)."""
    if cfg.eval_split is None:
        return cfg
    if cfg.eval_cases is not None:
        raise InputError(None, "set eval_split or eval_cases, not both")
    if cfg.eval_split == "test":
        raise InputError(
            None, "eval_split must not be 'test': it is the set scored once, at the end"
        )
    settings = cfg.finetune or {}
    labeled = labeled_cases(
        store, settings.get("task", "segmentation"), settings.get("label_key", "target")
    )
    cases = [c for c in labeled if store.index[c].get("split") == cfg.eval_split]
    if not cases:
        raise InputError(
            cfg.data, f"eval_split {cfg.eval_split!r} has no labeled cases in this store"
        )
    return cfg.model_copy(update={"eval_cases": sorted(cases)})


def check_eval_cases(cfg: DataEfficiencyConfig, store: Store) -> None:
    """``eval_cases`` name labeled cases of the store outside the test split."""
    if cfg.eval_cases is None:
        return
    if not cfg.eval_cases:
        raise InputError(None, "eval_cases is empty; leave it out to score on the test split")
    unknown = [c for c in cfg.eval_cases if c not in store.index]
    if unknown:
        raise InputError(cfg.data, f"eval_cases not in this store: {unknown[:5]}")
    test = [c for c in cfg.eval_cases if store.index[c].get("split") == "test"]
    if test:
        raise InputError(
            cfg.data,
            f"eval_cases must come from the training pool, not the test split: {test[:5]}",
        )


def make_budgets(cfg: DataEfficiencyConfig, pool: int) -> list[Budget]:
    """The budgets in order: counts (``n<k>`` / ``all``) when given, else fractions."""
    if cfg.counts is None:
        return [
            Budget(key=f"{f:g}", folder=f"f{f:g}", fraction=f, size=max(1, round(f * pool)))
            for f in cfg.fractions
        ]
    out: list[Budget] = []
    for k in sorted(set(cfg.counts)):
        if k < 1:
            raise InputError(None, f"label counts must be >= 1, got {k}")
        b = (
            Budget("all", "all", size=pool)
            if k >= pool
            else Budget(f"n{k}", f"n{k}", count=k, size=k)
        )
        if b not in out:
            out.append(b)
    return out


def cell_finetune_config(
    cfg: DataEfficiencyConfig, arm: ArmConfig, budget: Budget, seed: int, folder: Path
) -> FinetuneConfig:
    """The fine-tuning settings of one cell: shared, arm overrides, budget schedule, seed."""
    settings = deep_merge(cfg.finetune, arm.finetune)  # an arm may override single train keys
    train = dict(settings.pop("train", {}))
    train["seed"] = seed
    steps = (cfg.steps_per_budget or {}).get(budget.key)
    if steps is not None:  # the same fixed schedule for every arm at this budget
        train["total_steps"] = int(steps)
        if int(train.get("warmup_steps", 0)) > steps:
            train["warmup_steps"] = int(steps)
    return FinetuneConfig.model_validate(
        {
            **settings,
            "data": cfg.data,
            "out": folder / "run",
            "model": arm.model,
            "model_args": arm.model_args,
            "pretrained": arm.checkpoint(seed),
            **({"harmonise": arm.harmoniser(seed)} if arm.harmonise_by_seed else {}),
            "label_fraction": budget.fraction,
            "label_count": budget.count,
            "label_seed": seed,
            "train": {**train, "resume": "auto"},
            **held_out(cfg, settings),
        }
    )


def run_cell(
    cfg: DataEfficiencyConfig,
    arm_name: str,
    arm: ArmConfig,
    budget: float | Budget,
    seed: int,
) -> dict[str, Any]:
    """Fine-tune and evaluate one cell (skipped when its result exists)."""

    budget = _as_budget(budget)
    folder = cell_dir(cfg.out, arm_name, budget, seed)
    done = folder / "result.json"
    ft = cell_finetune_config(cfg, arm, budget, seed, folder)
    settings = cell_settings(cfg, ft)
    if done.is_file():
        result = json.loads(done.read_text())
        defaults = cell_settings(cfg, FinetuneConfig(data=ft.data, task=ft.task))
        check_same_settings(done, result.get("settings"), settings, defaults)
        return result
    t0 = time.perf_counter()
    fsum = finetune(ft)
    esum = evaluate(
        EvaluateConfig(
            model=Path(fsum["model"]),
            data=cfg.data,
            out=folder / "eval",
            n_boot=cfg.n_boot,
            cases=cfg.eval_cases,
        )
    )
    overall = {k: v["value"] for k, v in esum["result"]["overall"].items()}
    result = {
        "arm": arm_name,
        "budget": budget.key,
        "fraction": budget.fraction,
        "count": budget.count,
        "seed": seed,
        "steps": ft.train.total_steps,
        "n_labeled": fsum["n_train"],
        "n_test": esum["n_cases"],
        "scored_on": "test" if cfg.eval_cases is None else "eval_cases",
        "test": overall,
        "best_val": fsum["best"],
        "seconds": time.perf_counter() - t0,
        "torch_threads": torch.get_num_threads(),  # results are bit-identical at a fixed count
        "settings": settings,
    }
    atomic_write_json(done, result)
    return result


# Fine-tuning keys that change where a cell writes or what it logs, not what it computes.
_NOT_RESULT_KEYS = frozenset({"out", *(f"train.{k}" for k in OUTPUT_KEYS)})


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def cell_settings(cfg: DataEfficiencyConfig, ft: FinetuneConfig) -> dict[str, Any]:
    """What decides a cell's result, as flat JSON values: its resolved fine-tuning settings
    (less output and logging keys) and how it is scored. Stored in ``result.json`` so that a
    rerun with changed settings cannot silently reuse the old result."""
    flat = {k: v for k, v in _flat(config_to_dict(ft)).items() if k not in _NOT_RESULT_KEYS}
    flat["eval.cases"] = cfg.eval_cases
    flat["eval.n_boot"] = cfg.n_boot
    return json.loads(json.dumps(flat))  # tuples -> lists, as they read back from result.json


def check_same_settings(
    done: Path,
    recorded: dict[str, Any] | None,
    settings: dict[str, Any],
    defaults: dict[str, Any] | None = None,
) -> None:
    """Refuses to reuse a finished cell made with other settings (it names the keys).

    A key the recorded settings lack is a setting added to UMIT after the cell ran. It is not a
    change when its value now is its default (``defaults``: the settings of a default
    :class:`FinetuneConfig`), since a new option's default keeps the behaviour that was there
    before it; at any other value it is one.
    """
    if recorded is None:  # written before settings were recorded: nothing to check against
        log.warning("%s: no settings recorded; reused without a check", done)
        return
    missing = object()
    defaults = defaults or {}
    changed = sorted(
        k for k in recorded.keys() | settings.keys()
        if recorded.get(k, missing) != settings.get(k, missing)
        and not (k not in recorded and k in defaults and settings.get(k) == defaults[k])
    )  # fmt: skip
    if changed:
        raise InputError(
            done,
            f"this finished cell was made with other settings (changed: {', '.join(changed[:8])}"
            f"{', ...' if len(changed) > 8 else ''}); give the study another `out`, or delete "
            "the cell's folder to recompute it",
        )


def _one_thread() -> None:
    torch.set_num_threads(1)


def cell_pool(workers: int) -> ProcessPoolExecutor:
    """A pool of ``workers`` spawned processes with one torch thread each, for :func:`run_cell`
    (and other stages a caller runs beside the cells, e.g. the demo's pretraining)."""
    return ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_one_thread)


def run_cells(
    cfg: DataEfficiencyConfig, cells: list[tuple[str, Budget, int]]
) -> list[dict[str, Any]]:
    """Results of ``cells`` (arm, budget, seed) in order, run ``cfg.workers`` at a time."""
    if cfg.workers <= 1 or len(cells) <= 1:
        out = []
        for i, (a, b, s) in enumerate(cells):
            log.info("cell %d/%d: %s, budget %s, seed %d", i + 1, len(cells), a, b.key, s)
            out.append(run_cell(cfg, a, cfg.arms[a], b, s))
        return out
    workers = min(cfg.workers, len(cells))
    log.info("%d cells in %d single-thread processes", len(cells), workers)
    with cell_pool(workers) as pool:
        futures: list[Future] = [
            pool.submit(run_cell, cfg, a, cfg.arms[a], b, s) for a, b, s in cells
        ]
        out = []
        for i, ((a, b, s), f) in enumerate(zip(cells, futures, strict=True)):
            out.append(f.result())
            log.info("cell %d/%d done: %s, budget %s, seed %d", i + 1, len(cells), a, b.key, s)
        return out


def _budget_key(r: dict[str, Any]) -> str:
    return r.get("budget") or f"{r['fraction']:g}"


def run_floor_cells(
    cfg: DataEfficiencyConfig, budget: Budget, seed: int, C: float = 0.1
) -> list[dict[str, Any]]:
    """Both floors for one budget and seed (skipped when their results exist)."""
    names = [FLOOR_VOXELS, FLOOR_PROBE]
    folders = {n: cell_dir(cfg.out, n, budget, seed) for n in names}
    if all((f / "result.json").is_file() for f in folders.values()):
        return [json.loads((folders[n] / "result.json").read_text()) for n in names]
    arm_name = cfg.floor_encoder_arm or next(iter(cfg.arms))
    if arm_name not in cfg.arms:
        raise InputError(None, f"floor_encoder_arm {arm_name!r} is not an arm")
    arm = cfg.arms[arm_name].model_copy(update={"pretrained": None, "pretrained_by_seed": None})
    ft = cell_finetune_config(cfg, arm, budget, seed, folders[FLOOR_PROBE])
    t0 = time.perf_counter()
    rows = floor_rows(ft, seed, C=C)
    n_train = len(split_finetune_cases(Store(cfg.data), ft)["train"])
    out = []
    for name in names:
        folder = folders[name]
        atomic_write_text(folder / "eval" / "per_case.csv", _rows_to_csv(rows[name]))
        test = {m: full_metric(rows[name], m) for m in ("auc", "accuracy")}
        result = {
            "arm": name,
            "budget": budget.key,
            "fraction": budget.fraction,
            "count": budget.count,
            "seed": seed,
            "n_labeled": n_train,
            "n_test": len(rows[name]),
            "test": {k: (v if v == v else None) for k, v in test.items()},
            "encoder_arm": arm_name if name == FLOOR_PROBE else None,
            "seconds": time.perf_counter() - t0,
        }
        atomic_write_json(folder / "result.json", result)
        out.append(result)
    return out


def compare(cfg: DataEfficiencyConfig, budgets: list[Budget], metric: str) -> list[dict[str, Any]]:
    """Every configured comparison at every budget where both cells exist."""
    out = []
    for comp in cfg.comparisons:
        for ba in budgets:
            target = ba.size * comp.b_budget_factor
            if comp.b_budget_factor == 1:
                bb: Budget | None = ba
            elif ba.key == "all" and comp.b_budget_factor > 1:
                continue  # no larger budget than all labels
            else:  # the budget of that size; "all" only when the target reaches the pool
                everything = next((b for b in budgets if b.key == "all"), None)
                if everything is not None and target >= everything.size:
                    bb = everything
                else:
                    bb = next(
                        (b for b in budgets if b.key != "all" and b.size == round(target)), None
                    )
            if bb is None:
                continue
            tables = {}
            for side, arm, budget in (("a", comp.a, ba), ("b", comp.b, bb)):
                tables[side] = {}
                for s in cfg.seeds:
                    p = cell_dir(cfg.out, arm, budget, s) / "eval" / "per_case.csv"
                    if p.is_file():
                        tables[side][s] = read_per_case(p)
            if not tables["a"] or not tables["b"]:
                continue
            res = paired_difference(
                tables["a"],
                tables["b"],
                metric,
                n_boot=cfg.n_boot_paired,
                seed=0,
                clusters=pretraining_clusters(cfg, comp, tables["a"].keys() & tables["b"].keys()),
            )
            out.append({"a": comp.a, "b": comp.b, "a_budget": ba.key, "b_budget": bb.key, **res})
    return out


def pretraining_clusters(
    cfg: DataEfficiencyConfig, comp: ComparisonConfig, seeds: set[int]
) -> dict[int, tuple[str, str]] | None:
    """Each seed's pair of checkpoints (arm a's, arm b's; "" for scratch or a floor), the groups
    the paired bootstrap resamples together; None when ``cluster_by_pretraining`` is off."""
    if not cfg.cluster_by_pretraining:
        return None

    def ckpt(arm: str, seed: int) -> str:
        spec = cfg.arms.get(arm)  # floors are not arms
        return spec.pretraining_run(seed) if spec is not None else ""

    return {s: (ckpt(comp.a, s), ckpt(comp.b, s)) for s in seeds}


def seeds_label(row: dict[str, Any]) -> str:
    """``10`` for seeds resampled one by one, ``10 (5 runs)`` for seeds resampled by run."""
    k = row.get("n_clusters")
    return f"{row['n_seeds']}" if k is None else f"{row['n_seeds']} ({k} runs)"


def comparisons_markdown(rows: list[dict[str, Any]], metric: str) -> str:
    lines = [
        f"Paired differences a - b of test {metric} (mean over paired seeds; 95% CI: "
        "hierarchical bootstrap over test cases and seeds, or over pretraining runs with their "
        "seeds where runs are shared: seeds (runs))",
        "",
        "| a | budget a | b | budget b | a | b | a - b (95% CI) | CI excludes 0 | seeds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def f(x: float | None) -> str:
        return "-" if x is None else f"{x:.3f}"

    for r in rows:
        ci = "-" if r["ci_low"] is None else f"[{r['ci_low']:+.3f}, {r['ci_high']:+.3f}]"
        diff = "-" if r["diff"] is None else f"{r['diff']:+.3f}"
        lines.append(
            f"| {r['a']} | {r['a_budget']} | {r['b']} | {r['b_budget']} | {f(r.get('a_mean'))} "
            f"| {f(r.get('b_mean'))} | {diff} {ci} | {'yes' if r['excludes_zero'] else 'no'} "
            f"| {seeds_label(r)} |"
        )
    return "\n".join(lines) + "\n"


def summarize(results: list[dict[str, Any]], metric: str) -> dict[str, dict[str, dict[str, float]]]:
    """{arm: {budget: {mean, std, n, n_labeled}}} of the headline metric over seeds."""
    table: dict[str, dict[str, dict[str, float]]] = {}
    for r in results:
        cell = table.setdefault(r["arm"], {}).setdefault(
            _budget_key(r), {"values": [], "n_labeled": r["n_labeled"]}
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


def markdown_table(table: dict, fractions: list[float] | list[str], metric: str) -> str:
    keys = [k if isinstance(k, str) else f"{k:g}" for k in fractions]
    head = "| arm | " + " | ".join(keys) + " |"
    lines = [
        f"Test {metric} (mean ± std over seeds; labeled training cases in brackets)",
        "",
        head,
        "|---" * (len(keys) + 1) + "|",
    ]
    for arm, cells in table.items():
        row = []
        for k in keys:
            c = cells.get(k)
            row.append(
                "-"
                if c is None
                else f"- ({c['n_labeled']}, n=0)"
                if not c["n"]
                else f"{c['mean']:.3f} ± {c['std']:.3f} ({c['n_labeled']}, n={c['n']})"
            )
        lines.append(f"| {arm} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def summary_table(table: dict, budgets: list[Budget], metric: str) -> Table:
    """The table of :func:`summarize` for the report: one row per arm, one column per budget."""
    rows = []
    for arm, cells in table.items():
        row: list[Any] = [arm]
        for b in budgets:
            c = cells.get(b.key)
            sd = f" ± {c['std']:.3f}" if c is not None and c["n"] > 1 else ""
            row.append(
                "-"
                if c is None or not c["n"]
                else f"{c['mean']:.3f}{sd} ({c['n_labeled']}, n={c['n']})"
            )
        rows.append(row)
    return Table(
        ["arm", *(b.key for b in budgets)],
        rows,
        caption=f"Test {display_name(metric)}: mean ± sd over seeds (labeled cases, seeds)",
    )


def comparisons_section(rows: list[dict[str, Any]], metric: str) -> Section:
    """The paired comparisons as a report section."""

    def f(x: float | None, sign: str = "") -> str:
        return "-" if x is None else f"{x:{sign}.3f}"

    return Section(
        title="Paired comparisons",
        text=f"Paired differences a - b of test {display_name(metric)} (mean over paired seeds; "
        "95% CI: hierarchical bootstrap over test cases and seeds, or over pretraining runs with "
        "their seeds where runs are shared: seeds (runs)).",
        tables=[
            Table(
                ["a", "budget a", "b", "budget b", "a", "b", "a - b [95% CI]", "CI excludes 0",
                 "seeds"],
                [
                    [r["a"], r["a_budget"], r["b"], r["b_budget"], f(r.get("a_mean")),
                     f(r.get("b_mean")),
                     "-" if r["diff"] is None else f"{f(r['diff'], '+')} [{f(r['ci_low'], '+')}, "
                     f"{f(r['ci_high'], '+')}]",
                     "yes" if r["excludes_zero"] else "no", seeds_label(r)]
                    for r in rows
                ],
            )
        ],
    )  # fmt: skip


def cell_ci(out: Path, arm: str, budget: Budget, seed: int, metric: str):
    """A cell's bootstrap CI over test cases, from its ``eval/summary.json`` (None if absent)."""
    path = cell_dir(out, arm, budget, seed) / "eval" / "summary.json"
    try:
        m = json.loads(path.read_text())["result"]["overall"][metric]
    except (OSError, KeyError, ValueError):
        return None
    if m.get("ci_low") is None or m.get("ci_high") is None:
        return None
    return float(m["ci_low"]), float(m["ci_high"])


def label_efficiency_figure(
    out: Path,
    results: list[dict[str, Any]],
    budgets: list[Budget],
    metric: str,
    *,
    xlabel: str = "labeled training cases",
    use_counts: bool = True,
    log_x: bool = True,
) -> Figure | None:
    """Test ``metric`` vs label budget per arm, with error bars.

    A point with two or more seeds shows mean ± sd over seeds; a point with one seed shows that
    cell's percentile-bootstrap 95% CI over the test cases (read from ``eval/summary.json``). The
    caption says which. None when no cell has a value (e.g. an AUC undefined on one-class tests).

    Args:
        out: Experiment folder (for the cells' evaluation summaries).
        results: Cell results (``result.json`` contents).
        budgets: The budgets in order (x positions: their sizes, or fractions when not
            ``use_counts``).
    """
    xs = [float(b.size) if use_counts else float(b.fraction or 0) for b in budgets]
    series: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    seeds_used: set[int] = set()
    kinds: set[str] = set()
    n_test: set[int] = set()
    for arm in dict.fromkeys(r["arm"] for r in results):
        mean, lo, hi = (np.full(len(budgets), np.nan) for _ in range(3))
        for i, b in enumerate(budgets):
            cells = [r for r in results if r["arm"] == arm and _budget_key(r) == b.key]
            vals = {
                r["seed"]: float(r["test"][metric])
                for r in cells
                if r["test"].get(metric) is not None and np.isfinite(r["test"][metric])
            }
            if not vals:
                continue
            seeds_used |= set(vals)
            n_test |= {int(r["n_test"]) for r in cells if r.get("n_test")}
            v = np.array(list(vals.values()))
            mean[i] = v.mean()
            if v.size > 1:
                sd = v.std(ddof=1)
                lo[i], hi[i] = mean[i] - sd, mean[i] + sd
                kinds.add("sd")
            else:
                ci = cell_ci(out, arm, b, next(iter(vals)), metric)
                if ci is not None:
                    lo[i], hi[i] = ci
                    kinds.add("ci")
        if np.isfinite(mean).any():
            series[arm] = (mean, lo, hi)
    if not series:
        return None
    bars = []
    if "sd" in kinds:
        bars.append(f"mean ± sd over seeds ({len(seeds_used)} seeds)")
    if "ci" in kinds:
        cases = f" {min(n_test)}" if len(n_test) == 1 else ""
        bars.append(
            f"{'where a point has one seed, ' if 'sd' in kinds else 'one seed: '}its 95% "
            f"bootstrap CI over the{cases} test cases"
        )
    caption = (
        f"Label efficiency: test {display_name(metric)} vs {xlabel}. Error bars: "
        + ("; ".join(bars) if bars else "none (one seed, no CI)")
        + ". Points of different arms are drawn slightly apart along x."
    )
    return plot_curves(
        xs,
        series,
        xlabel=xlabel,
        ylabel=f"test {display_name(metric).split(',')[0]}",
        title="Label efficiency",
        log_x=log_x and all(x > 0 for x in xs),
        caption=caption,
    )


def run(cfg: DataEfficiencyConfig) -> dict[str, Any]:
    """Run every missing cell, then write the table, results and report."""

    if not cfg.arms:
        raise InputError(None, "data-efficiency needs at least one arm (arms.<name>.model=...)")
    reserved = {FLOOR_VOXELS, FLOOR_PROBE} & set(cfg.arms)
    if reserved:
        raise InputError(None, f"arm names {sorted(reserved)} are reserved for the floors")
    store = Store(cfg.data)
    if not any(store.index[c].get("split") == "test" for c in store.case_ids):
        raise InputError(cfg.data, "the store has no 'test' split to evaluate on")
    cfg = resolve_eval_split(cfg, store)
    check_eval_cases(cfg, store)
    task = (cfg.finetune or {}).get("task", "segmentation")
    names = set(cfg.arms) | ({FLOOR_VOXELS, FLOOR_PROBE} if cfg.floors else set())
    for comp in cfg.comparisons:
        for arm in (comp.a, comp.b):
            if arm not in names:
                raise InputError(None, f"comparison arm {arm!r} is neither an arm nor a floor")
    budgets = make_budgets(cfg, pool_size(cfg, store) if cfg.counts is not None else 0)
    cfg.out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, cfg.out)
    results = []
    if cfg.only_arms is not None:
        unknown = sorted(set(cfg.only_arms) - set(cfg.arms))
        if unknown:
            raise InputError(
                None, f"only_arms names unknown arms {unknown}; arms: {sorted(cfg.arms)}"
            )
    cells = [
        (a, b, s)
        for b in budgets
        for s in cfg.seeds
        for a, arm in cfg.arms.items()
        if (arm.seeds is None or s in arm.seeds) and (cfg.only_arms is None or a in cfg.only_arms)
    ]
    for a, _, s in cells:  # a seed without its pretraining replicate fails now, not later
        cfg.arms[a].checkpoint(s)
        cfg.arms[a].harmoniser(s)
    if cfg.tabulate_only:
        cells = [c for c in cells if (cell_dir(cfg.out, *c) / "result.json").is_file()]
    results.extend(run_cells(cfg, cells))
    if cfg.floors and task == "classification":
        for budget in budgets:
            for seed in cfg.seeds:
                done = [
                    cell_dir(cfg.out, n, budget, seed) / "result.json"
                    for n in (FLOOR_VOXELS, FLOOR_PROBE)
                ]
                if cfg.tabulate_only and not all(d.is_file() for d in done):
                    continue
                results.extend(run_floor_cells(cfg, budget, seed))
    elif cfg.floors:
        log.warning("floors are defined for classification only; skipped for %s", task)
    metric = cfg.metric or ("dice" if task == "segmentation" else "auc")
    table = summarize(results, metric)
    extra = cfg.extra_metrics
    if extra is None:
        extra = ["hd95", "nsd"] if task == "segmentation" else ["accuracy", "balanced_accuracy"]
    tables = {m: summarize(results, m) for m in [metric, *extra] if m != metric}
    keys = [b.key for b in budgets]
    comparisons = compare(cfg, budgets, metric)
    scored = (
        []
        if cfg.eval_cases is None
        else [
            f"Scored on {len(cfg.eval_cases)} held-out training-pool cases (eval_cases), not on "
            "the test split; 'Test' below means these cases.\n"
        ]
    )
    md = "\n".join(
        scored
        + [markdown_table(table, keys, metric)]
        + [markdown_table(t, keys, m) for m, t in tables.items() if _has_values(t)]
        + ([comparisons_markdown(comparisons, metric)] if comparisons else [])
    )
    atomic_write_json(
        cfg.out / "results.json",
        {
            "metric": metric,
            "budgets": [b.__dict__ for b in budgets],
            "table": table,
            "other_tables": tables,
            "comparisons": comparisons,
            "cells": results,
        },
    )
    atomic_write_text(cfg.out / "table.md", md)
    fig = label_efficiency_figure(
        cfg.out,
        results,
        budgets,
        metric,
        xlabel="labeled training cases"
        if cfg.counts is not None
        else "labeled fraction of training cases",
        use_counts=cfg.counts is not None,
    )
    sections = [
        Section(
            title="Test metric vs label budget",
            text=f"Test {display_name(metric)} of every arm at every label budget, mean ± sd "
            "over seeds (labeled training cases and seeds with a value in brackets).",
            tables=[summary_table(t, budgets, m) for m, t in [(metric, table), *tables.items()]
                    if _has_values(t)],
            figures=[fig] if fig is not None else [],
        )
    ]  # fmt: skip
    if comparisons:
        sections.append(comparisons_section(comparisons, metric))
    paths = write_report(cfg.out, "UMIT label-efficiency experiment", sections)
    return {
        "out": str(cfg.out),
        "metric": metric,
        "table": table,
        "comparisons": comparisons,
        "cells": results,
        "markdown": md,
        "report": str(paths["html"]),
    }
