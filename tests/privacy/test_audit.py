"""Membership-inference audit: ROC maths against scikit-learn, the audit on models that did and
did not memorize, near-duplicates, and ``umit audit privacy`` end to end on a phantom store."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from _synthetic import SmallConv, audit, make_cases, mlp, train
from sklearn.metrics import roc_auc_score, roc_curve
from torch import nn

from umit.privacy.audit import (
    attack_metrics,
    find_duplicates,
    roc_points,
    tpr_at_fpr,
    volume_signature,
)


def tiny_cls_for_audit(in_chans=1, num_classes=2, img_size=None):
    return nn.Sequential(
        nn.Conv3d(in_chans, 8, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool3d(1),
        nn.Flatten(),
        nn.Linear(8, num_classes),
    )


def tiny_seg_for_audit(in_chans=1, out_channels=2, img_size=None):
    return nn.Sequential(
        nn.Conv3d(in_chans, 8, 3, padding=1), nn.GELU(), nn.Conv3d(8, out_channels, 1)
    )


@pytest.fixture(autouse=True)
def _stand_in_models(register_models):
    register_models(tiny_cls_for_audit, tiny_seg_for_audit)


def test_roc_points_and_tpr_at_fpr_match_sklearn():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    s = np.round(rng.normal(size=300) + 0.7 * y, 1)  # rounded: many ties
    fpr, tpr, thr = roc_points(y, s)
    sk_fpr, sk_tpr, sk_thr = roc_curve(y, s, drop_intermediate=False)
    np.testing.assert_allclose(fpr, sk_fpr)
    np.testing.assert_allclose(tpr, sk_tpr)
    np.testing.assert_allclose(thr[1:], sk_thr[1:])
    for f in (0.0, 0.01, 0.05, 0.2):
        assert tpr_at_fpr(fpr, tpr, f) == pytest.approx(sk_tpr[sk_fpr <= f].max())
    m = attack_metrics(s[y == 1], s[y == 0], n_boot=50)["metrics"]
    assert m["auc"]["value"] == pytest.approx(roc_auc_score(y, s))
    assert m["advantage"]["value"] == pytest.approx(np.max(sk_tpr - sk_fpr))


def test_attack_metrics_cis_and_few_nonmember_warning():
    rng = np.random.default_rng(1)
    sep = attack_metrics(rng.normal(3, 1, 40), rng.normal(0, 1, 20), n_boot=200, seed=3)
    auc = sep["metrics"]["auc"]
    assert auc["ci_low"] <= auc["value"] <= auc["ci_high"] and auc["value"] > 0.95
    # 20 non-members cannot resolve FPR 1 % or 0.1 %: said so
    assert len(sep["warnings"]) == 2 and "only 20 non-members" in sep["warnings"][0]
    same = attack_metrics(rng.normal(0, 1, 400), rng.normal(0, 1, 400), n_boot=200)["metrics"]
    assert abs(same["auc"]["value"] - 0.5) < 0.06
    assert 0.03 < same["auc"]["ci_high"] - same["auc"]["ci_low"] < 0.12  # ~ +-1.96 * 0.02
    again = attack_metrics([1.0, 2.0, 3.0], [0.5, 2.5], n_boot=50, seed=5)
    assert again == attack_metrics([1.0, 2.0, 3.0], [0.5, 2.5], n_boot=50, seed=5)
    with pytest.raises(ValueError, match="at least 2 members"):
        attack_metrics([1.0], [0.0, 1.0])


def test_audit_separates_overfit_from_well_trained_model(tmp_path, one_thread):
    nonmembers = make_cases(32, 99, "n")
    # overfit: an MLP, 60 full-batch steps on 8 noise volumes -> memorized
    few = make_cases(8, 1, "m")
    overfit = mlp()
    train(overfit, few, tmp_path / "overfit", steps=60)
    hit = audit(overfit, few, nonmembers)["metrics"]
    assert hit["auc"]["value"] >= 0.9 and hit["auc"]["ci_low"] >= 0.75
    assert hit["advantage"]["value"] >= 0.7
    # well trained: a small model that learns the signal but cannot memorize noise
    many = make_cases(32, 2, "m")
    good = SmallConv()
    train(good, many, tmp_path / "good", steps=60)
    with torch.no_grad():
        pred = good(nonmembers[1]).argmax(1)
    assert (pred == torch.tensor(nonmembers[2])).float().mean() >= 0.6  # it did learn
    chance = audit(good, many, nonmembers)["metrics"]
    assert abs(chance["auc"]["value"] - 0.5) <= 0.15
    assert chance["auc"]["ci_low"] < 0.5 < chance["auc"]["ci_high"]
    assert hit["auc"]["value"] - chance["auc"]["value"] >= 0.35


def test_calibration_removes_per_case_difficulty():
    """Hard cases have high loss whatever the membership; the reference's loss cancels that."""
    rng = np.random.default_rng(2)
    difficulty = rng.gamma(2.0, 1.0, 120)
    member = np.arange(120) < 60
    target = difficulty - 0.3 * member + rng.normal(0, 0.05, 120)
    reference = difficulty + rng.normal(0, 0.05, 120)
    loss = attack_metrics(-target[member], -target[~member], n_boot=50)["metrics"]["auc"]["value"]
    cal = attack_metrics((reference - target)[member], (reference - target)[~member], n_boot=50)[
        "metrics"
    ]["auc"]["value"]
    assert loss < 0.75 and cal > 0.95


