"""`umit phantoms`: writes collections and the resolved config; bad settings are clear errors."""

from __future__ import annotations

import json

import pytest
import yaml

from umit.cli.main import main
from umit.config import build_config
from umit.data.phantoms.stage import PhantomsConfig, run
from umit.errors import InputError


def test_both_modalities_via_the_front_door(tmp_path, capsys):
    out = tmp_path / "phantoms"
    argv = ["phantoms", "--n", "2", "--out", str(out), "--modality", "both", "--seed", "3"]
    assert main([*argv, "shape=[32,32,32]", "n_test=1"]) == 0
    summary = capsys.readouterr().out.strip()
    assert len(summary.splitlines()) == 1 and str(out) in summary

    for kind, channels in (("ct", {"0": "CT"}), ("mr", {"0": "T1", "1": "T2", "2": "FLAIR"})):
        ds = json.loads((out / kind / "dataset.json").read_text())
        assert ds["channel_names"] == channels
        assert ds["numTraining"] == 2 and len(ds["test"]) == 1
        assert ds["phantom"]["seed"] == 3 and ds["phantom"]["shape"] == [32, 32, 32]
        for entry in ds["training"]:
            assert all((out / kind / p).is_file() for p in entry["image"])
            assert (out / kind / entry["label"]).is_file()
        assert (out / kind / "attributes.csv").read_text().count("\n") == 4

    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved == {
        "out": str(out),
        "n": 2,
        "modality": "both",
        "seed": 3,
        "shape": [32, 32, 32],
        "n_test": 1,
        "workers": 1,
        "findings": False,
        "phases": None,
    }
    # The saved config reproduces the run (and resumes without regenerating anything).
    again = build_config(PhantomsConfig, out / "config.yaml")
    assert run(again) == out


def test_multiphase_exams_via_the_front_door(tmp_path):
    out = tmp_path / "ph"
    argv = ["phantoms", "--out", str(out), "--n", "2", "--modality", "both", "shape=[32,32,32]"]
    assert main([*argv, "phases=[none,portal]"]) == 0
    rows = (out / "ct" / "attributes.csv").read_text().splitlines()
    assert rows[0].endswith(",subject_id") and len(rows) == 1 + 2 * 2  # 2 subjects x 2 phases
    assert "phantom_ct_0000_portal" in rows[2] and rows[2].endswith(",phantom_ct_0000")
    assert (out / "mr" / "attributes.csv").read_text().count("\n") == 3  # MR: one series each


def test_config_file_and_overrides(tmp_path):
    cfg_file = tmp_path / "p.yaml"
    cfg_file.write_text("n: 5\nmodality: mr\nshape: [32, 32, 32]\n")
    cfg = build_config(PhantomsConfig, cfg_file, ["n=1"], out=tmp_path / "mr", seed=None)
    assert (cfg.n, cfg.modality, cfg.seed, cfg.shape) == (1, "mr", 0, (32, 32, 32))
    root = run(cfg)
    assert (root / "dataset.json").is_file() and (root / "config.yaml").is_file()
    assert len(list((root / "imagesTr").glob("*.nii.gz"))) == 3


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--n", "0"], "n"),
        (["shape=[8,32,32]"], "(8, 32, 32)"),
        (["--modality", "pet"], None),  # argparse rejects it (exit 2)
        (["workers=0"], "workers"),
        (["wrokers=2"], "wrokers"),
    ],
)
def test_bad_settings_are_clear_errors(tmp_path, capsys, extra, message):
    argv = ["phantoms", "--out", str(tmp_path / "x"), *extra]
    if message is None:
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
        return
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "umit phantoms: error:" in err and message in err
    assert not (tmp_path / "x").exists()


def test_missing_out_is_a_clear_error():
    with pytest.raises(InputError, match="out"):
        build_config(PhantomsConfig, None, [], n=2)
