"""``umit evaluate``: a fine-tuned model on a split of a preprocessed store, overall and per subgroup.

Per case: Dice, HD95 and normalized surface Dice per label (segmentation, on the store grid with
its spacing), or class probabilities (classification). Then overall and per-subgroup metrics
(any index attribute: sex, age band, site, scanner, contrast) with bootstrap 95% CIs, group sizes,
the largest gap between groups and small-group warnings. Writes ``per_case.csv``,
``summary.json``, ``subgroups.csv`` (machine-readable keys such as ``dice_4``) and
``report.md`` / ``report.html`` for a reader: structures by name (from the model's inference
spec, else the store's plan, i.e. the dataset's ``dataset.json``), a per-structure table, the
best, median and worst case in three views with reference and predicted outlines, and the
subgroup tables and plots.
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
from umit.eval.case_views import (
    case_figure,
    select_cases,
    structure_dice,
    structure_name,
    worst_structure,
)
from umit.eval.explain_views import explain_section
from umit.eval.report import (
    Section,
    Table,
    display_names,
    fmt,
    fmt_ci,
    subgroup_section,
    write_report,
)
from umit.eval.shift import (
    NEEDS_LABEL_MAP,
    PERTURBATIONS,
    headline_curves,
    run_perturbations,
    shift_figure,
    site_shift,
    summarize_shift,
)
from umit.eval.subgroup import MetricSpec, analyze_subgroups, write_subgroup_csv
from umit.inference.segment import predict_case_classification, predict_case_segmentation
from umit.labels.table import LabelsTableConfig, overlay_index
from umit.metrics import segmentation_metrics
from umit.models.absent import DropChannels
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
    cases: list[str] | None = None
    """Evaluate exactly these case ids instead of ``split`` (e.g. a held-out set that chooses a
    recipe without touching the test split); refused when the model trained on any of them."""
    attributes: list[str] = Field(default_factory=lambda: list(DEFAULT_ATTRIBUTES))
    """Index attributes to break results down by (those absent from the store are skipped)."""
    n_boot: int = Field(default=1000, ge=1)
    """Bootstrap replicates for the confidence intervals."""
    min_group_size: int = Field(default=10, ge=1)
    """Groups smaller than this are flagged too small to judge."""
    nsd_tolerance_mm: float = Field(default=2.0, gt=0)
    """Tolerance of the normalized surface Dice."""
    case_figures: bool = True
    """Show the best, median and worst case by mean Dice in the report, each in three views
    (segmentation; the three cases are predicted once more for the figures)."""
    explain_figures: bool = True
    """Show where the model looked (``umit explain`` maps) on two cases in the report: the median
    and worst by mean Dice queried at their worst structure (segmentation), the most confident
    case of each class (classification); :mod:`umit.eval.explain_views`."""
    seed: int = 0
    """Seed of the bootstrap."""
    labels: LabelsTableConfig | None = None
    """Classification: take the reference label (the model's ``label_key``, a finding) from the
    catalog's labels table (``labels.catalog=RAW``, e.g. ``labels.source=truth`` for a model
    trained on report labels) instead of the store index."""
    drop_channels: list[str] = Field(default_factory=list)
    """Input channels (sequence names of the model's spec, e.g. ``[FLAIR]``) treated as missing
    at inference: absent for a model trained with ``channel_dropout`` (its learned absent
    embedding), 0 (the normalised mean) for any other model."""
    shift: list[str] = Field(default_factory=list)
    """Shift suite: perturbations of the test images to score at ``shift_strengths`` (``all``,
    or some of noise, blur, bias_field, intensity_remap, resolution, texture;
    :mod:`umit.eval.shift`). Writes ``shift.csv``, ``shift.json`` and ``shift.png``."""
    shift_strengths: list[float] = Field(default_factory=lambda: [0.25, 0.5, 0.75, 1.0])
    """Perturbation strengths in [0, 1] (0, the unperturbed image, is always scored)."""
    shift_cases: int | None = Field(default=None, ge=1)
    """Score the shift suite on the first N evaluated cases only (it costs one prediction per
    case, perturbation and strength)."""
    loso: bool = False
    """Leave-one-site-out: compare the sites absent from the model's training cases with those
    present (per-site metric, unseen - seen difference with a bootstrap CI)."""


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


def structure_names(ckpt: dict[str, Any], store: Store) -> dict[int, str]:
    """Label value -> structure name: the model's inference spec, else the store's plan (the
    dataset's ``dataset.json`` labels); background left out."""
    names = ckpt.get("label_names") or store.plan.labels or {}
    return {int(v): str(k) for k, v in names.items() if int(v) > 0}


def evaluate_cases(
    model, ckpt: dict[str, Any], store, cases: list[str], cfg: EvaluateConfig
) -> list[dict[str, Any]]:
    """Per-case rows: metrics (``dice_<label>``, ``dice_mean``, ...) and attributes."""
    spec = InferenceSpec.model_validate(ckpt["spec"])
    task = spec.task
    rows = []
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
        else:
            label = str(case_label(entry, ckpt.get("label_key", "target")))
            if label not in names:
                continue
            probs = predict_case_classification(model, store, c, tuple(spec.roi_size))
            row["label"] = names.index(label)
            row["score"] = float(probs[1]) if len(names) == 2 else [float(p) for p in probs]
            row["pred"] = names[int(np.argmax(probs))]
        rows.append(row)
    return rows


def _number(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


def _per_label(rows: list[dict[str, Any]], metric: str) -> dict[int, float]:
    """Label -> mean of ``<metric>_<label>`` over the cases with a finite value (numbers or CSV
    strings)."""
    out: dict[int, float] = {}
    for key in {k for r in rows for k in r}:
        base, _, lab = key.partition("_")
        if base == metric and lab.isdigit():
            vals = [v for v in (_number(r.get(key)) for r in rows) if np.isfinite(v)]
            out[int(lab)] = float(np.mean(vals)) if vals else float("nan")
    return out


def structure_table(result: dict[str, Any], rows: list[dict[str, Any]], names: dict[int, str]):
    """One row per structure: Dice [CI], mean HD95 and NSD, cases with a value.

    Args:
        result: The :func:`~umit.eval.subgroup.analyze_subgroups` result (``dice_<label>``).
        rows: Per-case rows (from :func:`evaluate_cases` or ``per_case.csv``).
        names: Label value -> structure name.
    """
    hd95, nsd = _per_label(rows, "hd95"), _per_label(rows, "nsd")
    labels = sorted(_per_label(rows, "dice"))
    pct = int(round(100 * result["ci"]))
    body = []
    for lab in labels:
        d = result["overall"][f"dice_{lab}"]
        body.append(
            [
                structure_name(lab, names),
                lab,
                fmt_ci(d["value"], d["ci_low"], d["ci_high"]),
                fmt(hd95.get(lab), 1),
                fmt(nsd.get(lab)),
                d["n_with_value"],
            ]
        )
    return Table(
        ["structure", "label", f"Dice [{pct}% CI]", "HD95 (mm), mean", "NSD, mean", "cases"],
        body,
        caption="Per structure (means over the cases with the structure in the reference or "
        "the prediction)",
    )


def case_section(
    model, ckpt: dict[str, Any], store, rows: list[dict[str, Any]], names: dict[int, str]
) -> Section | None:
    """The best, median and worst case by mean Dice, each in three views (predicted again).

    Args:
        rows: Per-case rows of :func:`evaluate_cases` (or read back from ``per_case.csv``).
        names: Label value -> structure name.
    """
    picks = select_cases({r["case_id"]: r.get("dice_mean") for r in rows})
    if not picks:
        return None
    spec = InferenceSpec.model_validate(ckpt["spec"])
    by_id = {r["case_id"]: r for r in rows}
    figures, table = [], []
    for pick in picks:
        c = pick["case_id"]
        case = store.case(c)
        dice = structure_dice(by_id[c])
        worst = worst_structure(dice)
        table.append(
            [
                pick["role"],
                c,
                f"{pick['dice']:.3f}",
                "-" if worst is None else f"{structure_name(worst[0], names)} ({worst[1]:.3f})",
            ]
        )
        figures.append(
            case_figure(
                pick,
                np.asarray(case.read()[0], np.float32),
                predict_case_segmentation(model, store, c, spec),
                np.asarray(case.read_label()),
                dice=dice,
                structures=names,
                affine=case.affine,
                n_cases=len(rows),
            )
        )
    return Section(
        title="Best, median and worst case",
        text=(
            f"The cases with the highest, the median and the lowest mean Dice of the {len(rows)} "
            "evaluated, each in axial, coronal and sagittal slices through the centre of its "
            "worst structure. Reference outlines are green, predicted outlines magenta."
        ),
        tables=[Table(["case", "case id", "mean Dice", "worst structure (Dice)"], table)],
        figures=figures,
    )


def with_missing_channels(model: Any, ckpt: dict[str, Any], cfg: EvaluateConfig) -> Any:
    """``model`` seeing the channels ``cfg.drop_channels`` as missing (:class:`DropChannels`).

    Raises:
        InputError: a name that is not a channel of the model, or every channel dropped.
    """
    spec = InferenceSpec.model_validate(ckpt["spec"])
    names = list(spec.channels)
    unknown = [n for n in cfg.drop_channels if n not in names]
    if unknown:
        raise InputError(
            cfg.model,
            f"drop_channels {unknown} are not input channels of this model; its channels are "
            f"{names}",
        )
    if len(set(cfg.drop_channels)) >= len(names):
        raise InputError(cfg.model, f"drop_channels {cfg.drop_channels} would drop every channel")
    return DropChannels(model, [names.index(n) for n in cfg.drop_channels]).eval()


def run(cfg: EvaluateConfig) -> dict[str, Any]:
    """Evaluate; returns the summary (overall metrics with CIs, subgroup results, paths)."""

    model, ckpt = load_model(cfg.model)
    store = Store(cfg.data)
    task = ckpt["task"]
    if cfg.labels is not None and task == "classification":
        overlay_index(store.index, cfg.labels, ckpt.get("label_key", "target"))
    trained_model = model  # explained as trained, whatever drop_channels says
    if cfg.drop_channels:
        model = with_missing_channels(model, ckpt, cfg)
    cases = listed_cases(cfg, store, ckpt) if cfg.cases is not None else [
        c for c in store.case_ids if cfg.split == "all" or store.index[c].get("split") == cfg.split
    ]  # fmt: skip
    if task == "segmentation":
        cases = [c for c in cases if store.index[c].get("has_label")]
    if not cases:
        raise InputError(cfg.data, f"no cases with a reference in {scope(cfg)}")
    out = cfg.out or Path(cfg.model).parent / (
        f"eval_{cfg.split}" if cfg.cases is None else "eval_cases"
    )
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out, name="evaluate_config.yaml")
    rows = evaluate_cases(model, ckpt, store, cases, cfg)
    attributes = [a for a in cfg.attributes if any(r.get(a) is not None for r in rows)]
    structures = structure_names(ckpt, store) if task == "segmentation" else {}
    if task == "segmentation":
        labels = sorted(
            {
                k.split("_", 1)[1]
                for r in rows
                for k in r
                if k.startswith("dice_") and k != "dice_mean"
            },
            key=int,
        )
        metrics = [
            MetricSpec.mean("dice_mean", "dice"),
            MetricSpec.mean("hd95_mean", "hd95", higher_is_better=False),
            MetricSpec.mean("nsd_mean", "nsd"),
        ]
        metrics += [MetricSpec.mean(f"dice_{lab}") for lab in labels]
        headline = ["dice", "hd95", "nsd"]
    else:
        metrics = [MetricSpec.auc(), MetricSpec.accuracy(), MetricSpec.balanced_accuracy()]
        if len(ckpt.get("class_names") or []) == 2:
            metrics.append(MetricSpec.ece())
        headline = [m.name for m in metrics]
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
        "split": cfg.split if cfg.cases is None else None,
        "cases": cfg.cases,
        "task": task,
        "n_cases": len(rows),
        "structures": {str(k): v for k, v in structures.items()},
        "result": result,
        "dp": ckpt.get("dp"),
        "drop_channels": list(cfg.drop_channels),
    }
    if cfg.shift or cfg.loso:
        summary["shift"] = shift_suites(cfg, model, ckpt, store, rows, out)
    atomic_write_json(out / "summary.json", summary)
    names = display_names(list(result["overall"]), structures)
    sections = report_sections(cfg, task, rows, result, names, headline, structures)
    if task == "segmentation" and cfg.case_figures:
        sec = case_section(model, ckpt, store, rows, structures)
        if sec is not None:
            sections.insert(2, sec)  # after the overall and per-structure tables
    if cfg.explain_figures:
        sec = explain_section(trained_model, ckpt, Path(cfg.model), store, rows, structures)
        if sec is not None:  # after the case figures, else after the tables of all cases
            shown = [i for i, x in enumerate(sections) if x.title in _BEFORE_EXPLAIN]
            sections.insert(shown[-1] + 1 if shown else 1, sec)
    if ckpt.get("dp"):  # trained with DP-SGD: state the guarantee next to the metrics
        sections.insert(1, Section(title="Differential privacy", text=format_dp(ckpt["dp"])))
    paths = write_report(out, f"UMIT evaluation: {Path(cfg.model).parent.name}", sections)
    summary["report"] = str(paths["html"])
    summary["out"] = str(out)
    return summary


_BEFORE_EXPLAIN = ("Overall", "Per structure", "Best, median and worst case")


def scope(cfg: EvaluateConfig) -> str:
    """What was evaluated, for messages and the report."""
    return f"split '{cfg.split}'" if cfg.cases is None else f"{len(cfg.cases)} listed cases"


def listed_cases(cfg: EvaluateConfig, store: Store, ckpt: dict[str, Any]) -> list[str]:
    """``cfg.cases``, checked: every id is in the store and none trained or validated the model."""
    cases = list(dict.fromkeys(cfg.cases or []))
    unknown = [c for c in cases if c not in store.index]
    if unknown:
        raise InputError(cfg.data, f"cases not in this store: {unknown[:5]}")
    used = ckpt.get("cases") or {}
    seen = sorted(set(cases) & (set(used.get("train", [])) | set(used.get("val", []))))
    if seen:
        raise InputError(
            cfg.model, f"the model was fine-tuned or validated on {len(seen)} of the listed "
            f"cases ({seen[:5]}); evaluate on held-out cases",
        )  # fmt: skip
    return cases


def shift_suites(
    cfg: EvaluateConfig, model, ckpt: dict[str, Any], store, rows: list[dict[str, Any]], out: Path
) -> dict[str, Any]:
    """The perturbation and leave-one-site-out suites (:mod:`umit.eval.shift`)."""
    result: dict[str, Any] = {}
    task = ckpt["task"]
    metric = "dice" if task == "segmentation" else "correct"
    if cfg.shift:
        kinds = list(PERTURBATIONS) if cfg.shift == ["all"] else list(cfg.shift)
        bad = [k for k in kinds if k not in PERTURBATIONS]
        if bad:
            raise InputError(None, f"unknown shift {bad}; one of all, {', '.join(PERTURBATIONS)}")
        if task != "segmentation":  # no label map to take the structures from
            if cfg.shift == ["all"]:
                kinds = [k for k in kinds if k not in NEEDS_LABEL_MAP]
            elif any(k in NEEDS_LABEL_MAP for k in kinds):
                raise InputError(
                    cfg.model,
                    f"shift {[k for k in kinds if k in NEEDS_LABEL_MAP]} needs a segmentation "
                    f"reference (label map); this model is a {task} model",
                )
        cases = [r["case_id"] for r in rows][: cfg.shift_cases]
        targets = {r["case_id"]: r["label"] for r in rows if "label" in r}
        srows = run_perturbations(
            model, ckpt, store, cases, kinds, cfg.shift_strengths, cfg.seed, targets
        )
        atomic_write_text(out / "shift.csv", _rows_to_csv(srows))
        result["perturbations"] = summarize_shift(srows, metric, cfg.n_boot, cfg.seed)
        curves, shown = headline_curves(result["perturbations"], metric)
        shift_figure(curves, shown, out / "shift.png", Path(cfg.model).parent.name)
    if cfg.loso:
        train = ((ckpt.get("cases") or {}).get("train")) or []
        if not train:
            raise InputError(cfg.model, "the model file lists no training cases: no site split")
        sites: dict[str, int] = {}
        for c in train:
            s = str(store.index.get(c, {}).get("site"))
            sites[s] = sites.get(s, 0) + 1
        names = ckpt.get("class_names") or []
        key = "dice_mean" if task == "segmentation" else "correct"
        scored = [
            {
                **r,
                "site": store.index[r["case_id"]].get("site"),
                **(
                    {}
                    if task == "segmentation"
                    else {"correct": float(r["pred"] == names[r["label"]])}
                ),
            }
            for r in rows
        ]
        result["leave_one_site_out"] = site_shift(scored, key, sites, "site", cfg.n_boot, cfg.seed)
    atomic_write_json(out / "shift.json", result)
    return result


def report_sections(
    cfg: EvaluateConfig,
    task: str,
    rows: list[dict[str, Any]],
    result: dict[str, Any],
    names: dict[str, str],
    headline: list[str],
    structures: dict[int, str],
) -> list[Section]:
    """Overall, per structure (segmentation), subgroups."""
    overall = result["overall"]
    pct = int(round(100 * result["ci"]))
    about = (
        f"{len(rows)} cases of {scope(cfg)} of {cfg.data}; model {cfg.model}. "
        f"Values are means over cases with {pct}% bootstrap confidence intervals "
        f"({result['n_boot']} replicates)."
    )
    if cfg.drop_channels:
        about += f" Input channels treated as missing: {', '.join(cfg.drop_channels)}."
    if task == "segmentation":
        about += (
            f" Per structure: Dice, 95th-percentile Hausdorff distance (HD95, mm) and normalized "
            f"surface Dice (NSD, {cfg.nsd_tolerance_mm:g} mm tolerance), on the preprocessed grid."
        )
    table = Table(
        header=["metric", f"value ({pct}% CI)", "cases"],
        rows=[
            [names[m], fmt_ci(v["value"], v["ci_low"], v["ci_high"]), v.get("n_with_value")]
            for m, v in overall.items()
            if m in headline
        ],
        caption=f"{task} on {scope(cfg)} ({len(rows)} cases)",
    )
    sections = [Section(title="Overall", text=about, tables=[table])]
    if task == "segmentation":
        sections.append(
            Section(title="Per structure", tables=[structure_table(result, rows, structures)])
        )
    if result["attributes"]:
        sections.append(
            subgroup_section(
                result,
                names=names,
                metrics=headline,
                overall=False,
                text="Per-structure results per subgroup are in subgroups.csv."
                if task == "segmentation"
                else "",
            )
        )
    return sections
