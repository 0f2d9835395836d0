"""Shift suites of ``umit evaluate``: every perturbation is the identity at strength 0 and does
what its docstring says at strength > 0; leave-one-site-out and the CIs by hand; the suite inside
``umit evaluate`` on a tiny store."""

from __future__ import annotations

import json

import numpy as np
import pytest

from umit.errors import InputError
from umit.eval.shift import (
    PERTURBATIONS,
    bootstrap_mean,
    perturb,
    site_shift,
    summarize_shift,
)

from _shared import TinyCls, TinySeg


def _image():
    rng = np.random.default_rng(0)
    x = np.full((1, 24, 24, 16), -1.0, np.float32)  # pad value -1 outside the body
    x[0, 4:20, 4:20, 2:14] = rng.normal(0.3, 0.2, (16, 16, 12))
    ref = np.zeros((24, 24, 16), np.int64)
    ref[4:20, 4:20, 2:14] = 1
    ref[8:12, 8:14, 4:10] = 2
    x[0][ref == 2] += 0.5
    return x, ref


@pytest.mark.parametrize("kind", list(PERTURBATIONS))
def test_strength_zero_is_the_identity_and_seeds_replay(kind):
    x, ref = _image()
    y, params = perturb(x, kind, 0.0, seed=3, pad_value=-1.0, reference=ref)
    np.testing.assert_allclose(y, x, atol=1e-6)
    a, pa = perturb(x, kind, 0.7, seed=3, pad_value=-1.0, reference=ref)
    b, _ = perturb(x, kind, 0.7, seed=3, pad_value=-1.0, reference=ref)
    np.testing.assert_array_equal(a, b)
    assert pa["kind"] == kind and pa["strength"] == 0.7
    assert np.abs(a - x).max() > 1e-3  # it does something


def test_each_perturbation_does_what_it_says():
    x, ref = _image()
    fg = x[0] != -1.0
    sd = x[0][fg].std()
    y, p = perturb(x, "noise", 0.5, seed=1, pad_value=-1.0)
    assert p["sigma"] == pytest.approx(0.5 * sd)
    assert (y - x).std() == pytest.approx(0.5 * sd, rel=0.03)
    y, p = perturb(x, "bias_field", 1.0, seed=1, pad_value=-1.0)
    ratio = (y[0][fg] + 1) / (x[0][fg] + 1)
    assert ratio.min() >= 0.5 - 1e-5 and ratio.max() <= 2.0 + 1e-5 and ratio.max() > 1.5
    y, p = perturb(x, "intensity_remap", 1.0, seed=1, pad_value=-1.0)
    order = np.argsort(x[0].ravel())
    assert np.all(np.diff(y[0].ravel()[order]) >= -1e-6)  # monotone
    assert p["gamma"] == pytest.approx(2**1.5)
    y, _ = perturb(x, "texture", 1.0, seed=1, pad_value=-1.0, reference=ref)
    np.testing.assert_array_equal(y[0][ref == 0], x[0][ref == 0])  # outside: unchanged
    for lab in (1, 2):  # inside: values drawn from the same structure only
        assert np.isin(y[0][ref == lab], x[0][ref == lab]).all()
    grid = np.indices((24, 24, 16)).sum(0) % 2 * 2.0 - 1.0  # checkerboard: all high frequency
    for kind in ("blur", "resolution"):
        y, _ = perturb(grid[None].astype(np.float32), kind, 1.0, seed=0)
        assert np.abs(y).mean() < 0.3 * np.abs(grid).mean()
        flat, _ = perturb(np.full((1, 24, 24, 16), 2.0, np.float32), kind, 1.0, seed=0)
        np.testing.assert_allclose(flat, 2.0, atol=1e-5)
    with pytest.raises(ValueError, match="unknown perturbation 'snow'"):
        perturb(x, "snow", 0.5, seed=0)
    with pytest.raises(ValueError, match="strength must be in"):
        perturb(x, "noise", 1.5, seed=0)
    with pytest.raises(ValueError, match="needs the reference label"):
        perturb(x, "texture", 0.5, seed=0)


