"""SimCLR-3D: NT-Xent against a hand-written reference, and training on each encoder family."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from umit.models import create_model
from umit.models.heads import pooled_features
from umit.ssl.simclr import SimCLR3D, nt_xent


def nt_xent_reference(z1, z2, t):
    z = torch.cat([z1, z2])
    n = z.shape[0]
    B = n // 2
    total = 0.0
    for i in range(n):
        j = (i + B) % n
        sims = [F.cosine_similarity(z[i], z[k], dim=0) / t for k in range(n)]
        denom = sum(math.exp(float(sims[k])) for k in range(n) if k != i)
        total += -math.log(math.exp(float(sims[j])) / denom)
    return total / n


def test_nt_xent_matches_reference_and_chance():
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    assert float(nt_xent(z1, z2, 0.3)) == pytest.approx(nt_xent_reference(z1, z2, 0.3), rel=1e-5)
    # all embeddings equal: every candidate looks alike -> ln(2B - 1)
    c = torch.ones(4, 3)
    assert float(nt_xent(c, c, 0.1)) == pytest.approx(math.log(7), rel=1e-6)
    # perfectly separated pairs score far below chance
    e = torch.eye(4)
    assert float(nt_xent(e, e, 0.1)) < 0.01


ENCODERS = [
    ("vit3d_test_p8", {}, (16, 16, 16)),
    ("swin3d_test", {"depths": (1, 1), "num_heads": (3, 6)}, (16, 16, 16)),  # 2 stages: fast
    ("resnet3d_test", {"norm": "batch", "num_classes": 0}, (16, 16, 16)),
]


@pytest.mark.parametrize(("name", "kwargs", "size"), ENCODERS)
def test_pooled_features_one_path(name, kwargs, size):
    enc = create_model(name, img_size=size, in_chans=1, **kwargs)
    f = pooled_features(enc, torch.randn(2, 1, *size))
    assert f.ndim == 2 and f.shape[0] == 2


@pytest.mark.parametrize(("name", "kwargs", "size"), ENCODERS)
def test_simclr_loss_decreases(name, kwargs, size):
    torch.manual_seed(0)
    enc = create_model(name, img_size=size, in_chans=1, **kwargs)
    model = SimCLR3D(enc, proj_dim=16, hidden=32, temperature=0.2)
    x = torch.randn(4, 1, *size)
    x[:, :, :8] += torch.arange(4.0).view(4, 1, 1, 1, 1)  # crops that differ in kind
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for step in range(20):
        out = model(x, generator=torch.Generator().manual_seed(step))
        assert set(out) >= {"loss", "chance_loss", "pos_sim", "neg_sim"}
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
    assert all(math.isfinite(v) for v in losses)
    assert float(out["chance_loss"]) == pytest.approx(math.log(7))
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.05, losses
