"""Helpers shared by the cases: seeding, the optimizer, a training step, quiet MONAI."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn


def quiet() -> None:
    """MONAI's deprecation / meshgrid chatter off (it would flood the benchmark log)."""
    warnings.filterwarnings("ignore")


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def train_step(model: nn.Module, loss_fn: Callable[[], torch.Tensor]) -> Callable[[], float]:
    """forward + loss + backward + AdamW step (torch's default foreach implementation, the same
    optimizer on every side), gradients set to None after the step."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)

    def step() -> float:
        loss = loss_fn()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def eval_output(model: nn.Module, fn: Callable[[], Any]) -> Callable[[], Any]:
    """``fn()`` in eval mode without grad, the model's mode restored afterwards."""

    def run() -> Any:
        was = model.training
        model.eval()
        with torch.no_grad():
            out = fn()
        model.train(was)
        return out

    return run
