"""Small reusable blocks shared by every encoder (flat, timm-style)."""

from umit.models.layers.attention import Attention
from umit.models.layers.drop_path import DropPath, drop_path
from umit.models.layers.mlp import Mlp
from umit.models.layers.patch_embed import PatchEmbed3d, to_3tuple
from umit.models.layers.pos_embed import build_sincos_pos_embed_3d, resample_pos_embed_3d

__all__ = [
    "Attention",
    "DropPath",
    "Mlp",
    "PatchEmbed3d",
    "build_sincos_pos_embed_3d",
    "drop_path",
    "resample_pos_embed_3d",
    "to_3tuple",
]
