"""Paired comparison of two arms: hierarchical bootstrap over test cases and seeds."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_auc_score

from umit.eval.paired import full_metric, paired_difference, read_per_case
from umit.finetune.subsets import select_labeled


def _cls_rows(labels, scores):
    return [
        {"case_id": f"c{i:03d}", "label": int(y), "score": float(s)}
        for i, (y, s) in enumerate(zip(labels, scores, strict=True))
    ]


def test_identical_arms_give_zero_difference_and_a_ci_around_zero():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 80)
    arms = {s: _cls_rows(y, rng.random(80) + 0.3 * y) for s in range(5)}
    res = paired_difference(arms, arms, "auc", n_boot=300)
    assert res["diff"] == 0.0 and res["ci_low"] == 0.0 and res["ci_high"] == 0.0
    assert not res["excludes_zero"] and res["n_seeds"] == 5 and res["n_cases"] == 80


def test_known_auc_gain_is_recovered():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 120)
    b, a, gains = {}, {}, []
    for s in range(5):
        base = rng.random(120)
        better = base + 0.4 * y  # positives shifted up: a known, seed-specific AUC gain
        gains.append(roc_auc_score(y, better) - roc_auc_score(y, base))
        b[s], a[s] = _cls_rows(y, base), _cls_rows(y, better)
    res = paired_difference(a, b, "auc", n_boot=500)
    assert abs(res["diff"] - np.mean(gains)) < 1e-9
    assert res["ci_low"] < np.mean(gains) < res["ci_high"] and res["excludes_zero"]
    assert abs(res["a_mean"] - res["b_mean"] - res["diff"]) < 1e-9
    flipped = paired_difference(b, a, "auc", n_boot=500)
    assert abs(flipped["diff"] + res["diff"]) < 1e-9 and flipped["ci_high"] < 0


def test_dice_difference_and_seed_pairing():
    rng = np.random.default_rng(2)
    b = {
        s: [{"case_id": f"c{i}", "dice_mean": v} for i, v in enumerate(rng.random(30))]
        for s in range(3)
    }
    a = {s: [{**r, "dice_mean": r["dice_mean"] + 0.1} for r in rows] for s, rows in b.items()}
    a[7] = a[0]  # a seed only one arm has is left out (seeds are paired)
    res = paired_difference(a, b, "dice", n_boot=200)
    assert res["n_seeds"] == 3 and abs(res["diff"] - 0.1) < 1e-12
    assert abs(res["ci_low"] - 0.1) < 1e-9 and abs(res["ci_high"] - 0.1) < 1e-9


def test_seed_noise_widens_the_ci():
    """With the test cases fixed, the CI still reflects seed-to-seed spread."""
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 200)
    base = rng.random(200)
    b = {s: _cls_rows(y, base) for s in range(5)}
    a = {s: _cls_rows(y, base + (0.1 if s % 2 else -0.1) * y) for s in range(5)}
    res = paired_difference(a, b, "auc", n_boot=500)
    assert res["ci_low"] < 0 < res["ci_high"]


def test_per_case_csv_roundtrip(tmp_path):
    from umit.eval.evaluate import _rows_to_csv

    rows = [
        {"case_id": "a", "label": 1, "score": 0.9},
        {"case_id": "b", "label": 0, "score": 0.2},
        {"case_id": "c", "label": 0, "score": 0.6},
    ]
    (tmp_path / "p.csv").write_text(_rows_to_csv(rows))
    back = read_per_case(tmp_path / "p.csv")
    assert back[0]["label"] == 1 and back[0]["score"] == 0.9
    assert full_metric(back, "auc") == 1.0 and abs(full_metric(back, "accuracy") - 2 / 3) < 1e-12


def test_count_subsets_are_nested_and_stratified():
    ids = [f"c{i:04d}" for i in range(1188)]
    strata = ["1" if i % 4 == 0 else "0" for i in range(1188)]  # 25% positives
    for seed in range(5):
        subsets = [set(select_labeled(ids, strata, count=k, seed=seed)) for k in (24, 48, 96)]
        assert subsets[0] <= subsets[1] <= subsets[2]
        assert [len(s) for s in subsets] == [24, 48, 96]
        assert sum(strata[int(c[1:])] == "1" for c in subsets[0]) == 6
