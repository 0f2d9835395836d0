"""Federated fine-tuning and the hand-off to the other stages: one site equals ``umit finetune``;
``best.pt`` goes to ``umit evaluate`` unchanged; the federated ``encoder.pt`` (and the global
checkpoint) start ``umit finetune``; classes are the union over sites; DP-SGD per site reports
each site's epsilon every round; the CLI runs and refuses bad input by name."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("flwr")

from umit.cli.main import main as cli  # noqa: E402
from umit.config import build_config  # noqa: E402
from umit.eval.evaluate import EvaluateConfig  # noqa: E402
from umit.eval.evaluate import run as evaluate  # noqa: E402
from umit.federated.config import FederatedConfig  # noqa: E402
from umit.federated.run import run  # noqa: E402
from umit.finetune.run import FinetuneConfig, build_model  # noqa: E402
from umit.finetune.run import run as finetune  # noqa: E402
from umit.train.checkpoint import load_artifact, load_model  # noqa: E402
from umit.train.metrics import read_metrics  # noqa: E402

from _shared import TinyCls, TinySeg  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_seg_fed(**kw):
    return TinySeg(**{"width": 4, **kw})


def tiny_cls_fed(**kw):
    return TinyCls(**{"width": 4, **kw})


@pytest.fixture(autouse=True)
def _stand_in_models(register_models):
    register_models(tiny_seg_fed, tiny_cls_fed)


SEG = {
    "model": "tiny_seg_fed",
    "model_args": {},
    "crop_size": [16, 16, 16],
    "samples_per_case": 2,
    "sw_batch_size": 4,
    "select": "last",
    "train": {"batch_size": 2, "warmup_steps": 1, "lr": 3e-3, "progress": False},
}


def fed(out, section, **values) -> FederatedConfig:
    return FederatedConfig.model_validate(
        {"task": "finetune", "rounds": 3, "local_steps": 2, "finetune": section, "out": out}
        | values
    )


def test_one_site_equals_umit_finetune_and_best_pt_goes_to_evaluate(tiny_ct_store, tmp_path):
    s = run(fed(tmp_path / "fed", SEG, sites=[tiny_ct_store]))
    central = FinetuneConfig.model_validate(
        SEG
        | {
            "data": tiny_ct_store,
            "out": tmp_path / "central",
            "train": SEG["train"] | {"total_steps": 6},
        }
    )
    finetune(central)
    a = load_artifact(tmp_path / "fed/best.pt", expect="model")
    b = load_artifact(tmp_path / "central/best.pt", expect="model")
    assert a["spec"] == b["spec"]  # the same inference spec as umit finetune writes
    for k, v in b["state_dict"].items():
        torch.testing.assert_close(a["state_dict"][k], v, atol=1e-6, rtol=0, msg=k)
    # per-site validation Dice every round (the server's aggregate too)
    evals = [r for r in read_metrics(tmp_path / "fed") if r["split"] == "eval"]
    assert [r["round"] for r in evals if r["site"] == "global"] == [1, 2, 3]
    assert all(0.0 <= r["val_dice"] <= 1.0 for r in evals)
    # umit evaluate takes the federated best.pt unchanged
    model, art = load_model(s["artifact"])
    assert art["task"] == "segmentation" and art["federated"]["round"] == 3
    summary = evaluate(
        EvaluateConfig(
            model=s["artifact"],
            data=tiny_ct_store,
            out=tmp_path / "ev",
            n_boot=10,
            case_figures=False,
        )
    )
    assert summary["n_cases"] == 2  # the two test cases, scored
    assert 0.0 <= summary["result"]["overall"]["dice"]["value"] <= 1.0


def test_classes_are_the_union_over_sites_and_dp_reports_epsilon_per_site(tiny_ct_store, tmp_path):
    section = {
        "task": "classification",
        "label_key": "sex",
        "model": "tiny_cls_fed",
        "model_args": {},
        "crop_size": [16, 16, 16],
        "samples_per_case": 1,
        "dp": {"enabled": True, "target_epsilon": 4.0},
        "train": {"batch_size": 1, "warmup_steps": 0, "lr": 1e-2, "progress": False},
    }
    s = run(fed(tmp_path / "fed", section, data=tiny_ct_store, rounds=2))
    art = load_artifact(s["artifact"], expect="model")
    assert art["spec"]["class_names"] == ["F", "M"]
    recs = [r for r in read_metrics(tmp_path / "fed") if r["split"] == "train"]
    eps = {}
    for r in recs:
        if r["site"] != "global":
            eps.setdefault(r["site"], []).append(r["epsilon"])
    assert set(eps) == {"site_a", "site_b", "site_c"}
    for site, values in eps.items():  # spent per round, within the budget of the whole run
        assert 0 < values[0] < values[1] <= 4.0 + 1e-6, site
    assert art["dp"]["epsilon"] == pytest.approx(max(v[-1] for v in eps.values()))
    assert art["dp"]["accountant"] == "rdp"
    # umit evaluate states the guarantee of the federated model
    from umit.train.dp import format_dp

    assert format_dp(art["dp"]).startswith(f"({art['dp']['epsilon']:.3g}, ")


def test_federated_encoder_and_global_checkpoint_start_umit_finetune(tiny_ct_store, tmp_path):
    cfg = build_config(
        FederatedConfig,
        None,
        [
            "task=pretrain",
            "rounds=2",
            "local_steps=1",
            "evaluate=false",
            "pretrain.model=vit3d_test_p16",
            "pretrain.crop_size=[32,32,16]",
            "pretrain.mae.decoder_dim=16",
            "pretrain.mae.decoder_depth=1",
            "pretrain.mae.decoder_heads=2",
            "pretrain.val_cases=0",
            "pretrain.train.warmup_steps=0",
        ],
        data=tiny_ct_store,
        out=tmp_path / "mae",
    )
    s = run(cfg)
    encoder = load_artifact(s["artifact"], expect="encoder")
    for pretrained in (s["artifact"], tmp_path / "mae/latest.pt"):
        ft = FinetuneConfig(
            data=tiny_ct_store,
            out=tmp_path / "ft",
            model="unetr",
            model_args={"encoder": "vit3d_test_p16", "feature_size": 4},
            crop_size=(32, 32, 16),
            pretrained=pretrained,
        )
        net = build_model(ft, in_chans=1, num_outputs=3)
        for k, v in encoder["state_dict"].items():
            assert torch.equal(net.encoder.state_dict()[k], v), k


def test_cli_runs_and_names_bad_input(tiny_ct_store, tmp_path, capsys):
    args = ["federated", "--data", str(tiny_ct_store), "--out", str(tmp_path / "cli")]
    args += ["task=finetune", "rounds=1", "local_steps=1", "evaluate=false"]
    args += [f"finetune.{k}={v}" for k, v in (("model", "tiny_seg_fed"), ("model_args", "{}"))]
    args += ["finetune.crop_size=[16,16,16]", "finetune.train.warmup_steps=0"]
    assert cli(args) == 0
    out = capsys.readouterr().out
    assert "federated finetune (fedavg): 1 rounds over sites site_a, site_b, site_c" in out
    assert (tmp_path / "cli/best.pt").is_file()
    assert cli(["federated", "--out", str(tmp_path / "x"), "strategy=fedsgd"]) == 2
    assert "strategy: Input should be 'fedavg' or 'fedprox'" in capsys.readouterr().err
    assert cli(["federated", "--out", str(tmp_path / "x")]) == 2
    assert "no sites" in capsys.readouterr().err
