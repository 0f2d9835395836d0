"""SwinTransformer3D: window partition, shifted-window mask, window attention, feature API."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from umit.models import SwinTransformer3D
from umit.models.swin3d import (
    MASK_VALUE,
    PatchMerging3D,
    WindowAttention3D,
    compute_shift_mask,
    effective_window,
    window_partition,
    window_reverse,
)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def tiny(**kw) -> SwinTransformer3D:
    args = dict(
        img_size=32, in_chans=2, embed_dim=12, depths=(2, 2), num_heads=(3, 6), window_size=4
    )
    return SwinTransformer3D(**{**args, **kw})


# ---------------------------------------------------------------------- windows and masks
def test_window_partition_reverse_round_trip():
    x = torch.randn(2, 6, 4, 9, 5)
    w = (3, 2, 3)
    win = window_partition(x, w)
    assert win.shape == (2 * 2 * 2 * 3, 18, 5)
    # window 1 of sample 0 is the block at (d 0:3, h 0:2, w 3:6), raster order inside
    torch.testing.assert_close(win[1], x[0, 0:3, 0:2, 3:6].reshape(18, 5))
    assert torch.equal(window_reverse(win, w, (2, 6, 4, 9)), x)


def test_effective_window():
    assert effective_window((8, 3, 7), (4, 4, 7), (2, 2, 3)) == ((4, 3, 7), (2, 0, 0))


def _brute_force_mask(padded, window, shift):
    """Tokens of a rolled window may attend iff they were true neighbours before the roll."""
    rolled = torch.stack(
        torch.meshgrid(*[torch.arange(p) for p in padded], indexing="ij"), dim=-1
    )  # (D, H, W, 3) rolled coordinates
    orig = (rolled + torch.tensor(shift)) % torch.tensor(padded)  # where each token came from
    r_win = window_partition(rolled[None].float(), window)  # (nW, N, 3)
    o_win = window_partition(orig[None].float(), window)
    same = (r_win[:, :, None] - r_win[:, None]).abs() == (o_win[:, :, None] - o_win[:, None]).abs()
    allowed = same.all(-1)  # (nW, N, N)
    return torch.where(allowed, 0.0, MASK_VALUE)


@pytest.mark.parametrize(
    ("padded", "window", "shift"),
    [
        ((8, 8, 8), (4, 4, 4), (2, 2, 2)),
        ((6, 9, 4), (3, 3, 4), (1, 1, 0)),
        ((4, 6, 6), (2, 3, 3), (1, 1, 1)),
    ],
)
def test_shift_mask_matches_brute_force(padded, window, shift):
    mask = compute_shift_mask(padded, window, shift)
    ref = _brute_force_mask(padded, window, shift)
    assert mask.shape == ref.shape
    assert torch.equal(mask, ref)


def test_window_attention_matches_naive_with_bias_and_mask():
    attn = WindowAttention3D(12, num_heads=3, window_size=(2, 2, 2)).eval()
    torch.nn.init.normal_(attn.relative_position_bias_table)
    B, nW, N = 2, 8, 8
    x = torch.randn(B * nW, N, 12)
    mask = compute_shift_mask((4, 4, 4), (2, 2, 2), (1, 1, 1))  # (nW, N, N)

    q, k, v = attn.qkv(x).reshape(B * nW, N, 3, 3, 4).permute(2, 0, 3, 1, 4)
    logits = q @ k.transpose(-2, -1) / math.sqrt(4) + attn.relative_position_bias(N)
    for masked in (False, True):
        lg = logits + mask.repeat(B, 1, 1).unsqueeze(1) if masked else logits
        ref = attn.proj((lg.softmax(-1) @ v).transpose(1, 2).reshape(B * nW, N, 12))
        out = attn(x, mask if masked else None)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    # the relative-position table is indexed by coordinate differences
    idx = attn.relative_position_index
    assert idx.shape == (8, 8) and idx.diagonal().unique().numel() == 1
    assert idx.max() == 3 * 3 * 3 - 1


def test_patch_merging_groups_2x2x2_neighbours():
    pm = PatchMerging3D(2)
    torch.nn.init.normal_(pm.reduction.weight)
    x = torch.randn(1, 4, 4, 3, 2)  # odd W is padded
    out = pm(x)
    assert out.shape == (1, 2, 2, 2, 4)
    xp = torch.nn.functional.pad(x, (0, 0, 0, 1))
    offs = itertools.product(range(2), repeat=3)
    cat = torch.cat([xp[:, a::2, b::2, c::2] for a, b, c in offs], dim=-1)
    torch.testing.assert_close(out, pm.reduction(pm.norm(cat)))


# ---------------------------------------------------------------------- model
def test_forward_shapes_feature_info_and_backward():
    m = tiny(num_classes=3)
    x = torch.randn(2, 2, 16, 24, 16)
    feats = m.forward_intermediates(x)
    assert [tuple(f.shape[1:]) for f in feats] == [(12, 8, 12, 8), (24, 4, 6, 4), (48, 2, 3, 2)]
    assert [f["num_chs"] for f in m.feature_info] == [12, 24, 48]
    assert [f["reduction"] for f in m.feature_info] == [(2, 2, 2), (4, 4, 4), (8, 8, 8)]
    tokens = m.forward_features(x)
    assert tokens.shape == (2, 12, 48) and m.grid_size((16, 24, 16)) == (2, 3, 2)
    # parameter-free layer norm on the way out
    torch.testing.assert_close(tokens.mean(-1), torch.zeros(2, 12), atol=1e-5, rtol=0)
    logits = m(x)
    assert logits.shape == (2, 3) and torch.isfinite(logits).all()
    logits.sum().backward()
    assert all(p.grad is not None for p in m.parameters())


def test_odd_input_sizes_and_padding():
    m = tiny(window_size=(3, 4, 5)).eval()
    x = torch.randn(1, 2, 21, 18, 30)
    feats = m.forward_intermediates(x, output_fmt="NLC")
    grids = m.feature_grid_sizes((21, 18, 30))
    assert grids == [(11, 9, 15), (6, 5, 8), (3, 3, 4)]
    assert [f.shape[1] for f in feats] == [math.prod(g) for g in grids]
    assert all(torch.isfinite(f).all() for f in feats)


def test_forward_intermediates_selection_and_norm():
    m = tiny().eval()
    x = torch.randn(1, 2, 16, 24, 16)
    allf = m.forward_intermediates(x)
    torch.testing.assert_close(m.forward_intermediates(x, indices=[-1, 0])[1], allf[0])
    torch.testing.assert_close(m.forward_intermediates(x, indices=1)[0], allf[-1])
    normed = m.forward_intermediates(x, indices=[2], norm=True)[0]
    ref = torch.nn.functional.layer_norm(allf[2].permute(0, 2, 3, 4, 1), (48,))
    torch.testing.assert_close(normed, ref.permute(0, 4, 1, 2, 3))
    final, _ = m.forward_intermediates(x, indices=[0], intermediates_only=False)
    torch.testing.assert_close(final, m.forward_features(x))
    with pytest.raises(ValueError, match="index 3 out of range"):
        m.forward_intermediates(x, indices=[3])


def test_grad_checkpointing_same_gradients():
    m = tiny()
    x = torch.randn(1, 2, 16, 24, 16)
    m.forward_features(x).square().mean().backward()
    ref = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    m.set_grad_checkpointing(True)
    m.forward_features(x).square().mean().backward()
    for n, p in m.named_parameters():
        torch.testing.assert_close(p.grad, ref[n], atol=1e-6, rtol=1e-5, msg=n)


def test_api_metadata_and_rejects_keep_indices():
    m = tiny()
    assert m.patch_size == (2, 2, 2) and m.num_prefix_tokens == 0 and m.num_features == 48
    nwd = m.no_weight_decay()
    assert len(nwd) == 4 and all(n.endswith("relative_position_bias_table") for n in nwd)
    assert "stages.0.blocks.0.attn.relative_position_index" not in m.state_dict()
    with pytest.raises(ValueError, match="keep_indices"):
        m.forward_features(torch.randn(1, 2, 16, 16, 16), torch.arange(4)[None])
    m.reset_classifier(5)
    assert m(torch.randn(1, 2, 16, 16, 16)).shape == (1, 5)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_heads": (5, 6)}, r"stage 0 width 12 is not divisible by num_heads\[0\]=5"),
        ({"num_heads": (3,)}, r"num_heads=\(3,\) needs one entry per stage"),
        ({"depths": (2, 0)}, r"depths must be non-empty positive ints, got \(2, 0\)"),
        ({"window_size": (4, 4)}, r"window_size must be an int or 3 ints, got \(4, 4\)"),
        ({"global_pool": "token"}, "global_pool must be 'avg' or '', got 'token'"),
        ({"attn_drop_rate": -0.1}, "attn_drop_rate must be in"),
        ({"embed_dim": 0}, "embed_dim must be positive, got 0"),
    ],
)
def test_bad_args_raise_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny(**kwargs)
