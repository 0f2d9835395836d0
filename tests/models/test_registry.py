"""Registry: names, errors, and a sweep over every registered model with a size cap."""

from __future__ import annotations

import fnmatch

import pytest
import torch
from torch import nn

from umit.models import (
    SwinTransformer3D,
    ViT3D,
    create_model,
    is_model,
    list_models,
    register_model,
)

MAX_PARAMS_FOR_FULL_RUN = 10_000_000
EXPECTED = {
    "vit3d_test_p16", "vit3d_test_p8", "vit3d_tiny_p16", "vit3d_tiny_p8", "vit3d_small_p16",
    "vit3d_small_p8", "vit3d_base_p16", "vit3d_base_p8", "vit3d_large_p16", "vit3d_huge_p16",
    "swin3d_test", "swin3d_tiny", "swin3d_small", "swin3d_base",
}  # fmt: skip
VIT_SIZES = {"test": (48, 2), "tiny": (192, 12), "small": (384, 12), "base": (768, 12),
             "large": (1024, 24), "huge": (1280, 32)}  # fmt: skip


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def vit_params(dim: int, depth: int, patch: int, in_chans: int = 1, tokens: int = 216) -> int:
    """Analytic ViT3D parameter count (learned pos embed, cls token, qkv bias, MLP ratio 4)."""
    patch_embed = dim * in_chans * patch**3 + dim
    block = 4 * dim + (3 * dim * dim + 3 * dim) + (dim * dim + dim) + (8 * dim * dim + 5 * dim)
    return patch_embed + tokens * dim + dim + depth * block + 2 * dim


def test_list_and_lookup():
    assert set(list_models()) >= EXPECTED
    assert list_models("swin3d_*") == ["swin3d_base", "swin3d_small", "swin3d_test", "swin3d_tiny"]
    assert list_models() == sorted(list_models())
    assert is_model("vit3d_base_p16") and not is_model("vit3d_base")


def test_unknown_name_lists_close_matches():
    with pytest.raises(ValueError, match=r"unknown model 'vit3d_bse_p16'.*'vit3d_base_p16'"):
        create_model("vit3d_bse_p16")
    with pytest.raises(ValueError, match="unknown model 'resnet50'"):
        create_model("resnet50")


def test_duplicate_registration_rejected():
    def vit3d_base_p16(**kwargs):  # same name, another function
        return nn.Identity()

    with pytest.raises(ValueError, match="'vit3d_base_p16' is already registered"):
        register_model(vit3d_base_p16)


def test_models_describe_themselves():
    m = create_model("vit3d_test_p16", img_size=(32, 32, 16), in_chans=2)
    assert m.model_name == "vit3d_test_p16"
    assert m.model_args == {"img_size": (32, 32, 16), "in_chans": 2}
    rebuilt = create_model(m.model_name, **m.model_args)
    rebuilt.load_state_dict(m.state_dict())
    assert m.init_args["embed_dim"] == 48 and m.init_args["in_chans"] == 2


