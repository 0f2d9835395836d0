"""Numeric tests of the shared layers: patch embedding, SDPA attention, MLP, DropPath, pos embed."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from umit.models.layers import (
    Attention,
    DropPath,
    Mlp,
    PatchEmbed3d,
    build_sincos_pos_embed_3d,
    drop_path,
    resample_pos_embed_3d,
    to_3tuple,
)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ---------------------------------------------------------------------- helpers / patch embed
def test_to_3tuple():
    assert to_3tuple(4, "x") == (4, 4, 4)
    assert to_3tuple((2, 3, 4), "x") == (2, 3, 4)
    for bad in [(2, 3), (0, 1, 1), -1, "abc", (2.5, 2, 2)]:
        with pytest.raises(ValueError, match="patch_size"):
            to_3tuple(bad, "patch_size")


def test_patch_embed_is_per_patch_linear_any_patch_and_channels():
    pe = PatchEmbed3d(img_size=(8, 12, 6), patch_size=(4, 3, 2), in_chans=3, embed_dim=10)
    x = torch.randn(2, 3, 8, 12, 6)
    out = pe(x)
    assert out.shape == (2, 2 * 4 * 3, 10)
    assert pe.grid_size((8, 12, 6)) == (2, 4, 3)
    # reference: cut patches by hand in (d, h, w) raster order and apply the conv as a Linear
    # (B, C, D, H, W) -> (B, C, d, pd, h, ph, w, pw) -> (B, d, h, w, C, pd, ph, pw) -> (B, L, C·p³)
    patches = x.view(2, 3, 2, 4, 4, 3, 3, 2).permute(0, 2, 4, 6, 1, 3, 5, 7).reshape(2, 24, -1)
    ref = patches @ pe.proj.weight.reshape(10, -1).T + pe.proj.bias
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_patch_embed_formats_and_padding():
    pe = PatchEmbed3d(
        img_size=8, patch_size=4, in_chans=1, embed_dim=6, output_fmt="NDHWC", pad=True
    )
    out = pe(torch.randn(1, 1, 9, 8, 5))  # padded to 12, 8, 8
    assert out.shape == (1, 3, 2, 2, 6)
    pe_c = PatchEmbed3d(img_size=8, patch_size=4, embed_dim=6, output_fmt="NCDHW")
    pe_c.load_state_dict(pe.state_dict())
    x = torch.randn(1, 1, 8, 8, 8)
    torch.testing.assert_close(pe_c(x), pe(x).permute(0, 4, 1, 2, 3))


def test_patch_embed_rejects_bad_sizes():
    with pytest.raises(ValueError, match=r"img_size=\(30, 32, 32\)"):
        PatchEmbed3d(img_size=(30, 32, 32), patch_size=16)
    with pytest.raises(ValueError, match="in_chans must be positive, got 0"):
        PatchEmbed3d(img_size=32, patch_size=16, in_chans=0)
    with pytest.raises(ValueError, match="output_fmt"):
        PatchEmbed3d(img_size=32, patch_size=16, output_fmt="NHWC")
    pe = PatchEmbed3d(img_size=32, patch_size=16, in_chans=1, embed_dim=8)
    with pytest.raises(ValueError, match=r"\(32, 40, 32\) is not divisible"):
        pe(torch.randn(1, 1, 32, 40, 32))
    with pytest.raises(ValueError, match=r"got shape \(1, 2, 32, 32, 32\)"):
        pe(torch.randn(1, 2, 32, 32, 32))


# ---------------------------------------------------------------------- attention
def _naive_attention(attn: Attention, x: torch.Tensor, mask: torch.Tensor | None = None):
    B, L, C = x.shape
    q, k, v = attn.qkv(x).reshape(B, L, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    logits = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if mask is not None:
        logits = logits + mask
    out = logits.softmax(-1) @ v  # (B, heads, L, hd)
    return attn.proj(out.transpose(1, 2).reshape(B, L, C))


@pytest.mark.parametrize("qkv_bias", [True, False])
def test_attention_matches_naive_softmax(qkv_bias):
    attn = Attention(24, num_heads=4, qkv_bias=qkv_bias).eval()
    x = torch.randn(2, 17, 24)
    torch.testing.assert_close(attn(x), _naive_attention(attn, x), atol=1e-5, rtol=0)
    mask = torch.randn(1, 4, 17, 17)
    torch.testing.assert_close(attn(x, mask), _naive_attention(attn, x, mask), atol=1e-5, rtol=0)
    assert (attn.qkv.bias is not None) == qkv_bias


def test_attention_args_and_dropout():
    with pytest.raises(ValueError, match="dim=10 must be divisible by num_heads=3"):
        Attention(10, num_heads=3)
    with pytest.raises(ValueError, match="attn_drop must be in \\[0, 1\\), got 1.5"):
        Attention(12, num_heads=3, attn_drop=1.5)
    attn = Attention(12, num_heads=3, attn_drop=0.5)
    x = torch.randn(2, 5, 12)
    assert not torch.allclose(attn.train()(x), attn.eval()(x))  # dropout active only in train
    torch.testing.assert_close(attn.eval()(x), attn.eval()(x))


# ---------------------------------------------------------------------- mlp / drop path
def test_mlp():
    mlp = Mlp(8, 32)
    x = torch.randn(3, 5, 8)
    ref = mlp.fc2(F.gelu(mlp.fc1(x)))
    torch.testing.assert_close(mlp(x), ref)
    with pytest.raises(ValueError, match="drop must be in"):
        Mlp(8, drop=-0.1)


def test_drop_path():
    x = torch.ones(4000, 3, 2)
    assert drop_path(x, 0.3, training=False) is x
    dp = DropPath(0.25).train()
    y = dp(x)
    per_sample = y.flatten(1)
    # each sample is either dropped entirely or scaled by 1/keep
    values = per_sample.unique()
    assert len(values) == 2
    torch.testing.assert_close(values, torch.tensor([0.0, 1 / 0.75]))
    assert (per_sample == per_sample[:, :1]).all()
    assert abs(y.mean().item() - 1.0) < 0.05  # unbiased in expectation
    assert torch.equal(dp.eval()(x), x)
    with pytest.raises(ValueError, match="drop_prob must be in \\[0, 1\\), got 1.0"):
        DropPath(1.0)


# ---------------------------------------------------------------------- position embeddings
def test_sincos_layout_and_zero_tail():
    grid = (2, 3, 4)
    pe = build_sincos_pos_embed_3d(grid, 12)  # F = 2 frequencies per axis
    assert pe.shape == (1, 24, 12)
    d, h, w = torch.meshgrid(*[torch.arange(g).float() for g in grid], indexing="ij")
    omega = 1.0 / 10000.0 ** (torch.arange(2).float() / 2)
    for block, coord in enumerate([h, d, w]):  # MONAI order: axis 1, axis 0, axis 2
        ang = coord.flatten()[:, None] * omega
        torch.testing.assert_close(pe[0, :, 4 * block : 4 * block + 2], ang.sin())
        torch.testing.assert_close(pe[0, :, 4 * block + 2 : 4 * block + 4], ang.cos())
    pe16 = build_sincos_pos_embed_3d(grid, 16)  # 16 % 6 = 4 trailing zeros
    assert torch.equal(pe16[..., 12:], torch.zeros(1, 24, 4))
    with pytest.raises(ValueError, match="embed_dim must be >= 6"):
        build_sincos_pos_embed_3d(grid, 4)


@pytest.mark.filterwarnings("ignore:torch.meshgrid")
def test_sincos_equals_monai():
    pytest.importorskip("monai")
    from monai.networks.blocks.pos_embed_utils import build_sincos_position_embedding

    for grid, dim in [((2, 3, 4), 48), ((6, 6, 6), 768), ((3, 5, 2), 36)]:
        ref = build_sincos_position_embedding(list(grid), dim, 3).data
        assert torch.equal(build_sincos_pos_embed_3d(grid, dim), ref)


def test_resample_identity_and_sincos_round_trip():
    grid = (4, 6, 2)
    pe = build_sincos_pos_embed_3d(grid, 48)
    # interpolating to the original grid gives back exactly the freshly computed table
    assert torch.equal(resample_pos_embed_3d(pe, grid, grid), build_sincos_pos_embed_3d(grid, 48))
    # up then down by 2 reproduces the smooth low-frequency channels closely
    up = resample_pos_embed_3d(pe, grid, (8, 12, 4))
    assert up.shape == (1, 8 * 12 * 4, 48)
    back = resample_pos_embed_3d(up, (8, 12, 4), grid)
    low = [c for b in range(3) for c in range(16 * b + 4, 16 * b + 8)] + [
        c for b in range(3) for c in range(16 * b + 12, 16 * b + 16)
    ]  # the lowest 4 frequencies of each axis block
    torch.testing.assert_close(back[..., low], pe[..., low], atol=5e-3, rtol=0)


def test_resample_keeps_axes_apart():
    """A table whose channels are the (d, h, w) coordinates resamples to the mapped coordinates."""
    old, new = (4, 6, 8), (8, 3, 8)
    coords = torch.stack(torch.meshgrid(*[torch.arange(g).float() for g in old], indexing="ij"))
    pe = coords.flatten(1).T.unsqueeze(0)  # (3, d, h, w) -> (1, L, 3)
    out = resample_pos_embed_3d(pe, old, new)
    for axis, (o, n) in enumerate(zip(old, new, strict=True)):
        # align_corners=False source coordinate of target index j, clamped at the borders
        src = ((torch.arange(n).float() + 0.5) * o / n - 0.5).clamp(0, o - 1)
        shape = [1, 1, 1]
        shape[axis] = n
        expect = src.view(shape).expand(*new).flatten()
        torch.testing.assert_close(out[0, :, axis], expect, atol=1e-5, rtol=0)


def test_resample_rejects_bad_grid():
    with pytest.raises(ValueError, match="does not match grid"):
        resample_pos_embed_3d(torch.zeros(1, 10, 6), (2, 2, 2), (4, 4, 4))
