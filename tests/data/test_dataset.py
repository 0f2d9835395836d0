"""StoreCropDataset (crops, padding, geometry, reproducibility, chunk reads) and the shard samplers."""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from umit.data.dataset import StoreCropDataset
from umit.data.store import Store
from umit.ingest.catalog import Catalog, SeriesRecord
from umit.preprocess.run import PreprocessConfig, run


def make_prep(
    tmp: Path, shapes, *, labeled=None, n_channels=1, chunk_size=16, blob_radius=3.0
) -> Path:
    """RAW with one case per shape (CT + MR channels, a spherical label blob), preprocessed as is."""
    raw, prep = tmp / "raw", tmp / "prep"
    (raw / "images").mkdir(parents=True)
    (raw / "labels").mkdir()
    labeled = labeled or [True] * len(shapes)
    with Catalog(raw / "catalog.db") as cat:
        for i, (shape, has_label) in enumerate(zip(shapes, labeled, strict=True)):
            cid = f"case{i:03d}"
            rng = np.random.default_rng(i)
            grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
            centre = np.array(shape) * rng.uniform(0.3, 0.7, 3)
            d = np.linalg.norm(grid - centre, axis=-1)
            label = ((d < blob_radius) + (d < blob_radius / 2)).astype(np.uint8)
            ct = (rng.normal(0, 50, shape) + 100 * label).astype(np.int16)
            channels = [ct, (rng.normal(300, 30, shape) + 10 * label).astype(np.float32)][
                :n_channels
            ]
            aff = np.diag([-1.0, -1.0, 1.0, 1.0])
            aff[:3, 3] = [5.0 * i, 2.0, -3.0]
            lab_rel = f"labels/{cid}.nii.gz" if has_label else None
            if has_label:
                nib.save(nib.Nifti1Image(label, aff), raw / lab_rel)
            recs = []
            for c, arr in enumerate(channels):
                rel = f"images/{cid}_{c:04d}.nii.gz"
                nib.save(nib.Nifti1Image(arr, aff), raw / rel)
                recs.append(
                    SeriesRecord(
                        series_id=f"{cid}-{c}", source_key=f"{cid}-{c}", case_id=cid, image_path=rel,
                        label_path=lab_rel, source="test", source_format="nifti", shape=shape,
                        spacing=(1.0, 1.0, 1.0), orientation="LPS", channel=c,
                        channel_name=["CT", "T1"][c], modality=["CT", "MR"][c],
                    )
                )  # fmt: skip
            cat.add_series(recs)
    cfg = PreprocessConfig(
        raw=raw,
        out=prep,
        workers=1,
        target_spacing=(1, 1, 1),
        crop_foreground=False,
        chunk_size=chunk_size,
    )
    assert run(cfg).failed == 0
    return prep


@pytest.fixture(scope="module")
def prep(tmp_path_factory) -> Path:
    shapes = [(40, 36, 24), (20, 24, 12), (36, 40, 30)]
    return make_prep(
        tmp_path_factory.mktemp("ds"), shapes, labeled=[True, True, False], n_channels=2
    )


def test_crop_shapes_values_and_geometry(prep):
    ds = StoreCropDataset(prep, (16, 12, 8), samples_per_case=3, foreground_prob=0.5, seed=1)
    assert len(ds) == 9
    store = Store(prep)
    for i in range(len(ds)):
        item = ds[i]
        case = store.case(item["case_id"])
        assert item["image"].shape == (2, 16, 12, 8) and item["image"].dtype == torch.float32
        start = item["crop_start"].numpy()
        assert (start >= 0).all() and (start + [16, 12, 8] <= case.spatial_shape).all()
        region = tuple(slice(s, s + n) for s, n in zip(start, (16, 12, 8), strict=True))
        assert np.array_equal(
            item["image"].numpy(), case.read((slice(None), *region)).astype(np.float32)
        )
        if case.has_label:
            assert item["label"].shape == (1, 16, 12, 8) and item["label"].dtype == torch.int64
            assert np.array_equal(item["label"][0].numpy(), case.read_label(region))
        else:
            assert "label" not in item
        # the crop's affine puts crop voxel (0, 0, 0) where the case has voxel crop_start
        affine = item["affine"].numpy()
        assert np.allclose(affine @ [0, 0, 0, 1], case.affine @ [*start, 1])
        assert np.allclose(affine @ [3, 2, 1, 1], case.affine @ [*(start + [3, 2, 1]), 1])


def test_small_volumes_are_padded_with_the_channel_pad_values(prep):
    ds = StoreCropDataset(prep, 48, cases=["case001"], samples_per_case=4, foreground_prob=0.0)
    case = Store(prep).case("case001")  # (20, 24, 12): smaller than the crop on every axis
    for i in range(len(ds)):
        item = ds[i]
        start = item["crop_start"].numpy()
        assert (start <= 0).all() and (start + 48 >= case.spatial_shape).all()
        inside = tuple(slice(-s, -s + n) for s, n in zip(start, case.spatial_shape, strict=True))
        image, label = item["image"].numpy(), item["label"][0].numpy()
        assert np.array_equal(image[(slice(None), *inside)], case.read().astype(np.float32))
        assert np.array_equal(label[inside], case.read_label())
        outside = np.ones(label.shape, bool)
        outside[inside] = False
        for c, pad in enumerate(case.pad_values):
            assert np.all(image[c][outside] == np.float32(pad))
        assert np.all(label[outside] == 0)
    assert case.pad_values[0] == -1.0  # CT window: air


