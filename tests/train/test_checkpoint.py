"""Checkpoints: plain data loadable with weights_only=True, atomic files, pruning, clear errors."""

from __future__ import annotations

import io
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from train_helpers import TinyNet, make_run

from umit.errors import InputError
from umit.train import checkpoint as ck
from umit.train import load_checkpoint, load_latest


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ckpt_run")
    make_run(out, total_steps=6, ckpt_every=2, keep_last=2, log_every=2).fit()
    return out


def test_files_latest_and_pruning(run_dir):
    names = sorted(p.name for p in run_dir.iterdir())
    assert names == [
        "config.yaml",
        "latest.pt",
        "metrics.jsonl",
        "step_000004.pt",
        "step_000006.pt",
    ]
    assert (run_dir / "latest.pt").read_bytes() == (run_dir / "step_000006.pt").read_bytes()


def test_checkpoint_is_plain_data_and_self_describing(run_dir):
    raw = torch.load(run_dir / "latest.pt", weights_only=True)  # no pickled objects
    assert raw["format"] == "umit-checkpoint" and raw["format_version"] == ck.FORMAT_VERSION
    assert raw["step"] == 6
    assert raw["model_name"] == "tiny_net"
    assert raw["model_args"] == {"in_dim": 8, "width": 16, "depth": 2, "out_dim": 2, "dropout": 0.1}
    assert raw["plan"] == {"spacing": [1.0, 1.0, 1.0]} and raw["data_hash"] == "abc123"
    assert set(raw["versions"]) == {"umit", "torch", "python"}
    assert all(type(v) is str for v in raw["versions"].values())
    assert raw["config"]["total_steps"] == 6 and raw["config"]["out_dir"] == str(run_dir)
    assert raw["data"] == {
        "epoch": 0,
        "samples_in_epoch": 24,
        "global_micro_batch": 4,
        "seed": 0,
        "shuffle": True,
    }
    assert raw["world_size"] == 1 and len(raw["rank_state"]) == 1
    assert set(raw["rank_state"][0]["rng"]) == {"torch", "numpy", "python", "cuda"}
    assert set(raw["task"]["ema"]) == set(raw["model"])
    assert raw["scaler"] is None  # fp32
    # optimizer state keyed by parameter name, groups keep their scales and names
    groups = raw["optimizer"]["param_groups"]
    assert {g["wd_scale"] for g in groups} == {0.0, 1.0}
    assert "stem.weight" in raw["optimizer"]["state"]
    # the weights rebuild the model from its recorded name/args
    model = TinyNet(**raw["model_args"])
    model.load_state_dict(raw["model"])


def test_load_checkpoint_errors(tmp_path, run_dir):
    with pytest.raises(InputError, match="not found") as exc:
        load_checkpoint(tmp_path / "nope.pt")
    assert "nope.pt" in str(exc.value)
    data = (run_dir / "latest.pt").read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="cannot read checkpoint"):
        load_checkpoint(tmp_path / "trunc.pt")
    (tmp_path / "text.pt").write_text("hello")
    with pytest.raises(InputError, match="cannot read checkpoint"):
        load_checkpoint(tmp_path / "text.pt")
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(InputError, match="not a umit checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    torch.save({"format": "umit-checkpoint", "obj": Path("x")}, tmp_path / "pickled.pt")
    with pytest.raises(InputError, match="cannot read checkpoint"):
        load_checkpoint(tmp_path / "pickled.pt")  # a pickled object is refused, not executed


def test_load_latest_skips_a_corrupt_latest(tmp_path, run_dir):
    for p in run_dir.glob("*.pt"):
        (tmp_path / p.name).write_bytes(p.read_bytes())
    (tmp_path / "latest.pt").write_bytes(b"corrupt")
    path, state = load_latest(tmp_path)
    assert path.name == "step_000006.pt" and state["step"] == 6
    assert load_latest(tmp_path / "empty") is None


def test_save_checkpoint_validates_and_writes_atomically(tmp_path):
    state = {"format": ck.FORMAT, "format_version": 1, "model": {"w": torch.ones(2)}, "step": 3}
    with pytest.raises(ValueError, match="lacks"):
        ck.save_checkpoint({"model": {}}, tmp_path)
    with pytest.raises(TypeError, match=r"checkpoint\['bad'\]: object is not plain data"):
        ck.save_checkpoint({**state, "bad": object()}, tmp_path)
    assert not any(tmp_path.iterdir())  # nothing half-written
    for step in (3, 4, 5):
        ck.save_checkpoint({**state, "step": step}, tmp_path, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "latest.pt",
        "step_000004.pt",
        "step_000005.pt",
    ]
    assert load_checkpoint(tmp_path / "latest.pt")["step"] == 5


def test_to_plain_converts_what_weights_only_refuses():
    out = ck.to_plain(
        {
            "p": Path("/a"),
            "n": np.float32(1.5),
            "arr": np.arange(3),
            "v": torch.__version__,
            "t": (1, [2]),
        }
    )
    assert out["p"] == "/a" and type(out["n"]) is float and type(out["v"]) is str
    assert torch.equal(out["arr"], torch.arange(3)) and out["t"] == (1, [2])
    with pytest.raises(TypeError, match=r"model_args\['act'\]"):
        ck.to_plain({"act": torch.nn.GELU}, "model_args")


def test_rng_state_round_trip():
    state = ck.rng_state()
    a = (torch.rand(3), np.random.rand(3), random.random())  # noqa: NPY002 - the global RNG is under test
    ck.set_rng_state(state)
    b = (torch.rand(3), np.random.rand(3), random.random())  # noqa: NPY002
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]


