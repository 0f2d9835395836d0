"""Training crops from the preprocessed Zarr store, and rank-aware samplers.

:class:`StoreCropDataset` draws the parameters of a random crop from an RNG seeded by
``(seed, epoch, index)`` (:meth:`StoreCropDataset.crop_params`), then reads the crop with a
deterministic function (:meth:`StoreCropDataset.read_crop`), so an epoch is the same whatever the
number of DataLoader workers, and a crop can be replayed from its parameters. A crop read touches
only the chunks it overlaps. Geometry travels with the voxels: each sample carries the affine of
its crop.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from umit.data.meta import translate_affine
from umit.data.store import Store


def _triple(size: int | Sequence[int], name: str) -> tuple[int, int, int]:
    t = (int(size),) * 3 if isinstance(size, int | np.integer) else tuple(int(s) for s in size)
    if len(t) != 3 or any(s < 1 for s in t):
        raise ValueError(f"{name} must be a positive int or 3 positive ints, got {size!r}")
    return t


def crop_start_range(
    shape: Sequence[int], crop_size: Sequence[int]
) -> tuple[np.ndarray, np.ndarray]:
    """Lowest and highest start voxel of a crop in a volume of ``shape``: a crop larger than
    the volume may start before it (and is padded), never more than it sticks out."""
    diff = np.asarray(shape, dtype=np.int64) - np.asarray(crop_size, dtype=np.int64)
    return np.minimum(0, diff), np.maximum(0, diff)


class StoreCropDataset(Dataset):
    """Random (optionally foreground-weighted) crops of the cases of a preprocessed store.

    Item ``i`` is a crop of case ``cases[i // samples_per_case]``. With probability
    ``foreground_prob`` the crop is centred on a cached voxel of a label class present in the case
    (class drawn uniformly, then a location), clamped to the volume; otherwise its start is uniform.
    Volumes smaller than the crop are padded with each channel's pad value (label with 0).

    Args:
        prep_dir: PREP folder written by ``umit preprocess``.
        crop_size: Crop edge (int) or (d, h, w) in voxels.
        cases: Case ids to use (e.g. one split); default all cases of the store.
        samples_per_case: Crops per case per epoch.
        foreground_prob: Probability of a foreground-centred crop (cases with a label).
        seed: Base seed; with the epoch and the index it fixes every crop.
        with_label: Return ``label`` for labeled cases.
        chunk_cache: PREP on an object store (``s3://...``): a local folder keeping a copy of
            the chunks read (each fetched once; worker processes share it). None: no copy.

    Returns (per item) a dict: ``image`` float32 (C, d, h, w); ``label`` int64 (1, d, h, w) for
    labeled cases; ``case_id`` str; ``crop_start`` int64 (3,) voxel start in the case (may be
    negative when padded); ``affine`` float64 (4, 4) of the crop.

    The store is opened lazily in each worker process; no file handle is pickled. Call
    :meth:`set_epoch` before each epoch (with ``persistent_workers=True`` the workers keep the
    epoch they were started with, so leave that off or pass the epoch another way).
    """

    def __init__(
        self,
        prep_dir: str | Path,
        crop_size: int | Sequence[int],
        *,
        cases: Sequence[str] | None = None,
        samples_per_case: int = 1,
        foreground_prob: float = 0.33,
        seed: int = 0,
        with_label: bool = True,
        chunk_cache: str | Path | None = None,
    ):
        self.crop_size = _triple(crop_size, "crop_size")
        if samples_per_case < 1:
            raise ValueError(f"samples_per_case must be >= 1, got {samples_per_case}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        if not 0.0 <= foreground_prob <= 1.0:
            raise ValueError(f"foreground_prob must be in [0, 1], got {foreground_prob}")
        # reads index.json only; Zarr opens on first read
        self.store = Store(prep_dir, chunk_cache=chunk_cache)
        self.case_ids = list(self.store.case_ids if cases is None else cases)
        missing = [c for c in self.case_ids if c not in self.store]
        if missing:
            raise ValueError(f"cases {missing[:5]} are not in the store {self.store.prep_dir}")
        if not self.case_ids:
            raise ValueError(f"no cases to sample from in {self.store.prep_dir}")
        self.samples_per_case = samples_per_case
        self.foreground_prob = float(foreground_prob)
        self.seed = int(seed)
        self.with_label = with_label
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.case_ids) * self.samples_per_case

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def crop_params(self, index: int) -> dict[str, Any]:
        """Random part: ``{"case_id", "start", "foreground_class"}`` for item ``index`` this epoch."""
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        case_id = self.case_ids[index // self.samples_per_case]
        entry = self.store.index[case_id]
        lo, hi = crop_start_range(entry["shape"][1:], self.crop_size)
        crop = np.asarray(self.crop_size, dtype=np.int64)
        rng = np.random.default_rng([self.seed, self.epoch, index])
        classes = sorted(int(c) for c, n in entry.get("class_locations", {}).items() if n > 0)
        fg_class = None
        if rng.random() < self.foreground_prob and classes:
            fg_class = classes[int(rng.integers(len(classes)))]
            n_loc = int(entry["class_locations"][str(fg_class)])
            centre = (
                self.store.case(case_id)
                .location(fg_class, int(rng.integers(n_loc)))
                .astype(np.int64)
            )
            start = np.clip(centre - crop // 2, lo, hi)
        else:
            start = rng.integers(lo, hi + 1)
        return {"case_id": case_id, "start": [int(s) for s in start], "foreground_class": fg_class}

    def read_crop(self, case_id: str, start: Sequence[int]) -> dict[str, Any]:
        """Deterministic part: the crop of ``case_id`` starting at voxel ``start`` (padded)."""
        case = self.store.case(case_id)
        shape = np.asarray(case.spatial_shape)
        crop = np.asarray(self.crop_size)
        start = np.asarray(start, dtype=np.int64)
        src_lo, src_hi = np.maximum(start, 0), np.minimum(start + crop, shape)
        src = tuple(slice(int(a), int(b)) for a, b in zip(src_lo, src_hi, strict=True))
        dst = tuple(
            slice(int(a), int(b)) for a, b in zip(src_lo - start, src_hi - start, strict=True)
        )
        inside = bool(np.all(src_hi > src_lo))
        n_ch = case.shape[0]
        image = np.empty((n_ch, *self.crop_size), dtype=np.float32)
        padded = not (np.all(start >= 0) and np.all(start + crop <= shape))
        if padded:
            image[:] = np.asarray(case.pad_values, dtype=np.float32).reshape(n_ch, 1, 1, 1)
        if inside:
            image[(slice(None), *dst)] = case.read((slice(None), *src))
        out: dict[str, Any] = {"image": torch.from_numpy(image)}
        if self.with_label and case.has_label:
            label = np.zeros((1, *self.crop_size), dtype=np.int64)
            if inside:
                label[(0, *dst)] = case.read_label(src)
            out["label"] = torch.from_numpy(label)
        out["case_id"] = case_id
        out["crop_start"] = torch.as_tensor(start, dtype=torch.int64)
        out["affine"] = torch.from_numpy(translate_affine(case.affine, start))
        return out

    def __getitem__(self, index: int) -> dict[str, Any]:
        params = self.crop_params(index)
        return self.read_crop(params["case_id"], params["start"])
