"""MAE-3D: masked volume modeling as a wrapper around any ViT-like encoder.

The encoder sees only the visible patches (``forward_features(x, keep_indices=...)``); a light
decoder gets the encoded visible tokens plus a shared mask token at every masked position (with
fixed 3D sin-cos positions) and predicts the voxels of each patch; the loss is the MSE on masked
patches only, against per-patch normalized intensities (``norm_pix_loss``, He et al. 2022).
After pretraining, ``mae.encoder.state_dict()`` loads into any fine-tuning model built with the
same registered encoder, with no wrapper keys (see :func:`encoder_state_dict`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from umit.models.layers.pos_embed import build_sincos_pos_embed_3d
from umit.models.vit3d import Block
from umit.ssl.masking import Masking, block_masking, random_masking


def patchify(x: torch.Tensor, patch: tuple[int, int, int]) -> torch.Tensor:
    """(B, C, D, H, W) -> (B, L, pd·ph·pw·C), tokens in (d, h, w) raster order."""
    B, C, D, H, W = x.shape
    pd, ph, pw = patch
    d, h, w = D // pd, H // ph, W // pw
    x = x.reshape(B, C, d, pd, h, ph, w, pw)
    x = x.permute(0, 2, 4, 6, 3, 5, 7, 1)  # -> (B, d, h, w, pd, ph, pw, C)
    return x.reshape(B, d * h * w, pd * ph * pw * C)


def unpatchify(
    tokens: torch.Tensor, patch: tuple[int, int, int], grid: tuple[int, int, int], channels: int
) -> torch.Tensor:
    """(B, L, pd·ph·pw·C) -> (B, C, D, H, W); inverse of :func:`patchify`."""
    B = tokens.shape[0]
    pd, ph, pw = patch
    d, h, w = grid
    x = tokens.reshape(B, d, h, w, pd, ph, pw, channels)
    x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)  # -> (B, C, d, pd, h, ph, w, pw)
    return x.reshape(B, channels, d * pd, h * ph, w * pw)


class MAE3D(nn.Module):
    """Masked autoencoder around an encoder with the UMIT feature API.

    Args:
        encoder: A ViT-like encoder exposing ``forward_features(x, keep_indices)``,
            ``patch_size``, ``grid_size(shape)``, ``embed_dim`` and ``num_prefix_tokens``.
        in_chans: Input channels (to size the prediction head).
        decoder_dim: Decoder width.
        decoder_depth: Decoder blocks.
        decoder_heads: Decoder attention heads.
        mask_ratio: Fraction of patches hidden from the encoder (default 0.75).
        masking: ``"random"`` or ``"block"`` (cubes of ``mask_block`` tokens per axis).
        mask_block: Block edge in tokens for block-wise masking.
        norm_pix_loss: Normalize each target patch to zero mean, unit variance.
    """

    def __init__(
        self,
        encoder: nn.Module,
        in_chans: int = 1,
        decoder_dim: int = 256,
        decoder_depth: int = 4,
        decoder_heads: int = 8,
        mask_ratio: float = 0.75,
        masking: str = "random",
        mask_block: int = 2,
        norm_pix_loss: bool = True,
    ):
        super().__init__()
        for attr in (
            "forward_features",
            "patch_size",
            "grid_size",
            "embed_dim",
            "num_prefix_tokens",
        ):
            if not hasattr(encoder, attr):
                raise ValueError(
                    f"encoder {type(encoder).__name__} lacks {attr!r}; MAE3D needs a ViT-like encoder"
                )
        if masking not in ("random", "block"):
            raise ValueError(f"masking must be 'random' or 'block', got {masking!r}")
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio!r}")
        if decoder_dim % decoder_heads:
            raise ValueError(
                f"decoder_dim {decoder_dim} is not divisible by decoder_heads {decoder_heads}"
            )
        self.encoder = encoder
        self.in_chans = in_chans
        self.mask_ratio = mask_ratio
        self.masking = masking
        self.mask_block = mask_block
        self.norm_pix_loss = norm_pix_loss
        self.patch = tuple(encoder.patch_size)
        self.decoder_dim = decoder_dim
        self.decoder_embed = nn.Linear(encoder.embed_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.decoder_blocks = nn.ModuleList(
            [
                Block(decoder_dim, decoder_heads, mlp_ratio=4.0, qkv_bias=True)
                for _ in range(decoder_depth)
            ]
        )
        self.decoder_norm = nn.LayerNorm(decoder_dim, eps=1e-6)
        p_voxels = self.patch[0] * self.patch[1] * self.patch[2]
        self.decoder_pred = nn.Linear(decoder_dim, p_voxels * in_chans)
        self._dec_pos: dict[tuple[int, int, int], torch.Tensor] = {}
        self._init_decoder()
        self.model_name = "mae3d"
        self.model_args = {
            "encoder": getattr(encoder, "model_name", type(encoder).__name__),
            "encoder_args": getattr(encoder, "model_args", {}),
            "in_chans": in_chans,
            "decoder_dim": decoder_dim,
            "decoder_depth": decoder_depth,
            "decoder_heads": decoder_heads,
            "mask_ratio": mask_ratio,
            "masking": masking,
            "mask_block": mask_block,
            "norm_pix_loss": norm_pix_loss,
        }

    def _init_decoder(self) -> None:
        nn.init.normal_(self.mask_token, std=0.02)
        for m in [self.decoder_embed, self.decoder_pred, *self.decoder_blocks.modules()]:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def no_weight_decay(self) -> set[str]:
        enc = getattr(self.encoder, "no_weight_decay", lambda: set())()
        return {f"encoder.{n}" for n in enc} | {"mask_token"}

    def decoder_pos(
        self, grid: tuple[int, int, int], device: torch.device, dtype: torch.dtype
    ) -> torch.Tensor:
        """Fixed sin-cos decoder positions (1, L, decoder_dim) for a token grid, cached."""
        table = self._dec_pos.get(grid)
        if table is None or table.device != device:
            table = build_sincos_pos_embed_3d(grid, self.decoder_dim, device=device)
            self._dec_pos[grid] = table
        return table.to(dtype)

    def draw_mask(self, batch: int, grid: tuple[int, int, int], device, generator=None) -> Masking:
        num = grid[0] * grid[1] * grid[2]
        if self.masking == "block":
            return block_masking(
                batch, grid, self.mask_ratio, self.mask_block, device=device, generator=generator
            )
        return random_masking(batch, num, self.mask_ratio, device=device, generator=generator)

    def forward_decoder(
        self, latent: torch.Tensor, m: Masking, grid: tuple[int, int, int]
    ) -> torch.Tensor:
        """Encoded visible tokens (B, P + L_keep, C_enc) -> patch predictions (B, L, p³·C)."""
        P = self.encoder.num_prefix_tokens
        x = self.decoder_embed(latent)  # (B, P + L_keep, C_dec)
        B, _, C = x.shape
        L = m.mask.shape[1]
        visible = x[:, P:]
        mask_tokens = self.mask_token.to(x.dtype).expand(B, L - visible.shape[1], C)
        tokens = torch.cat([visible, mask_tokens], dim=1)  # (B, L, C) in [visible, masked] order
        tokens = torch.gather(
            tokens, 1, m.restore.unsqueeze(-1).expand(-1, -1, C)
        )  # -> raster order
        tokens = tokens + self.decoder_pos(grid, x.device, tokens.dtype)
        x = torch.cat([x[:, :P], tokens], dim=1)
        for blk in self.decoder_blocks:
            x = blk(x)
        x = self.decoder_norm(x)
        return self.decoder_pred(x[:, P:])  # (B, L, p³·C)

    def target(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, D, H, W) -> per-patch targets (B, L, p³·C), normalized with norm_pix_loss."""
        target = patchify(x, self.patch).float()
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        return target

    def loss(self, x: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean squared error over masked patches (float32)."""
        per_patch = ((pred.float() - self.target(x)) ** 2).mean(dim=-1)  # (B, L)
        return (per_patch * mask).sum() / mask.sum().clamp_min(1.0)

    def flat_loss(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The loss of a flat-patch predictor (each masked patch -> its own mean): a trivial
        baseline (about 1 with norm_pix_loss) that a learning model must beat."""
        target = self.target(x)
        per_patch = ((target - target.mean(dim=-1, keepdim=True)) ** 2).mean(dim=-1)  # (B, L)
        return (per_patch * mask).sum() / mask.sum().clamp_min(1.0)

    def forward(
        self, batch: Any, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        """``batch``: a (B, C, D, H, W) tensor or a mapping with ``"image"``; returns the loss dict."""
        x = batch["image"] if isinstance(batch, Mapping) else batch
        if x.ndim != 5 or x.shape[1] != self.in_chans:
            raise ValueError(f"expected (B, {self.in_chans}, D, H, W) input, got {tuple(x.shape)}")
        grid = tuple(self.encoder.grid_size(x.shape[2:]))
        m = self.draw_mask(x.shape[0], grid, x.device, generator)
        latent = self.encoder.forward_features(x, keep_indices=m.keep)
        pred = self.forward_decoder(latent, m, grid)
        loss = self.loss(x, pred, m.mask)
        return {
            "loss": loss,
            "flat_loss": self.flat_loss(x, m.mask).detach(),
            "mask_ratio": m.mask.mean().detach(),
            "pred": pred.detach(),
            "mask": m.mask,
        }

    @torch.no_grad()
    def reconstruct(
        self, x: torch.Tensor, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        """Masked input, reconstruction (visible patches pasted back) and mask, in image space.

        With ``norm_pix_loss`` the predicted patches are de-normalized with the true patch
        statistics, as in MAE's visualizations.
        """
        out = self.forward(x, generator)
        grid = tuple(self.encoder.grid_size(x.shape[2:]))
        pred, mask = out["pred"].float(), out["mask"]
        target = patchify(x, self.patch).float()
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            std = (target.var(dim=-1, keepdim=True) + 1.0e-6) ** 0.5
            pred = pred * std + mean
        mixed = torch.where(mask.unsqueeze(-1).bool(), pred, target)
        return {
            "loss": out["loss"],
            "reconstruction": unpatchify(mixed, self.patch, grid, self.in_chans),
            "masked_input": unpatchify(
                target * (1 - mask.unsqueeze(-1)), self.patch, grid, self.in_chans
            ),
            "mask": mask,
        }


def encoder_state_dict(mae: MAE3D) -> dict[str, torch.Tensor]:
    """The encoder's weights without the wrapper prefix, ready for a fine-tuning model."""
    return {k: v.detach().clone() for k, v in mae.encoder.state_dict().items()}


def mae_flops_per_sample(mae: MAE3D, shape: tuple[int, ...]) -> float:
    """Training FLOPs (forward + backward ≈ 3x forward) of one sample of spatial ``shape``."""
    from torch.utils.flop_counter import FlopCounterMode  # only when FLOPs are counted

    x = torch.zeros(1, mae.in_chans, *shape, device=next(mae.parameters()).device)
    was_training = mae.training
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        mae.forward(x)
    mae.train(was_training)
    return 3.0 * counter.get_total_flops()
