"""`umit pretrain` end to end on a tiny phantom store, and the encoder file it leaves."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from umit.cli.main import main as cli_main
from umit.config import PRESETS_DIR
from umit.data.store import Store
from umit.errors import InputError
from umit.ssl.pretrain import PretrainConfig, split_cases
from umit.train.checkpoint import load_encoder

TINY = [
    "model=vit3d_test_p16",
    "crop_size=[32,32,16]",
    "mae.decoder_dim=32",
    "mae.decoder_depth=1",
    "mae.decoder_heads=4",
    "train.total_steps=6",
    "train.warmup_steps=2",
    "train.batch_size=2",
    "train.log_every=3",
    "train.eval_every=3",
    "train.ckpt_every=3",
    "train.progress=false",
    "val_cases=2",
    "val_crops=2",
]


def test_pretrain_cli_writes_run_and_encoder(tiny_ct_store, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli_main(["pretrain", "--data", str(tiny_ct_store), "--out", str(out), *TINY]) == 0
    assert "validation reconstruction loss" in capsys.readouterr().out
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert (
        cfg["model"] == "vit3d_test_p16" and cfg["mae"]["decoder_dim"] == 32
    )  # the whole run config
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [d["step"] for d in lines if d["split"] == "train"] == [3, 6]
    assert all("val_loss" in d for d in lines if d["split"] == "eval")
    ckpt = torch.load(out / "latest.pt", weights_only=True)
    assert ckpt["model_name"] == "mae3d" and ckpt["plan"]["target_spacing"] == [2.0, 2.0, 3.0]
    assert ckpt["run_config"]["train"]["total_steps"] == 6
    enc, meta = load_encoder(out / "encoder.pt")
    assert meta["model_name"] == "vit3d_test_p16"
    # the same weights come out of the training checkpoint of the wrapper
    enc2, _ = load_encoder(out / "latest.pt")
    for (k, v), (k2, v2) in zip(enc.state_dict().items(), enc2.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(v, v2)


def test_test_split_is_never_used_for_pretraining(tiny_ct_store):
    store = Store(tiny_ct_store)
    train, val = split_cases(store, ["test"], val_cases=2, seed=0)
    test_cases = {c for c in store.case_ids if store.index[c].get("split") == "test"}
    assert len(test_cases) == 2 and not (set(train) | set(val)) & test_cases
    assert len(val) == 2 and not set(train) & set(val)
    with pytest.raises(InputError, match="no cases left"):
        split_cases(store, ["train", "test"], 0, 0)


def test_bad_encoder_files(tmp_path):
    with pytest.raises(InputError, match="not found"):
        load_encoder(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(InputError, match="cannot read checkpoint"):
        load_encoder(tmp_path / "junk.pt")
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(InputError, match="not a umit checkpoint"):
        load_encoder(tmp_path / "other.pt")


def test_presets_parse():

    presets = sorted((PRESETS_DIR / "pretrain").glob("*.yaml"))
    assert len(presets) >= 3
    for p in presets:
        cfg = PretrainConfig.model_validate({**yaml.safe_load(p.read_text()), "data": "x"})
        from umit.models import list_models

        assert cfg.model in list_models(), p


METHOD_ARGS = {
    "mae": ["method=mae"],
    "simclr": ["method=simclr", "simclr.proj_dim=16", "simclr.hidden=32"],
    "genesis": ["method=genesis", "genesis.decoder_dim=16", "genesis.shuffle_blocks=5"],
}


def _cfg(store, out, *overrides):
    from umit.config import build_config

    return build_config(PretrainConfig, None, [*TINY, *overrides], data=store, out=out)


@pytest.mark.parametrize("method", ["mae", "simclr", "genesis"])
def test_each_method_writes_a_loadable_encoder_and_logs_baselines(tiny_ct_store, tmp_path, method):
    from umit.ssl.pretrain import run

    model = "model=vit3d_test_p16" if method == "mae" else "model=vit3d_test_p8"
    cfg = _cfg(
        tiny_ct_store,
        tmp_path / method,
        *METHOD_ARGS[method],
        model,
        "monitor_label=sex",
        "monitor_cases=8",
        "monitor_k=3",
    )
    summary = run(cfg)
    lines = [json.loads(x) for x in (cfg.out / "metrics.jsonl").read_text().splitlines()]
    train = [d for d in lines if d["split"] == "train"]
    evals = [d for d in lines if d["split"] == "eval"]
    part = {"mae": "flat_loss", "simclr": "chance_loss", "genesis": "baseline_loss"}[method]
    assert all(part in d for d in train)
    assert evals and all(
        {"val_loss", "val_baseline_loss", "knn_acc", "probe_acc"} <= set(d) for d in evals
    )
    if method == "mae":  # norm_pix_loss: predicting each patch's mean scores about 1
        assert train[0]["flat_loss"] == pytest.approx(1.0, abs=0.01)
    enc, meta = load_encoder(cfg.out / "encoder.pt")
    assert meta["method"] == method and summary["method"] == method
    saved = torch.load(cfg.out / "encoder.pt", weights_only=True)["state_dict"]
    assert saved.keys() == enc.state_dict().keys()
    assert all(torch.equal(saved[k], v) for k, v in enc.state_dict().items())
    enc2, _ = load_encoder(cfg.out / "latest.pt")  # the wrapper's training checkpoint
    assert all(torch.equal(enc2.state_dict()[k], v) for k, v in enc.state_dict().items())


def test_same_config_and_seed_give_bit_identical_weights(tiny_ct_store, tmp_path):
    from umit.ssl.pretrain import run

    args = [*METHOD_ARGS["simclr"], "model=vit3d_test_p8", "train.total_steps=3"]
    weights = []
    for name in ("a", "b", "c"):
        seed = ["train.seed=1"] if name == "c" else []
        run(_cfg(tiny_ct_store, tmp_path / name, *args, *seed))
        weights.append(torch.load(tmp_path / name / "encoder.pt", weights_only=True)["state_dict"])
    a, b, c = weights
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_cnn_and_swin_encoders_pretrain(tiny_ct_store, tmp_path):
    from umit.ssl.pretrain import run

    cfg = _cfg(
        tiny_ct_store,
        tmp_path / "cnn",
        *METHOD_ARGS["genesis"],
        "model=resnet3d_test",
        "model_args={norm: batch}",
        "train.total_steps=3",
    )
    run(cfg)
    enc, meta = load_encoder(cfg.out / "encoder.pt")
    assert meta["model_name"] == "resnet3d_test" and not hasattr(enc.head, "weight")
    with pytest.raises(ValueError, match="keep_indices"):  # MAE needs a ViT
        run(_cfg(tiny_ct_store, tmp_path / "swin_mae", "model=swin3d_test"))
