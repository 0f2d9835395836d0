"""Classification heads, freezing, layer ids, encoder loading, and a sweep over task models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from umit.models import ClassificationModel, create_model, freeze_encoder, layer_id_fn, list_models
from umit.models.heads import AttentionPool, load_encoder_state_dict
from umit.train.optim import param_groups

# small arguments for every registered task model (encoders are swept in test_registry.py)
TASK_MODELS = {
    "unetr": ({"encoder": "vit3d_test_p16", "out_channels": 3, "feature_size": 4}, (32, 16, 16)),
    "swin_unetr": (
        {"encoder": "swin3d_test", "out_channels": 3,
         "encoder_args": {"depths": (1, 1, 1, 1), "window_size": 4}},
        (32, 32, 64),
    ),
    "resunet3d": ({"out_channels": 3, "features": (4, 8, 16), "deep_supervision": True}, (16,) * 3),
    "classifier": ({"encoder": "vit3d_test_p16", "pool": "attn", "num_classes": 3}, (32, 16, 16)),
    "resnet3d_18": ({"num_classes": 3, "widths": (4, 8, 8, 8), "stem_width": 4}, (32,) * 3),
    "resnet3d_34": ({"num_classes": 3, "widths": (4, 8, 8, 8), "stem_width": 4}, (32,) * 3),
    "resnet3d_50": ({"num_classes": 3, "widths": (4, 8, 8, 8), "stem_width": 4}, (32,) * 3),
}  # fmt: skip
ENCODER_PREFIXES = ("vit3d_", "swin3d_")


pytestmark = pytest.mark.usefixtures("one_thread")


def trainable(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


# ---------------------------------------------------------------------- sweep
def test_every_task_model_is_swept():
    assert set(TASK_MODELS) <= {n for n in list_models() if not n.startswith(ENCODER_PREFIXES)}


@pytest.mark.parametrize("name", sorted(TASK_MODELS))
def test_task_model_forward_backward_and_rebuild(name):
    torch.manual_seed(0)
    args, shape = TASK_MODELS[name]
    m = create_model(name, img_size=shape, in_chans=2, **args)
    x = torch.randn(2, 2, *shape)
    out = m(x)
    outs = out if isinstance(out, list) else [out]
    expected = (2, 3) if "num_classes" in args else (2, 3, *shape)
    assert outs[0].shape == expected
    assert all(torch.isfinite(o).all() for o in outs)
    sum(o.float().square().mean() for o in outs).backward()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)
    # plain-data identity: a checkpoint rebuilds the model by name
    assert m.model_name == name
    torch.save(m.model_args, buf := __import__("io").BytesIO())
    buf.seek(0)
    args_back = torch.load(buf, weights_only=True)
    create_model(name, **args_back).load_state_dict(m.state_dict(), strict=True)


# ---------------------------------------------------------------------- classification
@pytest.mark.parametrize(
    ("encoder", "pool"),
    [("vit3d_test_p16", "cls"), ("vit3d_test_p16", "mean"), ("vit3d_test_p16", "attn"),
     ("swin3d_test", "mean"), ("swin3d_test", "attn")],
)  # fmt: skip
def test_classifier_pools_tokens_of_vit_and_swin(encoder, pool):
    args = {"drop_path_rate": 0.1}
    if encoder.startswith("swin"):
        args |= {"depths": (1, 1, 1, 1), "window_size": 4}
    m = ClassificationModel(encoder, num_classes=4, pool=pool, dropout=0.1, in_chans=1,
                            img_size=32, encoder_args=args)  # fmt: skip
    x = torch.randn(2, 1, 32, 32, 32)
    tokens = m.forward_features(x)
    assert m.forward_head(tokens, pre_logits=True).shape == (2, m.num_features)
    logits = m(x)
    assert logits.shape == (2, 4)
    F.cross_entropy(logits, torch.tensor([0, 3])).backward()
    assert m.head.weight.grad is not None


def test_classifier_argument_errors():
    with pytest.raises(ValueError, match="needs an encoder with a class token"):
        ClassificationModel("swin3d_test", pool="cls", in_chans=1)
    with pytest.raises(ValueError, match="pool must be one of"):
        ClassificationModel("vit3d_test_p16", pool="max", in_chans=1)
    with pytest.raises(ValueError, match="unknown model"):
        ClassificationModel("vit3d_nope", in_chans=1)
    with pytest.raises(ValueError, match="head_norm must be one of"):
        ClassificationModel("vit3d_test_p16", head_norm="layer", in_chans=1)


def test_head_norm_standardises_nearly_identical_pooled_features():
    """Pooled features that differ by 1e-3 across inputs reach the Linear on unit scale (the
    reference: per-feature z-scores over the batch with the biased variance, as BatchNorm)."""
    torch.manual_seed(0)
    m = ClassificationModel("vit3d_test_p16", num_classes=2, in_chans=1, img_size=32,
                            head_norm="batch")  # fmt: skip
    pooled = 5.0 + 1e-3 * torch.randn(8, m.num_features, dtype=torch.float64)
    seen = []
    m.head.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    m.double().train()
    tokens = pooled.unsqueeze(1).expand(-1, 4, -1)  # (B, L, C) whose mean is `pooled`
    m.forward_head(tokens)
    z = pooled.numpy()
    ref = (z - z.mean(0)) / np.sqrt(z.var(0) + 1e-6)
    np.testing.assert_allclose(seen[0].detach().numpy(), ref, rtol=1e-6, atol=1e-6)
    # pre_logits stays the raw pooled vector (what probes and distillation read)
    torch.testing.assert_close(m.forward_head(tokens, pre_logits=True), pooled)
    # the running statistics travel with the weights
    m.eval()
    back = create_model("classifier", **m.init_args).double().eval()
    back.load_state_dict(m.state_dict(), strict=True)
    torch.testing.assert_close(back.forward_head(tokens), m.forward_head(tokens))


def test_attention_pool_matches_reference_and_ignores_token_order():
    torch.manual_seed(0)
    pool = AttentionPool(16, num_heads=4)
    x = torch.randn(3, 10, 16)
    B, L, C = x.shape
    q = pool.q(pool.query).view(1, 4, 4).transpose(0, 1)  # (heads, 1, hd)
    k, v = pool.kv(x).view(B, L, 2, 4, 4).permute(2, 0, 3, 1, 4)  # (B, heads, L, hd) each
    attn = (q.unsqueeze(0) @ k.transpose(-1, -2) / 2.0).softmax(-1)  # scale 1/sqrt(4)
    ref = pool.proj((attn @ v).reshape(B, C))
    torch.testing.assert_close(pool(x), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pool(x[:, torch.randperm(L)]), pool(x), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------- freezing
def test_linear_probe_freezes_the_whole_encoder_only():
    m = create_model("classifier", encoder="vit3d_test_p16", num_classes=2, in_chans=1,
                     img_size=32, pool="attn")  # fmt: skip
    assert freeze_encoder(m, trainable_blocks=0) == []
    assert trainable(m) == {n for n, _ in m.named_parameters() if not n.startswith("encoder.")}
    seg = create_model("unetr", encoder="vit3d_test_p16", in_chans=1, img_size=32, feature_size=4)
    freeze_encoder(seg)
    assert trainable(seg) and all(not n.startswith("encoder.") for n in trainable(seg))


def test_partial_freezing_keeps_the_last_blocks_and_final_norm():
    m = create_model("classifier", encoder="vit3d_test_p16", num_classes=2, in_chans=1,
                     img_size=32, encoder_args={"depth": 4})  # fmt: skip
    kept = freeze_encoder(m, trainable_blocks=2)
    expected = {n for n, _ in m.encoder.named_parameters()
                if n.startswith(("blocks.2.", "blocks.3.", "norm."))}  # fmt: skip
    assert set(kept) == expected
    assert trainable(m) == {f"encoder.{n}" for n in expected} | {"head.weight", "head.bias"}
    freeze_encoder(m, trainable_blocks=4)  # every block, still not the stem
    assert not any(k in n for n in trainable(m) for k in ("patch_embed", "pos_embed", "cls_token"))
    with pytest.raises(ValueError, match=r"trainable_blocks must be in 0\.\.4"):
        freeze_encoder(m, trainable_blocks=5)
    with pytest.raises(ValueError, match="no encoder"):
        freeze_encoder(nn.Linear(2, 2))


def test_partial_freezing_of_swin_uses_its_stages():
    m = create_model("swin_unetr", encoder="swin3d_test", in_chans=1, out_channels=2)
    freeze_encoder(m, trainable_blocks=1)
    enc = {n for n in trainable(m) if n.startswith("encoder.")}
    assert enc and all(n.startswith("encoder.stages.3.") for n in enc)
    assert "decoder1.transp_conv.weight" in trainable(m)


# ---------------------------------------------------------------------- layer ids
def test_layer_ids_for_vit_models_and_param_groups():
    m = create_model("unetr", encoder="vit3d_test_p16", in_chans=1, img_size=32, feature_size=4,
                     encoder_args={"depth": 3})  # fmt: skip
    lid = layer_id_fn(m)
    assert lid("encoder.pos_embed") == lid("encoder.cls_token") == 0
    assert lid("encoder.patch_embed.proj.weight") == 0
    assert [lid(f"encoder.blocks.{i}.attn.qkv.weight") for i in range(3)] == [1, 2, 3]
    assert lid("encoder.norm.weight") == lid("decoder2.transp_conv.weight") == 4
    assert lid("out.conv.bias") == 4
    groups = param_groups(m, lid, layer_decay=0.5)
    scale = {n: g["lr_scale"] for g in groups for n in g["param_names"]}
    assert scale["encoder.blocks.0.attn.qkv.weight"] == 0.5**3
    assert scale["encoder.pos_embed"] == 0.5**4 and scale["out.conv.weight"] == 1.0


def test_layer_ids_for_swin_resnet_and_blocks_beyond_ten():
    swin = create_model("classifier", encoder="swin3d_test", in_chans=1, num_classes=2)
    lid = layer_id_fn(swin)
    assert lid("encoder.patch_embed.proj.weight") == 0
    assert [lid(f"encoder.stages.{i}.blocks.0.attn.qkv.weight") for i in range(4)] == [1, 2, 3, 4]
    assert lid("head.weight") == 5
    res = create_model("resnet3d_18", num_classes=2, widths=(4, 4, 4, 4), stem_width=4)
    lid = layer_id_fn(res)
    assert lid("conv1.weight") == lid("norm1.weight") == 0
    assert lid("layer1.0.conv1.weight") == 1 and lid("layer4.1.norm2.bias") == 4
    assert lid("head.weight") == 5
    deep = create_model("classifier", encoder="vit3d_test_p16", in_chans=1, img_size=32,
                        encoder_args={"depth": 12})  # fmt: skip
    lid = layer_id_fn(deep)
    assert lid("encoder.blocks.1.mlp.fc1.weight") == 2
    assert lid("encoder.blocks.11.mlp.fc1.weight") == 12


# ---------------------------------------------------------------------- loading
def test_load_encoder_state_dict_strips_prefix_and_resamples_position_table():
    src = create_model("vit3d_test_p16", img_size=32, in_chans=1)
    dst = create_model("vit3d_test_p16", img_size=(48, 32, 32), in_chans=1)
    wrapped = {f"encoder.{k}": v for k, v in src.state_dict().items()}
    wrapped["decoder.w"] = torch.ones(1)  # a whole task-model state dict: other keys ignored
    load_encoder_state_dict(dst, wrapped, strict=True)  # 2x2x2 grid -> 3x2x2
    torch.testing.assert_close(dst.blocks[0].attn.qkv.weight, src.blocks[0].attn.qkv.weight)
    assert dst.pos_embed.shape == (1, 12, 48)
    flat = create_model("vit3d_test_p16", img_size=(32, 32, 16), in_chans=1)  # 2x2x1: not a cube
    with pytest.raises(ValueError, match="pass source_grid"):
        load_encoder_state_dict(dst, flat.state_dict())
    load_encoder_state_dict(dst, flat.state_dict(), source_grid=(2, 2, 1))


def test_classifier_over_a_cnn_encoder_pools_its_feature_map():
    """``classifier`` takes a CNN encoder too (so a pretrained ResNet encoder fine-tunes through
    the same ``model.encoder`` path); mean pooling equals the spatial mean of the last map."""
    from umit.models import create_model

    torch.manual_seed(0)
    m = create_model(
        "classifier", encoder="resnet3d_test", img_size=(16, 16, 16), num_classes=3, pool="mean"
    ).eval()
    x = torch.randn(2, 1, 16, 16, 16)
    fmap = m.encoder.forward_features(x)  # (B, C, d, h, w)
    want = m.head(fmap.mean(dim=(2, 3, 4)))
    torch.testing.assert_close(m(x), want)
