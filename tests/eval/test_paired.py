"""Paired comparison of two arms: hierarchical bootstrap over test cases and seeds."""

from __future__ import annotations

import numpy as np
import pytest
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


def _dice_arms(rng, diffs, n=20):
    """Per-case Dice rows of two arms; arm a is b plus the seed's difference (tiny case noise)."""
    a, b = {}, {}
    for s, d in enumerate(diffs):
        base = rng.random(n)
        b[s] = [{"case_id": f"c{i}", "dice_mean": v} for i, v in enumerate(base)]
        a[s] = [
            {"case_id": f"c{i}", "dice_mean": v + d + rng.normal(0, 0.01)}
            for i, v in enumerate(base)
        ]
    return a, b


def test_seed_groups_resample_seeds_one_by_one_unless_some_are_shared():
    from umit.eval.paired import seed_groups

    seeds = [5, 6, 7, 8]
    assert seed_groups(seeds, None) is None
    assert seed_groups(seeds, {5: "r0", 6: "r1", 7: "r2", 8: "r3"}) is None  # one run per seed
    assert seed_groups(seeds, {s: "r0" for s in seeds}) is None  # one shared run: conditional
    assert seed_groups(seeds, {5: "r0", 6: "r1", 7: "r0", 8: "r1"}) == [[0, 2], [1, 3]]
    with pytest.raises(ValueError, match=r"no group for seeds \[8\]"):
        seed_groups(seeds, {5: "r0", 6: "r1", 7: "r0"})


def test_clusters_of_one_seed_each_give_the_plain_bootstrap_draw_for_draw():
    rng = np.random.default_rng(4)
    a, b = _dice_arms(rng, rng.normal(0.02, 0.05, 6))
    plain = paired_difference(a, b, "dice", n_boot=300)
    own = paired_difference(a, b, "dice", n_boot=300, clusters={s: f"run{s}" for s in a})
    shared = paired_difference(a, b, "dice", n_boot=300, clusters={s: "run0" for s in a})
    assert plain == own == shared and plain["n_clusters"] is None


def test_resampling_shared_runs_restores_coverage_that_seed_resampling_loses():
    """5 pretraining runs x 3 seeds each, true mean difference 0, a run effect (sd 1) much larger
    than the seed noise (sd 0.1): the seeds of a run are near copies, so resampling them one by one
    treats 15 draws as independent and the CI covers 0 far less often than resampling runs does.
    (With 5 clusters the percentile bootstrap still under-covers somewhat: ~0.8, not 0.95.)"""
    rng = np.random.default_rng(0)
    runs, per_run, trials = 5, 3, 200
    covered = {"seeds": 0, "runs": 0}
    for _ in range(trials):
        effect = rng.normal(0, 1, runs)
        diffs = [effect[s // per_run] + rng.normal(0, 0.1) for s in range(runs * per_run)]
        a, b = _dice_arms(rng, diffs)
        clusters = {s: s // per_run for s in a}
        for name, c in (("seeds", None), ("runs", clusters)):
            res = paired_difference(a, b, "dice", n_boot=400, clusters=c)
            covered[name] += res["ci_low"] <= 0 <= res["ci_high"]
            if c is not None:
                assert res["n_clusters"] == runs and res["n_seeds"] == runs * per_run
    rate = {k: v / trials for k, v in covered.items()}
    assert rate["runs"] >= 0.72 and rate["seeds"] <= 0.70
    assert rate["runs"] - rate["seeds"] >= 0.12
