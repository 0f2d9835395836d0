"""Per-iteration schedules against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from umit.train import Schedules, TrainConfig, cosine_schedule


def test_warmup_then_cosine_hand_values():
    got = cosine_schedule(base=1.0, final=0.0, total_steps=6, warmup_steps=2)
    c = math.cos(math.pi / 4)
    want = [0.0, 0.5, 1.0, 0.5 * (1 + c), 0.5, 0.5 * (1 - c)]
    np.testing.assert_allclose(got, want, atol=1e-12)


def test_cosine_without_warmup_and_offset_final():
    got = cosine_schedule(base=3.0, final=1.0, total_steps=4)
    # final + (base - final) * (1 + cos(pi * i / 4)) / 2
    want = [1.0 + 2.0 * (1 + math.cos(math.pi * i / 4)) / 2 for i in range(4)]
    np.testing.assert_allclose(got, want, atol=1e-12)
    assert got[0] == 3.0 and got[-1] > 1.0  # reaches final one step past the end (DINOv2)


def test_warmup_start_and_all_warmup():
    got = cosine_schedule(base=1.0, final=0.1, total_steps=4, warmup_steps=4, warmup_start=0.2)
    np.testing.assert_allclose(got, [0.2, 0.4, 0.6, 0.8], atol=1e-12)
    assert cosine_schedule(2.0, 2.0, 5).tolist() == [2.0] * 5
    assert cosine_schedule(1.0, 0.0, 1, warmup_steps=0).tolist() == [1.0]


@pytest.mark.parametrize("args", [(1.0, 0.0, 0, 0), (1.0, 0.0, 5, 6), (1.0, 0.0, 5, -1)])
def test_bad_schedule_arguments(args):
    with pytest.raises(ValueError, match="total_steps|warmup_steps"):
        cosine_schedule(*args)


def test_schedules_from_config():
    cfg = TrainConfig(
        total_steps=10,
        lr=1e-3,
        min_lr=1e-5,
        warmup_steps=2,
        weight_decay=0.04,
        weight_decay_end=0.4,
    )
    s = Schedules.from_config(cfg)
    assert s.lr.shape == s.wd.shape == (10,)
    assert s.lr[0] == 0.0 and s.lr[1] == pytest.approx(5e-4) and s.lr[2] == pytest.approx(1e-3)
    assert np.all(np.diff(s.lr[2:]) < 0) and s.lr[-1] > 1e-5
    # weight decay: cosine from 0.04 up to 0.4 over all steps, no warm-up
    assert s.wd[0] == pytest.approx(0.04) and np.all(np.diff(s.wd) > 0) and s.wd[-1] < 0.4
    constant = Schedules.from_config(TrainConfig(total_steps=3, weight_decay=0.1))
    assert constant.wd.tolist() == [0.1] * 3


def test_config_rejects_inconsistent_schedule():
    with pytest.raises(ValueError, match="min_lr"):
        TrainConfig(lr=1e-4, min_lr=1e-3)
    with pytest.raises(ValueError, match="warmup_steps"):
        TrainConfig(total_steps=5, warmup_steps=6)
    with pytest.raises(ValueError, match="betas"):
        TrainConfig(betas=(0.9, 1.0))
