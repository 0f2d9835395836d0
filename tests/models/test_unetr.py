"""UNETR over the feature API, its conv blocks, and parity with MONAI's UNETR."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from umit.models import UNETR, ViT3D, create_model
from umit.models.blocks import (
    Conv3d,
    InstanceNorm3d,
    ResBlock,
    UpBlock,
    conv3d,
    get_norm_layer,
    pointwise_conv3d,
)
from umit.models.monai_compat import vit3d_args_from_monai
from umit.models.unetr import convert_monai_unetr_state_dict, default_skip_indices, unetr_levels

pytestmark = pytest.mark.usefixtures("one_thread")


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def run_train_step(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    out.square().mean().backward()
    assert torch.isfinite(out).all()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    return out


# ---------------------------------------------------------------------- conv blocks
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("bias", [False, True])
def test_fast_conv3d_matches_f_conv3d_with_gradients(stride, bias):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 9, 8, 7, dtype=torch.float64).float().requires_grad_()
    w = (torch.randn(4, 3, 3, 3, 3) * 0.2).requires_grad_()
    b = torch.randn(4, requires_grad=True) if bias else None
    y = conv3d(x, w, b, (stride,) * 3, (1, 1, 1))
    ref = F.conv3d(x, w, b, stride, 1)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(y)
    ins = [t for t in (x, w, b) if t is not None]
    for got, want in zip(
        torch.autograd.grad(y, ins, g), torch.autograd.grad(ref, ins, g), strict=True
    ):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_pointwise_conv_and_conv_module_match_stock_modules():
    torch.manual_seed(0)
    for batch in (1, 3):
        x = torch.randn(batch, 5, 4, 6, 3, requires_grad=True)
        ours = Conv3d(5, 2, 1, bias=True)
        ref = nn.Conv3d(5, 2, 1, bias=True)
        ref.load_state_dict(ours.state_dict())  # same keys
        torch.testing.assert_close(ours(x), ref(x))
        torch.testing.assert_close(pointwise_conv3d(x, ours.weight, ours.bias), ref(x))
        g = torch.randn(batch, 2, 4, 6, 3)
        got = torch.autograd.grad(ours(x), (x, ours.weight, ours.bias), g)
        want = torch.autograd.grad(ref(x), (x, ref.weight, ref.bias), g)
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("affine", [False, True])
def test_instance_norm_equals_torch_instance_norm(affine):
    torch.manual_seed(0)
    ours, ref = InstanceNorm3d(6, affine=affine), nn.InstanceNorm3d(6, affine=affine)
    if affine:
        with torch.no_grad():
            ours.weight.normal_()
            ours.bias.normal_()
        ref.load_state_dict(ours.state_dict())
    x = torch.randn(2, 6, 5, 4, 3) * 3 + 1
    torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("batch", [1, 2])
def test_instance_norm_of_one_voxel_is_refused_as_torch_refuses_it(batch):
    """One spatial element per channel normalises to a constant; torch's layer raises (train
    and eval), and so does ours, at every batch size (group_norm alone passes batch > 1)."""
    x = torch.randn(batch, 6, 1, 1, 1)
    for layer in (nn.InstanceNorm3d(6), nn.InstanceNorm3d(6).eval()):
        with pytest.raises(ValueError, match="spatial element"):
            layer(x)
    for layer in (InstanceNorm3d(6), InstanceNorm3d(6).eval()):
        with pytest.raises(ValueError, match="single voxel per channel.*too small"):
            layer(x)


def test_norm_factory_names_and_errors():
    assert isinstance(get_norm_layer("instance", 8), InstanceNorm3d)
    assert type(get_norm_layer("instance", 8, stock=True)) is nn.InstanceNorm3d
    assert get_norm_layer("instance_affine", 8).affine
    assert get_norm_layer(("group", {"num_groups": 2}), 8).num_groups == 2
    assert get_norm_layer("group", 48).num_groups == 16  # gcd(48, 32)
    assert isinstance(get_norm_layer("batch", 8), nn.BatchNorm3d)
    with pytest.raises(ValueError, match="norm must be one of"):
        get_norm_layer("bacth", 8)
    with pytest.raises(ValueError, match="num_groups"):
        get_norm_layer(("group", {"num_groups": 3}), 8)


def test_res_block_shortcut_and_up_block_shapes():
    x = torch.randn(1, 4, 6, 6, 6)
    assert not ResBlock(4, 4).downsample and ResBlock(4, 8).downsample
    assert ResBlock(4, 8, stride=2)(x).shape == (1, 8, 3, 3, 3)
    up = UpBlock(8, 4, stride=(2, 2, 1))
    assert up(torch.randn(1, 8, 3, 3, 6), x).shape == (1, 4, 6, 6, 6)
    with pytest.raises(ValueError, match="does not match the up-sampled map"):
        up(torch.randn(1, 8, 3, 3, 3), x)


# ---------------------------------------------------------------------- levels / indices
def test_levels_follow_log2_of_the_patch():
    assert unetr_levels((16, 16, 16))[0] == 4
    assert unetr_levels((8, 8, 8))[0] == 3
    n, factors = unetr_levels((16, 16, 8))
    assert n == 4 and factors == [(2, 2, 2), (2, 2, 2), (2, 2, 2), (2, 2, 1)]
    with pytest.raises(ValueError, match="power-of-two"):
        unetr_levels((12, 12, 12))
    assert default_skip_indices(12, 4) == [3, 6, 9]  # MONAI's hidden_states_out[3, 6, 9]
    assert default_skip_indices(12, 3) == [4, 8]
    assert default_skip_indices(24, 4) == [6, 12, 18]


@pytest.mark.parametrize(
    ("encoder", "encoder_args", "shape", "n_levels"),
    [
        ("vit3d_test_p16", {}, (32, 16, 32), 4),
        ("vit3d_test_p8", {}, (16, 32, 16), 3),
        ("vit3d_test_p16", {"depth": 5, "class_token": False}, (16, 16, 32), 4),
        ("vit3d_test_p16", {"patch_size": (16, 16, 8)}, (16, 32, 16), 4),
    ],
)
def test_unetr_forward_backward_any_patch_and_depth(encoder, encoder_args, shape, n_levels):
    torch.manual_seed(0)
    m = create_model(
        "unetr", encoder=encoder, encoder_args=encoder_args, img_size=shape, in_chans=2,
        out_channels=3, feature_size=4,
    )  # fmt: skip
    assert m.num_levels == n_levels
    assert [f"decoder{i}" for i in range(2, n_levels + 2)] == [
        n for n, _ in m.named_children() if n.startswith("decoder")
    ][::-1]
    out = run_train_step(m, torch.randn(2, 2, *shape))
    assert out.shape == (2, 3, *shape)


def test_unetr_basic_blocks_and_skip_index_errors():
    m = UNETR("vit3d_test_p8", out_channels=2, in_chans=1, img_size=16, feature_size=4,
              res_block=False, conv_block=False, skip_indices=[-1, 0])  # fmt: skip
    assert m.skip_indices == [-1, 0]
    assert run_train_step(m, torch.randn(1, 1, 16, 16, 16)).shape == (1, 2, 16, 16, 16)
    with pytest.raises(ValueError, match="needs 2 skip_indices"):
        UNETR("vit3d_test_p8", in_chans=1, img_size=16, skip_indices=[0])
    with pytest.raises(ValueError, match="out of range"):
        UNETR("vit3d_test_p8", in_chans=1, img_size=16, skip_indices=[0, 7])


class StubEncoder(nn.Module):
    """Implements only the feature API (no ``blocks``): what the decoder may rely on."""

    def __init__(self, width=24, patch=8, depth=4, in_chans=1):
        super().__init__()
        self.proj = nn.Conv3d(in_chans, width, patch, patch)
        self.in_chans = in_chans
        self.num_prefix_tokens = 1
        self.feature_info = [
            {"num_chs": width, "reduction": (patch,) * 3, "module": f"layers.{i}"}
            for i in range(depth)
        ]
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        self.calls: list = []

    def forward_features(self, x):
        raise AssertionError("UNETR must use forward_intermediates")

    def forward_intermediates(self, x, indices=None, norm=False, output_fmt="NCDHW",
                              intermediates_only=True):  # fmt: skip
        self.calls.append((list(indices), intermediates_only))
        y = self.proj(x)  # (B, C, d, h, w)
        tokens = y.flatten(2).transpose(1, 2)  # (B, L, C)
        maps, feats = [], []
        for layer in self.layers:
            tokens = layer(tokens)
            feats.append(tokens.transpose(1, 2).reshape(y.shape))
        maps = [feats[i] for i in indices]
        cls = tokens.mean(1, keepdim=True)
        return maps if intermediates_only else (torch.cat([cls, tokens], 1), maps)


def test_unetr_uses_only_the_feature_api():
    enc = StubEncoder()
    m = UNETR(enc, out_channels=2, feature_size=4)
    assert m.skip_indices == [1, 2]  # depth 4, 3 levels
    out = run_train_step(m, torch.randn(1, 1, 16, 16, 24))
    assert out.shape == (1, 2, 16, 16, 24)
    assert enc.calls == [([1, 2], False)]
    with pytest.raises(ValueError, match="in_chans=3 but the encoder takes 1"):
        UNETR(StubEncoder(), in_chans=3)
    with pytest.raises(ValueError, match="feature API"):
        UNETR(nn.Linear(2, 2), in_chans=1)
    with pytest.raises(ValueError, match="single-scale"):
        UNETR("swin3d_test", in_chans=1)


# ---------------------------------------------------------------------- registry / weights
def test_create_model_records_plain_args_and_rebuilds():
    m = create_model("unetr", encoder="vit3d_test_p16", img_size=32, in_chans=1,
                     out_channels=3, feature_size=4)  # fmt: skip
    assert m.model_name == "unetr"
    assert m.model_args == {"encoder": "vit3d_test_p16", "img_size": 32, "in_chans": 1,
                            "out_channels": 3, "feature_size": 4}  # fmt: skip
    rebuilt = create_model(m.model_name, **m.model_args)
    rebuilt.load_state_dict(m.state_dict(), strict=True)


def test_pretrained_encoder_state_dict_loads_strictly():
    torch.manual_seed(0)
    bare = create_model("vit3d_test_p16", img_size=32, in_chans=1)  # what MAE saves
    m = UNETR("vit3d_test_p16", out_channels=2, in_chans=1, img_size=32, feature_size=4)
    m.load_encoder_state_dict(bare.state_dict(), strict=True)
    for k, v in bare.state_dict().items():
        torch.testing.assert_close(m.encoder.state_dict()[k], v)
    # pretrained on a 2³ token grid, fine-tuned on 3³: the learned table is resampled
    big = UNETR("vit3d_test_p16", out_channels=2, in_chans=1, img_size=48, feature_size=4)
    big.load_encoder_state_dict(bare.state_dict(), strict=True)
    assert big.encoder.pos_embed.shape == (1, 27, 48)
    with pytest.raises(RuntimeError, match="Unexpected key"):
        m.load_encoder_state_dict({**bare.state_dict(), "extra": torch.zeros(1)}, strict=True)


def _monai_pair(feature_size=4, img=(16, 16, 32)):
    from monai.networks.nets import UNETR as MonaiUNETR

    torch.manual_seed(0)
    ref = MonaiUNETR(1, 3, img, feature_size=feature_size, hidden_size=24, mlp_dim=48,
                     num_heads=2)  # fmt: skip
    enc = ViT3D(**vit3d_args_from_monai(in_channels=1, img_size=img, patch_size=16,
                                        hidden_size=24, mlp_dim=48, num_heads=2))  # fmt: skip
    return ref, UNETR(enc, out_channels=3, feature_size=feature_size)


def test_parameter_count_equals_monai_unetr():
    from monai.networks.nets import UNETR as MonaiUNETR

    ref, ours = _monai_pair()
    # MONAI builds an unused cross-attention LayerNorm in every block (dropped on conversion)
    unused = sum(p.numel() for n, p in ref.named_parameters() if "norm_cross_attn" in n)
    assert n_params(ours) == n_params(ref) - unused
    with torch.device("meta"):  # the ViT-B / feature 16 / 14-class configuration, 96³
        big_ref = MonaiUNETR(1, 14, 96, feature_size=16)
        big = create_model("unetr", encoder="vit3d_base_p16", img_size=96, in_chans=1,
                           out_channels=14, feature_size=16)  # fmt: skip
    assert n_params(big) - n_params(big.encoder) == n_params(big_ref) - n_params(big_ref.vit)
    assert n_params(big) - n_params(big.encoder) == 4_443_310


def test_numerical_parity_with_monai_unetr_weights():
    ref, ours = _monai_pair()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    ours.load_state_dict(convert_monai_unetr_state_dict(ref.state_dict()), strict=True)
    x = torch.randn(2, 1, 16, 16, 32)
    a, b = ref(x), ours(x)
    torch.testing.assert_close(b, a, atol=5e-5, rtol=1e-4)
    a.square().mean().backward()
    b.square().mean().backward()
    ref_grads = convert_monai_unetr_state_dict(
        {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}
    )
    for name, p in ours.named_parameters():
        want = ref_grads[name]
        torch.testing.assert_close(p.grad, want, atol=1e-4 * want.abs().max().item() + 1e-7,
                                   rtol=1e-3, msg=name)  # fmt: skip
