"""Distributed helpers uninitialized, and DDP / FSDP2 on CPU (gloo, 2 processes) vs one process."""

from __future__ import annotations

import pytest
import torch
from train_helpers import (
    DIST_SCENARIOS,
    RegressionData,
    TinyNet,
    dist_config,
    launch,
    max_abs_diff,
    params,
)

from umit.train import RegressionTask, Trainer, load_checkpoint
from umit.train import distributed as du
from umit.train.metrics import read_metrics

TIMING = {"samples_per_s", "tokens_per_s", "flops_per_s", "time_s"}


def test_helpers_work_uninitialized():
    assert not du.is_initialized()
    assert du.world_size() == 1 and du.rank() == 0 and du.local_rank() == 0 and du.is_main()
    du.barrier()
    t = torch.tensor([1.0, 3.0])
    out = du.all_reduce_mean(t)
    assert torch.equal(out, t) and out is not t
    assert du.all_reduce_mean({"a": torch.tensor(2.0), "b": 4}) == {"a": 2.0, "b": 4.0}
    assert du.all_gather_object({"x": 1}) == [{"x": 1}]
    model = TinyNet()
    for strategy in ("auto", "none", "ddp", "fsdp"):
        assert du.wrap_model(model, strategy) is model
        assert du.resolve_strategy(strategy) == "none"
    assert du.unwrap(model) is model
    with pytest.raises(ValueError, match="strategy"):
        du.resolve_strategy("horovod")
    assert du.default_device().type in ("cpu", "cuda")


def test_init_from_env(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert du.init_from_env() is False
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(RuntimeError, match="MASTER_ADDR"):
        du.init_from_env()


@pytest.fixture(scope="module")
def dist_runs(tmp_path_factory):
    """2 processes (gloo) train every scenario in train_helpers.DIST_SCENARIOS once."""
    out = tmp_path_factory.mktemp("dist")
    results = launch(2, ["dist", str(out)])
    for r in results:
        assert r.returncode == 0, r.stdout[-4000:]
    return out


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """One process with the global batch (2 x 4 = 8) and the same initial weights."""
    out = tmp_path_factory.mktemp("single")
    torch.manual_seed(1)  # rank 0's init in the multi-process run (broadcast to rank 1)
    trainer = Trainer(
        RegressionTask(TinyNet()), RegressionData(n=48), dist_config(out, batch_size=8)
    )
    trainer.fit()
    return {"out": out, "params": params(trainer.module)}


def final_params(run_dir):
    return params(load_checkpoint(run_dir / "latest.pt")["model"])


@pytest.mark.multiproc
@pytest.mark.parametrize("scenario", list(DIST_SCENARIOS))
def test_two_processes_equal_one_with_the_global_batch(dist_runs, single, scenario):
    diff = max_abs_diff(single["params"], final_params(dist_runs / scenario))
    print(
        f"{scenario}: 2 procs x batch {DIST_SCENARIOS[scenario]['batch_size']} "
        f"(accum {DIST_SCENARIOS[scenario]['grad_accum_steps']}) vs 1 proc x 8: max |param diff| = {diff:.3g}"
    )
    assert diff < 1e-5
    ours = read_metrics(dist_runs / scenario)
    ref = read_metrics(single["out"])
    # rank 0 alone writes: one record per logging step, no duplicates
    assert [r["step"] for r in ours] == [r["step"] for r in ref] == [2, 4, 6]
    for a, b in zip(ours, ref, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
        assert a["samples_seen"] == b["samples_seen"] == 8 * a["step"]


@pytest.mark.multiproc
def test_ddp_all_reduces_once_per_optimizer_step(dist_runs):
    # The tiny model fits one DDP bucket: one all-reduce per backward that synchronizes.
    assert int((dist_runs / "ddp" / "allreduce_calls.txt").read_text()) == 6
    # with grad_accum_steps=2, no_sync skips the first micro-batch of each step
    assert int((dist_runs / "ddp_accum" / "allreduce_calls.txt").read_text()) == 6


@pytest.mark.multiproc
def test_fsdp_checkpoint_is_full_and_plain(dist_runs):
    ckpt = torch.load(dist_runs / "fsdp" / "latest.pt", weights_only=True)
    assert ckpt["world_size"] == 2 and len(ckpt["rank_state"]) == 2
    assert ckpt["model"]["stem.weight"].shape == (16, 8)  # gathered, not a shard
    assert ckpt["optimizer"]["state"]["stem.weight"]["exp_avg"].shape == (16, 8)


@pytest.mark.multiproc
def test_ddp_crash_and_resume_equals_uninterrupted(dist_runs):
    diff = max_abs_diff(final_params(dist_runs / "ddp"), final_params(dist_runs / "ddp_resume"))
    print(f"ddp resumed vs uninterrupted: max |param diff| = {diff:.3g}")
    assert diff == 0.0

    def strip(records):
        return [{k: v for k, v in r.items() if k not in TIMING} for r in records]

    assert strip(read_metrics(dist_runs / "ddp_resume")) == strip(read_metrics(dist_runs / "ddp"))
