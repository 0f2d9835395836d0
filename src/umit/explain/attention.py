"""Attention weights of a ViT-based model, read without touching the model's code.

The attention layers compute softmax(q k^T / sqrt(d)) inside ``scaled_dot_product_attention`` and
never keep it, so a forward hook on every :class:`umit.models.layers.Attention` records the
layer's input and recomputes the weights from its own ``qkv`` projection (the same numbers SDPA
used, without dropout). That works for every model built on the shared ViT (encoders, UNETR,
classifiers) without reaching into ``encoder.blocks[i]``.

Rollout (Abnar & Zuidema, 2020): ``R = prod_l (0.5 * mean_h A_l + 0.5 * I)`` with rows
renormalised, the product taken from the first layer to the last, so row ``q`` of ``R`` says how
much each input token flows into output token ``q`` through the residual stream.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from umit.models.layers import Attention

__all__ = ["attention_layers", "attention_rollout", "record_attention"]


def attention_layers(model: nn.Module) -> list[Attention]:
    """The model's global self-attention layers, in the order they run (registration order)."""
    return [m for m in model.modules() if isinstance(m, Attention)]


def attention_weights(layer: Attention, x: torch.Tensor) -> torch.Tensor:
    """Recompute one layer's attention: tokens (B, L, C) -> weights (B, heads, L, L)."""
    B, L, _ = x.shape
    # (B, L, 3C) -> (B, L, 3, heads, hd) -> (3, B, heads, L, hd)
    qkv = layer.qkv(x).reshape(B, L, 3, layer.num_heads, layer.head_dim).permute(2, 0, 3, 1, 4)
    q, k = qkv[0], qkv[1]
    return ((q @ k.transpose(-2, -1)) * layer.scale).softmax(dim=-1)


@contextmanager
def record_attention(model: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Within the block, every forward of ``model`` appends each attention layer's weights
    (B, heads, L, L) to the yielded list, in the order the layers ran.

    Raises:
        ValueError: the model has no :class:`Attention` layer (not ViT-based).
    """
    layers = attention_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no ViT attention layer: use method=gradcam")
    out: list[torch.Tensor] = []

    def hook(module: Attention, args: tuple, _output: torch.Tensor) -> None:
        with torch.no_grad():
            out.append(attention_weights(module, args[0].detach()).float())

    handles = [m.register_forward_hook(hook) for m in layers]
    try:
        yield out
    finally:
        for h in handles:
            h.remove()


def attention_rollout(attn: list[torch.Tensor], residual: float = 0.5) -> torch.Tensor:
    """Rollout over layers: list of (B, heads, L, L) -> (B, L, L).

    Args:
        attn: per-layer weights, first layer first.
        residual: weight of the identity (the skip connection) mixed into each layer.
    """
    if not attn:
        raise ValueError("attention_rollout needs at least one layer")
    if not 0.0 <= residual < 1.0:
        raise ValueError(f"residual must be in [0, 1), got {residual!r}")
    B, _, L, _ = attn[0].shape
    eye = torch.eye(L, dtype=attn[0].dtype, device=attn[0].device).expand(B, L, L)
    r = eye.clone()
    for a in attn:
        m = (1.0 - residual) * a.mean(dim=1) + residual * eye  # (B, L, L)
        m = m / m.sum(dim=-1, keepdim=True)
        r = m @ r  # later layer on the left: row q of r = flow into token q
    return r
