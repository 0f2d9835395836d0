"""Pretrain -> fine-tune hand-off: ``encoder.pt`` of a tiny MAE run loads into the task models
with every encoder tensor equal to the file's, strictly; a mismatched encoder is refused by name."""

from __future__ import annotations

import pytest
import torch

from umit.errors import InputError
from umit.finetune.run import FinetuneConfig, build_model
from umit.ssl.pretrain import PretrainConfig
from umit.ssl.pretrain import run as pretrain
from umit.train.checkpoint import load_artifact

pytestmark = pytest.mark.usefixtures("one_thread")
CROP = (32, 32, 16)


@pytest.fixture(scope="module")
def encoder_file(tiny_ct_store, tmp_path_factory):
    out = tmp_path_factory.mktemp("mae")
    cfg = PretrainConfig.model_validate(
        {
            "data": tiny_ct_store,
            "out": out,
            "model": "vit3d_test_p16",
            "crop_size": CROP,
            "mae": {"decoder_dim": 32, "decoder_depth": 1, "decoder_heads": 4},
            "val_cases": 2,
            "val_crops": 2,
            "train": {"total_steps": 3, "warmup_steps": 1, "batch_size": 2, "progress": False},
        }
    )
    return pretrain(cfg)["encoder"]


@pytest.mark.parametrize(
    "model, args, outputs",
    [
        ("unetr", {"encoder": "vit3d_test_p16", "feature_size": 8}, 3),
        ("classifier", {"encoder": "vit3d_test_p16", "pool": "mean"}, 2),
    ],
)
def test_encoder_pt_loads_into_task_models_tensor_for_tensor(
    encoder_file, tiny_ct_store, tmp_path, model, args, outputs
):
    art = load_artifact(encoder_file, expect="encoder")
    task = "segmentation" if model == "unetr" else "classification"
    cfg = FinetuneConfig(
        data=tiny_ct_store, out=tmp_path, task=task, model=model, model_args=args,
        crop_size=CROP, pretrained=encoder_file,
    )  # fmt: skip
    net = build_model(cfg, in_chans=1, num_outputs=outputs)
    own = net.encoder.state_dict()
    assert set(own) == set(art["state_dict"])
    for k, v in art["state_dict"].items():
        assert torch.equal(own[k], v), k
    scratch = build_model(cfg.model_copy(update={"pretrained": None}), 1, outputs)
    assert not all(torch.equal(scratch.encoder.state_dict()[k], v) for k, v in own.items())


def test_a_mismatched_encoder_is_refused_naming_the_file(encoder_file, tiny_ct_store, tmp_path):
    cfg = FinetuneConfig(
        data=tiny_ct_store, out=tmp_path, task="classification", model="classifier",
        model_args={"encoder": "vit3d_tiny_p16"}, crop_size=CROP, pretrained=encoder_file,
    )  # fmt: skip
    with pytest.raises(
        InputError,
        match=r"(?s)encoder\.pt: encoder weights do not fit ViT3D.*Missing key.*blocks\.2.*size mismatch",
    ):
        build_model(cfg, in_chans=1, num_outputs=2)
    with pytest.raises(InputError, match="holds a pretrained encoder"):
        load_artifact(encoder_file, expect="model")


def test_a_headless_cnn_encoder_loads_into_the_classifier(tiny_ct_store, tmp_path):
    """SimCLR / Genesis save CNN encoders without a head; the classifier builds its encoder
    headless too, so the strict load matches key for key."""
    from umit.models import create_model
    from umit.train.checkpoint import save_artifact

    torch.manual_seed(1)
    enc = create_model("resnet3d_test", img_size=CROP, num_classes=0, norm="batch")
    path = save_artifact(tmp_path / "encoder.pt", "encoder", enc)
    cfg = FinetuneConfig(
        data=tiny_ct_store, out=tmp_path, task="classification", model="classifier",
        model_args={"encoder": "resnet3d_test", "encoder_args": {"norm": "batch"}},
        crop_size=CROP, pretrained=path,
    )  # fmt: skip
    net = build_model(cfg, in_chans=1, num_outputs=2)
    assert set(net.encoder.state_dict()) == set(enc.state_dict())
    for k, v in enc.state_dict().items():
        assert torch.equal(net.encoder.state_dict()[k], v), k


