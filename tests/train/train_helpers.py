"""Tiny model, data and task for the training tests; also a script for subprocess / multi-process runs.

As a script (``python tests/train/train_helpers.py MODE OUT``):

- ``kill OUT STEP``: train (``run_config``) and SIGKILL itself at the end of step ``STEP``.
- ``dist OUT``: run under torchrun-style env vars (RANK, WORLD_SIZE, ...) and train the
  distributed scenarios of :data:`DIST_SCENARIOS` one after another, each in ``OUT/<name>``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from umit.train import RegressionTask, TrainConfig, Trainer


class Block(nn.Module):
    def __init__(self, width: int, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc = nn.Linear(width, width)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop(torch.nn.functional.gelu(self.fc(self.norm(x))))


class TinyNet(nn.Module):
    """Residual MLP with ViT-like parts: a listed ``pos_embed``, ``blocks``, norm, head."""

    model_name = "tiny_net"

    def __init__(
        self,
        in_dim: int = 8,
        width: int = 16,
        depth: int = 2,
        out_dim: int = 2,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.model_args = {
            "in_dim": in_dim,
            "width": width,
            "depth": depth,
            "out_dim": out_dim,
            "dropout": dropout,
        }
        self.stem = nn.Linear(in_dim, width)
        self.pos_embed = nn.Parameter(torch.randn(1, width) * 0.02)
        self.blocks = nn.ModuleList([Block(width, dropout) for _ in range(depth)])
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, out_dim)

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed"}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x) + self.pos_embed  # (B, in_dim) -> (B, width)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


class RegressionData(Dataset):
    """``n`` fixed (x, y) pairs; ``noise > 0`` adds fresh noise to x from the global torch RNG."""

    def __init__(
        self, n: int = 48, in_dim: int = 8, out_dim: int = 2, noise: float = 0.0, seed: int = 0
    ):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, in_dim, generator=g)
        self.y = torch.tanh(self.x @ torch.randn(in_dim, out_dim, generator=g))
        self.noise = noise

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.x[i]
        if self.noise:
            x = x + self.noise * torch.randn_like(x)
        return x, self.y[i]


class StopTraining(Exception):
    """Raised by :class:`EmaTask` to simulate a crash at a given step."""


class EmaTask(RegressionTask):
    """Regression plus an EMA copy of the weights (extra task state) and an optional crash/kill."""

    def __init__(
        self, model: nn.Module, crash_at: int | None = None, kill_at: int | None = None, **kw: Any
    ):
        super().__init__(model, **kw)
        self.ema = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.crash_at = crash_at
        self.kill_at = kill_at

    def to(self, device: torch.device) -> EmaTask:
        self.module.to(device)
        self.ema = {k: v.to(device) for k, v in self.ema.items()}
        return self

    def on_step_end(self, step: int) -> None:
        with torch.no_grad():
            for k, v in self.module.state_dict().items():
                if v.is_floating_point():
                    self.ema[k].mul_(0.9).add_(v, alpha=0.1)
        if self.kill_at is not None and step + 1 == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        if self.crash_at is not None and step + 1 == self.crash_at:
            raise StopTraining(f"crash after step {step + 1}")

    def state_dict(self) -> dict[str, Any]:
        return {"ema": {k: v.cpu() for k, v in self.ema.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.ema = {k: v.clone() for k, v in state["ema"].items()}


def run_config(out: str | Path, **overrides: Any) -> TrainConfig:
    """Settings of the resume tests: epochs of 12 batches, windows that straddle checkpoints."""
    values: dict[str, Any] = {
        "total_steps": 16,
        "batch_size": 4,
        "lr": 3e-3,
        "min_lr": 1e-4,
        "warmup_steps": 3,
        "weight_decay": 0.05,
        "weight_decay_end": 0.2,
        "clip_grad_norm": 1.0,
        "log_every": 3,
        "ckpt_every": 5,
        "out_dir": str(out),
        "progress": False,
        "tensorboard": False,
    }
    values.update(overrides)
    return TrainConfig(**values)


def make_run(
    out: str | Path,
    model_seed: int = 0,
    dropout: float = 0.1,
    noise: float = 0.1,
    crash_at: int | None = None,
    kill_at: int | None = None,
    data: Any = None,
    **overrides: Any,
) -> Trainer:
    torch.manual_seed(model_seed)
    task = EmaTask(
        TinyNet(dropout=dropout), crash_at=crash_at, kill_at=kill_at, tokens_per_sample=1.0
    )
    data = RegressionData(n=50, noise=noise) if data is None else data
    return Trainer(
        task,
        data,
        run_config(out, **overrides),
        plan={"spacing": [1.0, 1.0, 1.0]},
        data_hash="abc123",
    )


def params(module_or_state: Any) -> dict[str, torch.Tensor]:
    sd = module_or_state if isinstance(module_or_state, dict) else module_or_state.state_dict()
    return {k: v.detach().cpu().double() for k, v in sd.items()}


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(
    nproc: int, args: list[str], timeout: float = 240, script: str | Path | None = None
) -> list[subprocess.CompletedProcess]:
    """Start ``nproc`` copies of this script (or ``script``) with torchrun's environment variables."""
    port = free_port()
    procs = []
    for rank in range(nproc):
        env = dict(
            os.environ,
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(nproc),
            LOCAL_WORLD_SIZE=str(nproc),
            OMP_NUM_THREADS="1",
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, str(script or __file__), *args],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    results = []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        results.append(subprocess.CompletedProcess(p.args, p.returncode, out, None))
    return results


