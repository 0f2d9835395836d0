"""Bias mitigation in ``umit finetune`` (``balance_by``): balanced sampling, reweighted loss and
group DRO checked by hand, and a tiny fine-tune that records what it balanced."""

from __future__ import annotations

import math

import pytest
import torch

from umit.data.store import Store
from umit.errors import InputError
from umit.finetune.groups import (
    GroupWeightedTask,
    case_groups,
    group_balanced_cases,
    group_weights,
)
from umit.finetune.run import FinetuneConfig, run
from umit.train.checkpoint import load_artifact

from _shared import TinySeg

GROUPS = {"a1": "A", "a2": "A", "a3": "A", "a4": "A", "b1": "B", "c1": "C", "c2": "C"}
CASES = list(GROUPS)


def test_balanced_sampling_counts():
    out = group_balanced_cases(CASES, GROUPS)
    counts = {g: sum(1 for c in out if GROUPS[c] == g) for g in "ABC"}
    assert counts == {"A": 4, "B": 4, "C": 4}
    assert out.count("b1") == 4 and out.count("c1") == out.count("c2") == 2


def test_group_weights_by_hand():
    w = group_weights(CASES, GROUPS)  # N / (G n_g) = 7 / (3 n_g)
    assert w == pytest.approx({"A": 7 / 12, "B": 7 / 3, "C": 7 / 6})
    assert sum(w[GROUPS[c]] for c in CASES) / len(CASES) == pytest.approx(1.0)


class _LossIsValue:
    """A task whose loss for a crop is the crop's single image value."""

    def trainable_module(self):
        return torch.nn.Identity()

    def set_trainable_module(self, m):
        pass

    def __call__(self, batch):
        assert batch["image"].shape[0] == 1 and len(batch["case_id"]) == 1
        return {"loss": batch["image"].sum()}


def _batch(cases, values):
    return {"image": torch.tensor(values).view(-1, 1), "case_id": list(cases)}


def test_reweighted_loss_by_hand():
    w = group_weights(CASES, GROUPS)
    task = GroupWeightedTask(_LossIsValue(), GROUPS, w, "reweight")
    out = task(_batch(["a1", "b1", "c2"], [1.0, 2.0, 3.0]))
    want = (w["A"] * 1 + w["B"] * 2 + w["C"] * 3) / 3
    assert out["loss"].item() == pytest.approx(want)
    assert out["loss_unweighted"].item() == pytest.approx(2.0)


def test_group_dro_moves_weight_to_the_worst_group():
    w = group_weights(CASES, GROUPS)
    task = GroupWeightedTask(_LossIsValue(), GROUPS, w, "dro", dro_eta=0.5)
    out = task(_batch(["a1", "a2", "b1"], [1.0, 3.0, 4.0]))  # L_A = 2, L_B = 4, C absent
    q = torch.tensor([math.exp(0.5 * 2), math.exp(0.5 * 4), 1.0]) / 3
    q = q / q.sum()
    assert task.q.tolist() == pytest.approx(q.tolist())
    assert out["loss"].item() == pytest.approx(float(q[0] * 2 + q[1] * 4))
    state = task.state_dict()
    fresh = GroupWeightedTask(_LossIsValue(), GROUPS, w, "dro")
    fresh.load_state_dict(state)
    assert fresh.q.tolist() == pytest.approx(q.tolist())


def test_bad_attributes_are_named():
    index = {c: {"site": "s1", "sex": None} for c in CASES}
    with pytest.raises(InputError, match="balance_by='scanner': no training case has it"):
        case_groups(index, CASES, "scanner")
    with pytest.raises(InputError, match="every training case is in group 's1'"):
        case_groups(index, CASES, "site")
    with pytest.raises(ValueError, match="mode must be"):
        GroupWeightedTask(_LossIsValue(), GROUPS, {}, "median")


def tiny_seg_groups(**kw):
    return TinySeg(**kw)


@pytest.mark.parametrize("mode", ["reweight"])  # sampling: test_balanced_sampling_counts
def test_finetune_balances_by_a_catalog_attribute(tiny_ct_store, tmp_path, register_models, mode):
    register_models(tiny_seg_groups)
    store = Store(tiny_ct_store)
    cfg = FinetuneConfig.model_validate(
        {
            "data": tiny_ct_store, "out": tmp_path / mode, "model": "tiny_seg_groups",
            "model_args": {}, "crop_size": [16, 16, 16], "samples_per_case": 1,
            "val_fraction": 0, "balance_by": "site", "balance": mode,
            "train": {"total_steps": 2, "batch_size": 2, "warmup_steps": 1, "progress": False},
        }
    )  # fmt: skip
    s = run(cfg)
    assert s["steps"] == 2
    bal = load_artifact(tmp_path / mode / "best.pt")["balance"]
    train = [c for c in store.case_ids if store.index[c]["split"] != "test"]
    want = {}
    for c in train:
        want[store.index[c]["site"]] = want.get(store.index[c]["site"], 0) + 1
    assert bal == {"by": "site", "mode": mode, "train_groups": want}
