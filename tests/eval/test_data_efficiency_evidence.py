"""``umit data-efficiency`` with label counts, a schedule per budget, floors and paired comparisons."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch.nn as nn
import yaml
from sklearn.metrics import roc_auc_score

from umit.data.store import Store
from umit.eval.data_efficiency import DataEfficiencyConfig, cell_dir, make_budgets, pool_size
from umit.eval.data_efficiency import run as data_efficiency
from umit.eval.evaluate import _rows_to_csv
from umit.finetune.run import FinetuneConfig, split_finetune_cases


class _TinyFeatCls(nn.Module):
    """A conv classifier with the feature API (forward_features / forward_head)."""

    def __init__(self, in_chans=1, num_classes=2, img_size=None, width=4):
        super().__init__()
        self.conv = nn.Conv3d(in_chans, width, 3, stride=2, padding=1)
        self.head = nn.Linear(width, num_classes)

    def forward_features(self, x):
        return self.conv(x).relu()

    def forward_head(self, x, pre_logits=False):
        x = x.mean(dim=(2, 3, 4))
        return x if pre_logits else self.head(x)

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


def tiny_feat_cls_for_tests(**kw):
    return _TinyFeatCls(**kw)


@pytest.fixture(autouse=True)
def _stand_in_models(register_models):
    register_models(tiny_feat_cls_for_tests)


def _cfg(store, out, **kw) -> DataEfficiencyConfig:
    return DataEfficiencyConfig.model_validate(
        {
            "data": store,
            "out": out,
            "counts": [2, 4, 100],
            "seeds": [0, 1],
            "n_boot": 5,
            "n_boot_paired": 50,
            "steps_per_budget": {"n2": 1, "n4": 2},
            "arms": {
                "pre": {"model": "tiny_feat_cls_for_tests", "finetune": {"train": {"lr": 1e-2}}},
                "scratch": {
                    "model": "tiny_feat_cls_for_tests",
                    "finetune": {"train": {"total_steps": 9}},  # the budget schedule wins
                },
            },
            "finetune": {
                "task": "classification",
                "label_key": "sex",
                "crop_size": [16, 16, 16],
                "val_fraction": 0.25,
                "select": "last",
                "train": {"total_steps": 3, "batch_size": 2, "eval_every": 2, "progress": False},
            },
            **kw,
        }
    )


def test_count_budgets_are_nested_per_seed(tiny_ct_store, tmp_path):
    cfg = _cfg(tiny_ct_store, tmp_path / "de")
    store = Store(tiny_ct_store)
    pool = pool_size(cfg, store)
    budgets = make_budgets(cfg, pool)
    assert [b.key for b in budgets] == ["n2", "n4", "all"] and budgets[-1].size == pool
    base = cfg.finetune | {"data": tiny_ct_store}
    base.pop("train")
    for seed in (0, 1):
        small, large = (
            set(
                split_finetune_cases(
                    store,
                    FinetuneConfig.model_validate({**base, "label_count": k, "label_seed": seed}),
                )["train"]
            )
            for k in (2, 4)
        )
        assert len(small) == 2 and len(large) == 4 and small <= large


def _fake_cells(cfg: DataEfficiencyConfig, budgets, shift: float) -> None:
    """Finished cells of both arms (so nothing is fine-tuned): 'pre' = 'scratch' with its
    positives' scores shifted up, on 60 synthetic test cases."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 60)
    for b in budgets:
        for seed in cfg.seeds:
            base = rng.random(60)
            for arm, scores in (("scratch", base), ("pre", base + shift * y)):
                rows = [
                    {"case_id": f"s{i:02d}", "label": int(t), "score": float(v)}
                    for i, (t, v) in enumerate(zip(y, scores, strict=True))
                ]
                folder = cell_dir(cfg.out, arm, b, seed)
                (folder / "eval").mkdir(parents=True)
                (folder / "eval" / "per_case.csv").write_text(_rows_to_csv(rows))
                test = {"auc": roc_auc_score(y, scores), "accuracy": 0.5}
                result = {"arm": arm, "budget": b.key, "fraction": None, "count": b.count}
                result |= {"seed": seed, "n_labeled": b.size, "n_test": 60, "test": test}
                (folder / "result.json").write_text(json.dumps(result))


