"""Metrics against references: MONAI (Dice, HD95, NSD), scikit-learn (AUC, accuracy), hand (ECE)."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from scipy import ndimage

from umit.metrics import (
    accuracy,
    balanced_accuracy,
    classification_metrics,
    dice,
    expected_calibration_error,
    flatten_label_metrics,
    hausdorff_distance,
    hd95,
    predicted_labels,
    roc_auc,
    segmentation_metrics,
    surface,
    surface_dice,
    surface_distances,
)

monai_metrics = pytest.importorskip("monai.metrics")
SPACING = (0.8, 1.1, 2.5)
SHAPE = (40, 36, 20)


def blob(rng: np.random.Generator, shape=SHAPE, n: int = 3) -> np.ndarray:
    seeds = np.zeros(shape, bool)
    for _ in range(n):
        seeds[tuple(int(rng.integers(4, s - 4)) for s in shape)] = True
    return ndimage.binary_dilation(seeds, iterations=int(rng.integers(3, 6)))


def perturbed(rng: np.random.Generator, mask: np.ndarray) -> np.ndarray:
    """A plausible prediction of ``mask``: shifted, eroded or dilated, with a false positive."""
    out = np.roll(mask, tuple(int(v) for v in rng.integers(-1, 2, size=3)), axis=(0, 1, 2))
    out = ndimage.binary_dilation(out) if rng.random() < 0.5 else ndimage.binary_erosion(out)
    out[tuple(int(rng.integers(0, s)) for s in mask.shape)] = True
    return out


def pairs(n: int = 6, seed: int = 0):
    rng = np.random.default_rng(seed)
    for _ in range(n):
        ref = blob(rng)
        yield perturbed(rng, ref), ref


def monai_values(
    pred: np.ndarray, ref: np.ndarray, tol: float
) -> tuple[float, float, float, float]:
    p = torch.from_numpy(pred)[None, None].float()
    r = torch.from_numpy(ref)[None, None].float()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return (
            monai_metrics.DiceMetric(include_background=True)(p, r).item(),
            monai_metrics.compute_hausdorff_distance(
                p, r, include_background=True, percentile=95, spacing=SPACING
            ).item(),
            monai_metrics.compute_hausdorff_distance(
                p, r, include_background=True, spacing=SPACING
            ).item(),
            monai_metrics.compute_surface_dice(
                p, r, [tol], include_background=True, spacing=SPACING
            ).item(),
        )


def test_segmentation_metrics_match_monai_with_anisotropic_spacing():
    worst = np.zeros(4)
    for pred, ref in pairs():
        ref_vals = monai_values(pred, ref, tol=1.7)
        ours = (
            dice(pred, ref),
            hd95(pred, ref, SPACING),
            hausdorff_distance(pred, ref, SPACING, percentile=None),
            surface_dice(pred, ref, SPACING, 1.7),
        )
        assert 0.2 < ours[0] < 0.98  # the pairs overlap partially: a meaningful comparison
        worst = np.maximum(worst, np.abs(np.subtract(ours, ref_vals)))
        np.testing.assert_allclose(ours, ref_vals, rtol=1e-5, atol=1e-5)
    print("max |umit - monai| (dice, hd95, hd, nsd):", worst)


def test_multilabel_metrics_equal_per_label_binary_metrics():
    rng = np.random.default_rng(1)
    ref = np.zeros(SHAPE, np.uint8)
    pred = np.zeros(SHAPE, np.uint8)
    for lab in (1, 2, 4):
        r = blob(rng, n=2)
        ref[r] = lab
        pred[perturbed(rng, r)] = lab
    res = segmentation_metrics(pred, ref, SPACING, nsd_tolerance_mm={1: 1.0, 2: 2.0, 4: 1.5})
    assert sorted(res) == [1, 2, 4]
    for lab, tol in ((1, 1.0), (2, 2.0), (4, 1.5)):
        p, r = pred == lab, ref == lab
        assert res[lab]["dice"] == pytest.approx(dice(p, r), abs=1e-12)
        assert res[lab]["hd95"] == pytest.approx(hd95(p, r, SPACING), abs=1e-9)
        assert res[lab]["nsd"] == pytest.approx(surface_dice(p, r, SPACING, tol), abs=1e-12)
    # MONAI Dice on the one-hot maps.
    onehot = lambda a: torch.from_numpy(np.stack([a == k for k in (1, 2, 4)]))[None].float()  # noqa: E731
    monai_dice = monai_metrics.DiceMetric(include_background=True)(onehot(pred), onehot(ref))[0]
    np.testing.assert_allclose([res[k]["dice"] for k in (1, 2, 4)], monai_dice.numpy(), rtol=1e-6)
    flat = flatten_label_metrics(res)
    assert flat["dice_2"] == res[2]["dice"]
    assert flat["dice_mean"] == pytest.approx(np.mean([res[k]["dice"] for k in (1, 2, 4)]))


def test_label_only_in_one_map_and_requested_absent_label():
    ref = np.zeros((10, 10, 6), np.int16)
    pred = np.zeros_like(ref)
    ref[2:5, 2:5, 1:3] = 1
    pred[6:8, 6:8, 2:4] = 2
    res = segmentation_metrics(pred, ref, (1.0, 1.0, 2.0), labels=[1, 2, 3])
    diag = math.sqrt(9**2 + 9**2 + 10**2)
    assert res[1] == {"dice": 0.0, "hd95": pytest.approx(diag), "nsd": 0.0}
    assert res[2]["dice"] == 0.0 and res[2]["hd95"] == pytest.approx(diag)
    assert all(math.isnan(v) for v in res[3].values())
    res = segmentation_metrics(pred, ref, 1.0, labels=[1], missing="inf", empty_value=1.0)
    assert res[1]["hd95"] == math.inf


def test_empty_mask_conventions():
    empty = np.zeros((8, 8, 8), bool)
    full = empty.copy()
    full[2:5, 2:5, 2:5] = True
    assert math.isnan(dice(empty, empty)) and dice(empty, empty, empty_value=1.0) == 1.0
    assert math.isnan(hd95(empty, empty, 1.0)) and math.isnan(surface_dice(empty, empty, 1.0, 1.0))
    assert dice(full, empty) == 0.0 and surface_dice(empty, full, 1.0, 1.0) == 0.0
    assert hd95(full, empty, (1, 1, 2)) == pytest.approx(math.sqrt(49 + 49 + 14**2))
    assert hd95(full, empty, 1.0, missing="inf") == math.inf
    assert dice(full, full) == 1.0 and hd95(full, full, 1.0) == 0.0
    assert surface_dice(full, full, 1.0, 0.0) == 1.0


def test_surface_is_mask_minus_erosion_and_2d_works():
    rng = np.random.default_rng(2)
    m = blob(rng)
    m[0, 5:10, 5:10] = True  # touching the image border: border voxels are surface
    assert np.array_equal(surface(m), m ^ ndimage.binary_erosion(m))
    sq = np.zeros((12, 12), bool)
    sq[3:9, 3:9] = True
    shifted = np.roll(sq, 2, axis=0)
    d_pr, d_rp = surface_distances(shifted, sq, (1.0, 1.0))
    assert d_pr.size == surface(shifted).sum() and d_rp.size == surface(sq).sum()
    assert hausdorff_distance(shifted, sq, (1.0, 1.0), percentile=None) == pytest.approx(2.0)


def test_segmentation_bad_inputs():
    a = np.zeros((4, 4, 4), bool)
    with pytest.raises(ValueError, match="shape mismatch"):
        dice(a, np.zeros((4, 4, 5), bool))
    with pytest.raises(ValueError, match="spacing"):
        hd95(a, a, (1.0, 1.0))
    with pytest.raises(ValueError, match="spacing"):
        hd95(a, a, (1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="tolerance"):
        surface_dice(a, a, 1.0, -1.0)
    with pytest.raises(ValueError, match="integer label map"):
        segmentation_metrics(a.astype(float), a.astype(float), 1.0)
    with pytest.raises(ValueError, match="unknown segmentation metrics"):
        segmentation_metrics(a.astype(np.uint8), a.astype(np.uint8), 1.0, metrics=["iou"])
    with pytest.raises(ValueError, match="shape mismatch"):
        segmentation_metrics(a.astype(np.uint8), np.zeros((3, 4, 4), np.uint8), 1.0)


# -- classification ---------------------------------------------------------------------------


def test_auc_accuracy_match_sklearn():
    from sklearn import metrics as skm

    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 300)
    s = np.round(np.clip(0.3 * y + rng.normal(0.35, 0.25, 300), 0, 1), 2)  # rounding -> ties
    assert roc_auc(y, s) == pytest.approx(skm.roc_auc_score(y, s), abs=1e-12)
    assert roc_auc(y, np.stack([1 - s, s], 1)) == pytest.approx(skm.roc_auc_score(y, s), abs=1e-12)
    pred = predicted_labels(s)
    assert accuracy(y, pred) == pytest.approx(skm.accuracy_score(y, pred))
    assert balanced_accuracy(y, pred) == pytest.approx(skm.balanced_accuracy_score(y, pred))

    y3 = rng.integers(0, 4, 400)
    logits = rng.normal(size=(400, 4)) + 1.5 * np.eye(4)[y3]
    p3 = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    ref = skm.roc_auc_score(y3, p3, multi_class="ovr", average="macro")
    assert roc_auc(y3, p3) == pytest.approx(ref, abs=1e-12)
    pred3 = predicted_labels(p3)
    assert accuracy(y3, pred3) == pytest.approx(skm.accuracy_score(y3, pred3))
    assert balanced_accuracy(y3, pred3) == pytest.approx(skm.balanced_accuracy_score(y3, pred3))
    # A predicted class absent from y_true: sklearn drops it from the mean, so do we.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = skm.balanced_accuracy_score([0, 0, 1, 1], [0, 2, 1, 1])
    assert balanced_accuracy([0, 0, 1, 1], [0, 2, 1, 1]) == pytest.approx(ref)


def test_auc_undefined_with_one_class():
    assert math.isnan(roc_auc([1, 1, 1], [0.2, 0.5, 0.9]))


def test_ece_by_hand():
    # 6 binary cases, 5 bins of width 0.2 over the top-label confidence max(p, 1 - p):
    #   p=0.95 y=1 conf .95 ok | p=0.85 y=0 conf .85 wrong | p=0.10 y=0 conf .90 ok
    #   p=0.35 y=0 conf .65 ok | p=0.62 y=0 conf .62 wrong | p=0.45 y=1 conf .55 wrong
    # bin (.4,.6]: {.55 wrong}          -> |0 - .55|            * 1/6
    # bin (.6,.8]: {.65 ok, .62 wrong}  -> |.5 - .635|          * 2/6
    # bin (.8, 1]: {.95 ok, .85 wrong, .90 ok} -> |2/3 - .9|    * 3/6
    y = [1, 0, 0, 0, 0, 1]
    p = [0.95, 0.85, 0.10, 0.35, 0.62, 0.45]
    hand = (0.55 + 2 * abs(0.5 - 0.635) + 3 * abs(2 / 3 - 0.9)) / 6
    assert expected_calibration_error(y, p, n_bins=5) == pytest.approx(hand, abs=1e-12)
    # Multi-class: confidence is the top probability, correct means argmax == label.
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.5, 0.4], [0.3, 0.3, 0.4], [0.05, 0.05, 0.9]])
    y3 = [0, 2, 2, 2]
    # bins of 1/3: (1/3, 2/3]: .5 wrong, .4 ok ; (2/3, 1]: .7 ok, .9 ok
    hand3 = (2 * abs(0.5 - 0.45) + 2 * abs(1.0 - 0.8)) / 4
    assert expected_calibration_error(y3, probs, n_bins=3) == pytest.approx(hand3, abs=1e-12)
    # Perfectly calibrated in each bin -> 0.
    assert expected_calibration_error([1, 0], [1.0, 0.0]) == 0.0


def test_classification_metrics_bundle_and_bad_inputs():
    out = classification_metrics([0, 1, 1, 0], [0.1, 0.8, 0.4, 0.3])
    assert (
        out["auc"] == 1.0 and out["accuracy"] == 0.75 and set(out) >= {"ece", "balanced_accuracy"}
    )
    with pytest.raises(ValueError, match="length mismatch"):
        roc_auc([0, 1, 1], [0.2, 0.3])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        expected_calibration_error([0, 1], [0.2, 1.3])
    with pytest.raises(ValueError, match="integers"):
        accuracy([0.5, 1.0], [0, 1])
    with pytest.raises(ValueError, match="out of range"):
        roc_auc([0, 3], np.full((2, 3), 1 / 3))
    with pytest.raises(ValueError, match="empty"):
        accuracy([], [])
