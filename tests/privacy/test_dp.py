"""DP-SGD: per-sample clipping against a hand computation, Poisson batches, refusals, the spent
epsilon in best.pt / summary / evaluate report, and the membership-inference AUC it removes."""

from __future__ import annotations

import pytest
import torch
from _synthetic import Items, audit, make_cases, mlp, train, train_cfg
from torch import nn

from umit.errors import InputError
from umit.train.dp import DPSGD, DPConfig
from umit.train.tasks import ClassificationTask


def tiny_cls_for_dp(in_chans=1, num_classes=2, img_size=None):
    return nn.Sequential(
        nn.Conv3d(in_chans, 4, 3, stride=2, padding=1),
        nn.GroupNorm(2, 4),
        nn.ReLU(),
        nn.AdaptiveAvgPool3d(1),
        nn.Flatten(),
        nn.Linear(4, num_classes),
    )


@pytest.fixture(autouse=True)
def _stand_in_models(register_models):
    register_models(tiny_cls_for_dp)


def _engine(model, tmp_path, n=4, batch_size=2, **dp):
    ids, x, y = make_cases(n, 0, "c")
    task = ClassificationTask(model, dict(zip(ids, y, strict=True)))
    cfg = train_cfg(tmp_path, steps=10, batch_size=batch_size)
    engine = DPSGD(DPConfig(enabled=True, **dp), task, Items(ids, x), cfg)
    return engine, ids, x, y


def _small_model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv3d(1, 3, 3, padding=1), nn.GroupNorm(1, 3), nn.Flatten(), nn.Linear(3 * 512, 2)
    )


@pytest.mark.parametrize("mode", ["loop", "hooks"])
def test_clipping_matches_hand_computation(tmp_path, mode):
    model = _small_model()
    ids, x, y = make_cases(4, 0, "c")
    params = [p for p in model.parameters() if p.requires_grad]
    # hand (before Opacus hooks are attached): each sample's gradient, clipped to C, summed,
    # divided by the expected batch size
    grads = []
    for i in range(2):
        loss = nn.functional.cross_entropy(model(x[i : i + 1]), torch.tensor([y[i]]))
        grads.append(torch.autograd.grad(loss, params))
    norms = [float(torch.sqrt(sum((g**2).sum() for g in gs))) for gs in grads]
    clip = (norms[0] * norms[1]) ** 0.5  # between the two: one sample is clipped, one is not
    assert min(norms) < clip < max(norms)
    engine, *_ = _engine(model, tmp_path, grad_sample_mode=mode, max_grad_norm=clip)
    engine.noise_multiplier = 0.0
    opt = engine.optimizer_factory(model)
    out = engine.task({"image": x[:2], "case_id": ids[:2]})
    out["loss"].backward()  # what the loop does (fills grad_sample for hooks, a no-op for loop)
    assert opt.pre_step()  # clip, add (zero) noise, scale
    for k, p in enumerate(params):
        want = sum(g[k] * min(1.0, clip / (n + 1e-6)) for g, n in zip(grads, norms, strict=True))
        torch.testing.assert_close(p.grad, want / 2, rtol=1e-4, atol=1e-7)
    # without clipping the result would differ: the test can fail
    unclipped = (grads[0][0] + grads[1][0]) / 2
    assert not torch.allclose(params[0].grad, unclipped, rtol=1e-3)


def test_empty_poisson_batch_is_a_noise_only_step(tmp_path):
    model = _small_model()
    engine, *_ = _engine(model, tmp_path)
    opt = engine.optimizer_factory(model)
    before = [p.detach().clone() for p in model.parameters()]
    engine.task({})["loss"].backward()
    opt.step()
    assert engine.steps == 1 and engine.epsilon() > 0
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True))


def test_poisson_loader_samples_at_rate_and_resumes(tmp_path):
    engine, *_ = _engine(_small_model(), tmp_path, n=20, batch_size=4)
    assert engine.sample_rate == pytest.approx(0.2)
    epochs = [list(engine.loader(e, 0)) for e in range(40)]
    assert all(len(b) == 5 for b in epochs)  # 1 / q batches per epoch
    sizes = [len(batch["case_id"]) if batch else 0 for ep in epochs for batch in ep]
    assert 3.3 < sum(sizes) / len(sizes) < 4.7 and len(set(sizes)) > 3  # Poisson, mean 4
    again = list(engine.loader(7, 2))
    assert [b.get("case_id") for b in again] == [b.get("case_id") for b in epochs[7][2:]]