def test_bootstrap_and_site_shift_by_hand():
    v = [0.2, 0.4, 0.9, float("nan")]
    b = bootstrap_mean(v, 2000, 0)
    assert b["mean"] == pytest.approx(0.5) and b["n"] == 3 and b["ci_low"] < 0.5 < b["ci_high"]
    rows = [{"site": s, "d": d} for s, d in [("a", 0.9), ("a", 0.8), ("b", 0.6), ("b", 0.4)]]
    r = site_shift(rows, "d", {"a": 10}, n_boot=500)
    assert r["per_site"]["b"]["train_cases"] == 0 and r["per_site"]["a"]["train_cases"] == 10
    gap = r["unseen_minus_seen"]
    assert gap["value"] == pytest.approx(0.5 - 0.85)
    assert gap["ci_low"] <= gap["value"] <= gap["ci_high"] < 0


def test_auc_under_shift_by_hand():
    """Labels 0 0 1 1: clean scores rank every (positive, negative) pair right (AUC 1); under
    noise 0.1 0.6 0.4 0.9 rank 3 of 4 (AUC 0.75), a change of -0.25 paired case by case."""
    labels, clean, noisy = [0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9], [0.1, 0.6, 0.4, 0.9]
    rows = []
    for strength, scores in ((0.0, clean), (1.0, noisy)):
        for i, (y, sc) in enumerate(zip(labels, scores, strict=True)):
            correct = float((sc >= 0.5) == y)
            rows.append({"case_id": f"c{i}", "kind": "noise", "strength": strength,
                         "correct": correct, "label": y, "score": sc})  # fmt: skip
    out = summarize_shift(rows, "correct", n_boot=500, seed=0)["noise"]
    assert out["0"]["auc"]["mean"] == pytest.approx(1.0) and out["0"]["mean"] == 1.0
    auc = out["1"]["auc"]
    assert auc["mean"] == pytest.approx(0.75) and out["1"]["mean"] == pytest.approx(0.5)
    assert auc["change"]["mean"] == pytest.approx(-0.25) and auc["n"] == 4
    assert auc["change"]["ci_low"] <= -0.25 <= auc["change"]["ci_high"] <= 0.0
    assert out["0"]["auc"]["change"]["ci_low"] == out["0"]["auc"]["change"]["ci_high"] == 0.0
    # no score (a multi-class model): accuracy alone
    plain = [{k: v for k, v in r.items() if k != "score"} for r in rows]
    assert "auc" not in summarize_shift(plain, "correct", n_boot=50, seed=0)["noise"]["1"]


def test_perturbations_that_leave_binary_masks_unchanged_are_marked():
    """Noise and the intensity remap scale with the foreground's spread: on a binary mask (every
    foreground voxel 1) they change nothing, and the summary says so (changed 0) rather than
    reporting a model that is robust to them."""
    x = np.zeros((1, 12, 12, 12), np.float32)
    x[0, 3:9, 3:9, 3:9] = 1.0
    for kind in ("noise", "intensity_remap"):
        assert np.array_equal(perturb(x, kind, 1.0, seed=0)[0], x), kind
    assert not np.array_equal(perturb(x, "blur", 1.0, seed=0)[0], x)
    rows = [{"case_id": "a", "kind": k, "strength": 0.0, "correct": 1.0} for k in ("noise", "blur")]
    rows += [
        {"case_id": "a", "kind": "noise", "strength": 1.0, "correct": 1.0, "changed": False},
        {"case_id": "a", "kind": "blur", "strength": 1.0, "correct": 0.0, "changed": True},
    ]
    out = summarize_shift(rows, "correct", n_boot=20, seed=0)
    assert out["noise"]["1"]["changed"] == 0.0 and out["blur"]["1"]["changed"] == 1.0
    assert "changed" not in out["noise"]["0"]


def tiny_cls_shift(**kw):
    return TinyCls(**kw)


