"""SwinUNETR over the Swin feature maps, and parity with MONAI's SwinUNETR."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from umit.models import SwinTransformer3D, SwinUNETR, create_model
from umit.models.monai_compat import swin3d_args_from_monai
from umit.models.swin_unetr import convert_monai_swin_unetr_state_dict

pytestmark = pytest.mark.usefixtures("one_thread")


SMALL = {"depths": (1, 1, 1, 1), "window_size": 4}  # cheap windows for the tests


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_forward_backward_shapes_and_module_names():
    torch.manual_seed(0)
    m = create_model("swin_unetr", encoder="swin3d_test", encoder_args=SMALL, img_size=32,
                     in_chans=2, out_channels=3)  # fmt: skip
    assert m.model_name == "swin_unetr" and m.feature_size == 12
    names = {n for n, _ in m.named_children()}
    assert names >= {"encoder1", "encoder2", "encoder3", "encoder4", "encoder10", "decoder1",
                     "decoder5", "out"}  # fmt: skip
    x = torch.randn(1, 2, 32, 32, 64)
    out = m(x)
    assert out.shape == (1, 3, 32, 32, 64) and torch.isfinite(out).all()
    out.square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters())
    with pytest.raises(ValueError, match="must be divisible by"):
        m(torch.randn(1, 2, 32, 32, 40))


def test_feature_size_sets_the_encoder_width_and_other_depths_work():
    m = SwinUNETR("swin3d_test", out_channels=2, in_chans=1, feature_size=24,
                  encoder_args={"depths": (1, 1, 1), "num_heads": (3, 6, 12)})  # fmt: skip
    assert m.encoder.embed_dim == 24 and m.num_stages == 3 and not hasattr(m, "encoder4")
    assert m(torch.randn(1, 1, 32, 16, 16)).shape == (1, 2, 32, 16, 16)
    enc = create_model("swin3d_test", in_chans=1)
    with pytest.raises(ValueError, match="feature_size=24 but the encoder's width is 12"):
        SwinUNETR(enc, feature_size=24)
    with pytest.raises(ValueError, match="hierarchical encoder"):
        SwinUNETR("vit3d_test_p16", in_chans=1, img_size=32)


def test_pretrained_encoder_loads_strictly():
    bare = create_model("swin3d_test", in_chans=1)
    m = SwinUNETR("swin3d_test", out_channels=2, in_chans=1)
    m.load_encoder_state_dict(bare.state_dict(), strict=True)
    for k, v in bare.state_dict().items():
        torch.testing.assert_close(m.encoder.state_dict()[k], v)


def _monai_pair(feature_size=12):
    from monai.networks.nets import SwinUNETR as MonaiSwinUNETR

    torch.manual_seed(0)
    ref = MonaiSwinUNETR(in_channels=1, out_channels=3, feature_size=feature_size, **SMALL)
    enc = SwinTransformer3D(
        **swin3d_args_from_monai(in_channels=1, feature_size=feature_size, **SMALL)
    )
    return ref, SwinUNETR(enc, out_channels=3)


def test_parameter_counts_equal_monai_swin_unetr():
    ref, ours = _monai_pair()
    assert n_params(ours) == n_params(ref)
    with torch.device("meta"):  # MONAI's SwinUNETR(1, 14, feature_size=24 / 48) counts
        tiny = create_model("swin_unetr", encoder="swin3d_tiny", in_chans=1, out_channels=14)
        big = create_model("swin_unetr", encoder="swin3d_base", in_chans=1, out_channels=14)
    assert (n_params(tiny), n_params(big)) == (15_703_304, 62_187_296)


def test_numerical_parity_with_monai_swin_unetr_weights():
    ref, ours = _monai_pair()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    ours.load_state_dict(convert_monai_swin_unetr_state_dict(ref.state_dict()), strict=True)
    x = torch.randn(1, 1, 32, 32, 64)  # the 1/32 level must hold more than one voxel
    a, b = ref(x), ours(x)
    torch.testing.assert_close(b, a, atol=5e-5, rtol=1e-4)
    a.square().mean().backward()
    b.square().mean().backward()
    ref_grads = convert_monai_swin_unetr_state_dict(
        {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}
    )
    for name, p in ours.named_parameters():
        want = ref_grads[name]
        torch.testing.assert_close(p.grad, want, atol=1e-4 * want.abs().max().item() + 1e-7,
                                   rtol=1e-3, msg=name)  # fmt: skip
