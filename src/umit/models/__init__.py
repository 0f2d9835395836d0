"""Encoders built by name, their layers, and MONAI checkpoint loading.

>>> from umit.models import create_model
>>> enc = create_model("vit3d_base_p16", img_size=96, in_chans=1)
"""

from umit.models import absent, blocks, harmonised, layers
from umit.models.cnn import ResEncoder3D, ResNet3D, ResUNet3D
from umit.models.heads import ClassificationModel, freeze_encoder, layer_id_fn
from umit.models.monai_compat import (
    convert_monai_swin_state_dict,
    convert_monai_vit_state_dict,
    load_monai_checkpoint,
)
from umit.models.registry import create_model, is_model, list_models, register_model
from umit.models.swin3d import SwinTransformer3D
from umit.models.swin_unetr import SwinUNETR
from umit.models.unetr import UNETR
from umit.models.vit3d import ViT3D

__all__ = [
    "UNETR",
    "absent",
    "ClassificationModel",
    "ResEncoder3D",
    "ResNet3D",
    "ResUNet3D",
    "SwinTransformer3D",
    "SwinUNETR",
    "ViT3D",
    "blocks",
    "freeze_encoder",
    "harmonised",
    "layer_id_fn",
    "convert_monai_swin_state_dict",
    "convert_monai_vit_state_dict",
    "create_model",
    "is_model",
    "layers",
    "list_models",
    "load_monai_checkpoint",
    "register_model",
]
