"""`umit finetune` / `umit evaluate` / `umit data-efficiency` end to end on a tiny phantom store.

Tiny models are registered here so these tests exercise the pipeline, not a particular network.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

from umit.data.store import Store
from umit.errors import InputError
from umit.finetune.run import FinetuneConfig, run, split_finetune_cases
from umit.train.checkpoint import load_model

from _shared import TinyCls, TinySeg


def tiny_seg_for_tests(**kw):
    return TinySeg(**kw)


def tiny_cls_for_tests(**kw):
    return TinyCls(**kw)


@pytest.fixture(autouse=True)
def _stand_in_models(register_models):
    register_models(tiny_seg_for_tests, tiny_cls_for_tests)


def _seg_cfg(store, out, **kw) -> FinetuneConfig:
    return FinetuneConfig.model_validate(
        {
            "data": store,
            "out": out,
            "model": "tiny_seg_for_tests",
            "model_args": {},
            "crop_size": [16, 16, 16],
            "samples_per_case": 2,
            "sw_batch_size": 4,
            "train": {
                "total_steps": 6,
                "batch_size": 2,
                "warmup_steps": 1,
                "eval_every": 3,
                "log_every": 3,
                "ckpt_every": 6,
                "progress": False,
                "lr": 3e-3,
            },
            **kw,
        }
    )


def test_splits_are_disjoint_and_test_never_trains(tiny_ct_store):
    store = Store(tiny_ct_store)
    cfg = _seg_cfg(tiny_ct_store, "x", label_fraction=0.5, val_fraction=0.2)
    s = split_finetune_cases(store, cfg)
    assert set(s["test"]) == {c for c in store.case_ids if store.index[c]["split"] == "test"}
    sets = [set(s[k]) for k in ("train", "val", "unlabeled", "test")]
    assert sum(len(x) for x in sets) == len(set().union(*sets)) == len(store.case_ids)
    assert len(s["train"]) == 3 and len(s["val"]) == 2  # 8 train cases: 2 val, half of 6 labeled


def test_segmentation_finetune_then_evaluate(tiny_ct_store, tmp_path):
    from umit.eval.evaluate import EvaluateConfig
    from umit.eval.evaluate import run as evaluate

    s = run(_seg_cfg(tiny_ct_store, tmp_path / "seg"))
    assert s["steps"] == 6 and "val_dice" in s["best"]
    model, ckpt = load_model(tmp_path / "seg" / "best.pt")
    assert ckpt["task"] == "segmentation" and ckpt["plan"]["target_spacing"] == [2.0, 2.0, 3.0]
    torch.load(tmp_path / "seg" / "best.pt", weights_only=True)
    e = evaluate(
        EvaluateConfig(
            model=tmp_path / "seg" / "best.pt",
            data=tiny_ct_store,
            n_boot=20,
            attributes=["sex", "site"],
        )
    )
    assert e["n_cases"] == 2
    per_case = (tmp_path / "seg" / "eval_test" / "per_case.csv").read_text().splitlines()
    col = per_case[0].split(",").index("dice_mean")
    means = [float(r.split(",")[col]) for r in per_case[1:]]
    assert e["result"]["overall"]["dice"]["value"] == pytest.approx(np.mean(means), abs=1e-9)
    out = tmp_path / "seg" / "eval_test"
    assert (out / "report.html").stat().st_size > 1000 and (out / "per_case.csv").is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert "sex" in summary["result"]["attributes"]
    # the report names structures (dataset.json -> plan -> model), not label values
    assert summary["structures"]["4"] == "liver"
    page = (out / "report.html").read_text()
    assert "<td>liver</td>" in page and "<td>kidney_left</td>" in page
    assert "dice_4" not in page and "dice_mean" not in page
    assert "Best, median and worst case" in page and "median and worst" in page  # 2 cases
    assert page.count("data:image/png;base64,") >= 2  # the two case figures
    # the stand-in CNN has no feature API: no map, and the section says why (evaluation goes on)
    assert "Where the model looked" in page and "exposes no feature_info" in page


def test_evaluate_cli_prints_structure_names(tiny_ct_store, tmp_path, capsys):
    from umit.cli.main import main as cli_main

    run(_seg_cfg(tiny_ct_store, tmp_path / "seg"))
    model = str(tmp_path / "seg" / "best.pt")
    args = ["evaluate", "--model", model, "--data", str(tiny_ct_store), "n_boot=5"]
    assert cli_main([*args, "case_figures=false", "attributes=[site]"]) == 0
    printed = capsys.readouterr().out
    assert "Dice: liver" in printed and "Dice, mean over structures" in printed
    assert "dice_4" not in printed
    assert "warning: 2 subgroups with fewer than 10 cases not shown: site=site_a (1)" in printed


def test_classification_finetune_with_label_count(tiny_ct_store, tmp_path):
    cfg = FinetuneConfig.model_validate(
        {
            "data": tiny_ct_store,
            "out": tmp_path / "cls",
            "task": "classification",
            "label_key": "sex",
            "model": "tiny_cls_for_tests",
            "model_args": {},
            "crop_size": [16, 16, 16],
            "label_count": 4,
            "val_fraction": 0.25,
            "class_balanced": True,
            "train": {
                "total_steps": 4,
                "batch_size": 2,
                "warmup_steps": 1,
                "eval_every": 2,
                "progress": False,
            },
        }
    )
    s = run(cfg)
    assert s["n_train"] == 4 and s["steps"] == 4
    model, ckpt = load_model(tmp_path / "cls" / "best.pt")
    assert ckpt["task"] == "classification" and sorted(ckpt["class_names"]) == ckpt["class_names"]


def test_bad_finetune_inputs(tiny_ct_store, tmp_path):
    with pytest.raises(InputError, match="fewer than 2 classes"):
        run(
            FinetuneConfig(
                data=tiny_ct_store,
                out=tmp_path / "x",
                task="classification",
                label_key="modality",
                model="tiny_cls_for_tests",
                model_args={},
                crop_size=(16, 16, 16),
            )
        )
    with pytest.raises(InputError, match="not found"):
        load_model(tmp_path / "nothing.pt")


@pytest.mark.slow
def test_data_efficiency_resumes(tiny_ct_store, tmp_path, caplog):
    from umit.eval.data_efficiency import DataEfficiencyConfig
    from umit.eval.data_efficiency import run as data_efficiency

    cfg = DataEfficiencyConfig.model_validate(
        {
            "data": tiny_ct_store,
            "out": tmp_path / "de",
            "fractions": [0.5, 1.0],
            "seeds": [0],
            "n_boot": 10,
            "arms": {
                "tiny": {"model": "tiny_seg_for_tests"},
                "wider": {
                    "model": "tiny_seg_for_tests",
                    "model_args": {"width": 12},
                    "finetune": {"train": {"lr": 1e-3}},  # one key; the rest stays shared
                },
            },
            "finetune": {
                "crop_size": [16, 16, 16],
                "samples_per_case": 1,
                "train": {"total_steps": 2, "batch_size": 2, "eval_every": 2, "progress": False},
            },
        }
    )
    first = data_efficiency(cfg)
    assert set(first["table"]) == {"tiny", "wider"} and "0.5" in first["table"]["tiny"]
    marker = tmp_path / "de" / "cells" / "tiny" / "f0.5_s0" / "result.json"
    stamp = marker.stat().st_mtime_ns
    second = data_efficiency(cfg)  # every cell is done: nothing is recomputed
    assert marker.stat().st_mtime_ns == stamp and second["table"] == first["table"]
    assert np.isfinite(first["table"]["tiny"]["1"]["mean"])
    resolved = yaml.safe_load((tmp_path / "de/cells/wider/f1_s0/run/config.yaml").read_text())
    assert resolved["train"]["lr"] == 1e-3 and resolved["train"]["total_steps"] == 2
    table_md = (tmp_path / "de/table.md").read_text()
    assert "Test dice" in table_md and "Test hd95" in table_md and "Test nsd" in table_md
    recorded = json.loads(marker.read_text())
    assert recorded["settings"]["train.seed"] == 0 and recorded["torch_threads"] >= 1

    # logging keys do not decide a result: the finished cells are reused
    cfg.finetune["train"]["log_every"] = 1
    assert data_efficiency(cfg)["table"] == first["table"]
    assert marker.stat().st_mtime_ns == stamp
    # a changed setting does: the stale cell is refused, naming the key, not silently reused
    cfg.arms["wider"].finetune["train"]["lr"] = 2e-3
    with pytest.raises(InputError, match=r"other settings \(changed: train.lr\)"):
        data_efficiency(cfg)
    # a result written before settings were recorded is reused, with a warning that says so
    for legacy in (tmp_path / "de/cells/wider").glob("*/result.json"):
        legacy.write_text(json.dumps({k: v for k, v in json.loads(legacy.read_text()).items()
                                      if k != "settings"}))  # fmt: skip
    with caplog.at_level("WARNING", logger="umit.eval.data_efficiency"):
        assert data_efficiency(cfg)["table"] == first["table"]
    assert "no settings recorded" in caplog.text


# -- a task that must be learned ------------------------------------------------------------------
@pytest.fixture(scope="module")
def sphere_store(tmp_path_factory):
    """MR-like spheres of random radius and centre on noise; the label is the sphere."""
    import nibabel as nib

    from umit.ingest.run import IngestConfig
    from umit.ingest.run import run as ingest
    from umit.preprocess.run import PreprocessConfig
    from umit.preprocess.run import run as preprocess

    root = tmp_path_factory.mktemp("spheres")
    rng = np.random.default_rng(0)
    grid = np.stack(np.meshgrid(*[np.arange(24)] * 3, indexing="ij"), -1)
    entries = {"training": [], "test": []}
    for i in range(10):
        split = "test" if i >= 8 else "training"
        sub = "Ts" if split == "test" else "Tr"
        centre, radius = rng.uniform(9, 15, 3), rng.uniform(4, 7)
        label = (np.linalg.norm(grid - centre, axis=-1) < radius).astype(np.uint8)
        image = (100.0 * label + rng.normal(0, 15, label.shape)).astype(np.float32)
        for folder in (f"images{sub}", f"labels{sub}"):
            (root / folder).mkdir(exist_ok=True)
        nib.save(nib.Nifti1Image(image, np.eye(4)), root / f"images{sub}/s{i:02d}_0000.nii.gz")
        nib.save(nib.Nifti1Image(label, np.eye(4)), root / f"labels{sub}/s{i:02d}.nii.gz")
        entries[split].append(
            {
                "image": [f"./images{sub}/s{i:02d}_0000.nii.gz"],
                "label": f"./labels{sub}/s{i:02d}.nii.gz",
            }
        )
    dataset = {
        "channel_names": {"0": "MR"},
        "labels": {"background": 0, "sphere": 1},
        "numTraining": 8,
        "file_ending": ".nii.gz",
        **entries,
    }
    (root / "dataset.json").write_text(json.dumps(dataset))
    ingest(IngestConfig(src=root, out=root / "raw"), progress=False)
    preprocess(PreprocessConfig(raw=root / "raw", out=root / "prep", workers=1))
    return root / "prep"


def test_finetune_learns_a_trivially_learnable_task(sphere_store, tmp_path):
    """A bright sphere on noise (contrast 100, noise sd 15): 120 steps of a two-layer conv net
    must segment it with test Dice > 0.9 (measured 0.60 after 40 steps at lr 3e-3, 0.90 after
    60 at 1e-2: the check fails if training or the validation/evaluation path breaks)."""
    from umit.eval.evaluate import EvaluateConfig
    from umit.eval.evaluate import run as evaluate

    cfg = _seg_cfg(sphere_store, tmp_path / "run", crop_size=[16, 16, 16], foreground_prob=0.5)
    cfg = cfg.model_copy(
        update={
            "train": cfg.train.model_copy(update={"total_steps": 120, "eval_every": 60, "lr": 1e-2})
        }
    )
    s = run(cfg)
    assert s["selection"] in ("best_val", "last")
    e = evaluate(EvaluateConfig(model=tmp_path / "run" / "best.pt", data=sphere_store, n_boot=10))
    assert e["n_cases"] == 2 and e["result"]["overall"]["dice"]["value"] > 0.9


def test_model_selection_rule_never_selects_on_more_labels_than_the_budget(tiny_ct_store):
    from umit.finetune.run import selection_rule

    cfg = _seg_cfg(tiny_ct_store, "x")
    assert selection_rule(cfg, n_train=5, n_val=2) == "best_val"
    assert selection_rule(cfg, n_train=2, n_val=5) == "last"  # the val set would be extra labels
    assert selection_rule(cfg, n_train=5, n_val=0) == "last"
    forced = cfg.model_copy(update={"select": "best_val"})
    assert selection_rule(forced, n_train=2, n_val=5) == "best_val"


def test_layer_decay_on_a_model_without_blocks_is_an_error(tiny_ct_store, tmp_path):
    from umit.finetune.run import layer_id_fn_for

    with pytest.raises(InputError, match="layer_decay < 1 needs a model with encoder blocks"):
        layer_id_fn_for(TinySeg())


def test_segmentation_finetune_does_not_flip_by_default(tmp_path):
    # mirroring keeps label values, so flips teach "lung_left" on the right side (lateralized labels)
    from umit.finetune.run import FinetuneConfig

    assert FinetuneConfig(data=tmp_path).augment.flip_prob == 0.0


def test_epoch_schedules_scale_with_the_label_budget(tiny_ct_store):
    from umit.finetune.run import scheduled_train_config

    cfg = _seg_cfg(tiny_ct_store, "x").model_copy(update={"epochs": 10.0, "warmup_fraction": 0.1})
    small, large = scheduled_train_config(cfg, 24), scheduled_train_config(cfg, 240)
    assert (small.total_steps, small.warmup_steps) == (120, 12)  # 12 batches of 2 x 10 epochs
    assert (large.total_steps, large.warmup_steps) == (1200, 120)
    assert scheduled_train_config(cfg, 2).total_steps == cfg.min_steps  # the floor
    plain = _seg_cfg(tiny_ct_store, "x")
    assert scheduled_train_config(plain, 24) is plain.train  # no epochs: the configured steps