@pytest.mark.parametrize("name", sorted(VIT_SIZES))
def test_vit_param_counts_match_analytic(name):
    dim, depth = VIT_SIZES[name]
    for patch in (16, 8):
        model_name = f"vit3d_{name}_p{patch}"
        if not is_model(model_name):
            continue
        with torch.device("meta"):
            m = create_model(model_name)
        assert n_params(m) == vit_params(dim, depth, patch, tokens=(96 // patch) ** 3), model_name
        assert m.embed_dim == dim and len(m.blocks) == depth


# Small sizes for the models that are not bare ViT/Swin encoders: every registered name must be
# buildable here, so a new model without a size fails the sweep instead of going untested.
SMALL_RESNET = {"widths": (8, 16, 32, 64), "stem_width": 8}
TASK_MODEL_ARGS: dict[str, dict] = {
    "unetr": {"encoder": "vit3d_test_p16", "out_channels": 3, "feature_size": 8},
    "swin_unetr": {"encoder": "swin3d_test", "out_channels": 3, "feature_size": 12},
    "classifier": {"encoder": "vit3d_test_p16", "num_classes": 3},
    "resunet3d": {"out_channels": 3, "features": (4, 8, 16, 16), "deep_supervision": True},
    "resunet3d_encoder": {"features": (4, 8, 16, 3)},  # a feature map, 3 channels at 1/8
    "resnet3d_*": {"num_classes": 3, **SMALL_RESNET},
    "absent_channels": {
        "model": "unetr",
        "model_args": {"encoder": "vit3d_test_p16", "feature_size": 8},
        "out_channels": 3,
        "drop_prob": 0.3,
    },
    "phase_harmonised": {  # one CT channel in (not the sweep's 2), 3 predicted phases
        "model": "unetr",
        "model_args": {"encoder": "vit3d_test_p16", "feature_size": 8},
        "front_model": "resunet3d",
        "front_args": {"features": (4, 8), "in_chans": 1, "out_channels": 3},
        "out_channels": 3,
    },
}


def _task_args(name: str) -> dict | None:
    for pattern, args in TASK_MODEL_ARGS.items():
        if fnmatch.fnmatchcase(name, pattern):
            return args
    return None


def test_stand_in_models_do_not_leak_between_tests(register_models):
    def leak_probe_model(**kwargs):
        return nn.Identity()

    before = list_models()
    register_models(leak_probe_model)
    assert is_model("leak_probe_model")
    assert all(not n.endswith(("_for_tests", "_for_audit", "_for_dp")) for n in before)
    assert "predict_test_threshold" not in before


@pytest.mark.parametrize("name", list_models())
def test_every_model_runs_forward_and_backward(name):
    if name.startswith(("vit3d_", "swin3d_")):
        _check_encoder(name)
        return
    args = _task_args(name)
    assert args is not None, f"registered model {name!r} has no small size in TASK_MODEL_ARGS"
    torch.manual_seed(0)
    shape = (64, 64, 64) if name == "swin_unetr" else (32, 32, 32)  # Swin's bottleneck > 1 voxel
    chans = 1 if name == "phase_harmonised" else 2  # a cross-phase front takes one CT channel
    m = create_model(name, img_size=shape, in_chans=chans, **args)
    x = torch.randn(1, chans, *shape)
    outs = m(x)
    outs = (
        list(outs) if isinstance(outs, list | tuple) else [outs]
    )  # deep supervision: finest first
    if name.endswith("_encoder"):  # the deepest feature map
        want = (1, 3, *(n // m.feature_info[-1]["reduction"][0] for n in shape))
    else:
        want = (1, 3, *shape) if "out_channels" in args else (1, 3)
    assert tuple(outs[0].shape) == want and all(torch.isfinite(o).all() for o in outs)
    sum(o.square().mean() for o in outs).backward()
    grads = [p.grad for p in m.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert m.model_name == name


def _check_encoder(name: str) -> None:
    with torch.device("meta"):
        full = create_model(name)
    # ViT: divisible by 16; Swin: patch grid (14, 14, 7) fits window 7 without padding
    shape = (16, 32, 16) if name.startswith("vit") else (28, 28, 14)
    overrides: dict = {"img_size": shape, "in_chans": 2, "num_classes": 3}
    if n_params(full) > MAX_PARAMS_FOR_FULL_RUN:
        overrides["depth"] = 1  # full width, one block: checks shapes without the cost
    torch.manual_seed(0)
    m = create_model(name, **overrides)
    x = torch.randn(1, 2, *shape)
    tokens = m.forward_features(x)
    grid = m.grid_size(shape)
    assert tokens.shape == (1, m.num_prefix_tokens + grid[0] * grid[1] * grid[2], m.num_features)
    out = m.forward_head(tokens)
    assert out.shape == (1, 3) and torch.isfinite(out).all()
    out.square().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)
    feats = m.forward_intermediates(x, indices=1)
    assert feats[0].ndim == 5 and feats[0].shape[1] == m.feature_info[-1]["num_chs"]
    assert isinstance(m, (ViT3D, SwinTransformer3D))
