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
    """forward + loss + backward; gradients reset to None before each step.

    The optimizer step is left out on purpose: it is the same code on every side (torch's AdamW)
    and does not depend on the model implementation, so it would only dilute the comparison (on
    this 2-core CPU a foreach AdamW step over ViT-B's 86 M parameters costs about as much as the
    MAE step's forward + backward). ``optimizer_step_s`` in the case info times it once.
    """
    params = [p for p in model.parameters() if p.requires_grad]

    def step() -> float:
        for p in params:
            p.grad = None
        loss = loss_fn()
        loss.backward()
        return float(loss.detach())

    return step


def time_adamw_step(model: nn.Module, reps: int = 2) -> dict[str, float]:
    """Seconds of one ``torch.optim.AdamW`` step over the model's parameters, best of ``reps``,
    for torch's default (foreach) and the fused kernel; gradients are random and the weights are
    restored afterwards."""
    import time

    params = [p for p in model.parameters() if p.requires_grad]
    saved = [p.detach().clone() for p in params]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    out = {}
    for name, kw in (("foreach", {"foreach": True}), ("fused", {"fused": True})):
        opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.05, **kw)
        best = float("inf")
        for _ in range(reps + 1):
            t = time.perf_counter()
            opt.step()
            best = min(best, time.perf_counter() - t)
        out[name] = best
        del opt
    with torch.no_grad():
        for p, s in zip(params, saved, strict=True):
            p.copy_(s)
            p.grad = None
    return out


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
