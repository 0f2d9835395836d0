"""Batched, seeded, replayable 3D view augmentations on tensors (contrastive pretraining).

TorchIO's split: :func:`sample_view_params` draws every random choice into a
:class:`ViewParams` (plain tensors, one row per sample), :func:`apply_view` is deterministic
given them, so a view can be replayed or inspected. One ``grid_sample`` does the spatial part
(random resized crop at a volume fraction, ±zoom, a light elastic field); flips and 90°
rotations are then exact permutations (``torch.flip`` / ``torch.rot90``); intensity jitter
(scale, shift, gamma on a per-sample min-max range, Gaussian noise) comes last.

Coordinates follow ``F.affine_grid``: normalized [-1, 1], last axis in (x=W, y=H, z=D) order.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

from umit.config import UmitConfig

__all__ = ["ViewConfig", "ViewParams", "apply_view", "identity_params", "sample_view_params"]


class ViewConfig(UmitConfig):
    """Random view settings (SimCLR-style); every range is ``[low, high]``."""

    scale: tuple[float, float] = (0.3, 1.0)
    """Fraction of the input volume a view covers (random resized crop)."""
    zoom: tuple[float, float] = (0.85, 1.15)
    """Extra isotropic scaling (±15%)."""
    flip_prob: float = 0.5
    """Probability of flipping each axis."""
    rot90_prob: float = 0.5
    """Probability of a 90° rotation (k = 1..3) in a random axis plane."""
    elastic_std: float = 0.02
    """Std of the coarse random displacement (normalized units; 0 = off)."""
    elastic_grid: int = 4
    """Control points per axis of the displacement field."""
    intensity_scale: tuple[float, float] = (0.9, 1.1)
    """Multiplicative intensity jitter."""
    intensity_shift: tuple[float, float] = (-0.1, 0.1)
    """Additive intensity jitter (in normalized intensity units)."""
    gamma: tuple[float, float] = (0.8, 1.25)
    """Gamma on the per-sample min-max range."""
    noise_std: tuple[float, float] = (0.0, 0.05)
    """Std of additive Gaussian noise."""


@dataclass
class ViewParams:
    """What one batch of views applied (B rows each).

    Attributes:
        center: (B, 3) crop centre, normalized, (x, y, z) order.
        extent: (B, 3) crop half-extent as a fraction of the input (1 = whole axis).
        elastic: (B, 3, g, g, g) coarse displacement (normalized units) or None.
        flip: (B, 3) bool, flip of the (D, H, W) axes.
        rot_plane: (B,) int, 0: (D, H), 1: (D, W), 2: (H, W).
        rot_k: (B,) int, quarter turns.
        scale, shift, gamma, noise_std: (B,) intensity jitter.
        noise_seed: (B,) int64 seeds of the noise.
    """

    center: torch.Tensor
    extent: torch.Tensor
    elastic: torch.Tensor | None
    flip: torch.Tensor
    rot_plane: torch.Tensor
    rot_k: torch.Tensor
    scale: torch.Tensor
    shift: torch.Tensor
    gamma: torch.Tensor
    noise_std: torch.Tensor
    noise_seed: torch.Tensor

    def __getitem__(self, i: int) -> ViewParams:
        """The parameters of sample ``i`` (rows kept as length-1 batches)."""
        return ViewParams(
            **{
                f.name: (
                    None if getattr(self, f.name) is None else getattr(self, f.name)[i : i + 1]
                )
                for f in fields(self)
            }
        )


def _uniform(n: int, lo_hi: tuple[float, float], g: torch.Generator | None) -> torch.Tensor:
    lo, hi = lo_hi
    return lo + (hi - lo) * torch.rand(n, generator=g)


def sample_view_params(
    batch: int, cfg: ViewConfig, generator: torch.Generator | None = None
) -> ViewParams:
    """Draws the parameters of ``batch`` views on the CPU (global RNG when no generator)."""
    g = generator
    side = _uniform(batch, cfg.scale, g) ** (1.0 / 3.0) / _uniform(batch, cfg.zoom, g)
    extent = side.unsqueeze(1).expand(batch, 3).clone()
    room = (1.0 - extent).clamp_min(0.0)  # keep the crop inside the volume when it fits
    center = (2.0 * torch.rand(batch, 3, generator=g) - 1.0) * room
    elastic = None
    if cfg.elastic_std > 0:
        n = cfg.elastic_grid
        elastic = cfg.elastic_std * torch.randn(batch, 3, n, n, n, generator=g)
    flip = torch.rand(batch, 3, generator=g) < cfg.flip_prob
    rotate = torch.rand(batch, generator=g) < cfg.rot90_prob
    rot_plane = torch.randint(0, 3, (batch,), generator=g)
    rot_k = torch.randint(1, 4, (batch,), generator=g) * rotate
    return ViewParams(
        center=center,
        extent=extent,
        elastic=elastic,
        flip=flip,
        rot_plane=rot_plane,
        rot_k=rot_k,
        scale=_uniform(batch, cfg.intensity_scale, g),
        shift=_uniform(batch, cfg.intensity_shift, g),
        gamma=_uniform(batch, cfg.gamma, g),
        noise_std=_uniform(batch, cfg.noise_std, g),
        noise_seed=torch.randint(0, 2**62, (batch,), generator=g),
    )


def identity_params(batch: int) -> ViewParams:
    """Parameters under which :func:`apply_view` returns its input (same size)."""
    z = torch.zeros(batch)
    return ViewParams(
        center=torch.zeros(batch, 3),
        extent=torch.ones(batch, 3),
        elastic=None,
        flip=torch.zeros(batch, 3, dtype=torch.bool),
        rot_plane=torch.zeros(batch, dtype=torch.long),
        rot_k=torch.zeros(batch, dtype=torch.long),
        scale=torch.ones(batch),
        shift=z,
        gamma=torch.ones(batch),
        noise_std=z.clone(),
        noise_seed=torch.zeros(batch, dtype=torch.long),
    )


def _spatial(x: torch.Tensor, p: ViewParams, size: tuple[int, int, int]) -> torch.Tensor:
    """Random resized crop + zoom + elastic field in one trilinear ``grid_sample``."""
    B, C = x.shape[:2]
    theta = torch.zeros(B, 3, 4, device=x.device, dtype=torch.float32)
    theta[:, [0, 1, 2], [0, 1, 2]] = p.extent.to(x.device)
    theta[:, :, 3] = p.center.to(x.device)
    grid = F.affine_grid(theta, [B, C, *size], align_corners=False)  # (B, D, H, W, 3)
    if p.elastic is not None:
        disp = F.interpolate(
            p.elastic.to(x.device), size=size, mode="trilinear", align_corners=True
        )  # (B, 3, g, g, g) -> (B, 3, D, H, W)
        grid = grid + disp.permute(0, 2, 3, 4, 1)  # -> (B, D, H, W, 3)
    out = F.grid_sample(
        x.float(), grid, mode="bilinear", padding_mode="border", align_corners=False
    )
    return out.to(x.dtype)


def _permute(x: torch.Tensor, p: ViewParams) -> torch.Tensor:
    """Exact flips and 90° rotations, per sample."""
    planes = ((2, 3), (2, 4), (3, 4))  # of (B, C, D, H, W)
    out = []
    for i in range(x.shape[0]):
        xi = x[i : i + 1]
        dims = [d + 2 for d in range(3) if bool(p.flip[i, d])]
        if dims:
            xi = torch.flip(xi, dims)
        k = int(p.rot_k[i])
        plane = planes[int(p.rot_plane[i])]
        if k % 2 and xi.shape[plane[0]] != xi.shape[plane[1]]:
            k = 2  # a quarter turn would change the shape: a half turn instead
        if k:
            xi = torch.rot90(xi, k, plane)
        out.append(xi)
    return torch.cat(out)


def _intensity(x: torch.Tensor, p: ViewParams) -> torch.Tensor:
    """Gamma on the per-sample min-max range, then scale, shift and noise."""
    B = x.shape[0]
    dev = x.device

    def col(t: torch.Tensor) -> torch.Tensor:
        return t.to(dev, x.dtype).view(B, 1, 1, 1, 1)

    gamma = p.gamma.to(dev)
    if bool((gamma != 1).any()):
        flat = x.reshape(B, -1)
        lo = flat.min(dim=1).values.view(B, 1, 1, 1, 1)
        rng = (flat.max(dim=1).values.view(B, 1, 1, 1, 1) - lo).clamp_min(1e-6)
        x = ((x - lo) / rng).clamp(0, 1) ** col(p.gamma) * rng + lo
    x = x * col(p.scale) + col(p.shift)
    if bool((p.noise_std > 0).any()):
        noise = torch.stack(
            [
                torch.randn(
                    x.shape[1:], generator=torch.Generator().manual_seed(int(s)), dtype=x.dtype
                )
                for s in p.noise_seed
            ]
        ).to(dev)
        x = x + noise * col(p.noise_std)
    return x


def apply_view(
    x: torch.Tensor, params: ViewParams, size: tuple[int, int, int] | None = None
) -> torch.Tensor:
    """Deterministic view of ``x`` ((B, C, D, H, W) or (C, D, H, W)) at spatial ``size``.

    ``size`` defaults to the input's. In a plane of unequal sides an odd number of quarter
    turns becomes a half turn, so every view of a batch keeps the same shape.
    """
    single = x.ndim == 4
    if single:
        x = x.unsqueeze(0)
    if x.ndim != 5:
        raise ValueError(f"expected (B, C, D, H, W) or (C, D, H, W), got {tuple(x.shape)}")
    if params.center.shape[0] != x.shape[0]:
        raise ValueError(f"{params.center.shape[0]} view parameters for a batch of {x.shape[0]}")
    size = tuple(int(s) for s in (size or x.shape[2:]))
    is_identity = (
        params.elastic is None
        and size == tuple(x.shape[2:])
        and bool((params.extent == 1).all())
        and bool((params.center == 0).all())
    )
    out = x if is_identity else _spatial(x, params, size)  # type: ignore[arg-type]
    out = _intensity(_permute(out, params), params)
    return out[0] if single else out
