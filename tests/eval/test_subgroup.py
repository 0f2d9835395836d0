"""Subgroup analysis: bootstrap CIs (coverage, reproducibility), group sizes, gaps, warnings, CSV."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest

from umit.eval.subgroup import (
    MISSING_GROUP,
    MetricSpec,
    _Column,
    analyze_subgroups,
    subgroup_rows,
    write_subgroup_csv,
)
from umit.metrics import (
    accuracy,
    balanced_accuracy,
    expected_calibration_error,
    predicted_labels,
    roc_auc,
)

METRICS = [
    "dice",
    MetricSpec.mean("hd95", higher_is_better=False),
    MetricSpec.auc(),
    MetricSpec.ece(n_bins=10),
    MetricSpec.accuracy(),
    MetricSpec.balanced_accuracy(),
]


def table(n: int = 120, seed: int = 0, dice_gap: float = 0.1) -> list[dict]:
    """Synthetic per-case table: Dice lower for men by ``dice_gap``; a tiny site "Z"."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        sex = "F" if i % 2 == 0 else "M"
        y = int(rng.random() < 0.4)
        rows.append(
            {
                "case_id": f"case{i:03d}",
                "sex": sex,
                "site": "Z" if i < 4 else "AB"[i % 2 == 0 and i % 3 == 0],
                "age_band": None if i % 10 == 0 else ("<50" if i % 4 < 2 else ">=50"),
                "dice": float(np.clip(rng.normal(0.85 - dice_gap * (sex == "M"), 0.05), 0, 1)),
                "hd95": float(abs(rng.normal(4.0, 1.0))),
                "label": y,
                "score": float(np.clip(0.35 + 0.3 * y + rng.normal(0, 0.2), 0, 1)),
            }
        )
    return rows


def test_values_equal_direct_computation_and_json_serialisable():
    rows = table()
    res = analyze_subgroups(rows, METRICS, ["sex", "site", "age_band"], n_boot=200)
    json.dumps(res, allow_nan=False)  # plain data, NaN -> None
    y = np.array([r["label"] for r in rows])
    s = np.array([r["score"] for r in rows])
    assert res["overall"]["dice"]["value"] == pytest.approx(np.mean([r["dice"] for r in rows]))
    assert res["overall"]["auc"]["value"] == pytest.approx(roc_auc(y, s))
    assert res["overall"]["ece"]["value"] == pytest.approx(expected_calibration_error(y, s, 10))
    by_sex = {g["group"]: g for g in res["attributes"]["sex"]["groups"]}
    assert {k: v["n"] for k, v in by_sex.items()} == {"F": 60, "M": 60}
    men = [i for i, r in enumerate(rows) if r["sex"] == "M"]
    assert by_sex["M"]["metrics"]["auc"]["value"] == pytest.approx(roc_auc(y[men], s[men]))
    assert by_sex["M"]["metrics"]["balanced_accuracy"]["value"] == pytest.approx(
        balanced_accuracy(y[men], predicted_labels(s[men]))
    )
    assert by_sex["F"]["metrics"]["accuracy"]["value"] == pytest.approx(
        accuracy(y[::2], predicted_labels(s[::2]))
    )
    for m in res["overall"].values():
        assert m["ci_low"] <= m["value"] <= m["ci_high"]
    ages = {g["group"]: g["n"] for g in res["attributes"]["age_band"]["groups"]}
    assert ages[MISSING_GROUP] == 12 and sum(ages.values()) == 120


@pytest.mark.parametrize("kind", ["auc", "ece", "accuracy", "balanced_accuracy", "mean"])
def test_vectorised_replicates_equal_the_metric_functions(kind):
    rows = table(60, seed=5)
    for r in rows[:3]:
        r["dice"] = None  # missing values are skipped
    spec = MetricSpec.mean("dice") if kind == "mean" else MetricSpec(name=kind, kind=kind)
    col = _Column(spec, rows)
    rng = np.random.default_rng(0)
    valid = np.flatnonzero(col.valid)
    draws = valid[rng.integers(0, valid.size, size=(20, valid.size))]
    batch = col._batch(draws)
    for j in range(20):
        assert batch[j] == pytest.approx(col.value(draws[j]), abs=1e-12, nan_ok=True)
    # Multi-class AUC / ECE from lists of class probabilities.
    rng = np.random.default_rng(1)
    probs = rng.dirichlet(np.ones(3), size=50)
    multi = [
        {"case_id": i, "label": int(rng.integers(0, 3)), "score": p.tolist()}
        for i, p in enumerate(probs)
    ]
    if kind in ("auc", "ece", "balanced_accuracy"):
        col = _Column(MetricSpec(name=kind, kind=kind), multi)
        draws = rng.integers(0, 50, size=(10, 50))
        batch = col._batch(draws)
        for j in range(10):
            assert batch[j] == pytest.approx(col.value(draws[j]), abs=1e-12, nan_ok=True)


def test_bootstrap_ci_covers_the_true_mean():
    covered = 0
    for seed in range(40):
        rng = np.random.default_rng(100 + seed)
        rows = [{"case_id": i, "dice": float(rng.normal(0.8, 0.1))} for i in range(80)]
        res = analyze_subgroups(rows, ["dice"], [], n_boot=400, seed=seed)
        ov = res["overall"]["dice"]
        covered += ov["ci_low"] <= 0.8 <= ov["ci_high"]
        # width close to the normal-theory 95% CI: 2 * 1.96 * 0.1 / sqrt(80)
        assert ov["ci_high"] - ov["ci_low"] == pytest.approx(
            2 * 1.96 * 0.1 / math.sqrt(80), rel=0.3
        )
    assert covered >= 34  # nominal 95% of 40 = 38; binomial slack


