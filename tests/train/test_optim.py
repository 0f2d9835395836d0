"""AdamW parameter groups: weight-decay exclusions and layer-wise LR decay, by inspecting groups."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from train_helpers import TinyNet

from umit.train import TrainConfig, build_optimizer, layer_id_by_blocks, param_groups
from umit.train.optim import no_weight_decay_names, set_lr_wd


class Wrapper(nn.Module):
    """An SSL-style wrapper: the encoder's no_weight_decay names must get the prefix."""

    def __init__(self):
        super().__init__()
        self.encoder = TinyNet()
        self.mask_token = nn.Parameter(torch.zeros(1, 16))
        self.decoder = nn.Linear(16, 16)


def names_by_wd(groups):
    decay = [n for g in groups if g["wd_scale"] == 1.0 for n in g["param_names"]]
    no_decay = [n for g in groups if g["wd_scale"] == 0.0 for n in g["param_names"]]
    return decay, no_decay


def test_no_weight_decay_on_biases_norms_and_listed_names():
    model = TinyNet()
    decay, no_decay = names_by_wd(param_groups(model))
    assert sorted(decay) == [
        "blocks.0.fc.weight",
        "blocks.1.fc.weight",
        "head.weight",
        "stem.weight",
    ]
    assert "pos_embed" in no_decay  # 2-D, excluded only because the model lists it
    assert {"stem.bias", "norm.weight", "norm.bias", "blocks.0.norm.weight", "head.bias"} <= set(
        no_decay
    )
    assert len(decay) + len(no_decay) == len(list(model.parameters()))


def test_listed_names_are_prefixed_inside_wrappers_and_frozen_params_skipped():
    model = Wrapper()
    model.encoder.head.weight.requires_grad_(False)
    assert no_weight_decay_names(model) == {"encoder.pos_embed"}
    decay, no_decay = names_by_wd(param_groups(model))
    assert "encoder.pos_embed" in no_decay
    assert "encoder.head.weight" not in decay + no_decay
    assert "decoder.weight" in decay


def test_unlisted_2d_tokens_decay():
    # The rule is ndim/bias/listed, not a name guess: an unlisted (1, 16) token decays.
    decay, _ = names_by_wd(param_groups(Wrapper()))
    assert "mask_token" in decay


def test_layer_id_by_blocks():
    layer_id = layer_id_by_blocks(num_blocks=2)
    assert layer_id("pos_embed") == 0
    assert layer_id("encoder.patch_embed.proj.weight") == 0
    assert layer_id("cls_token") == 0
    assert layer_id("blocks.0.fc.weight") == 1
    assert layer_id("encoder.blocks.1.norm.bias") == 2
    assert layer_id("head.weight") == 3
    assert layer_id("decoder_blocks.0.fc.weight") == 3  # not the encoder's blocks


def test_layer_wise_lr_decay_scales():
    model = TinyNet(depth=2)
    fn = layer_id_by_blocks(2)
    groups = param_groups(model, layer_id_fn=fn, layer_decay=0.5)
    scale = {n: g["lr_scale"] for g in groups for n in g["param_names"]}
    assert scale["head.weight"] == 1.0 and scale["norm.weight"] == 1.0
    assert scale["blocks.1.fc.weight"] == 0.5
    assert scale["blocks.0.fc.weight"] == 0.25
    assert scale["pos_embed"] == 0.125
    # stem is not an embedding keyword -> full LR unless the caller's function says otherwise
    assert scale["stem.weight"] == 1.0
    # groups are unique per (wd_scale, lr_scale)
    keys = [(g["wd_scale"], g["lr_scale"]) for g in groups]
    assert len(keys) == len(set(keys))


def test_build_optimizer_sets_scaled_lr_and_wd():
    cfg = TrainConfig(lr=1e-3, min_lr=0.0, weight_decay=0.1, layer_decay=0.5, betas=(0.9, 0.95))
    opt = build_optimizer(TinyNet(), cfg)  # layer_decay < 1: layers from the 'blocks' list
    assert isinstance(opt, torch.optim.AdamW)
    for g in opt.param_groups:
        assert g["lr"] == pytest.approx(1e-3 * g["lr_scale"])
        assert g["weight_decay"] == pytest.approx(0.1 * g["wd_scale"])
        assert g["betas"] == (0.9, 0.95)
    set_lr_wd(opt, lr=2.0, wd=0.5)
    for g in opt.param_groups:
        assert g["lr"] == 2.0 * g["lr_scale"] and g["weight_decay"] == 0.5 * g["wd_scale"]


@pytest.mark.parametrize("fused", [None, True])
def test_sgd_steps_as_a_hand_computation(fused):
    """optimizer=sgd: w <- w - lr * (g + wd * w) on the first step (momentum buffer = gradient),
    then v <- m v + g_t; weight decay only where param_groups decays (not the bias)."""
    torch.manual_seed(0)
    net = nn.Linear(3, 2)
    cfg = TrainConfig(optimizer="sgd", lr=0.1, weight_decay=0.01, momentum=0.5)
    opt = build_optimizer(net, cfg, fused=fused)
    assert isinstance(opt, torch.optim.SGD) and all(g["momentum"] == 0.5 for g in opt.param_groups)
    w0, b0 = net.weight.detach().clone(), net.bias.detach().clone()
    x = torch.randn(4, 3)
    net(x).square().sum().backward()
    gw, gb = net.weight.grad.clone(), net.bias.grad.clone()
    opt.step()
    torch.testing.assert_close(net.weight.detach(), w0 - 0.1 * (gw + 0.01 * w0))
    torch.testing.assert_close(net.bias.detach(), b0 - 0.1 * gb)
    w1 = net.weight.detach().clone()
    opt.zero_grad()
    net(x).square().sum().backward()
    v = 0.5 * (gw + 0.01 * w0) + (net.weight.grad + 0.01 * w1)
    opt.step()
    torch.testing.assert_close(net.weight.detach(), w1 - 0.1 * v)
    with pytest.raises(ValueError, match="optimizer"):
        TrainConfig(optimizer="lamb")


def test_layer_decay_needs_blocks_or_function():
    with pytest.raises(ValueError, match="layer_id_fn"):
        build_optimizer(nn.Linear(2, 2), TrainConfig(layer_decay=0.7))
    with pytest.raises(ValueError, match="no trainable parameters"):
        param_groups(nn.Linear(2, 2).requires_grad_(False))
