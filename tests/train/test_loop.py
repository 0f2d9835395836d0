"""The training loop: resume equivalence (crash and SIGKILL), grad accumulation, bf16, metrics, errors."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import IterableDataset, TensorDataset
from train_helpers import (
    EmaTask,
    RegressionData,
    StopTraining,
    TinyNet,
    make_run,
    max_abs_diff,
    params,
    run_config,
)

from umit.errors import InputError
from umit.train import RegressionTask, Schedules, ShardedSampler, Trainer, train
from umit.train import distributed as du
from umit.train.metrics import read_metrics

HERE = Path(__file__).parent
# Wall-clock fields differ between runs; everything else must match exactly after a resume.
TIMING = {"samples_per_s", "tokens_per_s", "flops_per_s", "time_s"}


def curve(records):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 16-step run (dropout, input noise, EMA task state, clipping, epochs)."""
    out = tmp_path_factory.mktemp("reference")
    trainer = make_run(out)
    result = trainer.fit()
    return {
        "out": out,
        "result": result,
        "params": params(trainer.module),
        "ema": params(trainer.task.ema),
    }


def assert_same_run(reference, trainer, result, tol=0.0):
    diff = max_abs_diff(reference["params"], params(trainer.module))
    ema_diff = max_abs_diff(reference["ema"], params(trainer.task.ema))
    print(f"max |param diff| = {diff:.3g}, max |ema diff| = {ema_diff:.3g}")
    assert diff <= tol and ema_diff <= tol
    assert curve(read_metrics(result.out_dir)) == curve(read_metrics(reference["out"]))


def test_metrics_jsonl_is_well_formed(reference):
    out = reference["out"]
    lines = (out / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["step"] for r in records] == [3, 6, 9, 12, 15, 16]
    sched = Schedules.from_config(run_config(out))
    for r in records:
        assert r["split"] == "train"
        assert {
            "epoch",
            "lr",
            "wd",
            "loss",
            "mae",
            "grad_norm",
            "samples_per_s",
            "tokens_per_s",
        } <= set(r)
        assert {"flops_per_s", "samples_seen", "time_s"} <= set(r)
        assert r["lr"] == pytest.approx(sched.lr[r["step"] - 1]) and r["wd"] == pytest.approx(
            sched.wd[r["step"] - 1]
        )
        assert np.isfinite(r["loss"]) and r["samples_per_s"] > 0 and r["flops_per_s"] > 0
        assert r["samples_seen"] == 4 * r["step"]
    # 50 samples, batch 4 -> 12 batches per epoch; step 16 is 4 batches into epoch 1
    assert records[-1]["epoch"] == pytest.approx(1 + 4 / 12)
    assert records[0]["loss"] > records[-1]["loss"]  # it learns
    assert (out / "config.yaml").is_file()
    assert sorted(p.name for p in out.glob("*.pt")) == [
        "latest.pt",
        "step_000010.pt",
        "step_000015.pt",
        "step_000016.pt",
    ]
    result = reference["result"]
    assert result.step == 16 and result.start_step == 0 and result.resumed_from is None
    assert result.metrics == records[-1] and result.checkpoint.name == "step_000016.pt"


def test_resume_after_crash_reproduces_the_run(reference, tmp_path):
    with pytest.raises(StopTraining):
        make_run(tmp_path, crash_at=13).fit()
    # crashed in step 13: records at 3, 6, 9, 12 were written; the last checkpoint is at 10
    assert [r["step"] for r in read_metrics(tmp_path)] == [3, 6, 9, 12]
    trainer = make_run(tmp_path, model_seed=123)  # other init: the checkpoint must overwrite it
    result = trainer.fit()
    assert result.start_step == 10 and result.resumed_from.name == "latest.pt"
    assert_same_run(reference, trainer, result)


