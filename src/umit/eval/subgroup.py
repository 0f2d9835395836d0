"""Overall and per-subgroup metrics with percentile-bootstrap confidence intervals.

Input is a per-case table: a list of dicts, one per case, with a ``case_id``, per-case metric
values (``dice_1``, ``hd95_mean``, ...), classification columns (a true ``label`` and a ``score``:
the positive-class probability, or a list of class probabilities) and attribute columns (``sex``,
``site``, ``age_band``, ``scanner``, ``contrast``, ...). Missing attribute values form the group
``"(missing)"``; missing or None metric values count as NaN and are left out.

Statistics:

* **Per-case metrics** (``MetricSpec.mean``): the nan-mean over cases. A bootstrap replicate
  resamples cases with replacement and takes the nan-mean again (vectorised over replicates).
* **Pooled metrics** (AUC, accuracy, balanced accuracy, ECE): recomputed from the resampled
  cases' labels and scores in every replicate (an AUC is not a mean of per-case values).
* **CI**: the percentile bootstrap, ``[q((1 - ci) / 2), q((1 + ci) / 2)]`` over the replicates
  with a finite value (an AUC replicate with a single class is undefined and dropped;
  ``n_valid`` says how many were kept).
* **Groups** are resampled independently (stratified bootstrap), each from its own random stream
  derived from ``(seed, attribute, group)``, so results are reproducible and do not depend on
  which other groups or attributes are analysed.
* **Gap**: among groups with at least ``min_group_size`` cases and a finite value, the difference
  between the highest and the lowest point estimate. Its CI bootstraps the difference between
  *those two* groups (replicate by replicate), so it is the CI of a fixed, well-defined contrast
  rather than of "max minus min" (which is biased upwards by noise). ``ci_excludes_zero`` tells
  whether the gap is larger than the resampling noise.
* Groups smaller than ``min_group_size`` are flagged ``too_small`` ("too small to judge"), listed
  in ``warnings``, and left out of the gap.

Everything returned is JSON-serialisable (NaN becomes None).
"""

from __future__ import annotations

import csv
import io
import math
import warnings
import zlib
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from umit.metrics import (
    accuracy,
    balanced_accuracy,
    expected_calibration_error,
    predicted_labels,
    roc_auc,
)
from umit.utils.fileio import atomic_write_text

MISSING_GROUP = "(missing)"
_POOLED_KINDS = ("auc", "accuracy", "balanced_accuracy", "ece")
_BOOT_CHUNK = 256  # replicates drawn at a time (bounds memory for large groups)


@dataclass(frozen=True)
class MetricSpec:
    """One metric to analyse.

    Attributes:
        name: Name in the output (e.g. ``"dice_1"``, ``"auc"``).
        kind: ``"mean"`` (nan-mean of a per-case column) or a pooled classification metric:
            ``"auc"``, ``"accuracy"``, ``"balanced_accuracy"``, ``"ece"``.
        column: Per-case value column for ``"mean"`` (default: ``name``).
        label: True-label column for pooled metrics.
        score: Score column for pooled metrics: a float (binary positive-class probability) or a
            list of class probabilities per case.
        higher_is_better: Orientation, used to name the best and worst group of a gap.
        n_bins: ECE bins.
        threshold: Binary decision threshold for accuracy metrics.
    """

    name: str
    kind: str = "mean"
    column: str | None = None
    label: str = "label"
    score: str = "score"
    higher_is_better: bool = True
    n_bins: int = 15
    threshold: float = 0.5

    def __post_init__(self) -> None:
        if self.kind != "mean" and self.kind not in _POOLED_KINDS:
            raise ValueError(
                f"metric {self.name!r}: unknown kind {self.kind!r}; use 'mean' or one of {_POOLED_KINDS}"
            )

    @classmethod
    def mean(
        cls, column: str, name: str | None = None, higher_is_better: bool = True
    ) -> MetricSpec:
        return cls(
            name=name or column, kind="mean", column=column, higher_is_better=higher_is_better
        )

    @classmethod
    def auc(cls, label: str = "label", score: str = "score", name: str = "auc") -> MetricSpec:
        return cls(name=name, kind="auc", label=label, score=score)

    @classmethod
    def accuracy(
        cls, label: str = "label", score: str = "score", name: str = "accuracy"
    ) -> MetricSpec:
        return cls(name=name, kind="accuracy", label=label, score=score)

    @classmethod
    def balanced_accuracy(
        cls, label: str = "label", score: str = "score", name: str = "balanced_accuracy"
    ) -> MetricSpec:
        return cls(name=name, kind="balanced_accuracy", label=label, score=score)

    @classmethod
    def ece(
        cls, label: str = "label", score: str = "score", name: str = "ece", n_bins: int = 15
    ) -> MetricSpec:
        return cls(
            name=name, kind="ece", label=label, score=score, higher_is_better=False, n_bins=n_bins
        )