def test_near_duplicates_flag_a_copied_case_not_distinct_patients(tiny_ct_store):
    from umit.data.store import Store

    store = Store(tiny_ct_store)
    vols = {c: np.asarray(store.case(c).read(), np.float32) for c in store.case_ids}
    train_ids = [c for c in store.case_ids if store.index[c]["split"] == "train"]
    test_ids = [c for c in store.case_ids if store.index[c]["split"] == "test"]
    rng = np.random.default_rng(0)
    # a re-export of a training case with 10 % noise (a 1-voxel shift is not caught: no registration)
    v = vols[train_ids[3]]
    copy = v + rng.normal(0, 0.1 * v.std(), v.shape)
    sig = {c: volume_signature(v) for c, v in vols.items()}
    test_sigs = {c: sig[c] for c in test_ids} | {"copy": volume_signature(copy)}
    found = find_duplicates({c: sig[c] for c in train_ids}, test_sigs, threshold=0.99)
    assert [(p["train"], p["test"]) for p in found["pairs"]] == [(train_ids[3], "copy")]
    assert found["nearest"][0]["test"] == "copy" and found["nearest"][0]["ncc"] > 0.99
    assert all(p["ncc"] < 0.99 for p in found["nearest"][1:])
    assert volume_signature(vols[train_ids[0]]) @ sig[train_ids[0]] == pytest.approx(1.0)


def test_audit_cli_on_finetuned_model(tiny_ct_store, tmp_path, capsys):
    from umit.cli.main import main

    common = [
        "--data", str(tiny_ct_store), "task=classification", "model=tiny_cls_for_audit",
        "model_args={}", "label_key=sex", "crop_size=[16,16,16]", "samples_per_case=1",
        "val_fraction=0", "train.batch_size=2", "train.total_steps=8", "train.progress=false",
        "train.warmup_steps=0", "train.log_every=8",
    ]  # fmt: skip
    assert main(["finetune", "--out", str(tmp_path / "ft"), *common]) == 0
    assert main(["finetune", "--out", str(tmp_path / "ref"), "train.seed=1", *common]) == 0
    out = tmp_path / "audit"
    argv = ["audit", "privacy", "--model", str(tmp_path / "ft" / "best.pt"), "--data"]
    argv += [str(tiny_ct_store), "--reference", str(tmp_path / "ref" / "best.pt")]
    assert main([*argv, "--out", str(out), "n_boot=50"]) == 0
    printed = capsys.readouterr().out
    assert "calibrated (8 members / 2 non-members)" in printed
    result = json.loads((out / "audit.json").read_text())
    assert result["kind"] == "classification" and set(result["attacks"]) == {"loss", "calibrated"}
    ckpt = torch.load(tmp_path / "ft" / "best.pt", weights_only=True)
    members = sorted(c for c, v in result["per_case"].items() if v["member"])
    assert members == sorted(ckpt["cases"]["train"])
    assert {c for c, v in result["per_case"].items() if not v["member"]} == set(
        ckpt["cases"]["test"]
    )
    # the reference trained on the same cases: the report says the calibration is not valid
    assert any("reference model was trained on 8 audited cases" in w for w in result["warnings"])
    assert "membership" in (out / "report.md").read_text().lower()
    assert (out / "figures" / "report-01-roc.png").stat().st_size > 1000
    # "non-members" the model was trained on are refused
    assert main([*argv, "--nonmembers", "train", "--out", str(out / "bad")]) == 2
    assert "trained on" in capsys.readouterr().err


def test_audit_mae_run(tiny_ct_store, tmp_path):
    from umit.privacy.audit import AuditConfig, run
    from umit.ssl.pretrain import PretrainConfig
    from umit.ssl.pretrain import run as pretrain

    cfg = PretrainConfig.model_validate(
        {
            "data": tiny_ct_store,
            "out": tmp_path / "mae",
            "model": "vit3d_test_p16",
            "crop_size": [32, 32, 16],
            "mae": {"decoder_dim": 32, "decoder_depth": 1, "decoder_heads": 4},
            "val_cases": 2,
            "val_crops": 1,
            "train": {"total_steps": 2, "batch_size": 2, "progress": False, "log_every": 2},
        }
    )
    pretrain(cfg)
    # encoder.pt has no decoder: the run's latest.pt is audited instead
    res = run(
        AuditConfig(
            model=tmp_path / "mae" / "encoder.pt",
            data=tiny_ct_store,
            out=tmp_path / "audit",
            nonmembers="val,test",
            n_masks=2,
            n_boot=20,
        )
    )
    assert res["kind"] == "mae"
    a = res["attacks"]["loss"]
    assert (a["n_members"], a["n_nonmembers"]) == (6, 4)
    losses = [v["loss"] for v in res["per_case"].values()]
    assert all(np.isfinite(losses)) and len(set(losses)) == 10


def test_audit_segmentation_model_on_fixed_crops(tiny_ct_store, tmp_path):
    from umit.finetune.run import FinetuneConfig
    from umit.finetune.run import run as finetune
    from umit.privacy.audit import AuditConfig, run

    ft = FinetuneConfig.model_validate(
        {
            "data": tiny_ct_store,
            "out": tmp_path / "seg",
            "model": "tiny_seg_for_audit",
            "model_args": {},
            "crop_size": [16, 16, 16],
            "samples_per_case": 1,
            "val_fraction": 0,
            "train": {"total_steps": 4, "batch_size": 2, "progress": False, "log_every": 4},
        }
    )
    s = finetune(ft)
    cfg = AuditConfig(
        model=s["model"], data=tiny_ct_store, out=tmp_path / "a", n_crops=2, n_boot=20
    )
    res = run(cfg)
    assert res["kind"] == "segmentation"
    assert (res["attacks"]["loss"]["n_members"], res["attacks"]["loss"]["n_nonmembers"]) == (8, 2)
    # fixed, seeded crops: the same model scores the same cases identically
    again = run(cfg.model_copy(update={"out": tmp_path / "b"}))
    assert again["per_case"] == res["per_case"]
