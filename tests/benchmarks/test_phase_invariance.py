"""The cross-phase organ probe of benchmarks/phase_invariance.py, on features built to carry the
phase or not."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from benchmarks.phase_invariance import organ_probe, patch_majority  # noqa: E402


def _features(phase_weight: float, seed: int = 0) -> tuple[dict, dict]:
    """12 exams x 60 patches of 4 structures (and background) in 3 phases: each structure has a
    direction; in one phase it is shifted along a phase direction by ``phase_weight``."""
    rng = np.random.default_rng(seed)
    organs = rng.normal(size=(5, 16))
    phase_dirs = rng.normal(size=(3, 5, 16))
    labels = rng.integers(0, 5, size=(12, 60))
    feats, labs = {}, {}
    for i, p in enumerate(["none", "arterial", "portal"]):
        noise = rng.normal(scale=0.8, size=(12, 60, 16))
        feats[p] = organs[labels] + phase_weight * phase_dirs[i][labels] + noise
        labs[p] = labels
    return feats, labs


def test_invariant_features_score_the_same_in_every_phase():
    out = organ_probe(*_features(0.0))
    assert out["same_phase"] > 0.9
    assert out["other_phase"] == pytest.approx(out["same_phase"], abs=0.03)
    assert set(out["by_pair"]) == {f"{p}->{q}" for p in ("none", "arterial", "portal")
                                   for q in ("none", "arterial", "portal")}  # fmt: skip


def test_features_that_carry_the_phase_lose_accuracy_in_other_phases():
    out = organ_probe(*_features(2.0))
    assert out["same_phase"] > 0.9
    assert out["other_phase"] < out["same_phase"] - 0.2


def test_fewer_than_four_exams_is_a_clear_error():
    feats, labs = _features(0.0)
    with pytest.raises(ValueError, match="needs at least 4 exams with every phase, got 3"):
        organ_probe({p: f[:3] for p, f in feats.items()}, {p: v[:3] for p, v in labs.items()})


def test_patch_majority_against_a_loop():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 4, size=(2, 8, 8, 8))
    got = patch_majority(labels, 4)  # (2, 8): a 2x2x2 grid per exam
    for e in range(2):
        for i, (z, y, x) in enumerate(np.ndindex(2, 2, 2)):
            block = labels[e, 4 * z : 4 * z + 4, 4 * y : 4 * y + 4, 4 * x : 4 * x + 4]
            assert got[e, i] == np.bincount(block.ravel()).argmax()


def test_phase_difference_against_hand_values():
    import torch
    from benchmarks.phase_invariance import phase_difference

    rng = np.random.default_rng(2)
    labels = rng.integers(0, 3, size=(2, 4, 4, 4))  # one anatomy in every phase
    base = torch.from_numpy(rng.normal(size=(2, 1, 4, 4, 4)).astype(np.float32))
    shift = {"none": 0.0, "arterial": 0.6, "portal": 0.3}  # of structure 2 only
    organ2 = torch.from_numpy(labels == 2)[:, None].float()
    images = {p: base + s * organ2 for p, s in shift.items()}
    maps = {p: labels for p in shift}
    copied = phase_difference(
        images, maps, {p: x.expand(-1, 3, -1, -1, -1) for p, x in images.items()}
    )
    assert copied["1"]["input"] == 0 and np.isnan(copied["1"]["left"])
    # structure 2: |0 - 0.6|, |0 - 0.3|, |0.6 - 0.3| averaged
    assert copied["2"]["input"] == pytest.approx(0.4, abs=1e-6)
    assert copied["2"]["left"] == pytest.approx(1.0)  # a copy leaves all of it
    same = {p: base.expand(-1, 3, -1, -1, -1) for p in shift}  # every phase predicted alike
    assert phase_difference(images, maps, same)["2"]["left"] == 0
    half = {p: base + 0.5 * s * organ2 for p, s in shift.items()}
    assert phase_difference(images, maps, half)["2"]["left"] == pytest.approx(0.5)
