"""Probes of frozen encoders: crop/pad, probe scores against scikit-learn, end-to-end run."""

from __future__ import annotations

import numpy as np
import pytest

from umit.data.cases import centre_crop_or_pad
from umit.eval.probes import ProbeConfig, fit_probes, run
from umit.train.checkpoint import load_encoder


def test_centre_crop_or_pad():
    v = np.arange(1 * 4 * 6 * 2, dtype=np.float32).reshape(1, 4, 6, 2)
    out = centre_crop_or_pad(v, (2, 8, 2), [-1.0])
    assert out.shape == (1, 2, 8, 2)
    np.testing.assert_array_equal(out[0, :, 1:7, :], v[0, 1:3, :, :])  # cropped on x, padded on y
    assert np.all(out[0, :, 0] == -1) and np.all(out[0, :, 7] == -1)


def test_fit_probes_separable_vs_noise():
    rng = np.random.default_rng(0)
    y = np.array(["a", "b"] * 40)
    x = rng.normal(size=(80, 16))
    x_sep = x + (y == "b")[:, None] * 3.0
    good = fit_probes(x_sep[:60], y[:60], x_sep[60:], y[60:], k=5)
    assert good["linear"]["accuracy"] == 1.0 and good["knn"]["auc"] > 0.95
    bad = fit_probes(x[:60], y[:60], x[60:], y[60:], k=5)
    assert bad["linear"]["auc"] < 0.8


def test_probe_run_on_a_store(tiny_ct_store, tmp_path):
    from umit.models import create_model
    from umit.ssl.mae import MAE3D
    from umit.ssl.pretrain import PretrainConfig, save_encoder

    enc = create_model("vit3d_test_p16", img_size=(32, 32, 16), in_chans=1)
    mae = MAE3D(enc, decoder_dim=32, decoder_depth=1, decoder_heads=4)
    path = save_encoder(mae, tmp_path / "encoder.pt", None, PretrainConfig(data=tiny_ct_store))
    assert load_encoder(path)[0].embed_dim == enc.embed_dim
    res = run(ProbeConfig(encoder=path, data=tiny_ct_store, label_key="sex", out=tmp_path, k=3))
    assert res["n_train"] == 8 and res["n_test"] == 2  # the store's own train/test split
    assert set(res) >= {"pretrained", "random_init"}
    # the scores are the probes of the features of the store's centred cases, nothing else
    from umit.data.cases import centred_input
    from umit.data.store import Store
    from umit.eval.probes import extract_features

    store = Store(tiny_ct_store)
    ids = {
        s: sorted(c for c in store.case_ids if store.index[c]["split"] == s)
        for s in ("train", "test")
    }
    feats = {
        s: extract_features(enc.eval(), [centred_input(store, c, (32, 32, 16)).numpy() for c in v])
        for s, v in ids.items()
    }
    ys = {s: np.array([str(store.index[c]["sex"]) for c in v]) for s, v in ids.items()}
    want = fit_probes(feats["train"], ys["train"], feats["test"], ys["test"], k=3)
    assert res["pretrained"] == want
    assert (tmp_path / "probe_sex.json").is_file()
    with pytest.raises(Exception, match="fewer than 2 classes"):
        run(ProbeConfig(encoder=path, data=tiny_ct_store, label_key="modality", out=tmp_path))


def test_probe_runs_on_an_mae_training_checkpoint(tiny_ct_store, tmp_path):
    """``step_*.pt`` of ``umit pretrain`` (the MAE wrapper) probes like ``encoder.pt``; the
    random-init baseline is the bare encoder architecture, not the wrapper."""
    import torch

    from umit.models import create_model
    from umit.ssl.mae import MAE3D
    from umit.train.checkpoint import to_plain

    enc = create_model("vit3d_test_p16", img_size=(32, 32, 16), in_chans=1)
    mae = MAE3D(enc, decoder_dim=32, decoder_depth=1, decoder_heads=4)
    ckpt = {  # the layout the training loop wrote before artifacts had a kind (format version 1)
        "format": "umit-checkpoint",
        "format_version": 1,
        "step": 10,
        "model_name": mae.model_name,
        "model_args": to_plain(mae.model_args, "model_args"),
        "model": mae.state_dict(),
    }
    torch.save(ckpt, tmp_path / "step_000010.pt")
    res = run(
        ProbeConfig(
            encoder=tmp_path / "step_000010.pt",
            data=tiny_ct_store,
            label_key="sex",
            out=tmp_path,
            k=3,
        )
    )
    assert set(res) >= {"pretrained", "random_init"}
