"""CNN baselines: residual-encoder U-Net (deep supervision) and 3D ResNet classifiers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from umit.models import ResNet3D, ResUNet3D, create_model

SMALL_RESNET = {"widths": (8, 16, 32, 64), "stem_width": 8}


pytestmark = pytest.mark.usefixtures("one_thread")


def test_resunet_forward_backward_and_encoder_feature_api():
    torch.manual_seed(0)
    m = create_model("resunet3d", in_chans=2, out_channels=3, img_size=(32, 32, 16),
                     features=(8, 16, 32), blocks=(1, 2, 1))  # fmt: skip
    assert [len(s) for s in m.encoder.stages] == [1, 2, 1]
    x = torch.randn(2, 2, 32, 32, 16)
    out = m(x)
    assert out.shape == (2, 3, 32, 32, 16) and torch.isfinite(out).all()
    out.square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)
    info = m.encoder.feature_info
    assert [i["num_chs"] for i in info] == [8, 16, 32]
    assert [i["reduction"] for i in info] == [(1, 1, 1), (2, 2, 2), (4, 4, 4)]
    maps = m.encoder.forward_intermediates(x, indices=[0, -1])
    assert [tuple(f.shape) for f in maps] == [(2, 8, 32, 32, 16), (2, 32, 8, 8, 4)]
    assert m.encoder.forward_features(x).shape == (2, 32, 8, 8, 4)
    with pytest.raises(ValueError, match="divisible by the total stride"):
        m(torch.randn(1, 2, 30, 32, 16))


def test_resunet_deep_supervision_outputs_full_resolution_first():
    m = ResUNet3D(1, 2, features=(4, 8, 16, 16), blocks=1, deep_supervision=True,
                  strides=(1, 2, 2, (2, 2, 1)))  # fmt: skip
    x = torch.randn(1, 1, 32, 32, 16)
    outs = m(x)
    assert [tuple(o.shape) for o in outs] == [
        (1, 2, 32, 32, 16), (1, 2, 16, 16, 8), (1, 2, 8, 8, 4)
    ]  # fmt: skip
    sum(o.mean() for o in outs).backward()
    assert all(p.grad is not None for p in m.seg_layers.parameters())
    m.eval()
    assert m(x).shape == (1, 2, 32, 32, 16)  # eval: the full-resolution logits only
    # the heads exist either way, so checkpoints load with or without deep supervision
    plain = ResUNet3D(1, 2, features=(4, 8, 16, 16), blocks=1, strides=(1, 2, 2, (2, 2, 1)))
    plain.load_state_dict(m.state_dict(), strict=True)


def test_resunet_default_is_nnunet_like():
    with torch.device("meta"):
        m = create_model("resunet3d", out_channels=2)
    assert [i["num_chs"] for i in m.encoder.feature_info] == [32, 64, 128, 256, 320]
    assert [len(s) for s in m.encoder.stages] == [1, 3, 4, 6, 6]
    norms = [mod for mod in m.modules() if isinstance(mod, nn.InstanceNorm3d)]
    assert norms and all(n.affine for n in norms)
    assert not any(isinstance(mod, nn.BatchNorm3d) for mod in m.modules())


@pytest.mark.parametrize("name", ["resnet3d_18", "resnet3d_34", "resnet3d_50"])
def test_resnet_forward_features_head_and_backward(name):
    torch.manual_seed(0)
    m = create_model(name, in_chans=2, num_classes=3, img_size=32, **SMALL_RESNET)
    x = torch.randn(2, 2, 32, 32, 32)
    feats = m.forward_features(x)
    expansion = 4 if name.endswith("50") else 1
    assert feats.shape == (2, 64 * expansion, 1, 1, 1) and m.num_features == 64 * expansion
    logits = m.forward_head(feats)
    assert logits.shape == (2, 3)
    assert m.forward_head(feats, pre_logits=True).shape == (2, 64 * expansion)
    m(x).logsumexp(1).sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters())
    assert [i["reduction"] for i in m.feature_info] == [(4,) * 3, (8,) * 3, (16,) * 3, (32,) * 3]
    maps = m.forward_intermediates(x, indices=[1])
    assert maps[0].shape == (2, 16 * expansion, 4, 4, 4)


def test_resnet_uses_stock_modules_without_batch_norm_by_default():
    m = ResNet3D(num_classes=2, **SMALL_RESNET)
    types = {type(mod) for mod in m.modules()}
    # exact stock types: Opacus dispatches per-sample gradients on type(module)
    assert nn.GroupNorm in types and nn.Conv3d in types
    assert not any(issubclass(t, nn.modules.batchnorm._BatchNorm) for t in types)
    assert nn.BatchNorm3d in {type(x) for x in ResNet3D(norm="batch", **SMALL_RESNET).modules()}
    inst = ResNet3D(norm="instance_affine", **SMALL_RESNET)
    assert nn.InstanceNorm3d in {type(x) for x in inst.modules()}
    m.reset_classifier(0)
    assert m(torch.randn(1, 1, 32, 32, 32)).shape == (1, 64)


def test_cnn_argument_errors():
    with pytest.raises(ValueError, match="block must be one of"):
        ResNet3D(block="wide")
    with pytest.raises(ValueError, match="blocks must hold 3"):
        ResUNet3D(features=(4, 8, 16), blocks=(1, 2))
    with pytest.raises(ValueError, match="at least 2 stages"):
        ResUNet3D(features=(4,))


def test_resunet_encoder_is_a_named_model_that_rebuilds_from_its_identity():
    """A pretrained ResUNet's encoder is saved alone (encoder.pt): it needs a registered name."""
    net = create_model("resunet3d", in_chans=1, out_channels=2, features=(4, 8), blocks=1)
    enc = net.encoder
    assert enc.model_name == "resunet3d_encoder"
    rebuilt = create_model(enc.model_name, **enc.model_args)
    rebuilt.load_state_dict(enc.state_dict())  # the same structure, key for key
    x = torch.randn(1, 1, 8, 8, 8)
    torch.testing.assert_close(rebuilt(x), enc(x))
