"""`umit distill`: the KD and feature losses against hand computations and references, the
teacher cache (used, correct, invalidated), the student's best.pt in evaluate/predict, and the
errors for a teacher that cannot teach this student."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.special import rel_entr, softmax

from umit.errors import InputError
from umit.finetune.distill import DistillConfig, feature_loss, kd_kl_loss
from umit.finetune.distill import run as distill
from umit.finetune.run import FinetuneConfig
from umit.finetune.run import run as finetune
from umit.train.checkpoint import load_model

TRAIN = {
    "total_steps": 6,
    "batch_size": 2,
    "warmup_steps": 1,
    "eval_every": 6,
    "log_every": 1,
    "ckpt_every": 6,
    "progress": False,
    "lr": 3e-3,
}


# ---------------------------------------------------------------------------------------------
# losses
# ---------------------------------------------------------------------------------------------
def test_kd_kl_equals_a_hand_computation():
    # two classes, one sample: teacher logits (2, 0), student (0, 1), T = 2
    T = 2.0
    pt = np.array([math.exp(1), 1.0]) / (math.exp(1) + 1)  # softmax((2, 0) / 2)
    ps = np.array([1.0, math.exp(0.5)]) / (1 + math.exp(0.5))  # softmax((0, 1) / 2)
    hand = T * T * (pt[0] * math.log(pt[0] / ps[0]) + pt[1] * math.log(pt[1] / ps[1]))
    got = kd_kl_loss(torch.tensor([[0.0, 1.0]]), torch.tensor([[2.0, 0.0]]), T)
    assert float(got) == pytest.approx(hand, rel=1e-6)
    # 4 · (0.7311·ln(0.7311/0.3775) + 0.2689·ln(0.2689/0.6225)) = 4 · 0.2574
    assert hand == pytest.approx(1.0296, abs=1e-4)


def test_kd_kl_matches_torch_and_scipy_references():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(4, 5, generator=g) * 3, torch.randn(4, 5, generator=g) * 3
    for T in (1.0, 2.0, 4.0):
        ref = F.kl_div(
            F.log_softmax(s / T, 1), F.log_softmax(t / T, 1), reduction="batchmean", log_target=True
        ) * (T * T)
        assert float(kd_kl_loss(s, t, T)) == pytest.approx(float(ref), rel=1e-5)
    # segmentation: voxel-wise, averaged over samples and voxels (scipy's rel_entr)
    s, t = torch.randn(2, 3, 4, 4, 4, generator=g), torch.randn(2, 3, 4, 4, 4, generator=g)
    T = 3.0
    p, q = softmax(t.double().numpy() / T, axis=1), softmax(s.double().numpy() / T, axis=1)
    ref = rel_entr(p, q).sum(axis=1).mean() * T * T
    assert float(kd_kl_loss(s, t, T)) == pytest.approx(ref, rel=1e-5)
    assert float(kd_kl_loss(t, t, T)) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="differ"):
        kd_kl_loss(s, t[:, :2], T)


def test_feature_loss_values():
    g = torch.Generator().manual_seed(1)
    t = torch.randn(2, 6, 4, 4, 4, generator=g)
    assert float(feature_loss(t, t, "cosine")) == pytest.approx(0.0, abs=1e-6)
    assert float(feature_loss(-t, t, "cosine")) == pytest.approx(2.0, abs=1e-6)
    assert float(feature_loss(3 * t, t, "cosine")) == pytest.approx(0.0, abs=1e-6)  # scale-free
    assert float(feature_loss(t + 1, t, "mse")) == pytest.approx(1.0, abs=1e-6)
    # a coarser student map is resampled (trilinear) onto the teacher's grid: constant stays
    s = torch.ones(2, 6, 2, 2, 2)
    assert float(feature_loss(s, torch.ones(2, 6, 4, 4, 4), "mse")) == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(ValueError, match="channels"):
        feature_loss(t[:, :3], t)


# ---------------------------------------------------------------------------------------------
# end to end on the tiny phantom store
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def teacher(tiny_ct_store, tmp_path_factory) -> Path:
    """A small fine-tuned ResUNet (features 8, 16) on 3 labeled phantoms: the teacher."""
    out = tmp_path_factory.mktemp("teacher")
    finetune(
        FinetuneConfig.model_validate(
            {
                "data": tiny_ct_store,
                "out": out,
                "model": "resunet3d",
                "model_args": {"features": [8, 16]},
                "crop_size": [16, 16, 16],
                "samples_per_case": 2,
                "label_count": 3,
                "train": {**TRAIN, "total_steps": 12, "log_every": 6, "ckpt_every": 12},
            }
        )
    )
    return out / "best.pt"


def _cfg(store, teacher, out, **kw) -> DistillConfig:
    base = {
        "data": store,
        "out": out,
        "teacher": teacher,
        "model": "resunet3d",
        "model_args": {"features": [4, 8]},
        "crop_size": [16, 16, 16],
        "samples_per_case": 2,
        "label_count": 3,
        "train": TRAIN,
    }
    for k, v in kw.items():
        base[k] = {**base[k], **v} if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return DistillConfig.model_validate(base)


def test_distilled_student_learns_and_loads_in_evaluate_and_predict(
    tiny_ct_store, teacher, tmp_path, one_thread
):
    from umit.eval.evaluate import EvaluateConfig
    from umit.eval.evaluate import run as evaluate
    from umit.inference.predict import PredictConfig
    from umit.inference.predict import run as predict

    cfg = _cfg(
        tiny_ct_store,
        teacher,
        tmp_path / "st",
        alpha=0.0,  # KD only: the loss is the KL to the teacher, which must fall
        feature_weight=1.0,
        train={"total_steps": 24, "log_every": 4, "ckpt_every": 24, "eval_every": 24},
    )
    s = distill(cfg)
    kd = [h["kd"] for h in s["history"]]
    feat = [h["feat"] for h in s["history"]]
    assert kd[-1] < 0.7 * kd[0], kd  # the student moves towards the teacher's distribution
    assert feat[-1] < feat[0], feat
    assert s["n_unlabeled"] == 3 and s["params_teacher"] > 3 * s["params_student"]
    model, art = load_model(s["model"])
    assert art["model_name"] == "resunet3d" and list(art["model_args"]["features"]) == [4, 8]
    assert art["distill"]["teacher"] == str(teacher) and art["spec"]["task"] == "segmentation"
    assert not any(k.startswith("proj") for k in art["state_dict"])  # projections stay behind
    torch.load(s["model"], weights_only=True)
    e = evaluate(EvaluateConfig(model=Path(s["model"]), data=tiny_ct_store, n_boot=10))
    assert e["n_cases"] == 2
    raw = tiny_ct_store.parent / "raw" / "images"
    src = sorted(raw.glob("*.nii.gz"))[0]
    p = predict(PredictConfig(inputs=src, model=Path(s["model"]), out=tmp_path / "pred"))
    assert not p["failures"] and len(p["outputs"]) == 1


def test_cli_distill(tiny_ct_store, teacher, tmp_path, capsys, one_thread):
    from umit.cli.main import main

    rc = main(
        [
            "distill",
            "--teacher",
            str(teacher),
            "--data",
            str(tiny_ct_store),
            "--out",
            str(tmp_path / "cli"),
            "--label-count",
            "3",
            "model_args.features=[4,8]",
            "crop_size=[16,16,16]",
            "train.total_steps=2",
            "train.progress=false",
            "temperature=3",
        ]
    )
    assert rc == 0
    text = capsys.readouterr().out
    assert "distill: 2 steps on 3 labeled" in text and "teacher cache:" in text
    assert (tmp_path / "cli" / "best.pt").is_file()


def test_teacher_cache_is_used_equals_live_teacher_and_is_invalidated(
    tiny_ct_store, teacher, tmp_path, one_thread
):
    cache = tmp_path / "cache"
    kw = {"alpha": 0.5, "feature_weight": 0.5, "kd_unlabeled": True, "crop_epochs": 2}
    live = distill(_cfg(tiny_ct_store, teacher, tmp_path / "live", teacher_cache=False, **kw))
    first = distill(_cfg(tiny_ct_store, teacher, tmp_path / "a", cache_dir=cache, **kw))
    assert live["cache"]["used"] is False
    assert first["cache"]["computed"] == 2 and first["cache"]["reused"] == 0
    # the cached (float16) teacher gives the live teacher's losses
    for a, b in zip(live["history"], first["history"], strict=True):
        for k in ("loss", "kd", "kd_u", "feat"):
            assert a[k] == pytest.approx(b[k], rel=2e-3, abs=1e-4), k
    # the same teacher, store, crops and outputs: reused, nothing recomputed
    again = distill(_cfg(tiny_ct_store, teacher, tmp_path / "b", cache_dir=cache, **kw))
    assert again["cache"]["key"] == first["cache"]["key"]
    assert again["cache"]["computed"] == 0 and again["cache"]["reused"] == 2
    # ... and read: zeroed teacher logits in the cache change the KD loss (uniform targets)
    key_dir = Path(first["cache"]["dir"])
    for f in key_dir.glob("draw_*.pt"):
        d = torch.load(f, weights_only=True)
        d["t.image.logits"].zero_()
        torch.save(d, f)
    poisoned = distill(_cfg(tiny_ct_store, teacher, tmp_path / "c", cache_dir=cache, **kw))
    assert poisoned["history"][0]["kd"] != pytest.approx(first["history"][0]["kd"], rel=1e-2)
    # another crop seed, another augmentation or another teacher file: another key, recomputed
    other_seed = distill(
        _cfg(tiny_ct_store, teacher, tmp_path / "d", cache_dir=cache, train={"seed": 1}, **kw)
    )
    assert other_seed["cache"]["key"] != first["cache"]["key"]
    assert other_seed["cache"]["computed"] == 2
    aug = distill(
        _cfg(
            tiny_ct_store,
            teacher,
            tmp_path / "e",
            cache_dir=cache,
            augment={"flip_prob": 0.5},
            **kw,
        )
    )
    assert aug["cache"]["key"] not in (first["cache"]["key"], other_seed["cache"]["key"])
    from umit.train.checkpoint import update_artifact

    t2 = tmp_path / "teacher2.pt"
    t2.write_bytes(Path(teacher).read_bytes())
    update_artifact(t2, note="retrained")
    changed = distill(_cfg(tiny_ct_store, t2, tmp_path / "f", cache_dir=cache, **kw))
    assert changed["cache"]["key"] != first["cache"]["key"] and changed["cache"]["computed"] == 2


# ---------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------
def test_teacher_errors_name_the_file(tiny_ct_store, teacher, tmp_path, one_thread):
    # a teacher with another number of outputs than the store's classes
    from umit.models import create_model
    from umit.train.checkpoint import InferenceSpec, load_artifact, save_artifact

    art = load_artifact(teacher)
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    save_artifact(
        wrong / "best.pt",
        "model",
        create_model("resunet3d", features=[4, 8], out_channels=3, in_chans=1),
        plan=art["plan"],
        spec=InferenceSpec.model_validate({**art["spec"], "num_outputs": 3}),
    )
    with pytest.raises(InputError, match=r"wrong/best\.pt: teacher predicts 3 outputs"):
        distill(_cfg(tiny_ct_store, wrong / "best.pt", tmp_path / "x"))
    # a training checkpoint is not a teacher
    latest = Path(teacher).parent / "latest.pt"
    with pytest.raises(
        InputError, match=r"latest\.pt: holds a training checkpoint.*expected a fine-tuned model"
    ):
        distill(_cfg(tiny_ct_store, latest, tmp_path / "x"))
    with pytest.raises(InputError, match=r"nope\.pt: checkpoint not found"):
        distill(_cfg(tiny_ct_store, tmp_path / "nope.pt", tmp_path / "x"))
    # a classification teacher for a segmentation student
    from umit.train.checkpoint import update_artifact

    cls = tmp_path / "cls.pt"
    cls.write_bytes(Path(teacher).read_bytes())
    art = torch.load(cls, weights_only=True)
    update_artifact(cls, spec={**art["spec"], "task": "classification"})
    with pytest.raises(InputError, match=r"cls\.pt: teacher was trained for classification"):
        distill(_cfg(tiny_ct_store, cls, tmp_path / "x"))
    # nothing to distill
    with pytest.raises(InputError, match="nothing to distill"):
        distill(_cfg(tiny_ct_store, teacher, tmp_path / "x", alpha=1.0))
    # feature levels the encoders do not have
    with pytest.raises(InputError, match="feature_levels"):
        distill(
            _cfg(
                tiny_ct_store, teacher, tmp_path / "x", feature_weight=1.0, feature_levels=[[5, 0]]
            )
        )


def test_encoder_teacher_gives_features_only(tiny_ct_store, tmp_path, one_thread):
    from umit.models import create_model
    from umit.train.checkpoint import save_artifact

    enc = create_model("vit3d_test_p8", img_size=(16, 16, 16), in_chans=1)
    path = save_artifact(tmp_path / "encoder.pt", "encoder", enc)
    with pytest.raises(
        InputError, match=r"encoder\.pt: holds a pretrained encoder, which has no logits"
    ):
        distill(_cfg(tiny_ct_store, path, tmp_path / "x", alpha=0.5, feature_weight=1.0))
    s = distill(
        _cfg(
            tiny_ct_store,
            path,
            tmp_path / "ok",
            alpha=1.0,
            feature_weight=1.0,
            feature_levels=[[-1, -1]],
            train={"total_steps": 8, "log_every": 2},
        )
    )
    feat = [h["feat"] for h in s["history"]]
    assert feat[-1] < feat[0], feat  # cross-architecture: ViT tokens -> CNN maps via projection


def test_classification_distillation(tiny_ct_store, tmp_path, one_thread):
    """A ViT classifier teacher -> a smaller ViT classifier: KL at T on the case labels."""
    common = {
        "data": tiny_ct_store,
        "task": "classification",
        "label_key": "sex",
        "model": "classifier",
        "crop_size": [16, 16, 16],
        "label_count": 4,
        "val_fraction": 0.25,
    }
    finetune(
        FinetuneConfig.model_validate(
            {
                **common,
                "out": tmp_path / "t",
                "model_args": {"encoder": "vit3d_test_p8"},
                "train": {**TRAIN, "total_steps": 4},
            }
        )
    )
    s = distill(
        DistillConfig.model_validate(
            {
                **common,
                "out": tmp_path / "s",
                "teacher": tmp_path / "t" / "best.pt",
                "model_args": {"encoder": "vit3d_test_p8", "encoder_args": {"depth": 1}},
                "alpha": 0.0,
                "temperature": 4.0,
                "train": {**TRAIN, "total_steps": 12, "log_every": 3, "ckpt_every": 12},
            }
        )
    )
    kd = [h["kd"] for h in s["history"]]
    assert kd[-1] < kd[0], kd
    assert s["params_student"] < s["params_teacher"]
    model, art = load_model(s["model"])
    assert art["spec"]["task"] == "classification" and art["spec"]["num_outputs"] == 2
