"""ViT3D: shapes, keep_indices (MAE), position-embedding resampling, feature API, checkpointing."""

from __future__ import annotations

import pytest
import torch

from umit.models import ViT3D
from umit.models.layers import resample_pos_embed_3d


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def tiny(**kw) -> ViT3D:
    args = dict(img_size=32, patch_size=8, in_chans=2, embed_dim=24, depth=3, num_heads=3)
    return ViT3D(**{**args, **kw})


def test_forward_shapes_and_backward():
    m = tiny(num_classes=5)
    x = torch.randn(2, 2, 32, 32, 32)
    tokens = m.forward_features(x)
    assert tokens.shape == (2, 1 + 64, 24)
    logits = m(x)
    assert logits.shape == (2, 5) and torch.isfinite(logits).all()
    logits.sum().backward()
    assert all(p.grad is not None for p in m.parameters() if p.requires_grad)
    assert m.forward_head(tokens, pre_logits=True).shape == (2, 24)


def test_anisotropic_patch_and_no_class_token():
    m = tiny(img_size=(32, 24, 16), patch_size=(8, 8, 4), class_token=False, pos_embed="sincos")
    assert m.global_pool == "avg" and m.num_prefix_tokens == 0
    assert m.grid_size((32, 24, 16)) == (4, 3, 4)
    out = m.forward_features(torch.randn(1, 2, 32, 24, 16))
    assert out.shape == (1, 48, 24)
    assert "pos_embed" not in dict(m.named_parameters())  # sincos is a fixed buffer
    assert "pos_embed" in m.state_dict()


def test_keep_indices_all_equals_full_and_manual_gather():
    m = tiny().eval()
    x = torch.randn(2, 2, 32, 32, 32)
    full = m.forward_features(x)
    keep_all = torch.arange(64).expand(2, -1)
    torch.testing.assert_close(m.forward_features(x, keep_all), full)

    keep = torch.stack([torch.randperm(64)[:16] for _ in range(2)])  # (B, L_keep)
    out = m.forward_features(x, keep)
    assert out.shape == (2, 1 + 16, 24)
    # reference: embed, add positions, gather by hand, run the blocks
    tokens = m.patch_embed(x) + m.pos_embed  # (B, L, C)
    tokens = torch.stack([tokens[b, keep[b]] for b in range(2)])
    tokens = torch.cat([m.cls_token.expand(2, -1, -1), tokens], dim=1)
    for blk in m.blocks:
        tokens = blk(tokens)
    torch.testing.assert_close(out, m.norm(tokens))


def test_keep_indices_validation():
    m = tiny()
    x = torch.randn(2, 2, 32, 32, 32)
    with pytest.raises(
        ValueError, match=r"keep_indices must be \(B=2, L_keep\), got shape \(16,\)"
    ):
        m.forward_features(x, torch.arange(16))
    with pytest.raises(ValueError, match="int64"):
        m.forward_features(x, torch.zeros(2, 4, dtype=torch.int32))


@pytest.mark.parametrize("pos_embed", ["learn", "sincos"])
def test_runs_at_other_input_size_with_resampled_pos_embed(pos_embed):
    m = tiny(pos_embed=pos_embed, num_classes=3).eval()
    x = torch.randn(1, 2, 48, 48, 32)
    out = m.forward_features(x)
    assert out.shape == (1, 1 + 6 * 6 * 4, 24) and torch.isfinite(out).all()
    # equals running with the table resampled by hand
    table = resample_pos_embed_3d(m.pos_embed, (4, 4, 4), (6, 6, 4))
    assert torch.equal(m.pos_embed_for_grid((6, 6, 4)), table)
    # the resampled table is cached per grid (no grad needed here) ...
    with torch.no_grad():
        first = m.pos_embed_for_grid((6, 6, 4))
        assert m.pos_embed_for_grid((6, 6, 4)) is first
    # ... and refreshed when a learned table changes
    if pos_embed == "learn":
        with torch.no_grad():
            m.pos_embed.add_(1.0)
            assert not torch.equal(m.pos_embed_for_grid((6, 6, 4)), first)


def test_learned_pos_embed_gets_gradient_at_other_size():
    m = tiny()
    m.forward_features(torch.randn(1, 2, 48, 48, 32)).sum().backward()
    assert m.pos_embed.grad is not None and m.pos_embed.grad.abs().sum() > 0