def test_floors_and_paired_comparisons(tiny_ct_store, tmp_path, one_thread):
    cfg = _cfg(
        tiny_ct_store,
        tmp_path / "de",
        floors=True,
        floor_encoder_arm="scratch",
        comparisons=[
            {"a": "pre", "b": "scratch"},
            {"a": "pre", "b": "scratch", "b_budget_factor": 2},
            {"a": "pre", "b": "floor_random_probe"},
        ],
    )
    budgets = make_budgets(cfg, pool_size(cfg, Store(tiny_ct_store)))
    _fake_cells(cfg, budgets, shift=0.5)
    s = data_efficiency(cfg)
    table = s["table"]
    assert set(table) == {"pre", "scratch", "floor_voxel_count", "floor_random_probe"}
    assert set(table["floor_voxel_count"]) == {"n2", "n4", "all"}
    assert table["floor_voxel_count"]["n4"]["n_labeled"] == 4
    assert table["floor_random_probe"]["n2"]["n"] in (0, 2)  # AUC undefined on one-class tests
    comps = {(c["a"], c["b"], c["a_budget"], c["b_budget"]): c for c in s["comparisons"]}
    assert set(comps) >= {
        ("pre", "scratch", "n2", "n2"),
        ("pre", "scratch", "n2", "n4"),
        ("pre", "scratch", "n4", "all"),
        ("pre", "scratch", "all", "all"),
    }
    assert len(s["comparisons"]) == 3 + 2 + 3  # the 2n comparison has no partner at all labels
    same = comps[("pre", "scratch", "n2", "n2")]
    assert same["n_seeds"] == 2 and same["n_cases"] == 60
    assert same["diff"] > 0 and same["excludes_zero"]  # a known gain, well outside the noise
    assert comps[("pre", "floor_random_probe", "n2", "n2")]["n_cases"] == 0  # no shared cases
    floor_rows = (tmp_path / "de/cells/floor_voxel_count/n2_s0/eval/per_case.csv").read_text()
    assert floor_rows.startswith("case_id,label,score,pred")
    md = (tmp_path / "de/table.md").read_text()
    assert "| arm | n2 | n4 | all |" in md and "floor_random_probe" in md
    assert "Paired differences" in md and "| pre | n2 | scratch | n4 |" in md
    res = json.loads((tmp_path / "de/results.json").read_text())
    assert res["comparisons"] and [b["key"] for b in res["budgets"]] == ["n2", "n4", "all"]
    assert (tmp_path / "de/report.html").is_file()


def test_count_budgets_share_one_schedule_per_budget(tiny_ct_store, tmp_path, one_thread):
    cfg = _cfg(tiny_ct_store, tmp_path / "de", counts=[2, 100], seeds=[0])
    cfg = cfg.model_copy(update={"arms": {"scratch": cfg.arms["scratch"]}})
    s = data_efficiency(cfg)
    assert set(s["table"]["scratch"]) == {"n2", "all"}
    assert s["table"]["scratch"]["n2"]["n_labeled"] == 2
    resolved = yaml.safe_load((tmp_path / "de/cells/scratch/n2_s0/run/config.yaml").read_text())
    assert resolved["train"]["total_steps"] == 1 and resolved["label_count"] == 2
    all_cfg = yaml.safe_load((tmp_path / "de/cells/scratch/all_s0/run/config.yaml").read_text())
    assert all_cfg["label_count"] is None and all_cfg["train"]["total_steps"] == 9
    result = json.loads((tmp_path / "de/cells/scratch/n2_s0/result.json").read_text())
    assert result["budget"] == "n2" and result["steps"] == 1


def test_unknown_comparison_arm_is_refused(tiny_ct_store, tmp_path):
    from umit.errors import InputError

    cfg = _cfg(tiny_ct_store, tmp_path / "de", comparisons=[{"a": "pre", "b": "floor_voxel_count"}])
    with pytest.raises(InputError, match="neither an arm nor a floor"):
        data_efficiency(cfg)


