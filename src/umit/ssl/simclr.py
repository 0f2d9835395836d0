"""SimCLR-3D: contrastive pretraining (NT-Xent) as a wrapper around any registered encoder.

Two random views of every crop (:mod:`umit.data.augment3d`: random resized crops at two scale
ranges, zoom, elastic field, flips, 90° rotations, intensity jitter) go through the encoder in one
batch; pooled features (:func:`umit.models.heads.pooled_features`) feed a projection MLP with
BatchNorm (without it NT-Xent stayed at chance in our feasibility check); the loss pulls the two
views of a crop together against the other ``2B - 2`` views (Chen et al. 2020). The logged
``chance_loss`` is ``ln(2B - 1)``, what a collapsed or untrained embedding scores.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from umit.data.augment3d import ViewConfig, apply_view, sample_view_params
from umit.models.heads import feature_dim, pooled_features

__all__ = ["SimCLR3D", "nt_xent"]


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """NT-Xent over (B, F) embeddings of two views; row ``i`` of ``z1`` pairs with row ``i`` of ``z2``.

    Each of the 2B embeddings is classified among the other 2B - 1 by cosine similarity /
    ``temperature``; the target is its partner view.
    """
    B = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)  # (2B, F)
    sim = z @ z.t() / temperature  # (2B, 2B)
    sim = sim.masked_fill(torch.eye(2 * B, dtype=torch.bool, device=z.device), float("-inf"))
    target = torch.cat([torch.arange(B, 2 * B), torch.arange(0, B)]).to(z.device)
    return F.cross_entropy(sim, target)


class SimCLR3D(nn.Module):
    """Contrastive wrapper: encoder + projection MLP (Linear-BN-ReLU-Linear) + NT-Xent.

    Args:
        encoder: any encoder with the feature API (ViT3D, SwinTransformer3D, ResNet3D, ...).
        proj_dim: projection output width.
        hidden: projection hidden width (default: the encoder's feature width).
        temperature: NT-Xent temperature.
        views: random view settings of the first view; ``scale2`` replaces its crop scale
            range for the second view (two scales).
        scale2: crop volume fraction of the second view.
        view_size: spatial size of the views (default: the input crop's).
    """

    def __init__(
        self,
        encoder: nn.Module,
        proj_dim: int = 128,
        hidden: int | None = None,
        temperature: float = 0.1,
        views: ViewConfig | None = None,
        scale2: tuple[float, float] = (0.15, 0.5),
        view_size: tuple[int, int, int] | None = None,
    ):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature!r}")
        self.encoder = encoder
        dim = feature_dim(encoder)
        hidden = hidden or dim
        self.projector = nn.Sequential(
            nn.Linear(dim, hidden, bias=False),
            nn.BatchNorm1d(hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, proj_dim),
        )
        self.temperature = temperature
        self.views = views or ViewConfig()
        self.views2 = self.views.model_copy(update={"scale": tuple(scale2)})
        self.view_size = tuple(view_size) if view_size else None
        self.model_name = "simclr3d"
        self.model_args = {
            "encoder": getattr(encoder, "model_name", type(encoder).__name__),
            "encoder_args": getattr(encoder, "model_args", {}),
            "proj_dim": proj_dim,
            "hidden": hidden,
            "temperature": temperature,
        }

    def no_weight_decay(self) -> set[str]:
        enc = getattr(self.encoder, "no_weight_decay", lambda: set())()
        return {f"encoder.{n}" for n in enc}

    def make_views(
        self, x: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Two random views (B, C, *view_size) of a batch of crops."""
        B = x.shape[0]
        size = self.view_size or tuple(x.shape[2:])
        p1 = sample_view_params(B, self.views, generator)
        p2 = sample_view_params(B, self.views2, generator)
        return apply_view(x, p1, size), apply_view(x, p2, size)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, D, H, W) -> projections (B, proj_dim)."""
        return self.projector(pooled_features(self.encoder, x))

    def forward(
        self, batch: Any, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        """``batch``: (B, C, D, H, W) crops or a mapping with ``"image"``; returns the loss dict."""
        x = batch["image"] if isinstance(batch, Mapping) else batch
        if x.ndim != 5 or x.shape[0] < 2:
            raise ValueError(f"SimCLR needs a (B >= 2, C, D, H, W) batch, got {tuple(x.shape)}")
        v1, v2 = self.make_views(x, generator)
        B = x.shape[0]
        z = self.embed(torch.cat([v1, v2]))  # (2B, proj_dim): one pass, shared BN statistics
        z1, z2 = z[:B], z[B:]
        loss = nt_xent(z1, z2, self.temperature)
        with torch.no_grad():
            n = F.normalize(z.float(), dim=1)
            pos = (n[:B] * n[B:]).sum(1).mean()
            sim = n @ n.t()
            off = ~torch.eye(2 * B, dtype=torch.bool, device=z.device)
            neg = (sim.sum() - sim.diagonal().sum() - 2 * pos * B) / (off.sum() - 2 * B)
        return {
            "loss": loss,
            "chance_loss": torch.tensor(math.log(2 * B - 1)),
            "pos_sim": pos,
            "neg_sim": neg,
        }
