"""Multi-head self-attention through ``torch.nn.functional.scaled_dot_product_attention``.

One fused ``qkv`` Linear whose output features are laid out ``(3, num_heads, head_dim)``: the same
layout as timm and as MONAI's ``SABlock`` (``"b h (qkv l d) -> qkv b l h d"``), so MONAI weights copy
over unchanged. SDPA picks the fastest kernel available (flash / memory-efficient on CUDA, the
fused CPU kernel on CPU) and never materialises the attention matrix when no mask is given.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    """Multi-head self-attention.

    Args:
        dim: token width.
        num_heads: number of heads; must divide ``dim``.
        qkv_bias: bias on the fused qkv projection.
        attn_drop: dropout on the attention weights (training only).
        proj_drop: dropout after the output projection.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ):
        super().__init__()
        if num_heads <= 0 or dim % num_heads != 0:
            raise ValueError(f"dim={dim!r} must be divisible by num_heads={num_heads!r}")
        for name, p in (("attn_drop", attn_drop), ("proj_drop", proj_drop)):
            if not 0.0 <= p < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {p!r}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = float(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Attend over the tokens of ``x``.

        Args:
            x: tokens (B, L, C).
            attn_mask: optional additive float mask or boolean keep-mask broadcastable to
                (B, num_heads, L, L).

        Returns:
            (B, L, C)
        """
        B, L, C = x.shape
        # (B, L, 3C) -> (B, L, 3, heads, hd) -> (3, B, heads, L, hd)
        qkv = self.qkv(x).reshape(B, L, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.attn_drop if self.training else 0.0
        )
        # (B, heads, L, hd) -> (B, L, heads, hd) -> (B, L, C)
        x = x.transpose(1, 2).reshape(B, L, C)
        return self.proj_drop(self.proj(x))
