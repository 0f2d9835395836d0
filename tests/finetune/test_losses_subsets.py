"""DiceCE against MONAI's DiceCELoss; label subsets seeded, stratified, nested."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from umit.finetune.subsets import select_labeled
from umit.train.losses import dice_ce_loss, soft_dice_loss


@pytest.mark.parametrize(
    "include_background, ce_weight", [(True, 1.0), (False, 1.0), (False, 0.03)]
)
def test_dice_ce_matches_monai(include_background, ce_weight):
    from monai.losses import DiceCELoss

    torch.manual_seed(0)
    logits = torch.randn(2, 4, 6, 5, 4)
    target = torch.randint(0, 4, (2, 1, 6, 5, 4))
    ref = DiceCELoss(
        to_onehot_y=True,
        softmax=True,
        include_background=include_background,
        batch=False,
        lambda_ce=ce_weight,
    )
    ours = dice_ce_loss(logits, target, include_background=include_background, ce_weight=ce_weight)
    assert ours.item() == pytest.approx(ref(logits, target).item(), rel=1e-5)


def test_perfect_prediction_has_zero_dice_loss():
    target = torch.randint(0, 3, (1, 1, 4, 4, 4))
    logits = torch.nn.functional.one_hot(target[:, 0], 3).movedim(-1, 1).float() * 50
    assert soft_dice_loss(logits, target, include_background=True).item() == pytest.approx(
        0.0, abs=1e-4
    )


def test_subsets_seeded_stratified_nested():
    ids = [f"c{i:03d}" for i in range(200)]
    strata = ["pos" if i % 4 == 0 else "neg" for i in range(200)]  # 25% positives
    s10 = select_labeled(ids, strata, fraction=0.1, seed=1)
    s25 = select_labeled(ids, strata, fraction=0.25, seed=1)
    assert len(s10) == 20 and len(s25) == 50
    assert set(s10) <= set(s25)  # nested
    assert Counter(strata[ids.index(c)] for c in s10) == {"pos": 5, "neg": 15}  # stratified
    assert s10 == select_labeled(ids, strata, fraction=0.1, seed=1)  # seeded
    assert s10 != select_labeled(ids, strata, fraction=0.1, seed=2)
    assert len(select_labeled(ids, strata, count=7, seed=0)) == 7
    # at least one case of every stratum when the size allows it
    rare = ["r" if i == 5 else "n" for i in range(200)]
    assert "c005" in select_labeled(ids, rare, count=2, seed=0)


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"fraction": 0.0}, "fraction"),
        ({"fraction": 1.5}, "fraction"),
        ({"count": 0}, "count"),
        ({}, "exactly one"),
    ],
)
def test_subset_bad_args(kw, match):
    with pytest.raises(ValueError, match=match):
        select_labeled(["a", "b"], None, **kw)
