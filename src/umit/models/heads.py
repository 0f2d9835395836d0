"""Classification heads on the shared encoders, and the fine-tuning helpers of every task model.

- :class:`ClassificationModel`: an encoder (ViT3D tokens or Swin last-stage tokens) + pooling
  (``"cls"``, ``"mean"`` or ``"attn"``: a learned query attending over the patch tokens) +
  dropout + Linear; registered as ``create_model("classifier", encoder="vit3d_tiny_p16",
  pool="attn", num_classes=2)``.
- :func:`freeze_encoder`: linear probe (``trainable_blocks=0``) or partial fine-tuning (the last
  ``k`` blocks of ``model.encoder``, found through the encoder's ``feature_info`` module names).
- :func:`layer_id_fn`: parameter name -> layer id for layer-wise LR decay (stem 0, block i ->
  i + 1, everything after the encoder -> depth + 1), the input of
  ``umit.train.optim.param_groups(model, layer_id_fn(model), layer_decay)``.
- :func:`load_encoder_state_dict`: bare encoder weights (MAE's ``encoder.state_dict()``) into a
  task model's ``encoder``, resampling a position table pretrained on another grid.

Everything here uses only the feature API (``forward_features``, ``forward_intermediates``,
``feature_info``, ``num_features``, ``num_prefix_tokens``), never hard-coded module names.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from umit.models.layers import resample_pos_embed_3d
from umit.models.registry import create_model, register_model

__all__ = [
    "AttentionPool",
    "ClassificationModel",
    "build_encoder",
    "check_encoder_api",
    "feature_modules",
    "freeze_encoder",
    "layer_id_fn",
    "load_encoder_state_dict",
]

# parameter-name parts that belong to the input stem (layer 0), as umit.train.optim
STEM_KEYWORDS = ("patch_embed", "pos_embed", "cls_token", "mask_token", "reg_token", "register")
POOLS = ("cls", "mean", "attn")
HEAD_NORMS = ("none", "batch")


# ---------------------------------------------------------------------- encoders
def build_encoder(
    encoder: str | nn.Module,
    encoder_args: Mapping[str, Any] | None = None,
    in_chans: int | None = None,
    img_size: int | Sequence[int] | None = None,
) -> tuple[nn.Module, int]:
    """The encoder module and its input channels.

    A name is built with ``create_model(encoder, **encoder_args)`` plus ``in_chans`` /
    ``img_size`` when given; a module is used as is (``in_chans`` defaults to its own).

    Raises:
        ValueError: when the input channels cannot be found or disagree.
    """
    if isinstance(encoder, str):
        args = dict(encoder_args or {})
        if in_chans is not None:
            args["in_chans"] = in_chans
        if img_size is not None:
            args["img_size"] = tuple(img_size) if isinstance(img_size, (list, tuple)) else img_size
        args.setdefault("num_classes", 0)  # a headless encoder, as pretraining saves it
        module = create_model(encoder, **args)
    elif isinstance(encoder, nn.Module):
        if encoder_args:
            raise ValueError("encoder_args only apply to an encoder given by name")
        module = encoder
    else:
        raise ValueError(f"encoder must be a registered name or a module, got {encoder!r}")
    own = _encoder_in_chans(module)
    if in_chans is None:
        in_chans = own
    if in_chans is None:
        raise ValueError(
            f"cannot tell the input channels of {type(module).__name__}; pass in_chans"
        )
    if own is not None and own != in_chans:
        raise ValueError(f"in_chans={in_chans} but the encoder takes {own} input channels")
    return module, int(in_chans)


def _encoder_in_chans(encoder: nn.Module) -> int | None:
    for obj, attr in ((encoder, "in_chans"), (getattr(encoder, "patch_embed", None), "in_chans")):
        value = getattr(obj, attr, None)
        if isinstance(value, int):
            return value
    value = getattr(encoder, "init_args", {}).get("in_chans")
    return int(value) if isinstance(value, int) else None


def check_encoder_api(encoder: nn.Module, who: str, tokens: bool = False) -> None:
    """Raises ValueError naming what ``encoder`` lacks of the feature API ``who`` needs."""
    needed = ["forward_features", "forward_intermediates", "feature_info"]
    if tokens:
        needed.append("num_prefix_tokens")
    missing = [a for a in needed if not hasattr(encoder, a)]
    if missing:
        raise ValueError(f"{who} needs an encoder with {missing} (the feature API)")
    if not encoder.feature_info:
        raise ValueError(f"{who}: encoder {type(encoder).__name__} has an empty feature_info")


def feature_modules(encoder: nn.Module) -> list[str]:
    """Distinct ``feature_info`` module names of ``encoder``, in order (its "blocks")."""
    out: list[str] = []
    for info in encoder.feature_info:
        name = info.get("module")
        if not name:
            raise ValueError(f"{type(encoder).__name__}.feature_info entries need a 'module' name")
        if name not in out:
            out.append(name)
    return out


def _is_stem_name(name: str) -> bool:
    return any(part.startswith(k) for part in name.split(".") for k in STEM_KEYWORDS)


def load_encoder_state_dict(
    encoder: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    strict: bool = True,
    source_grid: Sequence[int] | None = None,
) -> Any:
    """Loads bare encoder weights into ``encoder`` (returns torch's missing / unexpected keys).

    Keys may carry an ``encoder.`` prefix (a whole MAE / task-model state dict: other keys are
    ignored). A learned position table of another token grid (pretrained at 96³, fine-tuned at
    128³) is resampled trilinearly to the encoder's grid; ``source_grid`` is needed only when the
    checkpoint grid is not a cube.
    """
    sd = dict(state_dict)
    if any(k.startswith("encoder.") for k in sd):
        sd = {k[len("encoder.") :]: v for k, v in sd.items() if k.startswith("encoder.")}
    pe, own = sd.get("pos_embed"), getattr(encoder, "pos_embed", None)
    if (
        isinstance(pe, torch.Tensor)
        and isinstance(own, torch.Tensor)
        and pe.shape != own.shape
        and pe.shape[-1] == own.shape[-1]  # another width is a mismatch, not another grid
        and hasattr(encoder, "pos_grid")
    ):
        if source_grid is None:
            side = round(pe.shape[1] ** (1 / 3))
            if side**3 != pe.shape[1]:
                raise ValueError(
                    f"checkpoint pos_embed has {pe.shape[1]} tokens, the encoder "
                    f"{own.shape[1]}; pass source_grid=(d, h, w) of the checkpoint"
                )
            source_grid = (side, side, side)
        sd["pos_embed"] = resample_pos_embed_3d(pe, tuple(source_grid), tuple(encoder.pos_grid))
    return encoder.load_state_dict(sd, strict=strict)


# ---------------------------------------------------------------------- fine-tuning helpers
def _encoder_and_prefix(model: nn.Module) -> tuple[nn.Module, str]:
    encoder = getattr(model, "encoder", None)
    if isinstance(encoder, nn.Module) and hasattr(encoder, "feature_info"):
        return encoder, "encoder."
    if hasattr(model, "feature_info"):
        return model, ""
    raise ValueError(
        f"{type(model).__name__} has neither an 'encoder' with feature_info nor feature_info"
    )


def freeze_encoder(model: nn.Module, trainable_blocks: int = 0) -> list[str]:
    """Freezes ``model.encoder`` for a linear probe or partial fine-tuning.

    With ``trainable_blocks=k > 0`` the last ``k`` modules named by the encoder's
    ``feature_info`` (ViT: ``blocks.i``; Swin: ``stages.i``) and the encoder parameters after them
    (a final norm) stay trainable. The decoder / head is not touched.

    Returns:
        names of the encoder parameters left trainable.

    Raises:
        ValueError: no encoder, or ``trainable_blocks`` outside ``0..number of blocks``.
    """
    encoder = getattr(model, "encoder", None)
    if not isinstance(encoder, nn.Module) or not hasattr(encoder, "feature_info"):
        raise ValueError(f"{type(model).__name__} has no encoder with feature_info to freeze")
    blocks = feature_modules(encoder)
    if not 0 <= trainable_blocks <= len(blocks):
        raise ValueError(
            f"trainable_blocks must be in 0..{len(blocks)} (the encoder's blocks), "
            f"got {trainable_blocks!r}"
        )
    encoder.requires_grad_(False)
    if trainable_blocks == 0:
        return []
    keep = blocks[-trainable_blocks:]
    names = [n for n, _ in encoder.named_parameters()]
    last_block_param = max(
        (i for i, n in enumerate(names) if any(n.startswith(b + ".") for b in blocks)), default=-1
    )
    trainable = []
    for i, (name, p) in enumerate(encoder.named_parameters()):
        in_kept = any(name.startswith(b + ".") for b in keep)
        if in_kept or (i > last_block_param and not _is_stem_name(name)):
            p.requires_grad_(True)
            trainable.append(name)
    return trainable


def wrapped_layer_id_fn(net: nn.Module, prefix: str = "net.") -> Callable[[str], int]:
    """Layer ids of a wrapper around a task model ``net`` (registered as ``prefix``): the task
    model's own ids under ``prefix``; the wrapper's other parameters go with the stem (0)."""
    fn = getattr(net, "layer_id_fn", None)
    inner = fn() if callable(fn) else layer_id_fn(net)
    cut = len(prefix)

    def layer_id(name: str) -> int:
        return inner(name[cut:]) if name.startswith(prefix) else 0

    layer_id.num_layers = getattr(inner, "num_layers", None)  # type: ignore[attr-defined]
    return layer_id


def layer_id_fn(model: nn.Module) -> Callable[[str], int]:
    """Parameter name -> layer id for layer-wise LR decay.

    Stem (patch / position embeddings, cls token, anything registered before the first block)
    -> 0; the i-th ``feature_info`` module (ViT ``blocks.i``, Swin ``stages.i``; a stem module
    such as Swin's ``patch_embed`` counts as stem) -> i + 1; encoder parameters after the last
    block (final norm) and everything outside the encoder (decoder, head) -> depth + 1. Works
    for task models (``model.encoder``) and for encoders / CNNs with ``feature_info``.
    """
    encoder, prefix = _encoder_and_prefix(model)
    modules = feature_modules(encoder)
    ids: dict[str, int] = {}
    depth = 0
    for name in modules:
        if _is_stem_name(name):
            ids[name] = 0
        else:
            depth += 1
            ids[name] = depth
    ordered = sorted(ids, key=len, reverse=True)  # "blocks.10" before "blocks.1"
    names = [n for n, _ in encoder.named_parameters()]
    first_block = min(
        (i for i, n in enumerate(names) if any(n.startswith(m + ".") for m in modules)),
        default=len(names),
    )
    stem = {n for i, n in enumerate(names) if i < first_block}

    def layer_id(name: str) -> int:
        if not name.startswith(prefix):
            return depth + 1
        rest = name[len(prefix) :]
        for m in ordered:
            if rest.startswith(m + ".") or rest == m:
                return ids[m]
        if rest in stem or _is_stem_name(rest):
            return 0
        return depth + 1

    layer_id.num_layers = depth + 2  # type: ignore[attr-defined]
    return layer_id


# ---------------------------------------------------------------------- classification
class AttentionPool(nn.Module):
    """Attention pooling: one learned query attends over the tokens (multi-head, SDPA).

    Args:
        dim: token width C.
        num_heads: heads; must divide ``dim``.
        qkv_bias: biases on the query / key-value projections.

    ``forward(x (B, L, C)) -> (B, C)``.
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = True):
        super().__init__()
        if num_heads <= 0 or dim % num_heads:
            raise ValueError(f"dim={dim!r} must be divisible by num_heads={num_heads!r}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.query = nn.Parameter(torch.zeros(1, 1, dim))
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        nn.init.trunc_normal_(self.query, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, C = x.shape
        nH, hd = self.num_heads, self.head_dim
        # (1, 1, C) -> (1, nH, 1, hd) -> (B, nH, 1, hd)
        q = self.q(self.query).view(1, 1, nH, hd).transpose(1, 2).expand(B, -1, -1, -1)
        # (B, L, 2C) -> (B, L, 2, nH, hd) -> (2, B, nH, L, hd)
        k, v = self.kv(x).view(B, L, 2, nH, hd).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, nH, 1, hd)
        return self.proj(out.reshape(B, C))  # (B, nH, 1, hd) -> (B, C)


def _default_heads(dim: int) -> int:
    for h in (8, 6, 4, 3, 2):
        if dim % h == 0 and dim // h >= 8:
            return h
    return 1


class ClassificationModel(nn.Module):
    """Encoder + pooling + Linear classifier.

    Args:
        encoder: registered encoder name (built with ``encoder_args``, ``in_chans``,
            ``img_size``) or a module with the feature API (ViT3D, SwinTransformer3D).
        num_classes: outputs.
        pool: ``"cls"`` (the class token; ViT with ``class_token``), ``"mean"`` (patch tokens) or
            ``"attn"`` (:class:`AttentionPool` over the patch tokens).
        dropout: dropout before the Linear.
        in_chans: input channels (forwarded to a named encoder).
        img_size: nominal input size (forwarded to a named encoder).
        encoder_args: more constructor arguments of a named encoder.
        attn_heads: heads of the attention pool (default: 8, 6, 4, ... whichever divides C).
        head_norm: ``"none"`` or ``"batch"``: a BatchNorm without affine parameters on the
            pooled features, before the Linear (as MAE's linear probe). It puts every feature
            on unit scale across the batch, so the head learns as fast when the pooled features
            of different inputs are nearly the same vector (a ViT on sparse masks at init).
    """

    def __init__(
        self,
        encoder: str | nn.Module = "vit3d_tiny_p16",
        num_classes: int = 2,
        pool: str = "mean",
        dropout: float = 0.0,
        in_chans: int | None = None,
        img_size: int | Sequence[int] | None = None,
        encoder_args: Mapping[str, Any] | None = None,
        attn_heads: int | None = None,
        head_norm: str = "none",
    ):
        super().__init__()
        if head_norm not in HEAD_NORMS:
            raise ValueError(f"head_norm must be one of {HEAD_NORMS}, got {head_norm!r}")
        if num_classes <= 0:
            raise ValueError(f"num_classes must be positive, got {num_classes!r}")
        if pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.encoder, in_chans = build_encoder(encoder, encoder_args, in_chans, img_size)
        check_encoder_api(self.encoder, "ClassificationModel")
        self.num_prefix_tokens = int(getattr(self.encoder, "num_prefix_tokens", 0))
        if pool == "cls" and self.num_prefix_tokens < 1:
            raise ValueError(
                f"pool='cls' needs an encoder with a class token; {type(self.encoder).__name__} "
                "has none (use 'mean' or 'attn')"
            )
        dim = int(getattr(self.encoder, "num_features", self.encoder.feature_info[-1]["num_chs"]))
        self.init_args: dict[str, Any] = {
            "encoder": encoder if isinstance(encoder, str) else type(encoder).__name__,
            "num_classes": num_classes,
            "pool": pool,
            "dropout": dropout,
            "in_chans": in_chans,
            "img_size": img_size,
            "encoder_args": dict(encoder_args or {}),
            "attn_heads": attn_heads,
            "head_norm": head_norm,
        }
        self.model_name: str | None = None  # set by create_model
        self.model_args: dict[str, Any] = {}
        self.pool_type = pool
        self.num_features = dim
        self.num_classes = num_classes
        self.pool = (
            AttentionPool(dim, attn_heads or _default_heads(dim)) if pool == "attn" else None
        )
        self.head_drop = nn.Dropout(dropout)
        self.head_norm = (
            nn.BatchNorm1d(dim, affine=False, eps=1e-6) if head_norm == "batch" else nn.Identity()
        )
        self.head = nn.Linear(dim, num_classes)
        # Zero head: every seed starts from the same (uniform) prediction, so a fine-tune's
        # outcome does not hinge on which way a random head pointed in a feature space that
        # one direction (e.g. object size) dominates; the first step moves it along the
        # gradient, and the encoder learns from the second on.
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def load_encoder_state_dict(
        self,
        state_dict: Mapping[str, torch.Tensor],
        strict: bool = True,
        source_grid: Sequence[int] | None = None,
    ) -> Any:
        """See :func:`load_encoder_state_dict`."""
        return load_encoder_state_dict(self.encoder, state_dict, strict, source_grid)

    def no_weight_decay(self) -> set[str]:
        fn = getattr(self.encoder, "no_weight_decay", None)
        names = {f"encoder.{n}" for n in fn()} if callable(fn) else set()
        return names | ({"pool.query"} if self.pool is not None else set())

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, D, H, W) -> encoder tokens (B, prefix + L, C)."""
        return self.encoder.forward_features(x)

    def forward_head(self, tokens: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pools tokens (B, prefix + L, C) -> (B, C), then dropout and the Linear.

        A CNN encoder's feature map (B, C, d, h, w) is read as tokens (B, d·h·w, C) first.
        """
        if tokens.ndim == 5:
            tokens = tokens.flatten(2).transpose(1, 2)  # (B, C, d, h, w) -> (B, L, C)
        if self.pool_type == "cls":
            x = tokens[:, 0]
        elif self.pool_type == "mean":
            x = tokens[:, self.num_prefix_tokens :].mean(dim=1)
        else:
            x = self.pool(tokens[:, self.num_prefix_tokens :])
        x = self.head_drop(x)
        return x if pre_logits else self.head(self.head_norm(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


@register_model
def classifier(**kwargs: Any) -> ClassificationModel:
    """Encoder + pooled Linear head: ``create_model("classifier", encoder="vit3d_tiny_p16",
    pool="attn", num_classes=2, img_size=96, in_chans=1)``; Swin encoders pool their last stage."""
    return ClassificationModel(**kwargs)


# ---------------------------------------------------------------------- feature helpers
def pooled_features(encoder: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(B, C_in, D, H, W) -> (B, F) pooled features of any encoder with the feature API.

    ``forward_head(forward_features(x), pre_logits=True)`` where the encoder has it (ViT3D,
    SwinTransformer3D, ResNet3D); otherwise (or when that is not pooled) the mean over patch
    tokens (B, prefix + L, C) or over a feature map (B, C, d, h, w).
    """
    feats = encoder.forward_features(x)
    head = getattr(encoder, "forward_head", None)
    if callable(head):
        pooled = head(feats, pre_logits=True)
        if pooled.ndim == 2:
            return pooled
    if feats.ndim == 5:
        return feats.mean(dim=(2, 3, 4))  # (B, C, d, h, w) -> (B, C)
    if feats.ndim == 3:
        return feats[:, int(getattr(encoder, "num_prefix_tokens", 0)) :].mean(dim=1)
    raise ValueError(f"cannot pool features of shape {tuple(feats.shape)}")


def feature_map(encoder: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(B, C_in, D, H, W) -> the deepest feature map (B, C, d, h, w), via ``forward_intermediates``."""
    return encoder.forward_intermediates(x, indices=1)[0]


def feature_dim(encoder: nn.Module) -> int:
    """Width of :func:`pooled_features` / :func:`feature_map`."""
    dim = getattr(encoder, "num_features", None)
    if dim is None:
        dim = encoder.feature_info[-1]["num_chs"]
    return int(dim)