def test_arm_seeds_and_only_arms_pick_the_cells(tiny_ct_store, tmp_path, one_thread):
    """An arm on a subset of the seeds runs only those; ``only_arms`` runs only those arms."""
    cfg = _cfg(tiny_ct_store, tmp_path / "exp", counts=[2], steps_per_budget={"n2": 1})
    cfg.arms["scratch"].seeds = [1]
    res = data_efficiency(cfg.model_copy(update={"only_arms": ["scratch"], "comparisons": []}))
    cells = sorted(p.parent.name for p in (tmp_path / "exp" / "cells").rglob("result.json"))
    arms = sorted({p.parent.parent.name for p in (tmp_path / "exp" / "cells").rglob("result.json")})
    assert arms == ["scratch"] and cells == ["n2_s1"]
    assert set(res["table"]) == {"scratch"}
    # tabulate_only runs nothing and tabulates what is there
    res = data_efficiency(
        cfg.model_copy(update={"tabulate_only": True, "comparisons": [], "only_arms": None})
    )
    assert set(res["table"]) == {"scratch"} and set(res["table"]["scratch"]) == {"n2"}
    with pytest.raises(Exception, match="only_arms names unknown arms"):
        data_efficiency(cfg.model_copy(update={"only_arms": ["nope"], "comparisons": []}))


def test_random_feature_floor_is_not_a_constant(tiny_ct_store):
    """A random ResNet's last stage is one constant for every input (zero-initialised residual
    branches); the floor's features (every stage, spatially pooled) must vary across cases."""
    from umit.eval.floors import random_features

    ft = FinetuneConfig(
        data=tiny_ct_store, task="classification", label_key="sex", model="classifier",
        model_args={"encoder": "resnet3d_test", "encoder_args": {"norm": "batch"}},
        crop_size=(32, 32, 16),
    )  # fmt: skip
    store = Store(tiny_ct_store)
    cases = store.case_ids[:6]
    f = random_features(ft, store, cases, 2, seed=0, calibrate=cases)
    assert f.shape[0] == 6 and f.std(axis=0).max() > 1e-3
    last = f[:, -32:]  # resnet3d_test's last stage (32 channels)
    assert last.std(axis=0).max() < 1e-6  # the degenerate part, kept as documented


def test_cells_in_two_worker_processes_give_the_same_results(tiny_ct_store, tmp_path, one_thread):
    """``workers=2`` runs cells in spawned single-thread processes; every cell is seeded, so the
    table equals a one-process run's, number for number."""
    arm = {
        "model": "classifier",
        "model_args": {"encoder": "resnet3d_test", "encoder_args": {"norm": "batch"}},
    }
    base = _cfg(tiny_ct_store, tmp_path / "one", counts=[2, 4], arms={"a": arm, "b": arm})
    data_efficiency(base)
    data_efficiency(base.model_copy(update={"out": tmp_path / "two", "workers": 2}))

    def cells(name):
        res = json.loads((tmp_path / name / "results.json").read_text())
        return {(c["arm"], c["budget"], c["seed"]): c["test"] for c in res["cells"]}

    assert len(cells("one")) == 8 and cells("one") == cells("two")


def test_pretrained_by_seed_gives_each_seed_its_replicate(tiny_ct_store, tmp_path):
    """Each seed's cell starts from its own pretraining replicate, so resampling seeds in the
    paired bootstrap resamples pretraining runs too; a seed without one fails before any cell."""
    from pydantic import ValidationError

    from umit.errors import InputError
    from umit.eval.data_efficiency import ArmConfig, Budget, cell_finetune_config

    reps = {0: tmp_path / "r0.pt", 1: tmp_path / "r1.pt"}
    arm = ArmConfig(model="tiny_feat_cls_for_tests", pretrained_by_seed=reps)
    cfg = _cfg(tiny_ct_store, tmp_path / "de", arms={"pre": arm}, counts=[2])
    budget = Budget("n2", "n2", count=2, size=2)
    for seed, path in reps.items():
        ft = cell_finetune_config(cfg, arm, budget, seed, tmp_path / f"c{seed}")
        assert ft.pretrained == path
    assert ArmConfig(model="m", pretrained=reps[0]).checkpoint(7) == reps[0]
    assert ArmConfig(model="m").checkpoint(7) is None
    with pytest.raises(ValidationError, match="not both"):
        ArmConfig(model="m", pretrained=reps[0], pretrained_by_seed=reps)
    with pytest.raises(ValidationError, match=r"no checkpoint for seeds \[2\]"):
        ArmConfig(model="m", pretrained_by_seed=reps, seeds=[1, 2])
    short = _cfg(tiny_ct_store, tmp_path / "de2", counts=[2], seeds=[0, 1, 2], arms={"pre": arm})
    with pytest.raises(InputError, match="no checkpoint for seed 2"):
        data_efficiency(short)
    assert not (tmp_path / "de2" / "cells").exists()  # refused before any cell ran