@pytest.fixture(scope="module")
def network_run(tiny_ct_store, tmp_path_factory):
    """A 3-step whole-UNETR restoration pretraining (``scope=network``)."""
    out = tmp_path_factory.mktemp("genesis_net")
    cfg = PretrainConfig.model_validate(
        {
            "data": tiny_ct_store,
            "out": out,
            "method": "genesis",
            "scope": "network",
            "model": "unetr",
            "model_args": UNETR_ARGS,
            "crop_size": CROP,
            "genesis": {"shuffle_blocks": 5},
            "val_cases": 2,
            "val_crops": 2,
            "train": {"total_steps": 3, "warmup_steps": 1, "batch_size": 2, "progress": False},
        }
    )
    return pretrain(cfg)


UNETR_ARGS = {"encoder": "vit3d_test_p16", "feature_size": 8}


def test_network_pt_loads_everything_but_the_output_layer(network_run, tiny_ct_store, tmp_path):
    art = load_artifact(network_run["network"], expect="network")
    assert art["model_name"] == "unetr" and art["model_args"]["out_channels"] == 1
    enc = load_artifact(network_run["encoder"], expect="encoder")  # written beside it
    cfg = FinetuneConfig(
        data=tiny_ct_store, out=tmp_path, model="unetr", model_args=UNETR_ARGS,
        crop_size=CROP, pretrained=network_run["network"],
    )  # fmt: skip
    net = build_model(cfg, in_chans=1, num_outputs=3)
    own = net.state_dict()
    fresh = {k for k, v in art["state_dict"].items() if v.shape != own[k].shape}
    assert fresh and all(k.startswith("out.") for k in fresh)  # only the 1x1x1 output conv
    for k, v in art["state_dict"].items():
        if k not in fresh:
            assert torch.equal(own[k], v), k
    for k, v in enc["state_dict"].items():
        assert torch.equal(own[f"encoder.{k}"], v), k


def test_a_mismatched_network_is_refused_naming_the_file(network_run, tiny_ct_store, tmp_path):
    base = {"data": tiny_ct_store, "out": tmp_path, "crop_size": CROP}
    wider = FinetuneConfig(
        **base, model="unetr", model_args={**UNETR_ARGS, "feature_size": 16},
        pretrained=network_run["network"],
    )  # fmt: skip
    with pytest.raises(InputError, match=r"network\.pt: network weights do not fit UNETR.*shape"):
        build_model(wider, in_chans=1, num_outputs=3)
    net = build_model(wider.model_copy(update={"partial_load": True}), in_chans=1, num_outputs=3)
    enc = load_artifact(network_run["encoder"], expect="encoder")["state_dict"]
    assert all(torch.equal(net.encoder.state_dict()[k], v) for k, v in enc.items())
    other = FinetuneConfig(
        **base, model="resunet3d", model_args={"features": [8, 16]},
        pretrained=network_run["network"],
    )  # fmt: skip
    with pytest.raises(InputError, match="holds a pretrained 'unetr' network; the model is"):
        build_model(other, in_chans=1, num_outputs=3)


def test_scope_network_needs_a_restoration_method(tiny_ct_store, tmp_path):
    cfg = PretrainConfig.model_validate(
        {"data": tiny_ct_store, "out": tmp_path, "method": "mae", "scope": "network",
         "model": "unetr", "model_args": UNETR_ARGS, "crop_size": CROP}
    )  # fmt: skip
    with pytest.raises(InputError, match="scope=network .* needs method=genesis"):
        pretrain(cfg)
