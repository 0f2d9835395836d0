"""Transformer feed-forward block (Linear -> GELU -> Linear), timm naming ``fc1`` / ``fc2``."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


class Mlp(nn.Module):
    """Two-layer MLP with an activation and dropout after each layer.

    Args:
        in_features: input (and by default output) width.
        hidden_features: hidden width; defaults to ``in_features``.
        out_features: output width; defaults to ``in_features``.
        act_layer: activation module class (exact GELU by default, as MONAI and timm).
        drop: dropout after the activation and after ``fc2``.
        bias: use biases in both linear layers.
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: int | None = None,
        out_features: int | None = None,
        act_layer: Callable[[], nn.Module] = nn.GELU,
        drop: float = 0.0,
        bias: bool = True,
    ):
        super().__init__()
        if in_features <= 0:
            raise ValueError(f"in_features must be positive, got {in_features!r}")
        if not 0.0 <= drop < 1.0:
            raise ValueError(f"drop must be in [0, 1), got {drop!r}")
        hidden_features = hidden_features or in_features
        out_features = out_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias)
        self.act = act_layer()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden_features, out_features, bias=bias)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))
