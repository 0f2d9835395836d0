"""Models Genesis: corruptions, baseline, and restoration training on each encoder family."""

from __future__ import annotations

import math

import pytest
import torch

from umit.models import create_model
from umit.ssl.genesis import Genesis3D, bezier_map, corrupt, local_shuffle


def test_bezier_identity_and_range():
    u = torch.linspace(0, 1, 11)
    line = bezier_map(u, torch.tensor([1 / 3, 1 / 3]), torch.tensor([2 / 3, 2 / 3]))
    torch.testing.assert_close(line, u, atol=1e-3, rtol=0)
    curved = bezier_map(u, torch.tensor([0.1, 0.9]), torch.tensor([0.2, 0.95]))
    assert float(curved.min()) >= 0 and float(curved.max()) <= 1 and float((curved - u).max()) > 0.2


def test_local_shuffle_permutes_values_locally():
    x = torch.arange(1000.0).view(1, 10, 10, 10)
    y = local_shuffle(x, 1, max_frac=0.3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(torch.sort(y.flatten()).values, x.flatten()) and not torch.equal(x, y)
    assert float((y - x).abs().max()) <= 222  # a voxel moves at most within its 3³ box


def test_corrupt_is_seeded_and_changes_the_input():
    x = torch.rand(1, 12, 12, 12)
    a = corrupt(x, generator=torch.Generator().manual_seed(1))
    b = corrupt(x, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a, x)
    none = corrupt(x, 0, 0, 0, 0, 0, generator=torch.Generator().manual_seed(1))
    assert torch.equal(none, x)


ENCODERS = [
    ("vit3d_test_p8", {}),
    ("swin3d_test", {}),
    ("resnet3d_test", {"norm": "batch", "num_classes": 0}),
]


@pytest.mark.parametrize(("name", "kwargs"), ENCODERS)
def test_genesis_restoration_learns(name, kwargs):
    torch.manual_seed(0)
    size = (16, 16, 16)
    enc = create_model(name, img_size=size, in_chans=1, **kwargs)
    model = Genesis3D(enc, decoder_dim=16, shuffle_blocks=10)
    x = torch.randn(2, 1, *size)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for step in range(20):
        out = model(x, generator=torch.Generator().manual_seed(step % 4))
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
        assert float(out["baseline_loss"]) > 0
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5, losses


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("unetr", {"encoder": "vit3d_test_p8", "feature_size": 8, "img_size": (16, 16, 16)}),
        ("resunet3d", {"features": [8, 16], "deep_supervision": True}),
    ],
)
def test_whole_network_restoration_trains_decoder_and_encoder(name, kwargs):
    torch.manual_seed(0)
    net = create_model(name, in_chans=1, out_channels=1, **kwargs)
    model = Genesis3D(net, network=True, shuffle_blocks=5)
    assert model.encoder is net.encoder  # the network's own encoder, not a copy
    assert all(k.startswith("network.") for k in model.state_dict())  # no duplicate tensors
    x = torch.randn(2, 1, 16, 16, 16)
    out = model(x, generator=torch.Generator().manual_seed(0))
    out["loss"].backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if ".encoder." in n)
    assert any(
        g is not None and g.abs().sum() > 0 for n, g in grads.items() if ".encoder." not in n
    )


def test_whole_network_must_output_the_input_channels():
    net = create_model("resunet3d", in_chans=1, out_channels=3, features=[8, 16])
    with pytest.raises(ValueError, match="out_channels=3"):
        Genesis3D(net, network=True)
