"""Augmentation: parameters drawn then applied deterministically; flips keep world geometry."""

from __future__ import annotations

import numpy as np
import torch

from umit.data.transforms import (
    AugmentConfig,
    AugmentedDataset,
    apply_augment,
    draw_augment_params,
    flip_affine,
)


def _world(affine: torch.Tensor, ijk) -> torch.Tensor:
    return affine[:3, :3] @ torch.tensor(ijk, dtype=affine.dtype) + affine[:3, 3]


def test_flip_keeps_each_voxel_at_its_world_position():
    img = torch.arange(2 * 4 * 5 * 3, dtype=torch.float32).reshape(2, 4, 5, 3)
    aff = torch.tensor(
        [[0.9, 0.1, 0, 5], [0, 1.1, 0.2, -3], [0.05, 0, 2.5, 7], [0, 0, 0, 1]], dtype=torch.float64
    )
    sample = {"image": img, "label": (img[:1] > 40).long(), "affine": aff}
    params = {
        "flip": [True, False, True],
        "scale": [1.0, 1.0],
        "shift": [0.0, 0.0],
        "noise_seed": None,
        "noise_std": 0,
    }
    out = apply_augment(sample, params)
    i, j, k = 1, 3, 0
    fi, fk = 4 - 1 - i, 3 - 1 - k  # where voxel (i, j, k) went
    assert out["image"][0, fi, j, fk] == img[0, i, j, k]
    assert out["label"][0, fi, j, fk] == sample["label"][0, i, j, k]
    assert torch.allclose(_world(out["affine"], [fi, j, fk]), _world(aff, [i, j, k]))
    assert torch.allclose(flip_affine(flip_affine(aff, (4, 5, 3), [0]), (4, 5, 3), [0]), aff)


def test_intensity_is_scale_then_shift_per_channel():
    img = torch.ones(2, 2, 2, 2)
    params = {
        "flip": [False] * 3,
        "scale": [2.0, 0.5],
        "shift": [1.0, -1.0],
        "noise_seed": None,
        "noise_std": 0,
    }
    out = apply_augment({"image": img}, params)["image"]
    assert torch.all(out[0] == 3.0) and torch.all(out[1] == -0.5)


class _Const(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, i):
        return {"image": torch.zeros(1, 4, 4, 4) + i}


def test_augmented_dataset_is_reproducible_per_epoch_and_index():
    cfg = AugmentConfig(noise_std=0.1)
    a, b = AugmentedDataset(_Const(), cfg, seed=1), AugmentedDataset(_Const(), cfg, seed=1)
    assert torch.equal(a[2]["image"], b[2]["image"])
    first = a[2]["image"].clone()
    a.set_epoch(1)
    assert not torch.equal(a[2]["image"], first)
    p = draw_augment_params(
        np.random.default_rng(0),
        AugmentConfig(flip_prob=0.0, intensity_scale=0.0, intensity_shift=0.0),
        1,
    )
    assert p["flip"] == [False] * 3 and p["scale"] == [1.0] and p["shift"] == [0.0]