# name -> (per-process batch size, grad_accum_steps, strategy, extra settings)
DIST_SCENARIOS: dict[str, dict[str, Any]] = {
    "ddp": {"batch_size": 4, "grad_accum_steps": 1, "strategy": "ddp"},
    "ddp_accum": {"batch_size": 2, "grad_accum_steps": 2, "strategy": "ddp"},
    "fsdp": {"batch_size": 4, "grad_accum_steps": 1, "strategy": "fsdp"},
    "fsdp_accum": {"batch_size": 2, "grad_accum_steps": 2, "strategy": "fsdp"},
}
DIST_STEPS = 6


def dist_config(out: str | Path, **overrides: Any) -> TrainConfig:
    """No dropout or noise: the multi-process run must equal one process with the global batch."""
    values: dict[str, Any] = {
        "total_steps": DIST_STEPS,
        "lr": 1e-2,
        "min_lr": 1e-3,
        "warmup_steps": 1,
        "clip_grad_norm": 0.5,
        "log_every": 2,
        "ckpt_every": 3,
        "out_dir": str(out),
        "progress": False,
        "tensorboard": False,
        "resume": None,
    }
    values.update(overrides)
    return TrainConfig(**values)


def _dist_main(out: Path) -> None:
    from umit.train import distributed as du

    assert du.init_from_env(), "expected torchrun-style environment variables"
    assert du.world_size() == 2
    got = du.all_reduce_mean({"a": float(du.rank()), "b": torch.tensor(2.0)})
    assert got == {"a": 0.5, "b": 2.0}, got
    for name, settings in DIST_SCENARIOS.items():
        torch.manual_seed(1 + du.rank())  # different init per rank: wrapping must sync it
        task = RegressionTask(TinyNet())
        trainer = Trainer(task, RegressionData(n=48), dist_config(out / name, **settings))
        calls = []
        if settings["strategy"] == "ddp":
            # Count gradient all-reduces: one per optimizer step when no_sync skips the others.
            from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

            def counting_hook(state, bucket, calls=calls):
                calls.append(1)
                return allreduce_hook(state, bucket)

            trainer.model.register_comm_hook(None, counting_hook)
        trainer.fit()
        if calls and du.is_main():
            (out / name / "allreduce_calls.txt").write_text(str(len(calls)))
    # Crash at step 4 then resume to DIST_STEPS: must equal the uninterrupted "ddp" run.
    torch.manual_seed(1)
    crash = EmaTask(TinyNet(), crash_at=4)
    cfg = dist_config(out / "ddp_resume", **DIST_SCENARIOS["ddp"])
    with contextlib.suppress(StopTraining):
        Trainer(crash, RegressionData(n=48), cfg).fit()
    torch.manual_seed(5)
    cfg = dist_config(out / "ddp_resume", resume="auto", **DIST_SCENARIOS["ddp"])
    Trainer(EmaTask(TinyNet()), RegressionData(n=48), cfg).fit()
    du.destroy()
    print(f"rank {os.environ['RANK']} done")


if __name__ == "__main__":
    mode, out = sys.argv[1], Path(sys.argv[2])
    if mode == "kill":
        torch.set_num_threads(int(sys.argv[4]))  # the parent's: reductions split the same way
        make_run(out, kill_at=int(sys.argv[3])).fit()
        raise SystemExit("not killed")
    if mode == "dist":
        _dist_main(out)
    else:
        raise SystemExit(f"unknown mode {mode}")