def test_crops_are_reproducible_per_seed_epoch_and_index(prep):
    a = StoreCropDataset(prep, 8, samples_per_case=4, seed=7)
    b = StoreCropDataset(prep, 8, samples_per_case=4, seed=7)
    starts = [a.crop_params(i)["start"] for i in range(len(a))]
    assert starts == [b.crop_params(i)["start"] for i in range(len(b))]
    assert torch.equal(a[5]["image"], b[5]["image"])
    a.set_epoch(1)
    assert starts != [a.crop_params(i)["start"] for i in range(len(a))]
    with pytest.raises(IndexError):
        a.crop_params(len(a))


@pytest.mark.multiproc
def test_an_epoch_is_the_same_with_any_number_of_workers(prep):
    ds = StoreCropDataset(prep, 8, samples_per_case=4, seed=3, with_label=False)
    ds[0]  # open the store in the parent before the workers fork
    ds.set_epoch(2)

    def starts(workers):
        loader = DataLoader(ds, batch_size=3, num_workers=workers)
        return torch.cat([b["crop_start"] for b in loader]), torch.cat([b["image"] for b in loader])

    s0, x0 = starts(0)
    s2, x2 = starts(2)
    assert torch.equal(s0, s2) and torch.equal(x0, x2)


def test_dataset_pickles_without_open_handles(prep):
    ds = StoreCropDataset(prep, 8)
    item = ds[0]
    clone = pickle.loads(pickle.dumps(ds))
    assert clone.store._zstore is None and not clone.store._cases
    assert torch.equal(clone[0]["image"], item["image"])


def test_foreground_weighted_crops_hit_foreground_at_the_requested_rate(tmp_path):
    prep = make_prep(tmp_path, [(40, 40, 40)], blob_radius=2.5)

    label = Store(prep).case("case000").read_label()

    def hit_rate(p):
        ds = StoreCropDataset(prep, 8, samples_per_case=400, foreground_prob=p, seed=11)
        starts = [ds.crop_params(i)["start"] for i in range(len(ds))]
        return np.mean([label[tuple(slice(s, s + 8) for s in start)].any() for start in starts])

    base = hit_rate(0.0)  # uniform crops rarely see the small blob
    assert base < 0.2
    assert hit_rate(1.0) == 1.0
    expected = 0.4 + 0.6 * base
    assert abs(hit_rate(0.4) - expected) < 0.08  # 400 draws: 3 standard deviations ~ 0.075
    item = StoreCropDataset(prep, 8, foreground_prob=1.0)[0]  # the crop read agrees
    assert (item["label"] > 0).any()


def test_subset_and_bad_arguments(prep):
    ds = StoreCropDataset(prep, 8, cases=["case002"], samples_per_case=2)
    assert {ds[i]["case_id"] for i in range(len(ds))} == {"case002"}
    with pytest.raises(ValueError, match="not in the store"):
        StoreCropDataset(prep, 8, cases=["nope"])
    with pytest.raises(ValueError, match="crop_size"):
        StoreCropDataset(prep, (8, 8))
    with pytest.raises(ValueError, match="foreground_prob"):
        StoreCropDataset(prep, 8, foreground_prob=1.5)


def test_a_96_cube_crop_reads_only_the_chunks_it_touches(tmp_path, monkeypatch):
    from zarr.storage import LocalStore

    prep = make_prep(tmp_path, [(128, 128, 100)], n_channels=2, chunk_size=64)
    keys: list[str] = []
    original = LocalStore.get

    async def counting_get(self, key, *args, **kwargs):
        keys.append(key)
        return await original(self, key, *args, **kwargs)

    monkeypatch.setattr(LocalStore, "get", counting_get)
    ds = StoreCropDataset(prep, 96)
    chunk = re.compile(r"cases/case000/(image|label)/c/(.*)")

    def chunk_reads(start):
        keys.clear()
        ds.read_crop("case000", start)
        found = [m.groups() for m in map(chunk.fullmatch, keys) if m]
        images = [tuple(int(x) for x in rest.split("/")) for kind, rest in found if kind == "image"]
        labels = [tuple(int(x) for x in rest.split("/")) for kind, rest in found if kind == "label"]
        return images, labels

    images, labels = chunk_reads((0, 32, 4))  # 2 chunks along each axis
    assert sorted(images) == sorted(
        (c, i, j, k) for c in (0, 1) for i in (0, 1) for j in (0, 1) for k in (0, 1)
    )
    assert len(labels) == 8
    images, labels = chunk_reads((10, 20, 4))  # 96 voxels from offset 10/20/4: still 2 per axis
    assert len(images) == 2 * 8 and len(labels) == 8
    # the general bound: the chunks the crop overlaps, e.g. (32..127, 0..95, -10..85 padded)
    images, labels = chunk_reads((32, 0, -10))
    assert sorted(set(images)) == sorted(images) and len(images) == 2 * 8
    # duplicates would mean re-reads; every read chunk is one the crop overlaps
    ds2 = StoreCropDataset(prep, 96, samples_per_case=5, seed=4)
    for i in range(len(ds2)):
        start = np.array(ds2.crop_params(i)["start"])
        images, labels = chunk_reads(start)
        lo, hi = np.maximum(start, 0) // 64, (np.minimum(start + 96, (128, 128, 100)) - 1) // 64
        expected = {
            (c, a, b, d)
            for c in (0, 1)
            for a in range(lo[0], hi[0] + 1)
            for b in range(lo[1], hi[1] + 1)
            for d in range(lo[2], hi[2] + 1)
        }
        assert sorted(images) == sorted(expected)
        assert len(labels) == len(expected) // 2
