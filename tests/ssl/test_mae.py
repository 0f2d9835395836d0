"""MAE-3D: patchify, masked loss, encoder on visible tokens only, weights reusable, learns."""

from __future__ import annotations

import pytest
import torch

from umit.models import create_model
from umit.ssl.mae import MAE3D, encoder_state_dict, mae_flops_per_sample, patchify, unpatchify


def _mae(**kw) -> MAE3D:
    torch.manual_seed(0)
    enc = create_model("vit3d_test_p16", img_size=32, in_chans=1)
    return MAE3D(enc, in_chans=1, decoder_dim=32, decoder_depth=1, decoder_heads=4, **kw)


def test_patchify_round_trip_and_layout():
    x = torch.randn(2, 3, 8, 12, 4)
    t = patchify(x, (4, 4, 2))
    assert t.shape == (2, 2 * 3 * 2, 4 * 4 * 2 * 3)
    # token 1 is grid cell (0, 0, 1): voxels [0:4, 0:4, 2:4], channels last
    manual = x[0, :, 0:4, 0:4, 2:4].permute(1, 2, 3, 0).reshape(-1)
    assert torch.equal(t[0, 1], manual)
    assert torch.equal(unpatchify(t, (4, 4, 2), (2, 3, 2), 3), x)


def test_loss_counts_masked_patches_only():
    mae = _mae(norm_pix_loss=True)
    x = torch.randn(2, 1, 32, 32, 32)
    target = patchify(x, mae.patch)
    target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
    mask = torch.zeros(2, 8)
    mask[:, :6] = 1
    pred = target.clone()
    pred[:, 6:] += 5.0  # wrong only on visible patches: no loss
    assert mae.loss(x, pred, mask).item() == pytest.approx(0.0, abs=1e-10)
    pred = target.clone()
    pred[:, :6] += 2.0  # off by 2 on every voxel of every masked patch: MSE 4
    assert mae.loss(x, pred, mask).item() == pytest.approx(4.0, rel=1e-5)


def test_encoder_sees_only_visible_tokens_and_backward_works():
    mae = _mae(mask_ratio=0.75)
    seen = []
    mae.encoder.blocks[0].register_forward_hook(lambda m, i, o: seen.append(o.shape))
    x = torch.randn(2, 1, 32, 32, 32)
    out = mae(x, generator=torch.Generator().manual_seed(0))
    L = 8
    assert seen[0][1] == mae.encoder.num_prefix_tokens + 2  # 8 tokens, 75% masked -> 2 visible
    assert out["pred"].shape == (2, L, 16**3) and out["mask"].sum().item() == 2 * 6
    out["loss"].backward()
    assert torch.isfinite(out["loss"])
    assert all(p.grad is not None for n, p in mae.named_parameters() if p.requires_grad)


def test_block_masking_and_bad_inputs():
    mae = _mae(masking="block", mask_block=1)
    assert torch.isfinite(mae(torch.randn(1, 1, 32, 32, 32))["loss"])
    with pytest.raises(ValueError, match="expected"):
        mae(torch.randn(1, 2, 32, 32, 32))
    enc = create_model("vit3d_test_p16", img_size=32)
    with pytest.raises(ValueError, match="masking"):
        MAE3D(enc, masking="grid")
    with pytest.raises(ValueError, match="divisible"):
        MAE3D(enc, decoder_dim=30, decoder_heads=4)
    with pytest.raises(ValueError, match="lacks"):
        MAE3D(torch.nn.Linear(2, 2))


def test_encoder_weights_load_without_wrapper():
    mae = _mae()
    fresh = create_model("vit3d_test_p16", img_size=32, in_chans=1)
    fresh.load_state_dict(encoder_state_dict(mae), strict=True)
    x = torch.randn(1, 1, 32, 32, 32)
    mae.eval()
    fresh.eval()
    assert torch.allclose(fresh.forward_features(x), mae.encoder.forward_features(x))


def test_reconstruction_learns_a_volume():
    mae = _mae(mask_ratio=0.5, norm_pix_loss=False)
    g = torch.Generator().manual_seed(0)
    zz, yy, xx = torch.meshgrid(*(torch.linspace(-1, 1, 32),) * 3, indexing="ij")
    x = (torch.sin(3 * xx) * torch.cos(2 * yy) + zz).reshape(1, 1, 32, 32, 32)
    opt = torch.optim.AdamW(mae.parameters(), lr=2e-3)
    losses = []
    for _ in range(40):
        loss = mae(x, generator=g)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5
    rec = mae.reconstruct(x, generator=g)
    assert rec["reconstruction"].shape == x.shape


def test_flops_counted():
    mae = _mae()
    flops = mae_flops_per_sample(mae, (32, 32, 32))
    n_enc = sum(p.numel() for p in mae.encoder.blocks.parameters())
    # at least the encoder blocks' matmuls on the 2 visible tokens (+cls), forward and backward
    assert flops > 3 * 2 * n_enc * 2


def test_patch4_block_masking_and_flat_baseline():
    from umit.models import create_model
    from umit.ssl.mae import MAE3D, patchify

    torch.manual_seed(0)
    enc = create_model("vit3d_test_p4", img_size=(16, 16, 16), in_chans=1)
    assert enc.patch_size == (4, 4, 4) and enc.grid_size((16, 16, 16)) == (4, 4, 4)
    x = torch.randn(2, 1, 16, 16, 16)
    mae = MAE3D(enc, decoder_dim=16, decoder_depth=1, decoder_heads=2, masking="block")
    out = mae(x)
    # norm_pix_loss (unbiased variance): predicting each patch's mean (0) scores (n - 1) / n
    assert float(out["flat_loss"]) == pytest.approx(63 / 64, abs=1e-4)
    raw = MAE3D(enc, decoder_dim=16, decoder_depth=1, decoder_heads=2, norm_pix_loss=False)
    m = raw.draw_mask(2, (4, 4, 4), "cpu", torch.Generator().manual_seed(0))
    target = patchify(x, raw.patch)
    flat_pred = target.mean(-1, keepdim=True).expand_as(target)
    assert float(raw.flat_loss(x, m.mask)) == pytest.approx(float(raw.loss(x, flat_pred, m.mask)))
