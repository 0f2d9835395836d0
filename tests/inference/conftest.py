"""Fixtures of the inference tests: a tiny threshold "model" saved as a real ``best.pt``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from umit.data.plan import ChannelPlan, Plan
from umit.finetune.run import FinetuneConfig, save_model
from umit.models import create_model
from umit.preprocess.normalize import normalize_channel


class ThresholdSegmenter(nn.Module):
    """Two-class 'model': class 1 where the normalized intensity exceeds ``threshold``."""

    def __init__(self, threshold: float = 0.0, in_chans: int = 1):
        super().__init__()
        self.threshold = nn.Parameter(torch.tensor(float(threshold)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = x[:, :1] - self.threshold  # (B, 1, X, Y, Z)
        return torch.cat([-d, d], dim=1)  # (B, 2, X, Y, Z)


def seg_test_threshold(**kwargs) -> ThresholdSegmenter:
    return ThresholdSegmenter(**kwargs)


@pytest.fixture
def tiny_model(tmp_path, register_models) -> Path:
    """best.pt of a threshold 'model' at 500 HU, label 1 named liver, on a 1.5 mm grid."""
    register_models(seg_test_threshold)
    plan = Plan(
        target_spacing=(1.5, 1.5, 1.5),
        channels=[
            ChannelPlan(
                name="image", modality="CT", scheme="ct_window", clip_low=-1000, clip_high=1000
            )
        ],
        crop_foreground=False,
    )
    t = float(normalize_channel(np.full((1, 1, 1), 500.0, np.float32), plan.channels[0])[0].item())
    cfg = FinetuneConfig(data=tmp_path, crop_size=(16, 16, 16), sw_overlap=0.25)
    return save_model(
        create_model("seg_test_threshold", threshold=t), tmp_path / "best.pt", plan=plan,
        cfg=cfg, extra={"label_names": {"background": 0, "liver": 1}},
    )  # fmt: skip
