"""Hand-built ViT whose attention is known, and the affines it is tested under (shared by
``tests/explain`` and the report section's tests in ``tests/eval``)."""

from __future__ import annotations

import numpy as np
import torch

from umit.data.plan import ChannelPlan, Plan
from umit.models import create_model

from _shared import rotation

SP = 1.5
PLAN = Plan(
    target_spacing=(SP, SP, SP),
    channels=[ChannelPlan(name="image", modality="MR", scheme="none")],
    crop_foreground=False,
)
CUBE = (slice(4, 8), slice(8, 12), slice(12, 16))  # one 4³ patch of the 16³ grid, any flip


def affines() -> dict[str, np.ndarray]:
    ras = np.diag([SP, SP, SP, 1.0])
    ras[:3, 3] = [-10.0, 20.0, 5.0]
    lps = np.diag([-SP, -SP, SP, 1.0])
    lps[:3, 3] = [30.0, 12.0, -7.0]
    obl = np.eye(4)
    obl[:3, :3] = rotation(0.3, -0.2, 0.25) @ np.diag([SP, SP, SP])
    obl[:3, 3] = [3.0, -4.0, 11.0]
    return {"ras": ras, "lps": lps, "oblique": obl}


def hand_vit(depth: int = 2) -> torch.nn.Module:
    """A ViT classifier whose every token attends to the patches of mean intensity > 0.

    Patch embedding = patch mean on channel 0, no position embedding, zero class token: after
    LayerNorm a bright patch is +c·e0-like, a zero patch 0. Keys read channel 0, every query is
    the constant bias u, so score(q, t) = u·k_t·scale is large for bright patches and 0 for the
    others. Values, projections and MLPs are zero, so the tokens never change between layers.
    """
    model = create_model(
        "classifier", encoder="vit3d_test_p4", num_classes=2, pool="cls", img_size=16,
        in_chans=1, encoder_args={"depth": depth, "pos_embed": "learn"},
    )  # fmt: skip
    C = 48
    sd = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}
    sd["encoder.patch_embed.proj.weight"][0] = 1.0 / 64
    for i in range(depth):
        b = f"encoder.blocks.{i}."
        sd[b + "norm1.weight"].fill_(1.0)
        sd[b + "norm2.weight"].fill_(1.0)
        sd[b + "attn.qkv.bias"][:C] = 3.0  # q = u for every token
        sd[b + "attn.qkv.weight"][C : 2 * C, 0] = 1.0  # k_j = LN(x)_0 for every j
    sd["encoder.norm.weight"].fill_(1.0)
    model.load_state_dict(sd)
    return model.eval()
