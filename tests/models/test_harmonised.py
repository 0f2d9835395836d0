"""A task model behind a frozen cross-phase network (`phase_harmonised`, `finetune.harmonise`):
the forward against a hand composition, the front's freezing, the saved model, the bad inputs,
and one real fine-tuning run whose front stays the pretrained network bit for bit."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from umit.errors import InputError
from umit.models import create_model
from umit.train.checkpoint import InferenceSpec, load_model, save_artifact

FRONT_ARGS = {"features": [4, 8], "in_chans": 1, "out_channels": 3}
NET_ARGS = {"features": [4, 8], "out_channels": 5}


def _harmonised() -> torch.nn.Module:
    return create_model(
        "phase_harmonised",
        model="resunet3d",
        model_args=NET_ARGS,
        front_model="resunet3d",
        front_args=FRONT_ARGS,
    )


def test_forward_is_the_task_model_on_the_input_plus_each_predicted_change():
    torch.manual_seed(0)
    model = _harmonised().eval()
    with torch.no_grad():  # away from the initialisation, so that the front is no copy
        for p in model.front.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(2, 1, 16, 16, 16)
    change = model.front(x)  # (2, 3, 16, 16, 16)
    assert change.abs().max() > 0
    phases = torch.cat([x + change[:, i : i + 1] for i in range(3)], dim=1)
    torch.testing.assert_close(model(x), model.net(phases))
    assert model.net.encoder is model.encoder and model.out_channels == 5


def test_the_front_neither_trains_nor_updates_its_statistics():
    torch.manual_seed(0)
    model = _harmonised()
    model.train()
    assert model.net.training and not model.front.training
    before = {k: v.clone() for k, v in model.front.state_dict().items()}
    model(torch.randn(2, 1, 16, 16, 16)).sum().backward()
    assert all(p.grad is None and not p.requires_grad for p in model.front.parameters())
    assert any(p.grad is not None for p in model.net.parameters())
    for k, v in model.front.state_dict().items():  # batch-norm running stats included
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    named = [n for n, p in model.named_parameters() if p.requires_grad]
    assert named and all(n.startswith("net.") for n in named)


def test_saved_model_reloads_front_and_task_model(tmp_path):
    torch.manual_seed(1)
    model = _harmonised().eval()
    spec = InferenceSpec(task="segmentation", roi_size=(16, 16, 16))
    path = save_artifact(tmp_path / "m.pt", "model", model, spec=spec)
    again, art = load_model(path)
    assert art["model_args"]["front_model"] == "resunet3d"
    x = torch.randn(1, 1, 16, 16, 16)
    torch.testing.assert_close(again.eval()(x), model(x))


def test_bad_harmonised_arguments():
    with pytest.raises(ValueError, match="out_channels >= 2"):
        create_model("phase_harmonised", model="resunet3d", model_args=NET_ARGS,
                     front_model="resunet3d", front_args={"features": [4, 8], "in_chans": 1})  # fmt: skip
    with pytest.raises(ValueError, match="from one CT channel; it takes 1 and in_chans=2"):
        create_model("phase_harmonised", model="resunet3d", model_args=NET_ARGS,
                     front_model="resunet3d", front_args=FRONT_ARGS, in_chans=2)  # fmt: skip
    with pytest.raises(ValueError, match="sees the front's 3 phases; its in_chans=1"):
        create_model("phase_harmonised", model="resunet3d",
                     model_args={**NET_ARGS, "in_chans": 1},
                     front_model="resunet3d", front_args=FRONT_ARGS)  # fmt: skip


def _front_file(path: Path, method: str = "cross_phase", in_chans: int = 1) -> Path:
    torch.manual_seed(2)
    front = create_model("resunet3d", **{**FRONT_ARGS, "in_chans": in_chans})
    with torch.no_grad():
        for p in front.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return save_artifact(path, "network", front, extra={"method": method})


def test_finetune_behind_a_cross_phase_front(tiny_ct_store, tmp_path):
    from umit.finetune.run import FinetuneConfig, run

    front_path = _front_file(tmp_path / "front.pt")
    settings = {
        "data": tiny_ct_store,
        "model": "resunet3d",
        "model_args": {"features": [4, 8]},
        "crop_size": [16, 16, 16],
        "samples_per_case": 1,
        "label_count": 2,
        "train": {"total_steps": 3, "batch_size": 2, "warmup_steps": 1, "eval_every": 3,
                  "progress": False},
    }  # fmt: skip
    summary = run(FinetuneConfig.model_validate(
        {**settings, "out": tmp_path / "ft", "harmonise": front_path}))  # fmt: skip
    model, art = load_model(summary["model"])
    assert art["model_name"] == "phase_harmonised"
    trained = model.front.state_dict()
    for k, v in torch.load(front_path, weights_only=True)["state_dict"].items():
        torch.testing.assert_close(trained[k], v, rtol=0, atol=0)  # the front never moved
    first = next(m for m in model.net.modules() if isinstance(m, torch.nn.Conv3d))
    assert first.in_channels == 3  # the task model sees the three phases
    with pytest.raises(InputError, match="method='genesis'"):
        run(FinetuneConfig.model_validate({**settings, "out": tmp_path / "bad1",
            "harmonise": _front_file(tmp_path / "genesis.pt", method="genesis")}))  # fmt: skip
    with pytest.raises(InputError, match="takes 2 channel"):
        run(FinetuneConfig.model_validate({**settings, "out": tmp_path / "bad2",
            "harmonise": _front_file(tmp_path / "two.pt", in_chans=2)}))  # fmt: skip
    with pytest.raises(ValueError, match="harmonise and channel_dropout"):
        FinetuneConfig.model_validate({**settings, "harmonise": front_path,
                                       "channel_dropout": 0.2})  # fmt: skip


def test_arms_take_one_front_per_seed(tmp_path):
    from umit.eval.data_efficiency import (
        ArmConfig,
        Budget,
        DataEfficiencyConfig,
        cell_finetune_config,
    )

    by_seed = {0: tmp_path / "a.pt", 1: tmp_path / "b.pt"}
    arm = ArmConfig(model="unetr", harmonise_by_seed=by_seed)
    cfg = DataEfficiencyConfig(data=tmp_path, arms={"h": arm})
    budget = Budget(key="n1", folder="n1", count=1)
    assert cell_finetune_config(cfg, arm, budget, 1, tmp_path).harmonise == by_seed[1]
    assert (
        cell_finetune_config(cfg, ArmConfig(model="unetr"), budget, 1, tmp_path).harmonise is None
    )
    assert arm.pretraining_run(0) == str(by_seed[0])
    both = ArmConfig(model="unetr", pretrained=tmp_path / "p.pt",
                     finetune={"harmonise": str(by_seed[0])})  # fmt: skip
    assert both.pretraining_run(3) == f"{tmp_path / 'p.pt'}+{by_seed[0]}"
    with pytest.raises(InputError, match="harmonise_by_seed has no checkpoint for seed 2"):
        arm.harmoniser(2)
    with pytest.raises(ValueError, match="harmonise_by_seed has no checkpoint for seeds \\[2\\]"):
        ArmConfig(model="unetr", harmonise_by_seed=by_seed, seeds=[0, 2])
    with pytest.raises(ValueError, match="not both"):
        ArmConfig(model="unetr", harmonise_by_seed=by_seed, finetune={"harmonise": "x.pt"})


def test_layer_ids_are_the_task_models_under_net():
    from umit.models.heads import layer_id_fn

    unetr = {"encoder": "vit3d_test_p8", "feature_size": 8, "img_size": (16, 16, 16)}
    model = create_model("phase_harmonised", model="unetr", model_args=unetr, out_channels=2,
                         front_model="resunet3d", front_args=FRONT_ARGS)  # fmt: skip
    ids, inner = model.layer_id_fn(), layer_id_fn(model.net)
    names = [n for n, _ in model.net.named_parameters()]
    assert [ids(f"net.{n}") for n in names] == [inner(n) for n in names]
    assert max(inner(n) for n in names) > 0 and ids("front.anything") == 0
    assert ids.num_layers == inner.num_layers