# -- artifacts: one loader, every kind, old layouts migrated ------------------------------------
def _v1_best_pt(path, model, plan=None):
    """``best.pt`` exactly as main at f4fec19 wrote it (``finetune.run.save_model``): a ``kind``
    but no ``format``, and no inference spec (ROI and overlap only inside ``run_config``)."""
    from umit.train.checkpoint import to_plain, versions

    payload = {
        "kind": "model",
        "task": "classification",
        "model_name": model.model_name,
        "model_args": to_plain(model.model_args, "model_args"),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "plan": plan,
        "run_config": {"task": "classification", "crop_size": [32, 32, 16], "sw_overlap": 0.25,
                       "label_key": "target", "renamed_later": 1},
        "versions": versions(),
        "cases": {"train": ["a"], "val": [], "unlabeled": [], "test": []},
        "class_names": ["0", "1"],
        "label_names": None,
        "label_key": "target",
        "num_outputs": 2,
    }  # fmt: skip
    torch.save(payload, path)
    return path


def test_a_version_1_model_file_migrates_to_an_inference_spec(tmp_path):
    from umit.models import create_model
    from umit.train.checkpoint import InferenceSpec, load_artifact, load_model

    net = create_model("classifier", encoder="vit3d_test_p16", img_size=(32, 32, 16), num_classes=2)
    path = _v1_best_pt(tmp_path / "best.pt", net)
    art = load_artifact(path, expect="model")
    assert art["format_version"] == ck.FORMAT_VERSION and art["kind"] == "model"
    spec = InferenceSpec.model_validate(art["spec"])
    assert spec.roi_size == (32, 32, 16) and spec.overlap == 0.25
    assert spec.class_names == ["0", "1"] and spec.task == "classification"
    model, art = load_model(path)
    for k, v in net.state_dict().items():
        assert torch.equal(model.state_dict()[k], v)
    with pytest.raises(
        InputError, match="holds a fine-tuned model .*expected a pretrained encoder"
    ):
        load_artifact(path, expect="encoder")


def test_save_artifact_round_trips_and_refuses_what_it_cannot_describe(tmp_path):
    from umit.models import create_model
    from umit.train.checkpoint import InferenceSpec, load_artifact, save_artifact

    enc = create_model("vit3d_test_p16", img_size=(32, 32, 16))
    path = save_artifact(tmp_path / "encoder.pt", "encoder", enc, extra={"method": "mae"})
    art = load_artifact(path, expect="encoder")
    assert art["method"] == "mae" and art["model_name"] == "vit3d_test_p16"
    assert torch.load(path, weights_only=True)["format_version"] == ck.FORMAT_VERSION  # plain data
    with pytest.raises(ValueError, match="needs its InferenceSpec"):
        save_artifact(tmp_path / "m.pt", "model", enc)
    with pytest.raises(ValueError, match="writes 'model', 'encoder' or 'network'"):
        save_artifact(tmp_path / "m.pt", "train_state", enc, spec=InferenceSpec())
    with pytest.raises(ValueError, match="no model_name"):
        save_artifact(tmp_path / "m.pt", "encoder", torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="unknown artifact kind"):
        load_artifact(path, expect="weights")


def test_resume_with_a_parameter_that_never_had_a_gradient():
    """AdamW keeps no state for a parameter without gradients (a ResUNet's deep-supervision
    heads trained without deep supervision): the optimizer state restores all the same, the next
    steps equal the uninterrupted run's."""

    def build(seed: int):
        torch.manual_seed(seed)
        net = torch.nn.ModuleDict({"used": torch.nn.Linear(3, 2), "unused": torch.nn.Linear(3, 2)})
        return net, torch.optim.AdamW(net.parameters(), lr=0.1)

    def step(net, opt, x):
        opt.zero_grad()
        net["used"](x).square().sum().backward()
        opt.step()

    x = torch.randn(4, 3)
    net, opt = build(0)
    step(net, opt, x)
    assert len(opt.state) == 2  # the used layer's weight and bias only
    # through bytes, as a checkpoint file (the gathered tensors are the live optimizer's)
    buffer = io.BytesIO()
    torch.save(ck.gather_train_state(net, opt), buffer)
    buffer.seek(0)
    model_sd, optim_sd = torch.load(buffer, weights_only=True)
    other, other_opt = build(1)
    ck.restore_train_state(other, other_opt, model_sd, optim_sd)
    for _ in range(2):
        step(net, opt, x)
        step(other, other_opt, x)
    for (name, a), b in zip(net.state_dict().items(), other.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=name)
    assert not torch.equal(net["used"].weight, model_sd["used.weight"])  # it did train
