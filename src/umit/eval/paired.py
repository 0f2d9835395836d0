"""Paired comparison of two arms of a label-efficiency experiment: difference with a bootstrap CI.

Both arms are evaluated on the same test cases, once per seed, and the seeds are paired (the same
label subset and data order in both arms). The difference a - b of a headline metric (mean over
seeds) gets a two-level (hierarchical) percentile-bootstrap CI; every replicate

1. resamples the test cases with replacement (the same case indices for both arms: the test set
   is shared),
2. resamples the seeds with replacement (the same seeds for both arms: they are paired),
3. recomputes the metric for every (arm, drawn seed) on the drawn cases (an AUC from the cases'
   labels and scores, a Dice as the mean of the per-case ``dice_mean``), averages over the drawn
   seeds and takes the difference.

So the CI carries both sources of noise: which test cases, and which label subset / training run.
Inputs are per-case rows as written to ``per_case.csv`` by ``umit evaluate``.
"""

from __future__ import annotations

import csv
import math
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import rankdata

# headline metric -> per-case column it averages (metrics not listed here are pooled or a column)
MEAN_COLUMNS = {"dice": "dice_mean", "hd95": "hd95_mean", "nsd": "nsd_mean"}
POOLED = ("auc", "accuracy")


def read_per_case(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a ``per_case.csv`` (label as int, score as float or list of floats)."""
    rows = []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            row: dict[str, Any] = dict(r)
            if r.get("label") not in (None, ""):
                row["label"] = int(float(r["label"]))
            s = r.get("score")
            if s not in (None, ""):
                parts = s.split()
                row["score"] = float(parts[0]) if len(parts) == 1 else [float(p) for p in parts]
            rows.append(row)
    return rows


def _float(v: Any) -> float:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return float("nan")
    return x if math.isfinite(x) else float("nan")


class CaseArrays:
    """One (arm, seed) evaluation as arrays over a fixed, shared order of case ids."""

    def __init__(self, rows: Sequence[Mapping[str, Any]], case_ids: Sequence[str], metric: str):
        by_id = {str(r["case_id"]): r for r in rows}
        missing = [c for c in case_ids if c not in by_id]
        if missing:
            raise ValueError(f"per-case rows lack cases {missing[:3]}")
        ordered = [by_id[c] for c in case_ids]
        self.metric = metric
        if metric in POOLED:
            self.labels = np.array([int(r["label"]) for r in ordered])
            scores = [r["score"] for r in ordered]
            self.scores = np.array(scores, dtype=float)  # (n,) binary or (n, K)
        else:
            col = MEAN_COLUMNS.get(metric, metric)
            self.values = np.array([_float(r.get(col)) for r in ordered])

    def replicates(self, idx: np.ndarray) -> np.ndarray:
        """(B,) metric on each row of case indices ``idx`` (B, n)."""
        if self.metric == "auc":
            return auc_rows(self.labels[idx], self.scores[idx])
        if self.metric == "accuracy":
            s = self.scores[idx]
            pred = (s >= 0.5).astype(int) if s.ndim == 2 else s.argmax(-1)
            return (pred == self.labels[idx]).mean(axis=1)
        return _nanmean(self.values[idx], axis=1)


def _nanmean(x: np.ndarray, axis: int | None = None) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(x, axis=axis)


def auc_rows(y: np.ndarray, s: np.ndarray) -> np.ndarray:
    """Binary AUC (Mann-Whitney, ties count half) per row of (B, n); macro one-vs-rest for
    (B, n, K) scores. NaN where a row lacks a class."""
    if s.ndim == 3:
        K = s.shape[-1]
        per = np.stack([auc_rows((y == k).astype(int), s[..., k]) for k in range(K)], axis=1)
        return _nanmean(per, axis=1)

    ranks = rankdata(s, axis=1)
    pos = y == 1
    n1 = pos.sum(axis=1).astype(float)
    n0 = y.shape[1] - n1
    with np.errstate(divide="ignore", invalid="ignore"):
        auc = ((ranks * pos).sum(axis=1) - n1 * (n1 + 1) / 2) / (n1 * n0)
    auc[(n1 == 0) | (n0 == 0)] = np.nan
    return auc


def paired_difference(
    a: Mapping[int, Sequence[Mapping[str, Any]]],
    b: Mapping[int, Sequence[Mapping[str, Any]]],
    metric: str,
    *,
    n_boot: int = 2000,
    ci: float = 0.95,
    seed: int = 0,
) -> dict[str, Any]:
    """Mean over paired seeds of metric(a) - metric(b), with a hierarchical bootstrap CI.

    ``a`` and ``b`` map a seed to its per-case rows. Only seeds present in both arms count, and
    only test cases present in every (arm, seed) table.
    """
    seeds = sorted(set(a) & set(b))
    ids = None
    for table in [*(a[s] for s in seeds), *(b[s] for s in seeds)]:
        these = {str(r["case_id"]) for r in table}
        ids = these if ids is None else ids & these
    case_ids = sorted(ids or [])
    n = len(case_ids)
    if not seeds or n == 0:  # nothing paired to compare
        return {
            "diff": None,
            "ci_low": None,
            "ci_high": None,
            "excludes_zero": False,
            "n_seeds": len(seeds),
            "n_cases": n,
        }
    arr_a = [CaseArrays(a[s], case_ids, metric) for s in seeds]
    arr_b = [CaseArrays(b[s], case_ids, metric) for s in seeds]
    full = np.arange(n)[None, :]
    per_a = np.array([x.replicates(full)[0] for x in arr_a])
    per_b = np.array([x.replicates(full)[0] for x in arr_b])
    rng = np.random.default_rng([int(seed), 7919])
    case_idx = rng.integers(0, n, size=(n_boot, n))
    seed_idx = rng.integers(0, len(seeds), size=(n_boot, len(seeds)))
    ma = np.stack([x.replicates(case_idx) for x in arr_a], axis=1)  # (B, S)
    mb = np.stack([x.replicates(case_idx) for x in arr_b], axis=1)
    rows = np.arange(n_boot)[:, None]
    reps = np.mean(ma[rows, seed_idx] - mb[rows, seed_idx], axis=1)
    diff = float(_nanmean(per_a - per_b))
    mean_a, mean_b = float(_nanmean(per_a)), float(_nanmean(per_b))
    ok = reps[np.isfinite(reps)]
    lo = hi = None
    if ok.size >= 2:
        lo, hi = (float(v) for v in np.percentile(ok, [50 * (1 - ci), 50 * (1 + ci)]))

    def clean(x: float) -> float | None:
        return x if math.isfinite(x) else None

    return {
        "diff": clean(diff),
        "ci_low": lo,
        "ci_high": hi,
        "excludes_zero": bool(lo is not None and hi is not None and (lo > 0 or hi < 0)),
        "a_mean": clean(mean_a),
        "b_mean": clean(mean_b),
        "n_seeds": len(seeds),
        "n_cases": n,
        "n_valid_boot": int(ok.size),
        "ci": ci,
    }


def full_metric(rows: Sequence[Mapping[str, Any]], metric: str) -> float:
    """The metric of one evaluation on all its cases (NaN when undefined)."""
    ids = [str(r["case_id"]) for r in rows]
    return float(CaseArrays(rows, ids, metric).replicates(np.arange(len(ids))[None, :])[0])
