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

When seeds share something drawn at random that is not resampled per seed (two seeds fine-tuned
from one pretraining run), their results are not independent, and resampling them one by one
makes the CI too narrow. ``clusters`` names each seed's group (e.g. its pretraining checkpoint);
step 2 then resamples groups, each drawn group bringing all its seeds (the cluster bootstrap of
Davison & Hinkley 1997, sec. 3.8, resampling clusters only). With every seed in its own group, or
one group for all seeds (a study conditional on one pretraining run), this is step 2 as above,
draw for draw.
"""

from __future__ import annotations

import csv
import math
import warnings
from collections.abc import Hashable, Mapping, Sequence
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
    clusters: Mapping[int, Hashable] | None = None,
) -> dict[str, Any]:
    """Mean over paired seeds of metric(a) - metric(b), with a hierarchical bootstrap CI.

    ``a`` and ``b`` map a seed to its per-case rows. Only seeds present in both arms count, and
    only test cases present in every (arm, seed) table. ``clusters`` maps a seed to its group
    (seeds of one group are resampled together; module docstring); ``n_clusters`` in the result
    is the number of groups resampled, or None when seeds were resampled one by one.
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
            "n_clusters": None,
        }
    groups = seed_groups(seeds, clusters)
    arr_a = [CaseArrays(a[s], case_ids, metric) for s in seeds]
    arr_b = [CaseArrays(b[s], case_ids, metric) for s in seeds]
    full = np.arange(n)[None, :]
    per_a = np.array([x.replicates(full)[0] for x in arr_a])
    per_b = np.array([x.replicates(full)[0] for x in arr_b])
    rng = np.random.default_rng([int(seed), 7919])
    case_idx = rng.integers(0, n, size=(n_boot, n))
    if groups is None:  # seeds one by one
        seed_idx = rng.integers(0, len(seeds), size=(n_boot, len(seeds)))
        weights = _counts(seed_idx, len(seeds))  # (B, S) times each seed was drawn
    else:  # whole groups: a seed is drawn as often as its group
        group_idx = rng.integers(0, len(groups), size=(n_boot, len(groups)))
        membership = np.zeros((len(groups), len(seeds)))  # (G, S)
        for g, members in enumerate(groups):
            membership[g, members] = 1.0
        weights = _counts(group_idx, len(groups)) @ membership  # (B, S)
    ma = np.stack([x.replicates(case_idx) for x in arr_a], axis=1)  # (B, S)
    mb = np.stack([x.replicates(case_idx) for x in arr_b], axis=1)
    drawn = np.where(weights > 0, weights * (ma - mb), 0.0)  # a NaN counts only when drawn
    reps = drawn.sum(axis=1) / weights.sum(axis=1)
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
        "n_clusters": None if groups is None else len(groups),
        "n_valid_boot": int(ok.size),
        "ci": ci,
    }


def seed_groups(
    seeds: Sequence[int], clusters: Mapping[int, Hashable] | None
) -> list[list[int]] | None:
    """Indices into ``seeds`` grouped by cluster, or None when the bootstrap should resample seeds
    one by one: no clusters, every seed its own cluster, or one cluster for all (the study is
    then conditional on what they share). Raises when a paired seed has no cluster."""
    if clusters is None:
        return None
    missing = [s for s in seeds if s not in clusters]
    if missing:
        raise ValueError(f"clusters has no group for seeds {missing}")
    by_group: dict[Hashable, list[int]] = {}
    for i, s in enumerate(seeds):
        by_group.setdefault(clusters[s], []).append(i)
    if len(by_group) in (1, len(seeds)):
        return None
    return list(by_group.values())


def _counts(idx: np.ndarray, k: int) -> np.ndarray:
    """(B, k) how often each of k units appears in each row of draws ``idx`` (B, m)."""
    out = np.zeros((idx.shape[0], k))
    np.add.at(out, (np.arange(idx.shape[0])[:, None], idx), 1.0)
    return out


def full_metric(rows: Sequence[Mapping[str, Any]], metric: str) -> float:
    """The metric of one evaluation on all its cases (NaN when undefined)."""
    ids = [str(r["case_id"]) for r in rows]
    return float(CaseArrays(rows, ids, metric).replicates(np.arange(len(ids))[None, :])[0])