def test_twice_the_budget_is_found_when_no_budget_is_all(tiny_ct_store, tmp_path):
    """With budgets 2 and 4 only, 'a at 2 vs b at 4' is a comparison; the largest budget is not
    all labels, so 4 has no partner (it used to be taken for 'all' and the row was dropped)."""
    from umit.eval.data_efficiency import compare

    cfg = _cfg(
        tiny_ct_store, tmp_path / "de", counts=[2, 4],
        comparisons=[{"a": "pre", "b": "scratch", "b_budget_factor": 2}],
    )  # fmt: skip
    budgets = make_budgets(cfg, pool_size(cfg, Store(tiny_ct_store)))
    assert [b.key for b in budgets] == ["n2", "n4"]
    _fake_cells(cfg, budgets, shift=0.5)
    rows = compare(cfg, budgets, "auc")
    assert [(r["a_budget"], r["b_budget"]) for r in rows] == [("n2", "n4")]


def test_seeds_sharing_a_pretraining_run_are_resampled_by_run(tiny_ct_store, tmp_path):
    """Four seeds from two pretraining runs: the comparison resamples the two runs (and says so
    in the table); with cluster_by_pretraining off, or one run per seed, it resamples seeds."""
    from umit.eval.data_efficiency import compare, comparisons_markdown, pretraining_clusters

    shared = {
        0: tmp_path / "r0.pt",
        1: tmp_path / "r1.pt",
        2: tmp_path / "r0.pt",
        3: tmp_path / "r1.pt",
    }
    arms = {
        "pre": {"model": "tiny_feat_cls_for_tests", "pretrained_by_seed": shared},
        "scratch": {"model": "tiny_feat_cls_for_tests"},
    }
    comps = [{"a": "pre", "b": "scratch"}, {"a": "scratch", "b": "floor_voxel_count"}]
    cfg = _cfg(tiny_ct_store, tmp_path / "de", seeds=[0, 1, 2, 3], counts=[2], arms=arms,
               comparisons=comps)  # fmt: skip
    clusters = pretraining_clusters(cfg, cfg.comparisons[0], {0, 1, 2, 3})
    assert clusters[0] == clusters[2] != clusters[1] == clusters[3]
    assert clusters[0] == (str(tmp_path / "r0.pt"), "")
    # a floor is not an arm: no checkpoint, so every seed is alike (resampled one by one)
    assert set(pretraining_clusters(cfg, cfg.comparisons[1], {0, 1}).values()) == {("", "")}
    budgets = make_budgets(cfg, pool_size(cfg, Store(tiny_ct_store)))
    _fake_cells(cfg, budgets, shift=0.5)
    (row,) = [r for r in compare(cfg, budgets, "auc") if r["b"] == "scratch"]
    assert row["n_seeds"] == 4 and row["n_clusters"] == 2
    assert "| 4 (2 runs) |" in comparisons_markdown([row], "auc")
    off = cfg.model_copy(update={"cluster_by_pretraining": False})
    (plain,) = [r for r in compare(off, budgets, "auc") if r["b"] == "scratch"]
    assert plain["n_clusters"] is None and plain["diff"] == row["diff"]
    assert (plain["ci_low"], plain["ci_high"]) != (row["ci_low"], row["ci_high"])


def test_a_setting_added_after_a_cell_ran_blocks_reuse_only_off_its_default(tmp_path):
    from umit.errors import InputError
    from umit.eval.data_efficiency import check_same_settings

    done = tmp_path / "result.json"
    recorded = {"train.lr": 3e-3, "augment.flip_prob": 0.0}  # written before the new option
    defaults = {"train.lr": 1e-4, "augment.flip_prob": 0.5, "augment.label_intensity_shift": 0.0}
    now = {**recorded, "augment.label_intensity_shift": 0.0}
    check_same_settings(done, recorded, now, defaults)  # new option at its default: the same run
    with pytest.raises(InputError, match=r"changed: augment.label_intensity_shift\)"):
        check_same_settings(done, recorded, {**now, "augment.label_intensity_shift": 0.5}, defaults)
    with pytest.raises(InputError, match=r"changed: augment.label_intensity_shift\)"):
        check_same_settings(done, recorded, now)  # without the defaults nothing is assumed
    with pytest.raises(InputError, match=r"changed: augment.flip_prob\)"):  # an option removed
        check_same_settings(done, recorded, {"train.lr": 3e-3}, defaults)
