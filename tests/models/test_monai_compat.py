"""Parity with MONAI 1.6: converted ViT / UNETR / SwinUNETR weights give MONAI's features.

MONAI's attention and Swin code call einops; when einops is not installed a tiny shim covering
exactly the patterns MONAI uses is patched in (and checked against einops when it is there).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

monai = pytest.importorskip("monai")

from monai.networks.blocks import patchembedding, selfattention  # noqa: E402
from monai.networks.nets import UNETR, SwinUNETR, ViT, swin_unetr  # noqa: E402

from umit.errors import InputError  # noqa: E402
from umit.models import SwinTransformer3D, ViT3D, load_monai_checkpoint  # noqa: E402
from umit.models.layers import resample_pos_embed_3d  # noqa: E402
from umit.models.monai_compat import (  # noqa: E402
    convert_monai_vit_state_dict,
    swin3d_args_from_monai,
    vit3d_args_from_monai,
)
from umit.models.swin3d import compute_shift_mask  # noqa: E402
from umit.train.checkpoint import load_monai_weights  # noqa: E402

TOL = 1e-5


# ---------------------------------------------------------------------- einops shim
def _rearrange(x: torch.Tensor, pattern: str, **axes: int) -> torch.Tensor:
    if pattern in ("b c d h w -> b d h w c", "n c d h w -> n d h w c"):
        return x.permute(0, 2, 3, 4, 1)
    if pattern in ("b d h w c -> b c d h w", "n d h w c -> n c d h w"):
        return x.permute(0, 4, 1, 2, 3)
    if pattern == "b h (qkv l d) -> qkv b l h d":
        b, h, _ = x.shape
        return x.reshape(b, h, axes["qkv"], axes["l"], -1).permute(2, 0, 3, 1, 4)
    if pattern == "b l h d -> b h (l d)":
        b, heads, h, d = x.shape
        return x.permute(0, 2, 1, 3).reshape(b, h, heads * d)
    if pattern == "b c (h p1) (w p2) (d p3) -> b (h w d) (p1 p2 p3 c)":
        p1, p2, p3 = axes["p1"], axes["p2"], axes["p3"]
        b, c, H, W, D = x.shape
        x = x.reshape(b, c, H // p1, p1, W // p2, p2, D // p3, p3).permute(0, 2, 4, 6, 3, 5, 7, 1)
        return x.reshape(b, (H // p1) * (W // p2) * (D // p3), p1 * p2 * p3 * c)
    raise NotImplementedError(f"einops shim: unexpected pattern {pattern!r}")


class _Rearrange(nn.Module):
    def __init__(self, pattern: str, **axes: int):
        super().__init__()
        self.pattern, self.axes = pattern, axes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _rearrange(x, self.pattern, **self.axes)


@pytest.fixture(autouse=True)
def _monai_env(monkeypatch):
    torch.manual_seed(0)
    try:
        import einops  # noqa: F401
    except ImportError:
        monkeypatch.setattr(selfattention, "Rearrange", _Rearrange)
        monkeypatch.setattr(patchembedding, "Rearrange", _Rearrange)
        monkeypatch.setattr(swin_unetr, "rearrange", _rearrange)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI's meshgrid / deprecation chatter
        yield


def test_einops_shim_matches_einops():
    einops = pytest.importorskip("einops")
    cases = [
        ((2, 3, 4, 5, 6), "b c d h w -> b d h w c", {}),
        ((2, 4, 5, 6, 3), "n d h w c -> n c d h w", {}),
        ((2, 7, 24), "b h (qkv l d) -> qkv b l h d", {"qkv": 3, "l": 2}),
        ((2, 3, 7, 4), "b l h d -> b h (l d)", {}),
        (
            (2, 2, 8, 4, 6),
            "b c (h p1) (w p2) (d p3) -> b (h w d) (p1 p2 p3 c)",
            {"p1": 4, "p2": 2, "p3": 3},
        ),
    ]
    for shape, pattern, axes in cases:
        x = torch.randn(shape)
        assert torch.equal(_rearrange(x, pattern, **axes), einops.rearrange(x, pattern, **axes))


# ---------------------------------------------------------------------- helpers
@torch.no_grad()
def randomize(model: nn.Module) -> nn.Module:
    """Moves every parameter off its init (LayerNorm weights included) so no mapping hides."""
    for p in model.parameters():
        p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# ---------------------------------------------------------------------- ViT / UNETR
@pytest.mark.parametrize(
    ("classification", "pos_embed_type", "qkv_bias", "proj_type", "dtype"),
    [
        (False, "learnable", False, "conv", torch.float32),
        (True, "sincos", True, "conv", torch.float32),
        # the Linear -> Conv3d reshuffle is exact; in float32 only the GEMM vs conv rounding
        # (~5e-6 relative over 4096-long dot products) differs, so check it in float64
        (False, "learnable", True, "perceptron", torch.float64),
    ],
)
def test_vit_parity(classification, pos_embed_type, qkv_bias, proj_type, dtype):
    args = dict(
        in_channels=2, img_size=(32, 48, 32), patch_size=(16, 16, 8), hidden_size=48, mlp_dim=100,
        num_layers=3, num_heads=3, classification=classification, num_classes=4,
        pos_embed_type=pos_embed_type, qkv_bias=qkv_bias, proj_type=proj_type,
    )  # fmt: skip
    ref = randomize(ViT(**args))
    ours = ViT3D(**vit3d_args_from_monai(**args)).eval()
    result = load_monai_checkpoint(ours, ref.state_dict())
    assert result.missing_keys == result.unexpected_keys == []
    ref, ours = ref.to(dtype), ours.to(dtype)
    x = torch.randn(2, 2, 32, 48, 32, dtype=dtype)
    with torch.no_grad():
        out, hidden = ref(x)
        tokens = ours.forward_features(x)
        inter = ours.forward_intermediates(x, output_fmt="NLC")
        maps = ours.forward_intermediates(x, indices=[0])
    if classification:  # MONAI returns tanh(head(cls)) after the final norm
        assert max_diff(out, torch.tanh(ours.forward_head(tokens))) < TOL
    else:
        assert out.shape == tokens.shape and max_diff(out, tokens) < TOL
    assert len(hidden) == len(inter) == 3
    for h, o in zip(hidden, inter, strict=True):  # hidden_states_out: before the final norm
        assert max_diff(h[:, int(classification) :], o) < TOL
    # UNETR's proj_feat: (B, L, C) -> (B, d, h, w, C) -> (B, C, d, h, w)
    proj = hidden[0][:, int(classification) :].reshape(2, 2, 3, 4, 48).permute(0, 4, 1, 2, 3)
    assert max_diff(proj, maps[0]) < TOL


def test_unetr_checkpoint_file_with_prefix(tmp_path):
    unetr = randomize(UNETR(in_channels=1, out_channels=3, img_size=32, feature_size=8,
                            hidden_size=48, mlp_dim=96, num_heads=3))  # fmt: skip
    path = tmp_path / "unetr.pt"
    state = {f"module.{k}": v for k, v in unetr.state_dict().items()}  # DDP-saved
    torch.save({"state_dict": state, "epoch": 7}, path)
    ours = ViT3D(**vit3d_args_from_monai(1, 32, 16, hidden_size=48, mlp_dim=96, num_heads=3)).eval()
    result = load_monai_weights(ours, path)
    assert result.dropped_keys and all(not k.startswith("module.vit.") for k in result.dropped_keys)
    assert any(k.startswith("module.decoder") for k in result.dropped_keys)
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        out, hidden = unetr.vit(x)
        assert max_diff(out, ours.forward_features(x)) < TOL
        for h, o in zip(hidden, ours.forward_intermediates(x, output_fmt="NLC"), strict=True):
            assert max_diff(h, o) < TOL


def test_vit_split_qkv_and_cross_attn_keys():
    ref = randomize(
        ViT(1, 32, 16, hidden_size=24, mlp_dim=48, num_layers=2, num_heads=2, qkv_bias=True)
    )
    sd = dict(ref.state_dict())
    assert "blocks.0.norm_cross_attn.weight" in sd  # always built by MONAI, dropped by us
    for i in range(2):  # an old-style (use_combined_linear=False) checkpoint
        for part in ("weight", "bias"):
            q, k, v = sd.pop(f"blocks.{i}.attn.qkv.{part}").chunk(3)
            sd.update({f"blocks.{i}.attn.to_q.{part}": q, f"blocks.{i}.attn.to_k.{part}": k,
                       f"blocks.{i}.attn.to_v.{part}": v})  # fmt: skip
    assert (
        convert_monai_vit_state_dict(sd).keys()
        == convert_monai_vit_state_dict(ref.state_dict()).keys()
    )
    for k, v in convert_monai_vit_state_dict(sd).items():
        assert torch.equal(v, convert_monai_vit_state_dict(ref.state_dict())[k]), k


def test_vit_pos_embed_resampled_on_load():
    ref = randomize(ViT(1, 32, 16, hidden_size=24, mlp_dim=48, num_layers=1, num_heads=2))
    sd = ref.state_dict()
    args = vit3d_args_from_monai(
        1, (48, 48, 32), 16, hidden_size=24, mlp_dim=48, num_layers=1, num_heads=2
    )
    ours = ViT3D(**args)
    load_monai_checkpoint(ours, sd)  # 8 tokens: a 2x2x2 cube is inferred
    expect = resample_pos_embed_3d(sd["patch_embedding.position_embeddings"], (2, 2, 2), (3, 3, 2))
    assert torch.equal(ours.pos_embed.data, expect)
    flat = ViT(1, (64, 32, 32), 16, hidden_size=24, mlp_dim=48, num_layers=1, num_heads=2)
    with pytest.raises(ValueError, match="pass source_grid"):
        load_monai_checkpoint(ours, flat.state_dict())
    load_monai_checkpoint(ours, flat.state_dict(), source_grid=(4, 2, 2))


def test_strict_loading_reports_mismatches():
    ref = ViT(1, 32, 16, hidden_size=24, mlp_dim=48, num_layers=2, num_heads=2, qkv_bias=False)
    args = vit3d_args_from_monai(1, 32, 16, hidden_size=24, mlp_dim=48, num_layers=2, num_heads=2)
    wrong = ViT3D(**{**args, "qkv_bias": True})
    with pytest.raises(ValueError, match=r"missing=\['blocks.0.attn.qkv.bias'"):
        load_monai_checkpoint(wrong, ref.state_dict())
    result = load_monai_checkpoint(wrong, ref.state_dict(), strict=False)
    assert result.missing_keys == ["blocks.0.attn.qkv.bias", "blocks.1.attn.qkv.bias"]
    deeper = ViT3D(**{**args, "depth": 1})
    with pytest.raises(ValueError, match=r"unexpected=\['blocks.1"):
        load_monai_checkpoint(deeper, ref.state_dict())
    wide = ViT3D(**{**args, "embed_dim": 48, "num_heads": 2})
    with pytest.raises(ValueError, match="shape mismatches"):
        load_monai_checkpoint(wide, ref.state_dict(), strict=False)


def test_bad_checkpoints(tmp_path):
    ours = ViT3D(img_size=32, patch_size=16, embed_dim=24, depth=1, num_heads=2)
    with pytest.raises(InputError, match="only local files"):
        load_monai_weights(ours, "https://example.org/w.pt")
    with pytest.raises(InputError, match="missing.pt.*not found"):
        load_monai_weights(ours, tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="load_monai_weights"):
        load_monai_checkpoint(ours, tmp_path / "w.pt")
    with pytest.raises(ValueError, match="no encoder found"):
        load_monai_checkpoint(ours, {"decoder.weight": torch.zeros(2)})
    with pytest.raises(ValueError, match="none of"):
        load_monai_checkpoint(ours, {"epoch": 3, "optimizer": {"lr": 0.1}})
    with pytest.raises(ValueError, match="use_v2=True"):
        swin3d_args_from_monai(1, use_v2=True)
    with pytest.raises(ValueError, match="expected a ViT3D or SwinTransformer3D"):
        load_monai_checkpoint(nn.Linear(2, 2), {"patch_embed.proj.weight": torch.zeros(1)})


# ---------------------------------------------------------------------- SwinUNETR
def test_swin_parity_every_stage():
    args = dict(in_channels=2, out_channels=3, feature_size=12, window_size=7)
    ref = randomize(SwinUNETR(**args))
    ours = SwinTransformer3D(**swin3d_args_from_monai(**args)).eval()
    result = load_monai_checkpoint(ours, ref.state_dict())  # full SwinUNETR: swinViT. prefix
    assert result.missing_keys == [] and any(k.startswith("decoder1") for k in result.dropped_keys)
    # grids (20, 24, 12) -> (10, 12, 6) -> (5, 6, 3) -> ...: padding to the window, a stage that
    # shifts along two axes only, then windows shrunk to the grid (no shift)
    x = torch.randn(1, 2, 40, 48, 24)
    for normalize in (False, True):
        with torch.no_grad():
            expect = ref.swinViT(x, normalize)
            got = ours.forward_intermediates(x, norm=normalize)
        assert [tuple(g.shape) for g in got] == [tuple(e.shape) for e in expect]
        for e, g in zip(expect, got, strict=True):
            assert max_diff(e, g) < TOL


def test_swin_parity_mergingv2_and_patch_norm():
    args = dict(in_channels=1, out_channels=2, feature_size=12, window_size=(4, 4, 4),
                depths=(2, 1, 1, 2), downsample="mergingv2", patch_norm=True)  # fmt: skip
    ref = randomize(SwinUNETR(**args))
    ours = SwinTransformer3D(**swin3d_args_from_monai(**args)).eval()
    load_monai_checkpoint(ours, {"model": ref.swinViT.state_dict()}, downsample="mergingv2")
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        for e, g in zip(
            ref.swinViT(x, True), ours.forward_intermediates(x, norm=True), strict=True
        ):
            assert max_diff(e, g) < TOL


def test_shift_mask_equals_monai():
    for padded, window, shift in [
        ((14, 14, 14), (7, 7, 7), (3, 3, 3)),
        ((8, 6, 4), (4, 3, 4), (2, 1, 0)),
    ]:
        assert torch.equal(compute_shift_mask(padded, window, shift),
                           swin_unetr.compute_mask(list(padded), window, shift, None))  # fmt: skip