def test_resume_after_sigkill_reproduces_the_run(reference, tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            str(HERE / "train_helpers.py"),
            "kill",
            str(tmp_path),
            "13",
            str(torch.get_num_threads()),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr
    assert torch.load(tmp_path / "latest.pt", weights_only=True)["step"] == 10
    assert read_metrics(tmp_path)[-1]["step"] == 12  # written after the checkpoint, then killed
    trainer = make_run(tmp_path, model_seed=7)
    result = trainer.fit()
    assert result.start_step == 10
    assert_same_run(reference, trainer, result)


def test_finished_run_resumes_to_nothing_and_resume_none_restarts(reference, tmp_path):
    trainer = make_run(reference["out"], resume=str(reference["out"] / "step_000016.pt"))
    result = trainer.fit()
    assert result.start_step == result.step == 16 and result.history == []
    assert max_abs_diff(reference["params"], params(trainer.module)) == 0.0
    # a run folder resumes from its newest checkpoint; an empty folder or a missing file fails
    assert make_run(tmp_path / "x", resume=str(reference["out"])).fit().start_step == 16
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no readable checkpoint"):
        make_run(tmp_path / "y", resume=str(tmp_path / "empty")).fit()
    with pytest.raises(InputError, match="checkpoint not found"):
        make_run(tmp_path / "z", resume=str(tmp_path / "missing.pt")).fit()
    # resume=None ignores existing checkpoints and replaces the metrics
    out = tmp_path / "again"
    make_run(out, total_steps=2, warmup_steps=0, log_every=1).fit()
    result = make_run(out, total_steps=1, warmup_steps=0, log_every=1, resume=None).fit()
    assert result.start_step == 0 and [r["step"] for r in read_metrics(out)] == [1]


def _accum_run(out, batch_size, accum):
    torch.manual_seed(0)
    trainer = make_run(
        out, dropout=0.0, noise=0.0, total_steps=6, batch_size=batch_size, grad_accum_steps=accum
    )
    result = trainer.fit()
    return params(trainer.module), [r["loss"] for r in result.history]


def test_grad_accumulation_equals_larger_batch(tmp_path):
    p1, loss1 = _accum_run(tmp_path / "a", batch_size=8, accum=1)
    p2, loss2 = _accum_run(tmp_path / "b", batch_size=4, accum=2)
    diff = max_abs_diff(p1, p2)
    print(f"accum=2 x b=4 vs accum=1 x b=8: max |param diff| = {diff:.3g}")
    assert diff < 1e-6
    np.testing.assert_allclose(loss1, loss2, rtol=1e-6)


def test_bf16_autocast_on_cpu_is_close_to_fp32(tmp_path):
    torch.manual_seed(0)
    fp32 = make_run(tmp_path / "fp32", dropout=0.0, noise=0.0, total_steps=4, log_every=1).fit()
    torch.manual_seed(0)
    bf16 = make_run(
        tmp_path / "bf16", dropout=0.0, noise=0.0, total_steps=4, log_every=1, precision="bf16"
    ).fit()
    l32 = np.array([r["loss"] for r in fp32.history])
    l16 = np.array([r["loss"] for r in bf16.history])
    print(f"bf16 vs fp32 loss rel diff: {np.abs(l16 / l32 - 1).max():.3g}")
    assert np.all(np.isfinite(l16)) and not np.array_equal(l16, l32)  # autocast really ran
    np.testing.assert_allclose(l16, l32, rtol=3e-2)


def test_fp16_on_cpu_fails_clearly(tmp_path):
    with pytest.raises(InputError, match="fp16.*CUDA.*bf16"):
        make_run(tmp_path, precision="fp16", device="cpu")


def test_eval_records_and_tensorboard_note(tmp_path, caplog):
    calls = []

    def eval_fn(step):
        calls.append(step)
        return {"val_score": float(step)}

    torch.manual_seed(0)
    task = RegressionTask(TinyNet())
    cfg = run_config(tmp_path, total_steps=6, eval_every=4, tensorboard=True, log_every=2)
    with caplog.at_level("INFO"):
        train(task, RegressionData(), cfg, eval_fn=eval_fn)
    evals = [r for r in read_metrics(tmp_path) if r["split"] == "eval"]
    assert calls == [4, 6] and [(r["step"], r["val_score"]) for r in evals] == [(4, 4.0), (6, 6.0)]
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        assert "tensorboard is not installed" in caplog.text
    else:
        assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


def test_only_rank_zero_writes(tmp_path, monkeypatch):
    # Pretend to be rank 1 of 2 (uninitialized, so no collective really runs).
    monkeypatch.setattr(du, "rank", lambda: 1)
    monkeypatch.setattr(du, "world_size", lambda: 2)
    out = tmp_path / "run"
    result = make_run(out, total_steps=4, ckpt_every=2, log_every=1).fit()
    assert result.step == 4 and result.history == [] and result.checkpoint is None
    assert not out.exists()


def test_loader_factory_is_resumed_at_the_right_batch(tmp_path):
    data = RegressionData(n=24)
    calls = []

    def factory(epoch, start_batch):
        calls.append((epoch, start_batch))
        order = torch.randperm(24, generator=torch.Generator().manual_seed(epoch))
        for b in range(start_batch, 6):
            idx = order[4 * b : 4 * b + 4]
            yield data.x[idx], data.y[idx]

    with pytest.raises(StopTraining):
        make_run(tmp_path, data=factory, crash_at=9, ckpt_every=4, total_steps=10).fit()
    assert calls == [(0, 0), (1, 0)]
    calls.clear()
    result = make_run(tmp_path, data=factory, ckpt_every=4, total_steps=10).fit()
    assert result.start_step == 8 and calls == [(1, 2)]


class _Stream(IterableDataset):
    def __iter__(self):
        yield from ()


def test_bad_inputs_fail_clearly(tmp_path):
    cfg = run_config(tmp_path)
    with pytest.raises(InputError, match="fewer than one micro-batch"):
        Trainer(RegressionTask(TinyNet()), RegressionData(n=3), cfg)
    with pytest.raises(TypeError, match="IterableDataset"):
        Trainer(RegressionTask(TinyNet()), _Stream(), cfg)
    with pytest.raises(TypeError, match="trainable_module"):
        Trainer(lambda batch: {"loss": torch.zeros(())}, RegressionData(), cfg)

    class NoLoss(EmaTask):
        def __call__(self, batch):
            return {"mae": torch.zeros(())}

    with pytest.raises(TypeError, match="'loss'"):
        Trainer(NoLoss(TinyNet()), RegressionData(), cfg).fit()

    class Diverges(EmaTask):
        def __call__(self, batch):
            out = super().__call__(batch)
            return {**out, "loss": out["loss"] * float("nan")}

    with pytest.raises(FloatingPointError, match="loss is nan at step 3"):
        Trainer(Diverges(TinyNet()), RegressionData(), run_config(tmp_path / "nan")).fit()
    assert read_metrics(tmp_path / "nan")[-1]["loss"] == "nan"  # written before failing


def test_sampler_shards_resumes_and_reshuffles():
    whole = ShardedSampler(22, batch_size=4, world_size=1, rank=0, seed=3)
    assert len(whole) == 20 and whole.batches_per_epoch == 5
    order = list(whole)
    shards = [
        list(ShardedSampler(22, batch_size=2, world_size=2, rank=r, seed=3)) for r in range(2)
    ]
    # global micro-batch j of 2 ranks x 2 == batch j of 1 rank x 4
    for j in range(5):
        assert sorted(shards[0][2 * j : 2 * j + 2] + shards[1][2 * j : 2 * j + 2]) == sorted(
            order[4 * j : 4 * j + 4]
        )
    whole.set_epoch(0, start=9)  # rounded down to a whole global batch
    assert list(whole) == order[8:]
    whole.set_epoch(1)
    assert list(whole) != order and sorted(list(whole)) != order
    assert list(ShardedSampler(8, 4, 1, 0, shuffle=False)) == list(range(8))
    with pytest.raises(ValueError, match="rank"):
        ShardedSampler(8, 4, world_size=2, rank=2)


def test_tensor_dataset_and_module_task(tmp_path):
    # The plain path: a TensorDataset and a task built from a model, nothing else.
    torch.manual_seed(0)
    x = torch.randn(16, 8)
    ds = TensorDataset(x, x[:, :2] * 2)
    result = train(RegressionTask(TinyNet()), ds, run_config(tmp_path, total_steps=3, log_every=1))
    assert [r["step"] for r in result.history] == [1, 2, 3]
    assert "tokens_per_s" not in result.history[0]  # the task reports no tokens


@pytest.mark.slow
def test_compile_matches_eager(tmp_path, request):
    markexpr = request.config.getoption("markexpr") or ""
    if "slow" not in markexpr or "not slow" in markexpr:
        pytest.skip("torch.compile on CPU takes about a minute; run with -m slow")
    runs = {}
    for name, compile_ in (("eager", False), ("compiled", True)):
        torch.manual_seed(0)
        trainer = make_run(tmp_path / name, dropout=0.0, noise=0.0, total_steps=4, compile=compile_)
        trainer.fit()
        runs[name] = params(trainer.module)
    assert max_abs_diff(runs["eager"], runs["compiled"]) < 1e-6
