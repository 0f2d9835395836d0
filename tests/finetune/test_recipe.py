"""Fine-tuning recipe options for a pretrained encoder (``encoder_lr_scale``, LP-FT via
``encoder_frozen_steps``) and the held-out selection set (``exclude_cases``, ``eval_cases``).

The learning-rate check is against Adam's first step by hand: with zero moments the update of
every weight with a non-zero gradient is ``lr * g / (|g| + eps)``, i.e. ``lr`` in magnitude.
"""

from __future__ import annotations

import csv

import pytest
import torch
import yaml

from umit.data.store import Store
from umit.errors import InputError
from umit.eval.evaluate import EvaluateConfig
from umit.eval.evaluate import run as evaluate
from umit.finetune.recipe import EncoderFrozenFirst, encoder_lr_optimizer, encoder_recipe
from umit.finetune.run import FinetuneConfig, build_model, run, split_finetune_cases
from umit.models import create_model
from umit.train.checkpoint import load_artifact
from umit.train.config import TrainConfig
from umit.train.loop import seed_everything
from umit.train.optim import param_groups
from umit.train.tasks import SegmentationTask

from _shared import TinySeg

UNETR_ARGS = {"encoder": "vit3d_test_p16", "feature_size": 8}
CROP = (16, 16, 16)


def tiny_seg_recipe_test(**kw):
    return TinySeg(**kw)


@pytest.fixture(autouse=True)
def _stand_in_models(register_models):
    register_models(tiny_seg_recipe_test)


def _unetr() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("unetr", in_chans=1, out_channels=3, img_size=CROP, **UNETR_ARGS)


def _one_step(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x = torch.randn(2, 1, *CROP, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 3, (2, 1, *CROP), generator=torch.Generator().manual_seed(2))
    SegmentationTask(model)({"image": x, "label": y})["loss"].backward()
    opt.step()
    return {n: (p.detach() - before[n]).abs() for n, p in model.named_parameters()}


@pytest.mark.parametrize("scale", [0.1, 0.0])
def test_encoder_lr_scale_moves_the_encoder_by_scale_times_lr(scale, one_thread):
    cfg = TrainConfig(lr=1e-3, weight_decay=0.0)
    model = _unetr()
    opt = encoder_lr_optimizer(cfg, scale)(model)
    names = [n for g in opt.param_groups for n in g["param_names"]]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())  # each once
    for g in opt.param_groups:
        enc = {n.startswith("encoder.") for n in g["param_names"]}
        assert len(enc) == 1 and g["lr"] == pytest.approx(1e-3 * (scale if enc.pop() else 1.0))
    delta = _one_step(model, opt)
    enc = torch.cat([d.flatten() for n, d in delta.items() if n.startswith("encoder.")])
    dec = torch.cat([d.flatten() for n, d in delta.items() if not n.startswith("encoder.")])
    assert dec.max().item() == pytest.approx(1e-3, rel=1e-3)  # Adam's first step: lr * sign(g)
    assert enc.max().item() == pytest.approx(1e-3 * scale, rel=1e-3, abs=1e-12)


def test_encoder_groups_keep_the_weight_decay_split(one_thread):
    model = _unetr()
    opt = encoder_lr_optimizer(TrainConfig(lr=1e-3, weight_decay=0.05), 0.5)(model)
    plain = {n: g["wd_scale"] for g in param_groups(model) for n in g["param_names"]}
    assert 0.0 in plain.values() and 1.0 in plain.values()
    for g in opt.param_groups:
        for n in g["param_names"]:
            assert g["weight_decay"] == 0.05 * plain[n], n  # as the loop's own groups
    sgd = encoder_lr_optimizer(TrainConfig(lr=1e-3, optimizer="sgd", momentum=0.8), 0.5)(model)
    assert isinstance(sgd, torch.optim.SGD) and {g["momentum"] for g in sgd.param_groups} == {0.8}


def test_lp_ft_freezes_the_encoder_for_k_steps_then_trains_it(tiny_ct_store, tmp_path, one_thread):
    steps, frozen = 6, 3
    cfg = FinetuneConfig.model_validate(
        {
            "data": tiny_ct_store, "out": tmp_path / "ft", "model": "unetr",
            "model_args": UNETR_ARGS, "crop_size": CROP, "samples_per_case": 2,
            "foreground_prob": 1.0, "encoder_frozen_steps": frozen,
            "train": {"total_steps": steps, "batch_size": 2, "lr": 3e-3, "warmup_steps": 0,
                      "ckpt_every": 1, "keep_last": steps, "progress": False},
        }
    )  # fmt: skip
    seed_everything(cfg.train.seed)  # as run() does before building: the same initial weights
    init = build_model(cfg, 1, 9).state_dict()
    run(cfg)

    def weights(step: int) -> dict[str, torch.Tensor]:
        return load_artifact(tmp_path / "ft" / f"step_{step:06d}.pt", expect="train_state")["model"]

    for step in range(1, steps + 1):
        w = weights(step)
        enc_same = all(torch.equal(w[k], v) for k, v in init.items() if k.startswith("encoder."))
        head_same = all(torch.equal(w[k], v) for k, v in init.items() if k.startswith("out."))
        assert enc_same == (step <= frozen), step
        assert not head_same, step  # the decoder and head learn from the first step


