"""The speed paths the benchmarks credit compute what the plain path computes."""

from __future__ import annotations

import torch

from umit.models import ViT3D
from umit.models.layers import PatchEmbed3d


def test_kept_patch_gemm_equals_conv_then_gather():
    torch.manual_seed(0)
    pe = PatchEmbed3d(img_size=(32, 48, 32), patch_size=(16, 16, 8), in_chans=2, embed_dim=24)
    x = torch.randn(3, 2, 32, 48, 32)
    keep = torch.stack([torch.randperm(24)[:6] for _ in range(3)])  # any order, per sample
    full = pe(x)  # (B, L, C) through the convolution
    expect = torch.gather(full, 1, keep.unsqueeze(-1).expand(-1, -1, 24))
    got = pe(x, keep)
    torch.testing.assert_close(got, expect, atol=1e-5, rtol=1e-5)
    # gradients of the weights: the GEMM path sees exactly the kept patches
    g = torch.randn_like(got)
    (gw_gemm, gb_gemm) = torch.autograd.grad((pe(x, keep) * g).sum(), pe.proj.parameters())
    sel = torch.zeros_like(full).scatter(1, keep.unsqueeze(-1).expand(-1, -1, 24), g)
    (gw_conv, gb_conv) = torch.autograd.grad((pe(x) * sel).sum(), pe.proj.parameters())
    torch.testing.assert_close(gw_gemm, gw_conv, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(gb_gemm, gb_conv, atol=1e-5, rtol=1e-5)


def test_vit_visible_tokens_equal_full_embedding():
    torch.manual_seed(0)
    vit = ViT3D(img_size=32, patch_size=8, embed_dim=48, depth=1, num_heads=3).eval()
    x = torch.randn(2, 1, 32, 32, 32)
    keep = torch.sort(torch.stack([torch.randperm(64)[:16] for _ in range(2)]), dim=1).values
    with torch.no_grad():
        tokens = vit._embed(x)[:, 1:]  # (B, L, C) all patches + positions, cls dropped
        kept = vit._embed(x, keep)[:, 1:]
    expect = torch.gather(tokens, 1, keep.unsqueeze(-1).expand(-1, -1, 48))
    torch.testing.assert_close(kept, expect, atol=1e-5, rtol=1e-5)
