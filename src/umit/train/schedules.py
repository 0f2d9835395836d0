"""Schedules precomputed per iteration (DINOv2 style): ``schedule[step]`` is the value for step.

A precomputed array is trivially resumable (the step is the whole state), can be plotted before
training, and any task can build its own (EMA momentum, teacher temperature) with the same
function.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from umit.train.config import TrainConfig


def cosine_schedule(
    base: float,
    final: float,
    total_steps: int,
    warmup_steps: int = 0,
    warmup_start: float = 0.0,
) -> np.ndarray:
    """Linear warm-up from ``warmup_start`` to ``base``, then half a cosine from ``base`` to ``final``.

    For step ``i`` (0-based) of ``T = total_steps`` with ``W = warmup_steps``::

        i <  W:  warmup_start + (base - warmup_start) * i / W
        i >= W:  final + (base - final) * (1 + cos(pi * (i - W) / (T - W))) / 2

    so the first step after warm-up uses exactly ``base`` and the value would reach ``final`` at
    step ``T`` (one past the last), as in DINOv2's ``CosineScheduler``.

    Returns:
        float64 array of shape ``(total_steps,)``.
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(
            f"warmup_steps must be in [0, total_steps={total_steps}], got {warmup_steps}"
        )
    warmup = warmup_start + (base - warmup_start) * np.arange(warmup_steps) / max(warmup_steps, 1)
    decay_steps = total_steps - warmup_steps
    phase = np.arange(decay_steps) / max(decay_steps, 1)
    decay = final + 0.5 * (base - final) * (1.0 + np.cos(np.pi * phase))
    out = np.concatenate([warmup, decay]).astype(np.float64)
    assert out.shape == (total_steps,)
    return out


@dataclass(frozen=True)
class Schedules:
    """Per-step learning rate and weight decay of one run."""

    lr: np.ndarray
    """``(total_steps,)`` learning rate (before per-group ``lr_scale``)."""
    wd: np.ndarray
    """``(total_steps,)`` weight decay (before per-group ``wd_scale``)."""

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> Schedules:
        lr = cosine_schedule(cfg.lr, cfg.min_lr, cfg.total_steps, cfg.warmup_steps)
        wd = cosine_schedule(cfg.weight_decay, cfg.effective_weight_decay_end, cfg.total_steps)
        return cls(lr=lr, wd=wd)
