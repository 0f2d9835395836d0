"""Cross-sequence MRI pretraining (held-out sequence prediction), its baseline and metrics."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from umit.cli.main import main as cli_main
from umit.errors import InputError
from umit.models import create_model
from umit.ssl.cross_sequence import (
    CrossSequence3D,
    foreground,
    intensity_matched,
    population_match,
    psnr,
    ssim3d,
)
from umit.ssl.pretrain import PretrainConfig
from umit.ssl.pretrain import run as pretrain
from umit.train.checkpoint import load_encoder

SEQ = ["T1", "T2", "FLAIR"]


def linear_mix(batch: int, size: int, g: torch.Generator) -> torch.Tensor:
    """(B, 3, s, s, s): T1, T2 smooth random fields, FLAIR = 2 * T1 - T2 exactly."""
    x = torch.randn(batch, 2, size, size, size, generator=g)
    return torch.cat([x, 2 * x[:, :1] - x[:, 1:2]], dim=1)


@pytest.mark.parametrize(
    ("target", "steps"), [("FLAIR", 150), pytest.param(None, 300, marks=pytest.mark.slow)]
)
def test_exact_function_of_the_inputs_is_learned_to_near_zero_loss(target, steps, one_thread):
    """FLAIR = 2 T1 - T2, so each sequence is a linear function of the other two (with a
    random target, the model must tell which one is missing: the absent embedding)."""
    torch.manual_seed(0)
    enc = create_model("vit3d_test_p8", img_size=8, in_chans=3, num_classes=0)
    model = CrossSequence3D(enc, SEQ, target=target, decoder_dim=16, loss="mse")
    opt = torch.optim.Adam(model.parameters(), lr=3e-2)
    g = torch.Generator().manual_seed(0)
    losses, bases = [], []
    for step in range(steps):
        if step == steps - 30:  # settle
            for group in opt.param_groups:
                group["lr"] = 3e-3
        out = model(linear_mix(2, 8, g), generator=g)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
        bases.append(out["baseline_loss"].item())
    last, base = float(np.mean(losses[-10:])), float(np.mean(bases))
    # the copy of one sequence cannot express 2 * T1 - T2 (MSE ~ 1 on unit fields): the model can
    assert base > 0.3
    assert last < 0.03 * base and last < 0.01 * losses[0], (losses[0], last, base)


@pytest.mark.parametrize(
    ("name", "kwargs", "tokens"),
    [
        ("vit3d_test_p8", {}, True),
        ("swin3d_test", {}, True),
        ("resnet3d_test", {"norm": "batch"}, False),
    ],
)
def test_any_encoder_through_the_feature_api(name, kwargs, tokens, one_thread):
    torch.manual_seed(0)
    enc = create_model(name, img_size=(16, 16, 16), in_chans=3, num_classes=0, **kwargs)
    model = CrossSequence3D(enc, SEQ, decoder_dim=8, mask_ratio=0.5, mask_patch=8)
    assert (model.absent.embed is not None) == tokens
    x = linear_mix(2, 16, torch.Generator().manual_seed(0))
    out = model(x, generator=torch.Generator().manual_seed(0))
    assert out["pred"].shape == (2, 16, 16, 16) and torch.isfinite(out["loss"])
    out["loss"].backward()
    enc_grads = [p.grad for p in enc.parameters() if p.grad is not None]
    assert enc_grads and any(g.abs().sum() > 0 for g in enc_grads)
    if tokens:  # the hidden channels' token vectors are trained
        hidden_rows = model.absent.embed.grad.abs().sum(1)
        assert (hidden_rows[out["targets"]] > 0).all()


def test_baseline_copies_an_affine_relative_exactly():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 8, 8, 8, generator=g)
    x[2] = 3.0 * x[1] - 0.5  # FLAIR an affine map of T2: the baseline is exact
    torch.testing.assert_close(intensity_matched(x, 2), x[2], atol=1e-5, rtol=0)
    # otherwise: the least-squares fit of the best source, as numpy's polyfit finds it
    x[2] = torch.randn(8, 8, 8, generator=g) + 0.8 * x[0]
    a, b = np.polyfit(x[0].flatten().numpy(), x[2].flatten().numpy(), 1)
    ref = a * x[0] + b
    torch.testing.assert_close(intensity_matched(x, 2), ref, atol=1e-5, rtol=0)
    enc = create_model("resnet3d_test", in_chans=3, num_classes=0, norm="batch")
    m = CrossSequence3D(enc, SEQ, target="FLAIR").eval()
    out = m(x[None].clone())
    assert math.isclose(float(out["baseline_loss"]), float((ref - x[2]).abs().mean()), rel_tol=1e-4)


class _Volumes:
    """A store stand-in: ``case(c).read()`` returns the (C, D, H, W) array of ``c``."""

    def __init__(self, volumes: dict[str, np.ndarray]):
        self.volumes = volumes

    def case(self, c: str):
        return type("Case", (), {"read": lambda _self: self.volumes[c]})()


def test_population_baseline_is_fitted_on_the_training_subjects_only():
    """The pooled least-squares fit of the best source over the fitting cases' foreground,
    against numpy's polyfit; the scored case's own target never enters it."""
    g = np.random.default_rng(3)
    vols = {}
    for c in ("a", "b"):
        v = np.zeros((3, 10, 10, 10))
        v[:, 2:8, 2:8, 2:8] = g.normal(size=(3, 6, 6, 6)) + 2.0
        v[2] = 0.9 * v[0] + 0.05 * g.normal(size=v[0].shape)  # FLAIR ~ T1, T2 unrelated
        vols[c] = v
    store = _Volumes(vols)
    src, a, b = population_match(store, ["a", "b"], 2)
    xs, ys = [], []
    for v in vols.values():
        m = foreground(torch.from_numpy(v), 2).numpy()
        xs.append(v[0][m])
        ys.append(v[2][m])
    ref_a, ref_b = np.polyfit(np.concatenate(xs), np.concatenate(ys), 1)
    assert src == 0 and a == pytest.approx(ref_a, rel=1e-9) and b == pytest.approx(ref_b, abs=1e-9)
    vols["b"][2] *= 5.0  # a different target in b: a fit on "a" alone does not move
    assert population_match(store, ["a"], 2) == population_match(
        _Volumes({"a": vols["a"]}), ["a"], 2
    )
    assert population_match(store, ["a", "b"], 2)[1] != pytest.approx(a)
    with pytest.raises(ValueError, match="at least one fitting case"):
        population_match(store, [], 2)


def test_psnr_and_ssim_against_hand_computations():
    g = torch.Generator().manual_seed(2)
    ref = torch.rand(9, 9, 9, generator=g)
    pred = ref + 0.1 * torch.randn(9, 9, 9, generator=g)
    mse = float(((pred.double() - ref.double()) ** 2).mean())
    rng = float(ref.max() - ref.min())
    assert math.isclose(psnr(pred, ref), 10 * math.log10(rng**2 / mse), rel_tol=1e-9)
    assert ssim3d(ref, ref) == pytest.approx(1.0)
    # explicit loop over the 27 windows of 7³ that fit (population statistics)
    p, r = pred.double().numpy(), ref.double().numpy()
    c1, c2 = (0.01 * rng) ** 2, (0.03 * rng) ** 2
    vals = []
    for i in range(3):
        for j in range(3):
            for k in range(3):
                a = p[i : i + 7, j : j + 7, k : k + 7]
                b = r[i : i + 7, j : j + 7, k : k + 7]
                cov = ((a - a.mean()) * (b - b.mean())).mean()
                vals.append(
                    (2 * a.mean() * b.mean() + c1)
                    * (2 * cov + c2)
                    / ((a.mean() ** 2 + b.mean() ** 2 + c1) * (a.var() + b.var() + c2))
                )
    assert ssim3d(pred, ref) == pytest.approx(float(np.mean(vals)), rel=1e-9)
    mask = torch.zeros(9, 9, 9, dtype=torch.bool)
    mask[3, 3, 3] = True  # the centre of the first window only
    assert ssim3d(pred, ref, mask=mask, data_range=rng) == pytest.approx(vals[0], rel=1e-9)


def test_masked_patches_of_the_missing_sequence():
    enc = create_model("resnet3d_test", in_chans=3, num_classes=0, norm="batch")
    m = CrossSequence3D(enc, SEQ, target="T2", mask_ratio=0.5, mask_patch=4)
    g = torch.Generator().manual_seed(0)
    hidden = m.draw_hidden(2, (16, 16, 16), g)
    assert hidden.float().mean().item() == pytest.approx(0.5)  # 32 of 64 cubes per sample
    x = linear_mix(2, 16, g)
    t = m.draw_targets(2)
    xh = m.hide(x, t, hidden)
    assert torch.isnan(xh[:, 1]).sum() == hidden.sum() and not torch.isnan(xh[:, [0, 2]]).any()


def test_bad_sequence_settings():
    enc = create_model("resnet3d_test", in_chans=1, num_classes=0)
    with pytest.raises(ValueError, match="at least two sequences"):
        CrossSequence3D(enc, ["T1"])
    enc = create_model("resnet3d_test", in_chans=2, num_classes=0)
    with pytest.raises(ValueError, match="'DWI' is not one of the channels"):
        CrossSequence3D(enc, ["T1", "T2"], target="DWI")
    with pytest.raises(ValueError, match="mask_ratio"):
        CrossSequence3D(enc, ["T1", "T2"], mask_ratio=0.0)


# ------------------------------------------------------------------ absent channels
@pytest.mark.parametrize(
    ("name", "kwargs", "tokens"),
    [
        ("unetr", {"encoder": "vit3d_test_p8", "feature_size": 8, "img_size": (16, 16, 16)}, True),
        ("resunet3d", {"features": [8, 16]}, False),
    ],
)
def test_absent_embedding_is_used_when_a_channel_is_dropped(name, kwargs, tokens, one_thread):
    torch.manual_seed(0)
    model = create_model(
        "absent_channels", model=name, model_args={**kwargs, "in_chans": 2, "out_channels": 2}
    ).eval()
    absent = model.absent
    assert (absent.embed is not None) == tokens == model.token_embedding
    x = torch.randn(2, 2, 16, 16, 16)
    full = model(x)
    dropped = x.clone()
    dropped[0, 1] = float("nan")  # sample 0 misses its second sequence
    y = model(dropped)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y[1], full[1])  # the other sample is untouched
    # the missing voxels hold the learned fill value: as if the input had been fill[1] there
    with torch.no_grad():
        absent.fill[1] = 0.7
    filled = x.clone()
    filled[0, 1] = 0.7
    if tokens:  # and a learned token vector tells the transformer which sequence is absent
        with torch.no_grad():
            absent.embed.zero_()
    torch.testing.assert_close(model(dropped), model(filled))
    if tokens:
        with torch.no_grad():
            absent.embed[1] = 0.5
        moved = model(dropped)
        assert not torch.allclose(moved[0], model(filled)[0])
        torch.testing.assert_close(moved[1], model(filled)[1])
        # the offset belongs to that input only: the encoder called directly afterwards is plain
        enc = model.net.encoder
        model(dropped)
        after = enc.forward_features(filled)
        absent.embed.data.zero_()
        torch.testing.assert_close(after, enc.forward_features(filled))
        absent.embed.data[1] = 0.5
    # gradients reach the absent parameters only through dropped channels
    model.train()
    model(dropped).sum().backward()
    assert absent.fill.grad[1] != 0 and absent.fill.grad[0] == 0
    if tokens:
        assert absent.embed.grad[1].abs().sum() > 0 and absent.embed.grad[0].abs().sum() == 0


def test_channel_dropout_keeps_one_channel_and_drops_at_the_rate():
    from umit.models.absent import drop_random_channels

    torch.manual_seed(0)
    x = torch.zeros(4000, 3, 1, 1, 1)
    out = drop_random_channels(x, 0.5)
    missing = torch.isnan(out).flatten(1)
    assert missing.all(dim=1).sum() == 0  # never every channel
    # drop 0.5 on the 2 channels besides the kept one: 1/3 of all channels
    assert missing.float().mean().item() == pytest.approx(1 / 3, abs=0.02)
    assert drop_random_channels(x, 0.0) is x


class _Spy(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))
        self.seen = None

    def forward(self, x):
        self.seen = x
        return x


def test_drop_channels_at_inference():
    from umit.models.absent import AbsentChannelModel, DropChannels

    spy = _Spy()
    x = torch.ones(1, 3, 2, 2, 2)
    DropChannels(spy, [2])(x)
    assert (spy.seen[:, 2] == 0).all() and (spy.seen[:, :2] == 1).all()  # a plain model: 0
    wrapped = AbsentChannelModel(_Spy(), 3)
    DropChannels(wrapped, [0])(x)  # a model with absent embeddings: absent (its fill value)
    assert (wrapped.net.seen[:, 0] == 0).all() and (wrapped.net.seen[:, 1:] == 1).all()
    with torch.no_grad():
        wrapped.absent.fill[0] = 2.5
    DropChannels(wrapped, [0])(x)
    assert (wrapped.net.seen[:, 0] == 2.5).all()
    assert (x == 1).all()  # the caller's input is not modified


# ------------------------------------------------------------------ end to end on a store
@pytest.fixture(scope="module")
def tiny_mr_store(tmp_path_factory):
    """PREP folder of 6 small MR phantoms (T1, T2, FLAIR; 1 in the test split)."""
    from umit.data.phantoms import write_phantom_collection
    from umit.ingest.run import IngestConfig
    from umit.ingest.run import run as ingest
    from umit.preprocess.run import PreprocessConfig
    from umit.preprocess.run import run as preprocess

    root = tmp_path_factory.mktemp("tiny_mr")
    write_phantom_collection(root / "src", n=5, n_test=1, modality="mr", seed=5, shape=(32, 36, 32))
    ingest(IngestConfig(src=root / "src", out=root / "raw"), progress=False)
    preprocess(
        PreprocessConfig(raw=root / "raw", out=root / "prep", workers=1, target_spacing=(3.0,) * 3)
    )
    return root / "prep"


TINY = [
    "method=cross_sequence",
    "model=vit3d_test_p8",
    "crop_size=[16,16,16]",
    "cross_sequence.decoder_dim=8",
    "train.total_steps=4",
    "train.warmup_steps=1",
    "train.batch_size=2",
    "train.log_every=2",
    "train.eval_every=2",
    "train.ckpt_every=4",
    "train.progress=false",
    "val_cases=1",
    "val_crops=2",
]


def test_pretrain_cross_sequence_cli(tiny_mr_store, tmp_path, capsys, one_thread):
    out = tmp_path / "run"
    assert cli_main(["pretrain", "--data", str(tiny_mr_store), "--out", str(out), *TINY]) == 0
    printed = capsys.readouterr().out
    assert "held-out sequence loss" in printed and "synthesis of FLAIR" in printed
    evals = [
        json.loads(line)
        for line in (out / "metrics.jsonl").read_text().splitlines()
        if '"eval"' in line
    ]
    assert evals and all(e["val_baseline_loss"] > 0 for e in evals)
    syn = json.loads((out / "synthesis.json").read_text())
    assert sorted(syn["targets"]) == sorted(SEQ)  # random target: every sequence scored
    for v in syn["targets"].values():
        assert len(v["per_case"]) == 1 and v["per_case"][0]["voxels"] > 100
        assert math.isfinite(v["model_psnr"]) and v["baseline_ssim"] <= 1.0
        assert math.isfinite(v["population_psnr"]) and v["population_fit"]["cases"] >= 1
    enc, meta = load_encoder(out / "encoder.pt")
    assert meta["model_name"] == "vit3d_test_p8" and meta["method"] == "cross_sequence"


def test_pretrain_cross_sequence_clear_errors(tiny_mr_store, tiny_ct_store, tmp_path):
    cfg = PretrainConfig(data=tiny_mr_store, out=tmp_path / "a", method="cross_sequence")
    bad = cfg.model_copy(
        update={"cross_sequence": cfg.cross_sequence.model_copy(update={"target": "DWI"})}
    )
    with pytest.raises(
        InputError, match=r"target='DWI' is not a sequence.*\['T1', 'T2', 'FLAIR'\]"
    ) as e:
        pretrain(bad)
    assert str(tiny_mr_store) in str(e.value)
    single = PretrainConfig(data=tiny_ct_store, out=tmp_path / "b", method="cross_sequence")
    with pytest.raises(InputError, match="multi-sequence store") as e:
        pretrain(single)
    assert str(tiny_ct_store) in str(e.value)


def test_finetune_with_channel_dropout_and_evaluate_without_a_sequence(
    tiny_mr_store, tiny_ct_store, tmp_path, one_thread
):
    from umit.eval.evaluate import EvaluateConfig
    from umit.eval.evaluate import run as evaluate
    from umit.finetune.run import FinetuneConfig
    from umit.finetune.run import run as finetune
    from umit.models.absent import AbsentChannelModel
    from umit.train.checkpoint import load_model

    cfg = FinetuneConfig.model_validate(
        {
            "data": tiny_mr_store,
            "out": tmp_path / "ft",
            "model": "unetr",
            "model_args": {"encoder": "vit3d_test_p8", "feature_size": 8},
            "crop_size": [16, 16, 16],
            "channel_dropout": 0.5,
            "val_fraction": 0.0,
            "select": "last",
            "train": {"total_steps": 2, "batch_size": 2, "warmup_steps": 1, "progress": False},
        }
    )
    summary = finetune(cfg)
    model, ckpt = load_model(summary["model"])
    assert isinstance(model, AbsentChannelModel) and model.drop_prob == 0.5
    assert model.token_embedding and ckpt["spec"]["channels"] == SEQ
    ev = EvaluateConfig(
        model=summary["model"],
        data=tiny_mr_store,
        out=tmp_path / "ev",
        n_boot=10,
        case_figures=False,
        drop_channels=["FLAIR"],
    )
    res = evaluate(ev)
    assert res["drop_channels"] == ["FLAIR"] and res["n_cases"] == 1
    assert "treated as missing: FLAIR" in (tmp_path / "ev" / "report.md").read_text()
    with pytest.raises(
        InputError, match=r"\['DWI'\] are not input channels.*'T1', 'T2', 'FLAIR'"
    ) as e:
        evaluate(ev.model_copy(update={"drop_channels": ["DWI"]}))
    assert "best.pt" in str(e.value)
    with pytest.raises(InputError, match="would drop every channel"):
        evaluate(ev.model_copy(update={"drop_channels": SEQ}))
    single = cfg.model_copy(update={"data": tiny_ct_store, "out": tmp_path / "ct"})
    with pytest.raises(InputError, match="channel_dropout=0.5 needs a multi-channel store") as e:
        finetune(single)
    assert str(tiny_ct_store) in str(e.value)
