"""Training-time augmentation: random transforms draw parameters, a deterministic function applies
them (TorchIO's habit), so every augmentation is replayable from its parameters and recorded.

Samples are dicts from :class:`umit.data.dataset.StoreCropDataset` (``image`` (C, d, h, w),
optional ``label`` (1, d, h, w), ``affine``). Flips update the affine, so geometry still travels
with the voxels after augmentation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from pydantic import Field
from torch.utils.data import Dataset

from umit.config import UmitConfig


class AugmentConfig(UmitConfig):
    """Light augmentation for pretraining and fine-tuning."""

    flip_prob: float = Field(default=0.5, ge=0, le=1)
    """Probability of flipping each spatial axis independently."""
    intensity_scale: float = Field(default=0.1, ge=0)
    """Multiply intensities by 1 + U(-s, s) (per channel)."""
    intensity_shift: float = Field(default=0.1, ge=0)
    """Add U(-s, s) to intensities (per channel, in normalized units)."""
    noise_std: float = Field(default=0.0, ge=0)
    """Standard deviation of additive Gaussian noise (0 = off)."""
    label_intensity_shift: float = Field(default=0.0, ge=0)
    """Add U(-s, s) to the voxels of each labeled structure (one draw per class and crop, the
    same for every channel; background, class 0, unchanged), in normalized units. It changes the
    contrast between structures the way contrast phases or scanners do, from the label map alone
    (SynthSeg's idea, in its mildest form). Segmentation fine-tuning only: it needs a label.
    0 = off."""


def draw_augment_params(
    rng: np.random.Generator, cfg: AugmentConfig, channels: int
) -> dict[str, Any]:
    """The random part: every parameter an augmentation will use, as plain data."""
    return {
        "flip": [bool(rng.random() < cfg.flip_prob) for _ in range(3)],
        "scale": (1.0 + rng.uniform(-cfg.intensity_scale, cfg.intensity_scale, channels)).tolist(),
        "shift": rng.uniform(-cfg.intensity_shift, cfg.intensity_shift, channels).tolist(),
        "noise_seed": int(rng.integers(2**31)) if cfg.noise_std > 0 else None,
        "noise_std": cfg.noise_std,
        # drawn last and only when on, so every other setting keeps its random stream
        "label_shift_seed": int(rng.integers(2**31)) if cfg.label_intensity_shift > 0 else None,
        "label_shift": cfg.label_intensity_shift,
    }


def label_shifts(seed: int, max_shift: float, num_classes: int) -> torch.Tensor:
    """The per-class intensity offsets of :func:`apply_augment`: U(-s, s) for classes
    1..num_classes-1 and 0 for the background, from ``seed`` alone."""
    gen = torch.Generator().manual_seed(seed)
    shifts = (torch.rand(num_classes, generator=gen, dtype=torch.float64) * 2 - 1) * max_shift
    shifts[0] = 0.0
    return shifts


def flip_affine(affine: torch.Tensor, shape: Sequence[int], axes: Sequence[int]) -> torch.Tensor:
    """Affine of an array flipped along spatial ``axes``: voxel i -> n-1-i keeps world positions."""
    out = affine.clone()
    for ax in axes:
        out[:3, 3] = out[:3, 3] + out[:3, ax] * (shape[ax] - 1)
        out[:3, ax] = -out[:3, ax]
    return out


def apply_augment(sample: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """The deterministic part: apply ``params`` to a sample (returns a new dict)."""
    out = dict(sample)
    image = sample["image"]
    axes = [ax for ax, f in enumerate(params["flip"]) if f]
    if axes:
        dims = [a + 1 for a in axes]  # (C, d, h, w): spatial axis a is tensor dim a + 1
        image = torch.flip(image, dims)
        if "label" in sample:
            out["label"] = torch.flip(sample["label"], dims)
        if "affine" in sample:
            out["affine"] = flip_affine(torch.as_tensor(sample["affine"]), image.shape[1:], axes)
    scale = torch.tensor(params["scale"], dtype=image.dtype).view(-1, 1, 1, 1)
    shift = torch.tensor(params["shift"], dtype=image.dtype).view(-1, 1, 1, 1)
    image = image * scale + shift
    if params.get("label_shift_seed") is not None:
        if "label" not in out:
            raise ValueError(
                "label_intensity_shift needs a label map in every sample; this sample has none "
                "(use it for segmentation fine-tuning, not for pretraining or classification)"
            )
        label = out["label"].long()  # (1, d, h, w), after any flip: aligned with image
        if label.min() < 0:
            raise ValueError(f"label_intensity_shift: negative label value {int(label.min())}")
        shifts = label_shifts(
            params["label_shift_seed"], params["label_shift"], int(label.max()) + 1
        ).to(image.dtype)
        image = image + shifts[label]  # (1, d, h, w) broadcasts over the channels
    if params.get("noise_seed") is not None:
        gen = torch.Generator().manual_seed(params["noise_seed"])
        image = image + params["noise_std"] * torch.randn(
            image.shape, generator=gen, dtype=image.dtype
        )
    out["image"] = image
    out["augment"] = params
    return out


class AugmentedDataset(Dataset):
    """Wraps a crop dataset; sample ``i`` of epoch ``e`` gets parameters seeded by (seed, e, i).

    The same sample in the same epoch is therefore augmented identically whatever the worker
    count, and after a resume.
    """

    def __init__(self, dataset: Dataset, cfg: AugmentConfig, seed: int = 0):
        self.dataset = dataset
        self.cfg = cfg
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.dataset)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.dataset[index]
        rng = np.random.default_rng([self.seed, 7919, self.epoch, index])
        params = draw_augment_params(rng, self.cfg, sample["image"].shape[0])
        out = apply_augment(sample, params)
        out.pop("augment")  # plain tensors only through the default collate
        return out
