"""AdamW with parameter groups: no weight decay on biases/norms/1-D/listed parameters, layer-wise LR.

Each group carries ``lr_scale`` and ``wd_scale``; the loop sets
``group["lr"] = lr[step] * lr_scale`` and ``group["weight_decay"] = wd[step] * wd_scale`` every
step (MAE / DINOv2 convention), so schedules and groups stay independent. ``param_names``
(torch's own key for named parameter groups) lists the parameters of each group for inspection.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from umit.train.config import TrainConfig

LayerIdFn = Callable[[str], int]

# Parameters that belong to the input stem (layer 0) in layer-wise LR decay.
EMBED_KEYWORDS = ("patch_embed", "pos_embed", "cls_token", "mask_token", "reg_token", "register")


def no_weight_decay_names(model: nn.Module) -> set[str]:
    """Full names listed by ``no_weight_decay()`` of ``model`` and of every submodule.

    A submodule's names are prefixed with its path, so an encoder's ``{"pos_embed"}`` inside an
    SSL wrapper becomes ``"encoder.pos_embed"``.
    """
    names: set[str] = set()
    for prefix, module in model.named_modules():
        fn = getattr(module, "no_weight_decay", None)
        if callable(fn):
            names.update(f"{prefix}.{n}" if prefix else n for n in fn())
    return names


def _listed(name: str, listed: set[str]) -> bool:
    # "pos_embed" also covers "pos_embed.weight" when the listed name is a module.
    return name in listed or any(name.startswith(n + ".") for n in listed)


def layer_id_by_blocks(num_blocks: int, blocks_name: str = "blocks") -> LayerIdFn:
    """Layer ids for a ViT-like encoder: stem (embeddings) 0, ``blocks.i`` -> ``i + 1``, rest last.

    Works on prefixed names (``encoder.blocks.3.attn.qkv.weight`` -> 4). Everything that is
    neither stem nor block (final norm, head, decoder) gets ``num_blocks + 1`` (full LR).
    """
    pattern = re.compile(rf"(?:^|\.){re.escape(blocks_name)}\.(\d+)\.")

    def layer_id(name: str) -> int:
        match = pattern.search(name)
        if match:
            return int(match.group(1)) + 1
        if any(part.startswith(k) for part in name.split(".") for k in EMBED_KEYWORDS):
            return 0
        return num_blocks + 1

    return layer_id


def param_groups(
    model: nn.Module,
    layer_id_fn: LayerIdFn | None = None,
    layer_decay: float = 1.0,
) -> list[dict]:
    """Split trainable parameters into groups by (``wd_scale``, ``lr_scale``).

    No weight decay (``wd_scale=0``) for parameters with ``ndim <= 1`` (biases, norm weights,
    scalars, 1-D tokens), names ending in ``.bias``, and names listed by ``no_weight_decay()``.
    With ``layer_id_fn`` and ``layer_decay < 1``, a parameter of layer ``i`` gets
    ``lr_scale = layer_decay ** (max_id - i)`` where ``max_id`` is the largest id seen.
    """
    if not 0 < layer_decay <= 1:
        raise ValueError(f"layer_decay must be in (0, 1], got {layer_decay}")
    skip = no_weight_decay_names(model)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError(f"{type(model).__name__} has no trainable parameters")
    ids = {n: layer_id_fn(n) for n, _ in named} if layer_id_fn is not None else {}
    max_id = max(ids.values(), default=0)
    groups: dict[tuple[float, float], dict] = {}
    for name, p in named:
        decay = not (p.ndim <= 1 or name.endswith(".bias") or _listed(name, skip))
        lr_scale = layer_decay ** (max_id - ids[name]) if ids else 1.0
        key = (1.0 if decay else 0.0, lr_scale)
        group = groups.setdefault(
            key, {"params": [], "param_names": [], "wd_scale": key[0], "lr_scale": key[1]}
        )
        group["params"].append(p)
        group["param_names"].append(name)
    # Stable order: decayed first, then by decreasing lr scale.
    return [groups[k] for k in sorted(groups, key=lambda k: (-k[0], -k[1]))]


def build_optimizer(
    model: nn.Module,
    cfg: TrainConfig,
    layer_id_fn: LayerIdFn | None = None,
    fused: bool | None = None,
) -> torch.optim.Optimizer:
    """``cfg.optimizer`` (AdamW by default) over :func:`param_groups`; lr and weight decay are
    set per step by the loop.

    If ``cfg.layer_decay < 1`` and no ``layer_id_fn`` is given, the module's ``blocks`` (a
    ``ModuleList``) define the layers via :func:`layer_id_by_blocks`.
    """
    if cfg.layer_decay < 1 and layer_id_fn is None:
        blocks = getattr(model, "blocks", None)
        if not isinstance(blocks, Iterable) or not hasattr(blocks, "__len__"):
            raise ValueError(
                f"layer_decay={cfg.layer_decay} needs a layer_id_fn, or a module with a "
                f"'blocks' ModuleList ({type(model).__name__} has none)"
            )
        layer_id_fn = layer_id_by_blocks(len(blocks))
    groups = param_groups(model, layer_id_fn, cfg.layer_decay if layer_id_fn else 1.0)
    return make_optimizer(groups, cfg, fused)


def make_optimizer(
    groups: list[dict[str, Any]], cfg: TrainConfig, fused: bool | None = None
) -> torch.optim.Optimizer:
    """``cfg.optimizer`` (AdamW or SGD with momentum) over ``groups`` of :func:`param_groups`,
    each at its ``lr_scale`` / ``wd_scale`` of the configured lr and weight decay."""
    for g in groups:
        g["lr"] = cfg.lr * g["lr_scale"]
        g["weight_decay"] = cfg.weight_decay * g["wd_scale"]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, fused=fused)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=fused)


def set_lr_wd(optimizer: torch.optim.Optimizer, lr: float, wd: float) -> None:
    """Apply this step's schedule values, scaled per group."""
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)
        g["weight_decay"] = wd * g.get("wd_scale", 1.0)
