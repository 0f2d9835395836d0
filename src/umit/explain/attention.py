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


# ---------------------------------------------------------------------------------------------
# Swin: attention inside (shifted) windows
# ---------------------------------------------------------------------------------------------
def window_attention_weights(
    block: nn.Module, x: torch.Tensor, window: tuple, shift: tuple, mask: torch.Tensor | None
) -> tuple[torch.Tensor, tuple[int, int, int], bool]:
    """Recompute one Swin block's window attention from its input grid.

    Args:
        block: a :class:`umit.models.swin3d.SwinBlock3D`.
        x: its input (B, D, H, W, C); window, shift, mask: what the stage passed it.

    Returns:
        ``(A, padded_grid, shifted)``: weights (B·nW, heads, N, N) over the padded, rolled grid.
    """
    import torch.nn.functional as F

    from umit.models.swin3d import window_partition

    attn = block.attn
    h = block.norm1(x)
    B, D, H, W, C = h.shape
    pad = [(-s) % w for s, w in zip((D, H, W), window, strict=True)]
    if any(pad):
        h = F.pad(h, (0, 0, 0, pad[2], 0, pad[1], 0, pad[0]))
    padded = tuple(int(n) for n in h.shape[1:4])
    shifted = bool(block.shifted and any(shift))
    if shifted:
        h = torch.roll(h, shifts=tuple(-s for s in shift), dims=(1, 2, 3))
    win = window_partition(h, window)  # (B·nW, N, C)
    Bw, N, _ = win.shape
    nH, hd = attn.num_heads, attn.head_dim
    # (Bw, N, 3C) -> (Bw, N, 3, nH, hd) -> (3, Bw, nH, N, hd)
    q, k, _v = attn.qkv(win).reshape(Bw, N, 3, nH, hd).permute(2, 0, 3, 1, 4).unbind(0)
    logits = (q @ k.transpose(-2, -1)) * hd**-0.5 + attn.relative_position_bias(N)[None]
    if shifted and mask is not None:
        nW = mask.shape[0]
        # (B·nW, nH, N, N) + (1, nW, 1, N, N) per sample
        logits = (logits.view(B, nW, nH, N, N) + mask[None, :, None]).view(Bw, nH, N, N)
    return logits.softmax(-1), padded, shifted  # type: ignore[return-value]


def _windows_to_grid(
    values: torch.Tensor, window: tuple, padded: tuple, B: int, shift: tuple, shifted: bool,
    grid: tuple,
) -> torch.Tensor:  # fmt: skip
    """(B·nW, N, K) window values -> (B, K, D, H, W) on the block's unpadded, unrolled grid."""
    from umit.models.swin3d import window_reverse

    g = window_reverse(values, window, (B, *padded))  # (B, Dp, Hp, Wp, K)
    if shifted:
        g = torch.roll(g, shifts=tuple(shift), dims=(1, 2, 3))
    g = g[:, : grid[0], : grid[1], : grid[2]]
    return g.permute(0, 4, 1, 2, 3)  # (B, D, H, W, K) -> (B, K, D, H, W)


@contextmanager
def record_window_attention(
    model: nn.Module, query: tuple[float, float, float] | None = None
) -> Iterator[list[torch.Tensor]]:
    """Within the block, every forward appends one map per Swin block: (B, heads, d, h, w) on
    that block's token grid.

    Without ``query`` the map is the attention each token *receives* from the tokens of its
    window (the mean over the window's queries); with ``query`` (a position as a fraction of
    the input's extent per axis, in [0, 1)) it is the attention row of the token holding that
    position, which is zero outside its window.

    Raises:
        ValueError: the model has no Swin block.
    """
    from umit.models.swin3d import SwinBlock3D, window_partition

    blocks = [m for m in model.modules() if isinstance(m, SwinBlock3D)]
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no Swin block")
    out: list[torch.Tensor] = []

    def hook(module: nn.Module, args: tuple, kwargs: dict, _output: torch.Tensor) -> None:
        names = ("x", "window", "shift", "mask")
        vals = dict(zip(names, args, strict=False)) | {
            k: v for k, v in kwargs.items() if k in names
        }
        x, window, shift, mask = (vals.get(n) for n in names)
        with torch.no_grad():
            A, padded, shifted = window_attention_weights(module, x.detach(), window, shift, mask)
            B, grid = x.shape[0], tuple(int(n) for n in x.shape[1:4])
            if query is None:
                vals_w = A.mean(dim=2).transpose(1, 2)  # (Bw, nH, N) -> (Bw, N, nH)
            else:
                onehot = torch.zeros(B, *padded, 1, dtype=A.dtype, device=A.device)
                idx = [min(int(f * n), n - 1) for f, n in zip(query, grid, strict=True)]
                onehot[:, idx[0], idx[1], idx[2]] = 1.0
                if shifted:
                    onehot = torch.roll(onehot, shifts=tuple(-s for s in shift), dims=(1, 2, 3))
                qw = window_partition(onehot, window)[..., 0]  # (Bw, N)
                vals_w = torch.einsum("bn,bhnm->bmh", qw, A)  # row of the query's token
            out.append(_windows_to_grid(vals_w, window, padded, B, shift, shifted, grid).float())

    handles = [b.register_forward_hook(hook, with_kwargs=True) for b in blocks]
    try:
        yield out
    finally:
        for h in handles:
            h.remove()
