"""``umit demo`` end to end at a tiny size: every stage runs, the cells run in two processes
beside the pretraining, the report and summary are written, and a rerun recomputes nothing."""

from __future__ import annotations

import json
import re

import pytest

from umit.cli.main import main as cli_main

TINY = [
    "n_train=6",
    "n_pool=3",
    "n_test=2",
    "shape=[32,32,24]",
    "target_spacing=[3.2,3.2,4.0]",
    "crop_size=[16,16,16]",
    "encoder=vit3d_test_p8",
    "feature_size=4",
    "pretrain_steps=2",
    "finetune_steps=2",
    "labeled=[2,all]",  # the "all" budget path (the default is [1, 20])
    "workers=2",
]


@pytest.mark.usefixtures("one_thread")
def test_demo_runs_every_stage_and_resumes(tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli_main(["demo", "--out", str(out), *TINY]) == 0
    printed = capsys.readouterr().out
    assert "UMIT demo finished" in printed and "2 labeled: Dice" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["catalog"]["cases"] == 8
    # the multiphase pool, unlabeled: 3 exams x 3 phases, one whole exam held out
    assert (
        summary["pretrain"]["train_cases"] == 6 and summary["pretrain"]["method"] == "cross_phase"
    )
    table = summary["table"]
    assert set(table) == {"UNETR + cross-phase front", "UNETR scratch", "ResUNet (CNN)"}
    for cells in table.values():
        assert set(cells) == {"n2", "all"} and cells["n2"]["n_labeled"] == 2
        assert all(0.0 <= c["mean"] <= 1.0 for c in cells.values())
    page = (out / "report.html").read_text()
    assert "Best, median and worst test phantom" in page and "<td>kidney_left</td>" in page
    assert "Where the model looked: UNETR behind the cross-phase front" in page
    assert "attention rollout" in page
    assert "Error bars: one seed: its 95% bootstrap CI over the 2 test cases" in page
    assert not re.search(r"\bdice_\d", page)
    results = sorted((out / "finetune" / "cells").rglob("result.json"))
    assert len(results) == 6
    stamps = [p.stat().st_mtime_ns for p in results]
    assert cli_main(["demo", "--out", str(out), *TINY]) == 0  # resumes: no cell recomputed
    assert [p.stat().st_mtime_ns for p in results] == stamps
    again = json.loads((out / "summary.json").read_text())["pretrain"]
    for key in (
        "initial_val_loss",
        "last_val_loss",
        "steps",
    ):  # the finished run's, not re-measured
        assert again[key] == summary["pretrain"][key], key