def _as_spec(m: MetricSpec | str) -> MetricSpec:
    if isinstance(m, MetricSpec):
        return m
    if isinstance(m, str):
        return MetricSpec.mean(m)
    raise ValueError(f"a metric must be a MetricSpec or a column name, got {m!r}")


def _clean(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def _stream(seed: int, *keys: str) -> np.random.Generator:
    """A random stream fixed by the seed and the keys (stable across runs and Python versions)."""
    return np.random.default_rng([int(seed), *(zlib.crc32(k.encode("utf-8")) for k in keys)])


# -- evaluating one metric on a set of cases ------------------------------------------------------


class _Column:
    """A metric's per-case data, its value on a set of cases, and vectorised bootstrap replicates.

    Cases without a value (NaN per-case metric, missing label or score) are dropped before
    resampling, so every replicate has as many cases as have a value (``n_with_value``).
    """

    def __init__(self, spec: MetricSpec, rows: Sequence[Mapping[str, Any]]):
        self.spec = spec
        if spec.kind == "mean":
            col = spec.column or spec.name
            if not any(col in r for r in rows):
                raise ValueError(f"metric {spec.name!r}: column {col!r} is in no row")
            vals = []
            for i, r in enumerate(rows):
                v = r.get(col)
                try:
                    vals.append(math.nan if v is None else float(v))
                except (TypeError, ValueError) as exc:
                    raise ValueError(f"row {i}: {col}={v!r} is not a number") from exc
            self.values = np.asarray(vals, dtype=np.float64)
            self.valid = ~np.isnan(self.values)
            return
        for col in (spec.label, spec.score):
            if not any(col in r for r in rows):
                raise ValueError(f"metric {spec.name!r}: column {col!r} is in no row")
        labels, scores, valid = [], [], []
        width = None
        for i, r in enumerate(rows):
            y, s = r.get(spec.label), r.get(spec.score)
            if y is None or s is None:
                labels.append(0)
                scores.append(None)
                valid.append(False)
                continue
            s_arr = np.asarray(s, dtype=np.float64).ravel()
            if width is None:
                width = s_arr.size
            elif s_arr.size != width:
                raise ValueError(
                    f"row {i}: {spec.score} has {s_arr.size} values, earlier rows {width}"
                )
            try:
                labels.append(int(y))
            except (TypeError, ValueError) as exc:
                raise ValueError(f"row {i}: {spec.label}={y!r} is not an integer label") from exc
            scores.append(s_arr)
            valid.append(True)
        if width is None:
            raise ValueError(
                f"metric {spec.name!r}: no row has both {spec.label!r} and {spec.score!r}"
            )
        self.labels = np.asarray(labels, dtype=np.int64)
        fill = np.full(width, 0.5 if width == 1 else 1.0 / width)
        s = np.stack([fill if v is None else v for v in scores])
        self.scores = s[:, 0] if width == 1 else s
        self.valid = np.asarray(valid, dtype=bool)
        y_ok, s_ok = self.labels[self.valid], self.scores[self.valid]
        # Validate once through the public functions (clear errors for bad labels or scores).
        if spec.kind == "ece":
            expected_calibration_error(y_ok, s_ok, spec.n_bins)
        elif spec.kind == "auc":
            roc_auc(y_ok, s_ok)
        # Per-case quantities the vectorised replicates need.
        if spec.kind in ("accuracy", "balanced_accuracy"):
            self.correct = (predicted_labels(self.scores, spec.threshold) == self.labels).astype(
                float
            )
            self.classes = np.unique(y_ok)
        elif spec.kind == "ece":
            s2 = (
                np.stack([1 - self.scores, self.scores], 1)
                if self.scores.ndim == 1
                else self.scores
            )
            pred = (self.scores >= 0.5).astype(np.int64) if self.scores.ndim == 1 else s2.argmax(1)
            self.conf = s2.max(1)
            self.correct = (pred == self.labels).astype(float)
            edges = np.linspace(0.0, 1.0, spec.n_bins + 1)
            self.bins = np.clip(np.digitize(self.conf, edges[1:-1], right=True), 0, spec.n_bins - 1)
        else:  # auc: per one-vs-rest task, dense score ranks and positive flags
            if self.scores.ndim == 1 or self.scores.shape[1] == 2:
                s1 = self.scores if self.scores.ndim == 1 else self.scores[:, 1]
                tasks = [(s1, self.labels == 1)]
            else:
                tasks = [(self.scores[:, c], self.labels == c) for c in range(self.scores.shape[1])]
            self.auc_tasks = [
                (np.unique(s, return_inverse=True)[1].ravel(), pos.astype(float))
                for s, pos in tasks
            ]

    def value(self, idx: np.ndarray) -> float:
        """The metric on cases ``idx`` (those without a value are ignored)."""
        idx = idx[self.valid[idx]]
        if idx.size == 0:
            return math.nan
        if self.spec.kind == "mean":
            return float(self.values[idx].mean())
        y, s = self.labels[idx], self.scores[idx]
        kind = self.spec.kind
        if kind == "auc":
            return roc_auc(y, s)
        if kind == "ece":
            return expected_calibration_error(y, s, self.spec.n_bins)
        pred = predicted_labels(s, self.spec.threshold)
        return accuracy(y, pred) if kind == "accuracy" else balanced_accuracy(y, pred)

    def replicates(self, idx: np.ndarray, rng: np.random.Generator, n_boot: int) -> np.ndarray:
        """``n_boot`` bootstrap values of the metric on cases ``idx`` (resampled with replacement)."""
        idx = idx[self.valid[idx]]
        out = np.full(n_boot, np.nan)
        n = idx.size
        if n == 0:
            return out
        for b0 in range(0, n_boot, _BOOT_CHUNK):
            nb = min(_BOOT_CHUNK, n_boot - b0)
            draw = idx[rng.integers(0, n, size=(nb, n))]  # (nb, n) case indices
            out[b0 : b0 + nb] = self._batch(draw)
        return out

    def _batch(self, draw: np.ndarray) -> np.ndarray:
        """The metric of every row of ``draw`` (nb, n) at once (bincount over row-offset keys)."""
        nb, n = draw.shape
        kind = self.spec.kind
        if kind == "mean":
            return self.values[draw].mean(axis=1)
        if kind == "accuracy":
            return self.correct[draw].mean(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            if kind == "balanced_accuracy":
                y, c = self.labels[draw], self.correct[draw]
                recalls = np.stack(
                    [(c * (y == k)).sum(1) / (y == k).sum(1) for k in self.classes], axis=1
                )
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)
                    return np.nanmean(recalls, axis=1)
            rows = np.arange(nb)[:, None]
            if kind == "ece":
                m = self.spec.n_bins
                key = (self.bins[draw] + m * rows).ravel()
                acc = np.bincount(key, weights=self.correct[draw].ravel(), minlength=nb * m)
                conf = np.bincount(key, weights=self.conf[draw].ravel(), minlength=nb * m)
                return np.abs(acc - conf).reshape(nb, m).sum(1) / n
            aucs = []
            for ranks, pos in self.auc_tasks:
                u = int(ranks.max()) + 1
                key = (ranks[draw] + u * rows).ravel()
                p = np.bincount(key, weights=pos[draw].ravel(), minlength=nb * u).reshape(nb, u)
                q = np.bincount(key, weights=1 - pos[draw].ravel(), minlength=nb * u).reshape(nb, u)
                below = np.cumsum(q, axis=1) - q  # negatives with a strictly lower score
                wins = (p * below).sum(1) + 0.5 * (p * q).sum(1)
                aucs.append(wins / (p.sum(1) * q.sum(1)))  # NaN when a class is absent
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                return np.nanmean(np.stack(aucs, axis=1), axis=1)


def ci_from_replicates(reps: np.ndarray, ci: float) -> tuple[float | None, float | None, int]:
    ok = reps[np.isfinite(reps)]
    if ok.size < 2:
        return None, None, int(ok.size)
    lo, hi = np.percentile(ok, [100 * (1 - ci) / 2, 100 * (1 + ci) / 2])
    return float(lo), float(hi), int(ok.size)


def _summary(value: float, reps: np.ndarray, ci: float, n_with_value: int) -> dict[str, Any]:
    lo, hi, n_valid = ci_from_replicates(reps, ci)
    return {
        "value": _clean(value),
        "ci_low": lo,
        "ci_high": hi,
        "n_with_value": n_with_value,
        "n_valid_boot": n_valid,
    }


# -- the analysis ------------------------------------------------------------------------------------


def analyze_subgroups(
    rows: Sequence[Mapping[str, Any]],
    metrics: Sequence[MetricSpec | str],
    attributes: Sequence[str],
    *,
    n_boot: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
    min_group_size: int = 10,
    id_column: str = "case_id",
) -> dict[str, Any]:
    """Overall and per-subgroup metrics with bootstrap CIs, group sizes, gaps and warnings.

    Args:
        rows: Per-case table, one mapping per case.
        metrics: :class:`MetricSpec` objects, or column names (nan-mean of that column).
        attributes: Attribute columns to split by (e.g. ``["sex", "site"]``).
        n_boot: Bootstrap replicates.
        ci: Confidence level of the intervals.
        seed: Seed of every random stream (same seed and table -> same output).
        min_group_size: Groups with fewer cases are flagged "too small to judge" and left out of
            the gap.
        id_column: Column with a unique case identifier.

    Returns:
        ``{"n_cases", "n_boot", "ci", "seed", "min_group_size",
        "metrics": [{name, kind, higher_is_better}],
        "overall": {metric: {value, ci_low, ci_high, n_with_value, n_valid_boot}},
        "attributes": {attr: {"groups": [{group, n, too_small, metrics: {metric: {...}}}],
        "gaps": {metric: {value, ci_low, ci_high, high_group, low_group, best_group,
        worst_group, ci_excludes_zero}}, "warnings": [...]}}, "warnings": [...]}``.
    """
    if not rows:
        raise ValueError("empty table: no cases to analyse")
    if not all(isinstance(r, Mapping) for r in rows):
        raise ValueError("rows must be mappings (one dict per case)")
    if int(n_boot) < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    if not 0 < ci < 1:
        raise ValueError(f"ci must be in (0, 1), got {ci}")
    if int(min_group_size) < 1:
        raise ValueError(f"min_group_size must be >= 1, got {min_group_size}")
    if not metrics:
        raise ValueError("no metrics given")
    ids = []
    for i, r in enumerate(rows):
        if id_column not in r:
            raise ValueError(f"row {i} has no {id_column!r} column")
        ids.append(str(r[id_column]))
    if len(set(ids)) != len(ids):
        dup = sorted(x for x, c in Counter(ids).items() if c > 1)[:5]
        raise ValueError(f"duplicate {id_column} values: {dup}")
    columns = sorted({k for r in rows for k in r})
    for attr in attributes:
        if not any(attr in r for r in rows):
            raise ValueError(f"unknown attribute {attr!r}: no row has it (columns: {columns})")
    specs = [_as_spec(m) for m in metrics]
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"metric names must be unique, got {names}")
    cols = [_Column(s, rows) for s in specs]

    n_boot = int(n_boot)
    all_idx = np.arange(len(rows))
    result: dict[str, Any] = {
        "n_cases": len(rows),
        "n_boot": n_boot,
        "ci": ci,
        "seed": int(seed),
        "min_group_size": int(min_group_size),
        "metrics": [
            {"name": s.name, "kind": s.kind, "higher_is_better": s.higher_is_better} for s in specs
        ],
        "overall": {},
        "attributes": {},
        "warnings": [],
    }
    for col in cols:
        reps = col.replicates(all_idx, _stream(seed, "overall", col.spec.name), n_boot)
        n_val = int(col.valid.sum())
        result["overall"][col.spec.name] = _summary(col.value(all_idx), reps, ci, n_val)

    for attr in attributes:
        groups: dict[str, list[int]] = {}
        for i, r in enumerate(rows):
            v = r.get(attr)
            key = MISSING_GROUP if v is None or (isinstance(v, float) and math.isnan(v)) else str(v)
            groups.setdefault(key, []).append(i)
        entry: dict[str, Any] = {"groups": [], "gaps": {}, "warnings": []}
        group_reps: dict[str, dict[str, np.ndarray]] = {}
        group_vals: dict[str, dict[str, float]] = {}
        for g in sorted(groups):
            idx = np.asarray(groups[g], dtype=np.int64)
            too_small = idx.size < min_group_size
            g_metrics = {}
            group_reps[g], group_vals[g] = {}, {}
            for col in cols:
                reps = col.replicates(idx, _stream(seed, attr, g, col.spec.name), n_boot)
                val = col.value(idx)
                group_reps[g][col.spec.name], group_vals[g][col.spec.name] = reps, val
                n_val = int(col.valid[idx].sum())
                g_metrics[col.spec.name] = _summary(val, reps, ci, n_val)
                if not math.isfinite(val) and not too_small:
                    entry["warnings"].append(
                        f"{attr}={g!r}: {col.spec.name} is undefined for this group"
                    )
            if too_small:
                entry["warnings"].append(
                    f"{attr}={g!r}: {idx.size} cases < min_group_size {min_group_size}: "
                    "too small to judge"
                )
            entry["groups"].append(
                {"group": g, "n": int(idx.size), "too_small": too_small, "metrics": g_metrics}
            )
        for col in cols:
            name = col.spec.name
            eligible = [
                grp["group"]
                for grp in entry["groups"]
                if not grp["too_small"] and math.isfinite(group_vals[grp["group"]][name])
            ]
            if len(eligible) < 2:
                entry["gaps"][name] = {
                    "value": None,
                    "ci_low": None,
                    "ci_high": None,
                    "reason": f"fewer than 2 groups with >= {min_group_size} cases and a value",
                }
                continue
            hi = max(eligible, key=lambda g, n=name: group_vals[g][n])
            lo = min(eligible, key=lambda g, n=name: group_vals[g][n])
            reps = group_reps[hi][name] - group_reps[lo][name]
            c_lo, c_hi, n_valid = ci_from_replicates(reps, ci)
            best, worst = (hi, lo) if col.spec.higher_is_better else (lo, hi)
            entry["gaps"][name] = {
                "value": _clean(group_vals[hi][name] - group_vals[lo][name]),
                "ci_low": c_lo,
                "ci_high": c_hi,
                "n_valid_boot": n_valid,
                "high_group": hi,
                "low_group": lo,
                "best_group": best,
                "worst_group": worst,
                "ci_excludes_zero": None if c_lo is None else bool(c_lo > 0 or c_hi < 0),
            }
        result["attributes"][attr] = entry
        result["warnings"].extend(entry["warnings"])
    return result


