"""Augmentation: parameters drawn then applied deterministically; flips keep world geometry."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pydantic import ValidationError

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


def _labelled_sample() -> dict:
    label = torch.zeros(1, 6, 5, 4, dtype=torch.long)
    label[0, :2] = 1
    label[0, 2:4, :3] = 2
    label[0, 4:, 1:] = 5  # classes 3 and 4 absent from this crop
    image = torch.linspace(-1, 1, 2 * 6 * 5 * 4).reshape(2, 6, 5, 4)
    return {"image": image, "label": label}


def _label_shifted(flip_prob: float, max_shift: float, seed: int) -> tuple[dict, dict, dict]:
    """A labelled sample, its label-shift parameters (nothing else random) and the result."""
    sample = _labelled_sample()
    cfg = AugmentConfig(flip_prob=flip_prob, intensity_scale=0.0, intensity_shift=0.0,
                        label_intensity_shift=max_shift)  # fmt: skip
    params = draw_augment_params(np.random.default_rng(seed), cfg, 2)
    return sample, params, apply_augment(sample, params)


def test_label_intensity_shift_adds_one_offset_per_structure_and_none_to_background():
    sample, params, out = _label_shifted(flip_prob=0.0, max_shift=0.4, seed=3)
    delta = (out["image"] - sample["image"]).numpy()  # (2, d, h, w)
    label = sample["label"][0].numpy()
    offsets = {}
    for k in np.unique(label):
        d = delta[:, label == k]  # both channels, every voxel of class k
        assert np.allclose(d, d.flat[0], atol=1e-6), f"class {k} got more than one offset"
        offsets[int(k)] = float(d.flat[0])
    assert offsets[0] == 0.0
    assert all(0 < abs(v) <= 0.4 for k, v in offsets.items() if k)
    assert len({round(v, 6) for k, v in offsets.items() if k}) == 3  # independent draws
    # the offsets are a function of the recorded parameters alone (replayable)
    again = apply_augment(sample, params)["image"]
    assert torch.equal(again, out["image"])


def test_label_intensity_shift_follows_the_flipped_label():
    sample, _, out = _label_shifted(flip_prob=1.0, max_shift=0.5, seed=0)
    flipped = torch.flip(sample["image"], [1, 2, 3])
    delta = (out["image"] - flipped)[0]
    assert torch.equal(out["label"], torch.flip(sample["label"], [1, 2, 3]))
    for k in (1, 2, 5):
        d = delta[out["label"][0] == k]
        assert torch.allclose(d, d[0].expand_as(d), atol=1e-6) and d[0] != 0
    assert torch.all(delta[out["label"][0] == 0] == 0)


def test_label_intensity_shift_off_keeps_every_other_random_draw():
    base = dict(flip_prob=0.5, intensity_scale=0.1, intensity_shift=0.1, noise_std=0.05)
    off = draw_augment_params(np.random.default_rng(7), AugmentConfig(**base), 1)
    on = draw_augment_params(
        np.random.default_rng(7), AugmentConfig(**base, label_intensity_shift=0.3), 1
    )
    assert off["label_shift_seed"] is None and on["label_shift_seed"] is not None
    for key in ("flip", "scale", "shift", "noise_seed"):
        assert off[key] == on[key]


def test_label_intensity_shift_without_a_label_is_a_clear_error():
    params = draw_augment_params(
        np.random.default_rng(0), AugmentConfig(label_intensity_shift=0.2), 1
    )
    with pytest.raises(ValueError, match="needs a label map"):
        apply_augment({"image": torch.zeros(1, 2, 2, 2)}, params)
    bad = {"image": torch.zeros(1, 2, 2, 2), "label": torch.full((1, 2, 2, 2), -1)}
    with pytest.raises(ValueError, match="negative label value -1"):
        apply_augment(bad, params)


def test_label_intensity_shift_is_refused_where_there_are_no_label_maps(tmp_path):
    from umit.finetune.run import FinetuneConfig
    from umit.ssl.pretrain import PretrainConfig

    aug = {"label_intensity_shift": 0.3}
    assert FinetuneConfig(data=tmp_path, task="segmentation", augment=aug)
    with pytest.raises(ValidationError, match="segmentation only"):
        FinetuneConfig(data=tmp_path, task="classification", augment=aug)
    with pytest.raises(ValidationError, match="pretraining reads none"):
        PretrainConfig(data=tmp_path, augment=aug)
