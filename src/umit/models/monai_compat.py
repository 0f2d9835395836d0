"""Load MONAI ``ViT`` / ``UNETR`` and ``SwinUNETR`` encoder weights into ViT3D / SwinTransformer3D.

Checked against MONAI 1.6.1 (``monai/networks/nets/{vit,unetr,swin_unetr}.py``,
``monai/networks/blocks/{patchembedding,transformerblock,selfattention,mlp}.py``).

ViT (``monai.networks.nets.ViT``, the ``vit.`` submodule of ``UNETR``) -> :class:`ViT3D`

=================================================  =================================  =======================
MONAI key                                          ours                               note
=================================================  =================================  =======================
``patch_embedding.patch_embeddings.{weight,bias}``  ``patch_embed.proj.*``             proj_type ``conv``
``patch_embedding.patch_embeddings.1.*``            ``patch_embed.proj.*``             ``perceptron``: Linear
                                                                                       (p1 p2 p3 c) -> Conv3d
``patch_embedding.position_embeddings``             ``pos_embed`` (1, L, C)            learnable or sincos
``cls_token``                                       ``cls_token``                      ``classification=True``
``blocks.N.norm1`` / ``norm2``                      ``blocks.N.norm1`` / ``norm2``
``blocks.N.attn.qkv``                               ``blocks.N.attn.qkv``              same (3, heads, hd) rows
``blocks.N.attn.to_q|to_k|to_v``                    ``blocks.N.attn.qkv`` (concat)     use_combined_linear=False
``blocks.N.attn.out_proj``                          ``blocks.N.attn.proj``
``blocks.N.mlp.linear1`` / ``linear2``              ``blocks.N.mlp.fc1`` / ``fc2``
``blocks.N.norm_cross_attn``, ``cross_attn.*``      dropped                            unused without
                                                                                       cross-attention
``norm``                                            ``norm``
``classification_head[.0]``                         ``head``                           Tanh not applied
=================================================  =================================  =======================

Build the matching model with :func:`vit3d_args_from_monai` (MONAI: LayerNorm eps 1e-5,
``qkv_bias=False``, no cls token unless ``classification=True``). Then ``forward_features`` equals
MONAI's first output (tokens after ``norm``) and ``forward_intermediates(norm=False,
output_fmt="NLC")`` equals ``hidden_states_out`` (minus the cls token). ``save_attn`` only stores
attention maps at run time and has no weights.

Swin (``SwinUNETR.swinViT`` = ``monai.networks.nets.swin_unetr.SwinTransformer``) ->
:class:`SwinTransformer3D`

=====================================================  =======================================  =====================
MONAI key                                              ours                                     note
=====================================================  =======================================  =====================
``patch_embed.proj`` / ``patch_embed.norm``            same
``layers{i+1}.0.blocks.J.norm1`` / ``norm2``           ``stages.{i}.blocks.J.norm1`` / ``norm2``
``layers{i+1}.0.blocks.J.attn.qkv`` / ``proj``         ``stages.{i}.blocks.J.attn.qkv`` / ``proj``
``...attn.relative_position_bias_table``               same
``...attn.relative_position_index``                    dropped                                  recomputed buffer
``layers{i+1}.0.blocks.J.mlp.linear1`` / ``linear2``   ``stages.{i}.blocks.J.mlp.fc1`` / ``fc2``
``layers{i+1}.0.downsample.norm`` / ``reduction``      ``stages.{i}.downsample.*``              8 channel blocks
                                                                                                reordered
=====================================================  =======================================  =====================

MONAI's default ``downsample="merging"`` concatenates the 2x2x2 neighbours in the order
000, 100, 010, 001, 110, 101, 011, 111 (d, h, w offsets); ours (and ``"mergingv2"``) uses
000, 001, ..., 111. LayerNorm and Linear are equivariant to a channel permutation, so the
converter permutes the 8 blocks of ``downsample.norm`` and of ``reduction``'s input columns.
``swinViT(x, normalize=True)`` equals ``forward_intermediates(x, norm=True)``. ``use_v2``
(``layers{i}c``) and Hyena stages are not supported.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import nn

from umit.models.layers import resample_pos_embed_3d, to_3tuple
from umit.models.swin3d import SwinTransformer3D
from umit.models.vit3d import ViT3D

__all__ = [
    "MonaiLoadResult",
    "convert_monai_swin_state_dict",
    "convert_monai_vit_state_dict",
    "load_monai_checkpoint",
    "swin3d_args_from_monai",
    "vit3d_args_from_monai",
]

StateDict = dict[str, torch.Tensor]

# our block k of a merged (8C) vector holds MONAI "merging" block _MERGING_PERM[k]
_MERGING_PERM = (0, 3, 2, 6, 1, 5, 4, 7)
_VIT_SIGNATURES = (
    "patch_embedding.patch_embeddings.weight",
    "patch_embedding.patch_embeddings.1.weight",
)
_SWIN_SIGNATURES = ("patch_embed.proj.weight",)
MONAI_CHECKPOINT_KEYS = ("state_dict", "model", "model_state_dict", "network", "net")


class MonaiLoadResult(NamedTuple):
    """What :func:`load_monai_checkpoint` did."""

    missing_keys: list[str]
    """Model keys the checkpoint did not provide (empty when ``strict``)."""
    unexpected_keys: list[str]
    """Converted encoder keys the model has no place for (empty when ``strict``)."""
    dropped_keys: list[str]
    """Checkpoint keys outside the encoder (decoder, other heads) or without weights to load."""


# ---------------------------------------------------------------------- constructor args
def vit3d_args_from_monai(
    in_channels: int,
    img_size: int | Sequence[int],
    patch_size: int | Sequence[int],
    hidden_size: int = 768,
    mlp_dim: int = 3072,
    num_layers: int = 12,
    num_heads: int = 12,
    proj_type: str = "conv",
    pos_embed_type: str = "learnable",
    classification: bool = False,
    num_classes: int = 2,
    dropout_rate: float = 0.0,
    spatial_dims: int = 3,
    qkv_bias: bool = False,
    **ignored: Any,
) -> dict[str, Any]:
    """:class:`ViT3D` kwargs reproducing ``monai.networks.nets.ViT(**same_args)``.

    Unlisted MONAI arguments (``post_activation``, ``save_attn``) have no effect on weights and
    are ignored. MONAI's ``pos_embed_type="none"`` is a zero-initialised trainable table, i.e.
    ``"learn"``.
    """
    if spatial_dims != 3:
        raise ValueError(f"only spatial_dims=3 is supported, got {spatial_dims!r}")
    if proj_type not in ("conv", "perceptron"):
        raise ValueError(f"proj_type must be 'conv' or 'perceptron', got {proj_type!r}")
    kinds = {"learnable": "learn", "none": "learn", "sincos": "sincos"}
    if pos_embed_type not in kinds:
        raise ValueError(
            f"pos_embed_type {pos_embed_type!r} is not supported; use one of {sorted(kinds)}"
        )
    return {
        "img_size": img_size,
        "patch_size": patch_size,
        "in_chans": in_channels,
        "embed_dim": hidden_size,
        "depth": num_layers,
        "num_heads": num_heads,
        "mlp_ratio": mlp_dim / hidden_size,
        "qkv_bias": qkv_bias,
        "class_token": classification,
        "pos_embed": kinds[pos_embed_type],
        "drop_rate": dropout_rate,
        "attn_drop_rate": dropout_rate,
        "num_classes": num_classes if classification else 0,
        "global_pool": "token" if classification else "avg",
        "norm_eps": 1e-5,
    }


def swin3d_args_from_monai(
    in_channels: int,
    patch_size: int = 2,
    depths: Sequence[int] = (2, 2, 2, 2),
    num_heads: Sequence[int] = (3, 6, 12, 24),
    window_size: int | Sequence[int] = 7,
    qkv_bias: bool = True,
    mlp_ratio: float = 4.0,
    feature_size: int = 24,
    drop_rate: float = 0.0,
    attn_drop_rate: float = 0.0,
    dropout_path_rate: float = 0.0,
    patch_norm: bool = False,
    spatial_dims: int = 3,
    use_v2: bool = False,
    use_hyena: bool = False,
    **ignored: Any,
) -> dict[str, Any]:
    """:class:`SwinTransformer3D` kwargs reproducing ``SwinUNETR(**same_args).swinViT``."""
    if spatial_dims != 3:
        raise ValueError(f"only spatial_dims=3 is supported, got {spatial_dims!r}")
    if use_v2 or use_hyena:
        raise ValueError(
            f"use_v2={use_v2!r} / use_hyena={use_hyena!r}: SwinUNETR-v2 and Hyena stages are not supported"
        )
    return {
        "patch_size": patch_size,
        "in_chans": in_channels,
        "embed_dim": feature_size,
        "depths": tuple(depths),
        "num_heads": tuple(num_heads),
        "window_size": window_size,
        "mlp_ratio": mlp_ratio,
        "qkv_bias": qkv_bias,
        "drop_rate": drop_rate,
        "attn_drop_rate": attn_drop_rate,
        "drop_path_rate": dropout_path_rate,
        "patch_norm": patch_norm,
        "norm_eps": 1e-5,
    }


# ---------------------------------------------------------------------- state-dict conversion
def _split_prefix(
    sd: Mapping[str, torch.Tensor], signatures: Sequence[str]
) -> tuple[str, list[str]]:
    """Finds the one prefix under which the encoder lives (``""``, ``"vit."``, ``"swinViT."``,
    ``"module."``...). Returns it and the keys outside it."""
    prefixes = {k[: -len(s)] for k in sd for s in signatures if k.endswith(s)}
    prefixes = {p for p in prefixes if p == "" or p.endswith(".")}
    if not prefixes:
        raise ValueError(
            f"no encoder found in the state dict: no key ends with {' or '.join(signatures)}"
        )
    if len(prefixes) > 1:
        raise ValueError(
            f"several encoders found in the state dict, under prefixes {sorted(prefixes)}"
        )
    prefix = prefixes.pop()
    return prefix, [k for k in sd if not k.startswith(prefix)]


def convert_monai_vit_state_dict(
    sd: Mapping[str, torch.Tensor], patch_size: int | Sequence[int] | None = None
) -> StateDict:
    """MONAI ``ViT`` keys -> :class:`ViT3D` keys (see the module table).

    ``sd`` may be a ``ViT`` state dict or contain one under a prefix (``UNETR``'s ``vit.``,
    ``module.``); keys outside it are ignored.

    Args:
        sd: MONAI state dict.
        patch_size: needed only for ``proj_type="perceptron"`` checkpoints.
    """
    prefix, _ = _split_prefix(sd, _VIT_SIGNATURES)
    src = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
    out: StateDict = {}
    qkv_parts: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in src.items():
        if re.match(r"blocks\.\d+\.(norm_cross_attn|cross_attn)\.", k):
            continue  # TransformerBlock always builds norm_cross_attn; unused without cross-attn
        if k.endswith("attn.causal_mask"):
            raise ValueError(f"{k}: causal MONAI attention is not supported")
        if k.startswith("patch_embedding.patch_embeddings.1."):
            if k.endswith(".weight"):
                if patch_size is None:
                    raise ValueError("a 'perceptron' patch embedding needs patch_size to convert")
                p = to_3tuple(patch_size, "patch_size")
                c = v.shape[1] // math.prod(p)
                if c * math.prod(p) != v.shape[1]:
                    raise ValueError(f"{k}: {tuple(v.shape)} does not fit patch_size={p}")
                # Linear over (p1 p2 p3 c) -> Conv3d (C, c, p1, p2, p3)
                v = v.reshape(v.shape[0], *p, c).permute(0, 4, 1, 2, 3).contiguous()
            out["patch_embed.proj." + k.rsplit(".", 1)[1]] = v
            continue
        m = re.match(r"(blocks\.\d+\.attn)\.to_([qkv])\.(weight|bias)$", k)
        if m:
            qkv_parts.setdefault(f"{m[1]}.qkv.{m[3]}", {})[m[2]] = v
            continue
        new = k
        for old, rep in (
            ("patch_embedding.patch_embeddings.", "patch_embed.proj."),
            ("patch_embedding.position_embeddings", "pos_embed"),
            (".attn.out_proj.", ".attn.proj."),
            (".mlp.linear1.", ".mlp.fc1."),
            (".mlp.linear2.", ".mlp.fc2."),
            ("classification_head.0.", "head."),
            ("classification_head.", "head."),
        ):
            if old in new and (not old[0].isalpha() or new.startswith(old)):
                new = new.replace(old, rep)
        out[new] = v
    for name, parts in qkv_parts.items():
        if set(parts) != {"q", "k", "v"}:
            raise ValueError(f"{name}: found only to_{'/to_'.join(sorted(parts))}")
        out[name] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


def convert_monai_swin_state_dict(
    sd: Mapping[str, torch.Tensor], downsample: str = "merging"
) -> StateDict:
    """MONAI ``SwinTransformer`` (``SwinUNETR.swinViT``) keys -> :class:`SwinTransformer3D` keys.

    ``sd`` may be a ``swinViT`` state dict or contain one under a prefix (``swinViT.``,
    ``module.``); keys outside it are ignored.

    Args:
        sd: MONAI state dict.
        downsample: the MONAI model's ``downsample`` (``"merging"``, the default, or
            ``"mergingv2"``): sets how the merging channels are reordered.
    """
    if downsample not in ("merging", "mergingv2"):
        raise ValueError(f"downsample must be 'merging' or 'mergingv2', got {downsample!r}")
    prefix, _ = _split_prefix(sd, _SWIN_SIGNATURES)
    out: StateDict = {}
    for key, v in sd.items():
        if not key.startswith(prefix):
            continue
        k = key[len(prefix) :]
        if k.startswith("patch_embed."):
            out[k] = v
            continue
        m = re.match(r"layers(\d+)\.0\.(.*)$", k)
        if m is None:
            if re.match(r"layers\d+c\.", k):
                raise ValueError(f"{key}: SwinUNETR-v2 (use_v2=True) checkpoints are not supported")
            out[k] = v  # not an encoder key we know: surfaces as unexpected on load
            continue
        stage, rest = int(m[1]) - 1, m[2]
        if rest.endswith("attn.relative_position_index"):
            continue  # recomputed from the window size
        rest = rest.replace(".mlp.linear1.", ".mlp.fc1.").replace(".mlp.linear2.", ".mlp.fc2.")
        if rest.startswith("downsample.") and downsample == "merging":
            v = _permute_merge_blocks(v, rest)
        out[f"stages.{stage}.{rest}"] = v
    return out


def _permute_merge_blocks(v: torch.Tensor, name: str) -> torch.Tensor:
    """Reorders the 8 neighbour blocks of a merging norm (8C,) or reduction (2C, 8C) weight."""
    if name.endswith("reduction.weight"):
        # (2C, 8C) -> (2C, 8, C) -> reorder blocks -> (2C, 8C)
        return v.view(v.shape[0], 8, -1)[:, list(_MERGING_PERM)].reshape(v.shape)
    # norm weight / bias: (8C,) -> (8, C) -> reorder -> (8C,)
    return v.view(8, -1)[list(_MERGING_PERM)].reshape(v.shape)


# ---------------------------------------------------------------------- loading
def _read_state_dict(sd: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    if not isinstance(sd, Mapping):
        raise ValueError(
            f"expected a loaded state dict, got {type(sd).__name__}; read files with "
            "umit.train.checkpoint.load_monai_weights(model, path)"
        )
    obj: Any = sd
    for _ in range(2):  # {"state_dict": {...}} or {"model": {...}} (possibly nested once more)
        if isinstance(obj, Mapping) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
            inner = next(
                (obj[k] for k in MONAI_CHECKPOINT_KEYS if isinstance(obj.get(k), Mapping)), None
            )
            if inner is None:
                raise ValueError(
                    f"not a state dict and none of {MONAI_CHECKPOINT_KEYS} holds one; keys: {list(obj)[:10]}"
                )
            obj = inner
    if not isinstance(obj, Mapping):
        raise ValueError(f"expected a state dict, got {type(obj).__name__}")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def _fit_pos_embed(sd: StateDict, model: ViT3D, source_grid: Sequence[int] | None) -> None:
    pe = sd.get("pos_embed")
    if pe is None or pe.shape[1] == model.pos_embed.shape[1]:
        return
    if source_grid is None:
        side = round(pe.shape[1] ** (1 / 3))
        if side**3 != pe.shape[1]:
            raise ValueError(
                f"checkpoint pos_embed has {pe.shape[1]} tokens, the model {model.pos_embed.shape[1]}; "
                "pass source_grid=(d, h, w) of the checkpoint"
            )
        source_grid = (side, side, side)
    sd["pos_embed"] = resample_pos_embed_3d(pe, source_grid, model.pos_grid)


def load_monai_checkpoint(
    model: nn.Module,
    path_or_sd: Mapping[str, Any],
    strict: bool = True,
    downsample: str = "merging",
    source_grid: Sequence[int] | None = None,
) -> MonaiLoadResult:
    """Loads MONAI weights into a :class:`ViT3D` or :class:`SwinTransformer3D`.

    Accepts a ``ViT`` / ``UNETR`` / ``SwinUNETR`` / ``swinViT`` state dict, or a checkpoint dict
    holding one under ``"state_dict"`` / ``"model"``; prefixes (``vit.``, ``swinViT.``,
    ``module.``) are found and stripped, and keys outside the encoder (decoders, SSL heads) are
    dropped and reported. Files are read by :func:`umit.train.checkpoint.load_monai_weights`
    (``weights_only``, local paths only), which calls this.

    Args:
        model: the encoder to fill (build it with :func:`vit3d_args_from_monai` /
            :func:`swin3d_args_from_monai`).
        path_or_sd: a loaded state dict or checkpoint dict.
        strict: raise when a model key is missing or a converted encoder key has no place.
        downsample: for Swin, the MONAI model's ``downsample`` mode.
        source_grid: for ViT, the checkpoint's patch grid when its position table has another
            size than the model's and is not a cube (it is resampled trilinearly).

    Raises:
        ValueError: unusable checkpoint or, when ``strict``, mismatched keys (all listed).
    """
    raw = _read_state_dict(path_or_sd)
    if isinstance(model, ViT3D):
        prefix, dropped = _split_prefix(raw, _VIT_SIGNATURES)
        sd = convert_monai_vit_state_dict(raw, patch_size=model.patch_size)
        if isinstance(model.head, nn.Identity):
            dropped += [prefix + k for k in sd if k.startswith("head.")]
            sd = {k: v for k, v in sd.items() if not k.startswith("head.")}
        _fit_pos_embed(sd, model, source_grid)
    elif isinstance(model, SwinTransformer3D):
        prefix, dropped = _split_prefix(raw, _SWIN_SIGNATURES)
        sd = convert_monai_swin_state_dict(raw, downsample=downsample)
    else:
        raise ValueError(f"expected a ViT3D or SwinTransformer3D, got {type(model).__name__}")
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shape_errors = [
        f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sorted(set(sd) & set(own))
        if sd[k].shape != own[k].shape
    ]
    if shape_errors or (strict and (missing or unexpected)):
        raise ValueError(
            f"MONAI checkpoint does not fit {type(model).__name__} (prefix {prefix!r}): "
            f"missing={missing} unexpected={unexpected} shape mismatches={shape_errors}"
        )
    model.load_state_dict({k: v for k, v in sd.items() if k in own}, strict=False)
    return MonaiLoadResult(missing, unexpected, sorted(dropped))


def convert_monai_decoder_keys(
    sd: Mapping[str, torch.Tensor], encoder_prefix: str
) -> dict[str, torch.Tensor]:
    """Decoder keys of a MONAI UNETR / SwinUNETR state dict -> ours (encoder keys skipped).

    MONAI wraps each convolution in ``Convolution`` (``conv1.conv.weight`` -> ``conv1.weight``)
    and each ``UnetrBasicBlock`` in ``.layer`` (``encoder1.layer.conv1`` -> ``encoder1.conv1``).
    """
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        k = k.removeprefix("module.")
        if k.startswith(encoder_prefix):
            continue
        k = re.sub(r"^(encoder\d+)\.layer\.", r"\1.", k)
        out[re.sub(r"\.conv\.(weight|bias)$", r".\1", k)] = v
    return out
