"""Encoders built by name, their layers, and MONAI checkpoint loading.

>>> from umit.models import create_model
>>> enc = create_model("vit3d_base_p16", img_size=96, in_chans=1)
"""

from umit.models import layers
from umit.models.monai_compat import (
    convert_monai_swin_state_dict,
    convert_monai_vit_state_dict,
    load_monai_checkpoint,
)
from umit.models.registry import create_model, is_model, list_models, register_model
from umit.models.swin3d import SwinTransformer3D
from umit.models.vit3d import ViT3D

__all__ = [
    "SwinTransformer3D",
    "ViT3D",
    "convert_monai_swin_state_dict",
    "convert_monai_vit_state_dict",
    "create_model",
    "is_model",
    "layers",
    "list_models",
    "load_monai_checkpoint",
    "register_model",
]