def test_forward_intermediates():
    m = tiny().eval()
    x = torch.randn(2, 2, 32, 32, 32)
    feats = m.forward_intermediates(x)
    assert len(feats) == 3 and all(f.shape == (2, 24, 4, 4, 4) for f in feats)
    last2 = m.forward_intermediates(x, indices=2)
    torch.testing.assert_close(last2[0], feats[1])
    picked = m.forward_intermediates(x, indices=[-1, 0], output_fmt="NLC")
    assert picked[0].shape == (2, 64, 24)
    # NLC tokens and NCDHW maps are the same numbers: (B, L, C) -> (B, C, d, h, w)
    torch.testing.assert_close(picked[0].transpose(1, 2).reshape(2, 24, 4, 4, 4), feats[-1])
    final, normed = m.forward_intermediates(x, indices=[-1], norm=True, intermediates_only=False)
    full = m.forward_features(x)
    torch.testing.assert_close(final, full)
    torch.testing.assert_close(normed[0].flatten(2).transpose(1, 2), full[:, 1:])
    with pytest.raises(ValueError, match="index 3 out of range"):
        m.forward_intermediates(x, indices=[3])
    with pytest.raises(ValueError, match="indices=0"):
        m.forward_intermediates(x, indices=0)
    with pytest.raises(ValueError, match="output_fmt"):
        m.forward_intermediates(x, output_fmt="NHWC")


def test_grad_checkpointing_same_gradients():
    m = tiny(drop_path_rate=0.0)
    x = torch.randn(2, 2, 32, 32, 32)
    m.forward_features(x).square().mean().backward()
    ref = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    m.set_grad_checkpointing(True)
    m.forward_features(x).square().mean().backward()
    for n, p in m.named_parameters():
        torch.testing.assert_close(p.grad, ref[n], atol=1e-6, rtol=1e-5, msg=n)


def test_api_metadata():
    m = tiny(num_classes=4)
    assert m.patch_size == (8, 8, 8) and m.embed_dim == m.num_features == 24
    assert m.no_weight_decay() == {"pos_embed", "cls_token"}
    assert tiny(pos_embed="sincos", class_token=False).no_weight_decay() == set()
    assert m.feature_info[2] == {"num_chs": 24, "reduction": (8, 8, 8), "module": "blocks.2"}
    assert m.init_args["embed_dim"] == 24 and m.init_args["patch_size"] == 8
    assert ViT3D(**m.init_args).state_dict().keys() == m.state_dict().keys()
    m.reset_classifier(0)
    assert m(torch.randn(1, 2, 32, 32, 32)).shape == (1, 24)
    m.reset_classifier(7, global_pool="avg")
    assert m(torch.randn(1, 2, 32, 32, 32)).shape == (1, 7)


def test_stochastic_layers_train_mode():
    m = tiny(drop_rate=0.1, attn_drop_rate=0.1, drop_path_rate=0.2).train()
    out = m.forward_features(torch.randn(2, 2, 32, 32, 32))
    assert torch.isfinite(out).all()
    assert m.blocks[0].drop_path1.__class__.__name__ == "Identity"  # rate 0 for the first block
    assert m.blocks[-1].drop_path1.drop_prob == pytest.approx(0.2)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"embed_dim": 25}, "embed_dim=25 must be divisible by num_heads=3"),
        ({"img_size": (32, 30, 32)}, r"img_size=\(32, 30, 32\)"),
        ({"patch_size": 0}, "patch_size must be positive, got 0"),
        ({"pos_embed": "rope"}, "pos_embed must be 'learn' or 'sincos', got 'rope'"),
        ({"class_token": False, "global_pool": "token"}, "global_pool='token' needs class_token"),
        ({"global_pool": "max"}, "got 'max'"),
        ({"drop_path_rate": 1.2}, "drop_path_rate must be in \\[0, 1\\), got 1.2"),
        ({"depth": 0}, "depth must be positive, got 0"),
        ({"num_classes": -1}, "num_classes must be >= 0, got -1"),
        (
            {"norm_layer": "batchnorm"},
            "norm_layer must be 'layernorm' or a callable, got 'batchnorm'",
        ),
    ],
)
def test_bad_args_raise_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny(**kwargs)


def test_bad_input_size():
    with pytest.raises(ValueError, match=r"\(32, 36, 32\) is not divisible by patch_size"):
        tiny()(torch.randn(1, 2, 32, 36, 32))