def test_reproducible_with_a_seed():
    rows = table()
    a = analyze_subgroups(rows, METRICS, ["sex", "site"], n_boot=100, seed=7)
    b = analyze_subgroups(rows, METRICS, ["sex", "site"], n_boot=100, seed=7)
    c = analyze_subgroups(rows, METRICS, ["sex", "site"], n_boot=100, seed=8)
    assert a == b
    assert a["overall"]["dice"]["ci_low"] != c["overall"]["dice"]["ci_low"]
    # A group's CI does not depend on which other attributes are analysed.
    d = analyze_subgroups(rows, METRICS, ["sex"], n_boot=100, seed=7)
    assert d["attributes"]["sex"] == a["attributes"]["sex"]


def test_gap_small_groups_and_warnings():
    res = analyze_subgroups(table(dice_gap=0.1), METRICS, ["sex", "site"], n_boot=300)
    gap = res["attributes"]["sex"]["gaps"]["dice"]
    assert gap["high_group"] == "F" and gap["best_group"] == "F" and gap["worst_group"] == "M"
    assert gap["value"] == pytest.approx(0.1, abs=0.04)
    assert gap["ci_low"] > 0 and gap["ci_excludes_zero"]
    # Lower is better for HD95 and ECE: best is the low group.
    for name in ("hd95", "ece"):
        g = res["attributes"]["sex"]["gaps"][name]
        assert g["best_group"] == g["low_group"] and g["worst_group"] == g["high_group"]
    # The 4-case site is flagged and left out of the site gap.
    sites = {g["group"]: g for g in res["attributes"]["site"]["groups"]}
    assert sites["Z"]["n"] == 4 and sites["Z"]["too_small"]
    assert not sites["A"]["too_small"]
    assert any("'Z'" in w and "too small to judge" in w for w in res["warnings"])
    site_gap = res["attributes"]["site"]["gaps"]["dice"]
    assert {site_gap["high_group"], site_gap["low_group"]} == {"A", "B"}
    # No real difference -> the CI of the gap includes zero (most of the time; fixed seed here).
    flat = analyze_subgroups(table(dice_gap=0.0), ["dice"], ["sex"], n_boot=300)
    assert not flat["attributes"]["sex"]["gaps"]["dice"]["ci_excludes_zero"]
    # Fewer than two judgeable groups -> no gap, with the reason.
    res = analyze_subgroups(table(), ["dice"], ["site"], n_boot=50, min_group_size=100)
    assert res["attributes"]["site"]["gaps"]["dice"]["value"] is None
    assert "fewer than 2 groups" in res["attributes"]["site"]["gaps"]["dice"]["reason"]


def test_undefined_auc_in_a_group_is_reported():
    rows = table(40)
    for r in rows:
        if r["sex"] == "F":
            r["label"] = 1
    res = analyze_subgroups(rows, [MetricSpec.auc()], ["sex"], n_boot=50)
    f = next(g for g in res["attributes"]["sex"]["groups"] if g["group"] == "F")
    assert f["metrics"]["auc"]["value"] is None and f["metrics"]["auc"]["n_valid_boot"] == 0
    assert any("auc is undefined" in w for w in res["warnings"])


def test_csv_writer(tmp_path):
    res = analyze_subgroups(table(), ["dice", MetricSpec.auc()], ["sex"], n_boot=50)
    path = write_subgroup_csv(res, tmp_path / "sub" / "subgroups.csv")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(subgroup_rows(res)) == 2 + 2 * 2 + 2
    scopes = {(r["scope"], r["group"], r["metric"]) for r in rows}
    assert ("overall", "all", "dice") in scopes and ("group", "M", "auc") in scopes
    gap = next(r for r in rows if r["scope"] == "gap" and r["metric"] == "dice")
    assert gap["group"] == "F - M" and float(gap["ci_low"]) > 0
    assert not list(path.parent.glob(".tmp-*"))


@pytest.mark.parametrize(
    ("rows", "metrics", "attributes", "match"),
    [
        ([], ["dice"], ["sex"], "empty table"),
        (table(20), ["dice"], ["scanner"], "unknown attribute 'scanner'"),
        (table(20), ["iou"], ["sex"], "column 'iou'"),
        (table(20), [MetricSpec.auc(score="prob")], ["sex"], "column 'prob'"),
        ([{"case_id": 1, "dice": 0.5}, {"case_id": 1, "dice": 0.6}], ["dice"], [], "duplicate"),
        ([{"dice": 0.5}], ["dice"], [], "case_id"),
        ([{"case_id": 1, "dice": "high"}], ["dice"], [], "not a number"),
        (table(20), [], ["sex"], "no metrics"),
    ],
)
def test_bad_inputs(rows, metrics, attributes, match):
    with pytest.raises(ValueError, match=match):
        analyze_subgroups(rows, metrics, attributes, n_boot=10)


def test_bad_metric_kind():
    with pytest.raises(ValueError, match="unknown kind"):
        MetricSpec(name="x", kind="f1")