def test_batchnorm_and_running_stats_are_refused(tmp_path):
    bn = nn.Sequential(nn.Conv3d(1, 2, 3), nn.BatchNorm3d(2), nn.Flatten(), nn.LazyLinear(2))
    with pytest.raises(InputError, match=r"1 \(BatchNorm3d: mixes the samples of a batch\)"):
        _engine(bn, tmp_path)
    inorm = nn.Sequential(nn.Conv3d(1, 2, 3), nn.InstanceNorm3d(2, track_running_stats=True))
    with pytest.raises(InputError, match="track_running_stats"):
        _engine(inorm, tmp_path)


def test_settings_dp_cannot_honour_are_refused(tmp_path):
    ids, x, y = make_cases(4, 0, "c")
    task = ClassificationTask(_small_model(), dict(zip(ids, y, strict=True)))
    cfg = train_cfg(tmp_path, steps=10, batch_size=2)
    bad = cfg.model_copy(update={"grad_accum_steps": 2, "clip_grad_norm": 1.0})
    with pytest.raises(InputError, match="grad_accum_steps must be 1.*clip_grad_norm"):
        DPSGD(DPConfig(enabled=True), task, Items(ids, x), bad)
    with pytest.raises(InputError, match="each case once.*samples_per_case=1"):
        DPSGD(DPConfig(enabled=True), task, Items(ids, x), cfg, num_units=2)


def test_finetune_dp_spends_at_most_target_epsilon(tiny_ct_store, tmp_path, one_thread):
    from umit.eval.evaluate import EvaluateConfig
    from umit.eval.evaluate import run as evaluate
    from umit.finetune.run import FinetuneConfig, run
    from umit.train.checkpoint import load_model

    cfg = FinetuneConfig.model_validate(
        {
            "data": tiny_ct_store,
            "out": tmp_path / "dp",
            "task": "classification",
            "model": "tiny_cls_for_dp",
            "model_args": {},
            "label_key": "sex",
            "crop_size": [16, 16, 16],
            "samples_per_case": 1,
            "dp": {"enabled": True, "target_epsilon": 3.0, "max_grad_norm": 0.5},
            "train": {
                "total_steps": 12,
                "batch_size": 2,
                "warmup_steps": 0,
                "eval_every": 6,
                "log_every": 6,
                "progress": False,
            },
        }
    )
    s = run(cfg)
    dp = s["dp"]
    assert 2.5 < dp["epsilon"] <= 3.0 and dp["steps"] == 12 and dp["noise_multiplier"] > 0.5
    assert dp["delta"] == pytest.approx(1 / (10 * s["n_train"]))
    assert dp["sample_rate"] == pytest.approx(2 / s["n_train"]) and dp["max_grad_norm"] == 0.5
    _, ckpt = load_model(s["model"])
    assert ckpt["dp"] == dp  # best.pt carries the whole run's epsilon
    latest = torch.load(tmp_path / "dp" / "latest.pt", weights_only=True)
    assert latest["task"]["dp"]["epsilon"] == dp["epsilon"]
    ev = evaluate(EvaluateConfig(model=s["model"], data=tiny_ct_store, n_boot=20))
    assert ev["dp"]["epsilon"] == dp["epsilon"]
    assert "## Differential privacy" in (tmp_path / "dp" / "eval_test" / "report.md").read_text()
    with pytest.raises(InputError, match="samples_per_case=1"):
        run(cfg.model_copy(update={"samples_per_case": 2, "out": tmp_path / "bad"}))


def test_dp_brings_membership_auc_towards_chance(tmp_path, one_thread):
    members, nonmembers = make_cases(32, 2, "m"), make_cases(32, 99, "n")
    plain = mlp()
    train(plain, members, tmp_path / "plain", steps=60)
    private = mlp()
    rep = train(
        private, members, tmp_path / "dp", steps=60, dp=DPConfig(enabled=True, target_epsilon=1.0)
    )
    assert rep["epsilon"] <= 1.0
    auc_plain = audit(plain, members, nonmembers)["metrics"]["auc"]
    auc_dp = audit(private, members, nonmembers)["metrics"]["auc"]
    assert auc_plain["value"] >= 0.9
    assert auc_dp["value"] <= 0.7 and auc_dp["ci_low"] < 0.5
    assert auc_plain["value"] - auc_dp["value"] >= 0.25


def test_cli_dp_flag_turns_dp_on(tiny_ct_store, tmp_path, capsys):
    from umit.cli.main import main

    argv = ["finetune", "--dp", "--data", str(tiny_ct_store), "--out", str(tmp_path / "x")]
    argv += ["task=classification", "model=tiny_cls_for_dp", "model_args={}", "label_key=sex"]
    argv += ["crop_size=[16,16,16]", "samples_per_case=2", "train.progress=false"]
    assert main(argv) == 2  # DP refuses two items per case: the flag reached the DP path
    assert "each case once" in capsys.readouterr().err