def test_evaluate_shift_of_a_binary_classifier_reports_auc(
    tiny_ct_store, tmp_path, register_models
):
    """The clean AUC of the suite is the plain evaluation's AUC (its per-case scores)."""
    from umit.eval.evaluate import EvaluateConfig
    from umit.eval.evaluate import run as evaluate
    from umit.eval.paired import full_metric, read_per_case
    from umit.finetune.run import FinetuneConfig
    from umit.finetune.run import run as finetune

    register_models(tiny_cls_shift)
    cfg = FinetuneConfig.model_validate(
        {
            "data": tiny_ct_store, "out": tmp_path / "m", "model": "tiny_cls_shift",
            "task": "classification", "label_key": "sex", "model_args": {},
            "crop_size": [16, 16, 16], "val_fraction": 0, "exclude_splits": [],
            "train": {"total_steps": 2, "batch_size": 2, "warmup_steps": 1, "progress": False},
        }
    )  # fmt: skip
    finetune(cfg)
    evaluate(
        EvaluateConfig(
            model=tmp_path / "m" / "best.pt", data=tiny_ct_store, out=tmp_path / "ev", n_boot=50,
            case_figures=False, shift=["all"], shift_strengths=[1.0], split="all",
        )
    )  # fmt: skip
    rows = read_per_case(tmp_path / "ev" / "per_case.csv")
    suite = json.loads((tmp_path / "ev" / "shift.json").read_text())["perturbations"]
    assert sorted(suite) == sorted(k for k in PERTURBATIONS if k != "texture")  # no label map
    noise = suite["noise"]
    assert noise["0"]["auc"]["mean"] == pytest.approx(full_metric(rows, "auc"), abs=1e-9)
    assert noise["0"]["auc"]["n"] == len(rows) and "auc" in noise["1"]
    assert (tmp_path / "ev" / "shift.png").stat().st_size > 1000
    with pytest.raises(InputError, match=r"\['texture'\] needs a segmentation reference"):
        evaluate(
            EvaluateConfig(
                model=tmp_path / "m" / "best.pt", data=tiny_ct_store, out=tmp_path / "e2",
                n_boot=5, case_figures=False, shift=["texture"], split="all",
            )
        )  # fmt: skip


def tiny_seg_shift(**kw):
    return TinySeg(**kw)


def test_evaluate_runs_the_suites(tiny_ct_store, tmp_path, register_models):
    from umit.eval.evaluate import EvaluateConfig
    from umit.eval.evaluate import run as evaluate
    from umit.finetune.run import FinetuneConfig
    from umit.finetune.run import run as finetune

    register_models(tiny_seg_shift)
    cfg = FinetuneConfig.model_validate(
        {
            "data": tiny_ct_store, "out": tmp_path / "m", "model": "tiny_seg_shift",
            "model_args": {}, "crop_size": [16, 16, 16], "val_fraction": 0,
            "train": {"total_steps": 2, "batch_size": 2, "warmup_steps": 1, "progress": False},
        }
    )  # fmt: skip
    finetune(cfg)
    e = evaluate(
        EvaluateConfig(
            model=tmp_path / "m" / "best.pt", data=tiny_ct_store, out=tmp_path / "ev", n_boot=50,
            case_figures=False, shift=["noise", "texture"], shift_strengths=[1.0],
            loso=True,
        )
    )  # fmt: skip
    lines = (tmp_path / "ev" / "per_case.csv").read_text().splitlines()
    cols = lines[0].split(",")
    per_case = {ln.split(",")[0]: float(ln.split(",")[cols.index("dice_mean")]) for ln in lines[1:]}
    shift = json.loads((tmp_path / "ev" / "shift.json").read_text())
    assert set(shift["perturbations"]) == {"noise", "texture"}
    assert set(shift["perturbations"]["noise"]) == {"0", "1"}
    # strength 0 is the plain evaluation, case by case
    srows = (tmp_path / "ev" / "shift.csv").read_text().splitlines()
    sc = srows[0].split(",")
    for ln in srows[1:]:
        f = ln.split(",")
        if float(f[sc.index("strength")]) == 0:
            assert float(f[sc.index("dice")]) == pytest.approx(per_case[f[0]], abs=1e-9)
    assert shift["perturbations"]["noise"]["0"]["mean"] == pytest.approx(
        np.mean(list(per_case.values()))
    )
    loso = shift["leave_one_site_out"]
    from umit.data.store import Store

    index = Store(tiny_ct_store).index
    train_sites = [index[c]["site"] for c in index if index[c]["split"] != "test"]
    for site, entry in loso["per_site"].items():
        assert entry["train_cases"] == train_sites.count(site)
    assert (tmp_path / "ev" / "shift.png").stat().st_size > 1000
    assert e["shift"]["perturbations"] == shift["perturbations"]
    with pytest.raises(InputError, match="unknown shift"):
        evaluate(
            EvaluateConfig(
                model=tmp_path / "m" / "best.pt", data=tiny_ct_store, out=tmp_path / "e2",
                n_boot=5, case_figures=False, shift=["fog"],
            )
        )  # fmt: skip
