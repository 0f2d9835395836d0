"""3D view augmentations: identity parameters, exact flips and rotations, replayable draws."""

from __future__ import annotations

import torch

from umit.data.augment3d import ViewConfig, apply_view, identity_params, sample_view_params


def test_identity_params_give_identity():
    x = torch.randn(2, 1, 8, 6, 4)
    assert torch.equal(apply_view(x, identity_params(2)), x)
    # the spatial path (a full-volume crop through grid_sample) is the identity too
    p = identity_params(2)
    p.elastic = torch.zeros(2, 3, 2, 2, 2)
    torch.testing.assert_close(apply_view(x, p), x, atol=1e-5, rtol=0)


def test_flip_and_rot90_are_exact_permutations():
    x = torch.randn(3, 1, 5, 5, 5)
    p = identity_params(3)
    p.flip[0] = torch.tensor([True, False, True])
    p.rot_k[1], p.rot_plane[1] = 1, 2
    p.rot_k[2], p.rot_plane[2] = 3, 0
    y = apply_view(x, p)
    assert torch.equal(y[0], torch.flip(x[0], (1, 3)))
    assert torch.equal(y[1], torch.rot90(x[1], 1, (2, 3)))
    assert torch.equal(y[2], torch.rot90(x[2], 3, (1, 2)))
    assert torch.equal(torch.sort(y.flatten()).values, torch.sort(x.flatten()).values)


def test_rot90_in_a_non_square_plane_keeps_the_shape():
    x = torch.randn(1, 1, 4, 6, 6)
    p = identity_params(1)
    p.rot_k[0], p.rot_plane[0] = 1, 0  # (D, H) = (4, 6): a half turn instead
    assert torch.equal(apply_view(x, p), torch.rot90(x, 2, (2, 3)))


def test_draws_are_seeded_and_replayable():
    x = torch.randn(2, 1, 16, 16, 16)
    cfg = ViewConfig()
    p1 = sample_view_params(2, cfg, torch.Generator().manual_seed(0))
    p2 = sample_view_params(2, cfg, torch.Generator().manual_seed(0))
    a, b = apply_view(x, p1, (8, 8, 8)), apply_view(x, p2, (8, 8, 8))
    assert a.shape == (2, 1, 8, 8, 8) and torch.equal(a, b)
    # per-sample parameters replay one sample alone
    torch.testing.assert_close(apply_view(x[1:], p1[1], (8, 8, 8)), a[1:])
    p3 = sample_view_params(2, cfg, torch.Generator().manual_seed(1))
    assert not torch.allclose(apply_view(x, p3, (8, 8, 8)), a)


def test_crop_zoom_and_intensity():
    # a linear ramp along W: a centred half-extent crop samples its middle half
    ramp = torch.linspace(-1, 1, 16).view(1, 1, 1, 1, 16).expand(1, 1, 16, 16, 16).contiguous()
    p = identity_params(1)
    p.extent[:] = 0.5
    y = apply_view(ramp, p, (16, 16, 16))
    torch.testing.assert_close(y[0, 0, 0, 0], torch.linspace(-0.5, 0.5, 16), atol=0.05, rtol=0)
    # intensity: scale and shift are exact; gamma 1 and noise 0 leave values alone
    p = identity_params(1)
    p.scale[:], p.shift[:] = 2.0, 0.5
    torch.testing.assert_close(apply_view(ramp, p), ramp * 2 + 0.5)
    p.noise_std[:] = 0.1
    noise = apply_view(ramp, p) - (ramp * 2 + 0.5)
    assert 0.08 < float(noise.std()) < 0.12
    # view scale ranges: a small-scale view covers a smaller part of the input
    small = sample_view_params(64, ViewConfig(scale=(0.1, 0.2)), torch.Generator().manual_seed(0))
    large = sample_view_params(64, ViewConfig(scale=(0.8, 1.0)), torch.Generator().manual_seed(0))
    assert float(small.extent.max()) < float(large.extent.min())