def test_lp_ft_state_survives_a_checkpoint():
    enc = torch.nn.Linear(2, 2)
    task = EncoderFrozenFirst(SegmentationTask(torch.nn.Identity()), enc, steps=3)
    assert task.frozen
    for s in range(3):
        task.on_step_end(s)
    assert not task.frozen
    again = EncoderFrozenFirst(SegmentationTask(torch.nn.Identity()), enc, steps=3)
    again.load_state_dict(task.state_dict())
    assert not again.frozen and again.step == 3


def test_recipe_errors_name_the_problem():
    cfg = TrainConfig(total_steps=10)
    task = SegmentationTask(TinySeg())
    with pytest.raises(InputError, match="TinySeg has none"):
        encoder_recipe(TinySeg(), task, cfg, lr_scale=0.1)
    with pytest.raises(InputError, match=r"encoder_frozen_steps \(10\) must be below.*\(10\)"):
        encoder_recipe(_unetr(), task, cfg, frozen_steps=10)
    assert encoder_recipe(TinySeg(), task, cfg) == (task, None)  # defaults: nothing changes


def test_excluded_cases_never_train_or_validate(tiny_ct_store):
    store = Store(tiny_ct_store)
    base = {"data": tiny_ct_store, "label_count": 2, "val_fraction": 0.2}
    pool = split_finetune_cases(store, FinetuneConfig.model_validate(base))
    held = pool["train"][:1] + pool["unlabeled"][:1]
    split = split_finetune_cases(
        store, FinetuneConfig.model_validate({**base, "exclude_cases": held})
    )
    used = set(split["train"]) | set(split["val"]) | set(split["unlabeled"])
    assert not used & set(held) and len(split["train"]) == 2
    with pytest.raises(InputError, match=r"prep: exclude_cases names 1 case.*nope"):
        split_finetune_cases(
            store, FinetuneConfig.model_validate({**base, "exclude_cases": ["nope"]})
        )


def test_data_efficiency_scores_on_held_out_cases(tiny_ct_store, tmp_path, one_thread):
    from umit.eval.data_efficiency import DataEfficiencyConfig
    from umit.eval.data_efficiency import run as data_efficiency

    store = Store(tiny_ct_store)
    train = sorted(c for c in store.case_ids if store.index[c].get("split") != "test")
    test = sorted(c for c in store.case_ids if store.index[c].get("split") == "test")
    held = train[:2]
    settings = {
        "data": tiny_ct_store, "out": tmp_path / "de", "counts": [2], "seeds": [0], "n_boot": 5,
        "eval_cases": held, "arms": {"tiny": {"model": "tiny_seg_recipe_test"}},
        "finetune": {"crop_size": [16, 16, 16], "samples_per_case": 1, "val_fraction": 0.0,
                     "train": {"total_steps": 2, "batch_size": 2, "progress": False}},
    }  # fmt: skip
    out = data_efficiency(DataEfficiencyConfig.model_validate(settings))
    cell = out["cells"][0]
    assert cell["scored_on"] == "eval_cases" and cell["n_test"] == 2
    folder = tmp_path / "de/cells/tiny/n2_s0"
    with open(folder / "eval/per_case.csv") as f:
        assert sorted(r["case_id"] for r in csv.DictReader(f)) == held
    run_cfg = yaml.safe_load((folder / "run/config.yaml").read_text())
    assert sorted(run_cfg["exclude_cases"]) == held
    assert "held-out training-pool cases" in (tmp_path / "de/table.md").read_text()
    model = load_artifact(folder / "run/best.pt", expect="model")
    trained = model["cases"]["train"]
    with pytest.raises(InputError, match=r"best\.pt: the model was fine-tuned or validated on 1"):
        evaluate(EvaluateConfig(model=folder / "run/best.pt", data=tiny_ct_store,
                                cases=[trained[0]], out=tmp_path / "e"))  # fmt: skip
    with pytest.raises(InputError, match="cases not in this store"):
        evaluate(EvaluateConfig(model=folder / "run/best.pt", data=tiny_ct_store,
                                cases=["nope"], out=tmp_path / "e"))  # fmt: skip
    for bad, msg in (
        (test[:1], "must come from the training pool, not the test split"),
        ([], "eval_cases is empty"),
        (["nope"], "eval_cases not in this store"),
    ):
        with pytest.raises(InputError, match=msg):
            data_efficiency(DataEfficiencyConfig.model_validate({**settings, "eval_cases": bad}))


def test_eval_split_names_the_labeled_cases_of_a_split(tiny_ct_store, tmp_path):
    from umit.eval.data_efficiency import DataEfficiencyConfig, resolve_eval_split

    store = Store(tiny_ct_store)
    splits = {store.index[c].get("split") for c in store.case_ids} - {"test"}
    split = sorted(splits)[0]
    expected = sorted(
        c for c in store.case_ids
        if store.index[c].get("split") == split and store.index[c].get("has_label")
    )  # fmt: skip
    assert expected
    base = {"data": tiny_ct_store, "out": tmp_path / "de", "arms": {}}
    cfg = resolve_eval_split(
        DataEfficiencyConfig.model_validate({**base, "eval_split": split}), store
    )
    assert cfg.eval_cases == expected
    unchanged = DataEfficiencyConfig.model_validate(base)
    assert resolve_eval_split(unchanged, store) is unchanged
    for extra, msg in (
        ({"eval_split": "test"}, "must not be 'test'"),
        ({"eval_split": "nope"}, "eval_split 'nope' has no labeled cases"),
        ({"eval_split": split, "eval_cases": expected}, "not both"),
    ):
        with pytest.raises(InputError, match=msg):
            resolve_eval_split(DataEfficiencyConfig.model_validate({**base, **extra}), store)