# -- CSV ---------------------------------------------------------------------------------------------

CSV_FIELDS = (
    "scope",
    "attribute",
    "group",
    "metric",
    "value",
    "ci_low",
    "ci_high",
    "n",
    "too_small",
)


def subgroup_rows(result: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Flatten an :func:`analyze_subgroups` result to one row per (scope, group, metric)."""
    out = []
    for name, m in result["overall"].items():
        out.append(
            {
                "scope": "overall",
                "attribute": "",
                "group": "all",
                "metric": name,
                "value": m["value"],
                "ci_low": m["ci_low"],
                "ci_high": m["ci_high"],
                "n": result["n_cases"],
                "too_small": False,
            }
        )
    for attr, entry in result["attributes"].items():
        for grp in entry["groups"]:
            for name, m in grp["metrics"].items():
                out.append(
                    {
                        "scope": "group",
                        "attribute": attr,
                        "group": grp["group"],
                        "metric": name,
                        "value": m["value"],
                        "ci_low": m["ci_low"],
                        "ci_high": m["ci_high"],
                        "n": grp["n"],
                        "too_small": grp["too_small"],
                    }
                )
        for name, gap in entry["gaps"].items():
            label = f"{gap['high_group']} - {gap['low_group']}" if "high_group" in gap else ""
            out.append(
                {
                    "scope": "gap",
                    "attribute": attr,
                    "group": label,
                    "metric": name,
                    "value": gap["value"],
                    "ci_low": gap["ci_low"],
                    "ci_high": gap["ci_high"],
                    "n": "",
                    "too_small": "",
                }
            )
    return out


def write_subgroup_csv(result: Mapping[str, Any], path: str | Path) -> Path:
    """Write :func:`subgroup_rows` as CSV (atomically); empty cells for undefined values."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    for row in subgroup_rows(result):
        writer.writerow({k: "" if row[k] is None else row[k] for k in CSV_FIELDS})
    atomic_write_text(path, buf.getvalue())
    return Path(path)
