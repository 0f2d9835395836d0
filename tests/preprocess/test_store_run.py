"""``umit preprocess`` end to end: store layout and geometry, failures, resume, kill -9."""

from __future__ import annotations

import argparse
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from umit.data.plan import ChannelPlan, Plan
from umit.data.store import Store, cases_dir
from umit.errors import GeometryError, InputError
from umit.ingest.catalog import Catalog, SeriesRecord
from umit.preprocess.resample import restore_original
from umit.preprocess.run import PreprocessConfig, prepare_case, run

LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _affine(spacing, origin=(30.0, 20.0, -15.0)) -> np.ndarray:
    aff = LPS @ np.diag([*spacing, 1.0])
    aff[:3, 3] = origin
    return aff


def _case_arrays(i: int, shape, n_channels: int = 1):
    rng = np.random.default_rng(i)
    x, y, z = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    centre = np.array(shape) / 2 + rng.uniform(-2, 2, 3)
    r2 = ((x - centre[0]) ** 2 + (y - centre[1]) ** 2 + ((z - centre[2]) * 2.5) ** 2).astype(
        np.float32
    )
    body = r2 < (0.4 * min(shape[:2])) ** 2
    ct = np.where(body, 40 + rng.normal(0, 30, shape), -1000).astype(np.int16)
    ct[r2 < 16] += 150
    label = np.zeros(shape, np.uint8)
    label[r2 < 25] = 1
    label[r2 < 4] = 2
    channels = [ct] + [
        np.where(body, 300 + rng.normal(0, 40, shape), 0).astype(np.float32)
        for _ in range(n_channels - 1)
    ]
    return channels, label


def make_raw(
    raw: Path,
    n: int = 4,
    shape=(28, 24, 10),
    spacing=(1.0, 1.0, 3.0),
    n_channels: int = 1,
    start: int = 0,
) -> Path:
    """A tiny ingested RAW folder: CT (+ MR channels), LPS-oriented NIfTI, labels with 2 classes."""
    (raw / "images").mkdir(parents=True, exist_ok=True)
    (raw / "labels").mkdir(exist_ok=True)
    names, modalities = ["CT", "T1", "T2"][:n_channels], ["CT", "MR", "MR"][:n_channels]
    with Catalog(raw / "catalog.db") as cat:
        cat.set_info("labels", {"0": "background", "1": "lesion", "2": "core"})  # MSD style
        for i in range(start, start + n):
            cid = f"case{i:03d}"
            channels, label = _case_arrays(i, shape, n_channels)
            aff = _affine(spacing)
            nib.save(nib.Nifti1Image(label, aff), raw / f"labels/{cid}.nii.gz")
            recs = []
            for c, arr in enumerate(channels):
                rel = f"images/{cid}_{c:04d}.nii.gz"
                nib.save(nib.Nifti1Image(arr, aff), raw / rel)
                recs.append(
                    SeriesRecord(
                        series_id=f"{cid}-{c}", source_key=f"{cid}-{c}", case_id=cid, image_path=rel,
                        label_path=f"labels/{cid}.nii.gz", source="test", source_format="nifti",
                        shape=shape, spacing=spacing, orientation="LPS", channel=c, channel_name=names[c],
                        modality=modalities[c], split="train" if i % 3 else "val", target=i % 2,
                        sex="FM"[i % 2], age_band="40-59", site=f"site{i % 2}", manufacturer="ACME", contrast="no",
                    )
                )  # fmt: skip
            cat.add_series(recs)
    return raw


def all_arrays(prep: Path) -> dict[tuple[str, str], np.ndarray]:
    store = Store(prep)
    out = {}
    for cid in store.case_ids:
        case = store.case(cid)
        out[cid, "image"] = case.read()
        if case.has_label:
            out[cid, "label"] = case.read_label()
        for cls in case.label_classes:
            out[cid, f"loc{cls}"] = case.class_locations(cls)
    return out


def index_without_times(prep: Path) -> dict:
    index = json.loads((prep / "index.json").read_text())
    index.pop("updated_at")
    for entry in index["cases"].values():
        entry.pop("processed_at")
    return index


def assert_same_store(a: Path, b: Path) -> None:
    assert index_without_times(a) == index_without_times(b)
    arrays_a, arrays_b = all_arrays(a), all_arrays(b)
    assert arrays_a.keys() == arrays_b.keys()
    for key, arr in arrays_a.items():
        assert arr.dtype == arrays_b[key].dtype and np.array_equal(arr, arrays_b[key]), key


def _world_centroid(affine, mask):
    idx = np.argwhere(mask).astype(np.float64)
    return (idx @ affine[:3, :3].T + affine[:3, 3]).mean(0)


@pytest.fixture(scope="module")
def raw4(tmp_path_factory) -> Path:
    return make_raw(tmp_path_factory.mktemp("raw4") / "raw", n=4, n_channels=2)


@pytest.fixture(scope="module")
def prep4(raw4, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("prep4") / "prep"
    result = run(
        PreprocessConfig(
            raw=raw4, out=out, workers=1, target_spacing=(1.5, 1.5, 1.5), chunk_size=16
        )
    )
    assert (result.done, result.skipped, result.failed) == (4, 0, 0)
    assert result.cases_per_s > 0 and "4 done" in result.summary()
    return out


def test_store_layout_index_and_attributes(prep4, raw4):
    for name in (
        "plan.json",
        "config.yaml",
        "fingerprint.json",
        "index.json",
        "failures.json",
        "store.zarr",
    ):
        assert (prep4 / name).exists(), name
    index = json.loads((prep4 / "index.json").read_text())
    assert sorted(index["cases"]) == ["case000", "case001", "case002", "case003"]
    entry = index["cases"]["case001"]
    assert (
        entry["split"] == "train"
        and entry["sex"] == "M"
        and entry["site"] == "site1"
        and entry["target"] == 1
    )
    assert (
        entry["has_label"]
        and entry["label_classes"] == [1, 2]
        and entry["channels"] == ["CT", "T1"]
    )
    assert (
        entry["modality"] == "CT" and entry["manufacturer"] == "ACME" and entry["contrast"] == "no"
    )
    assert json.loads((prep4 / "failures.json").read_text())["cases"] == {}
    plan = Plan.load(prep4 / "plan.json")
    assert [c.scheme for c in plan.channels] == ["ct_window", "mri_zscore"]
    assert plan.labels == {"background": 0, "lesion": 1, "core": 2}
    store = Store(prep4)
    case = store.case("case001")
    assert case.shape[0] == 2 and case.spatial_shape == tuple(entry["shape"][1:])
    assert np.allclose(case.spacing, (1.5, 1.5, 1.5), atol=1e-5)
    assert case.meta.orientation == "RAS" and case.meta.channel_names == ("CT", "T1")
    assert case.meta.extra["sex"] == "M"
    assert case.read().dtype == np.float16 and case.read_label().dtype == np.uint8
    assert case.pad_values[0] == -1.0
    assert set(np.unique(case.read_label())) <= {0, 1, 2}
    # zarr layout: chunks (1, n, n, n) per channel, labels (n, n, n)
    import zarr

    group = zarr.open_group(str(cases_dir(prep4) / "case001"), mode="r")
    assert group["image"].chunks == (1, 16, 16, 16) and group["label"].chunks == (16, 16, 16)
    # cached locations are voxels of their class
    label = case.read_label()
    for cls in (1, 2):
        loc = case.class_locations(cls)
        assert len(loc) == (label == cls).sum() and np.all(label[tuple(loc.T)] == cls)


def test_geometry_is_preserved_through_reorient_crop_and_resample(prep4, raw4):
    store = Store(prep4)
    for cid in store.case_ids:
        case = store.case(cid)
        raw_label = nib.load(raw4 / f"labels/{cid}.nii.gz")
        lab = np.asarray(raw_label.dataobj)
        # within half a voxel per axis (RAW LPS axes (1, 1, 3) mm -> 1.5 mm; nearest neighbour
        # ties on the 2x-upsampled z axis shift a label by a quarter of a RAW voxel)
        half_voxel = 0.5 * np.maximum([1.0, 1.0, 3.0], 1.5)
        moved = _world_centroid(case.affine, case.read_label() > 0) - _world_centroid(
            raw_label.affine, lab > 0
        )
        assert np.all(np.abs(moved) < half_voxel), (cid, moved)
        assert case.label_classes == [1, 2]  # the 2-voxel-radius core survives resampling
        # the label mapped back onto the RAW grid overlays the original
        back, back_aff = restore_original(case.read_label(), case.attrs)
        assert back.shape == lab.shape and np.allclose(back_aff, raw_label.affine)
        dice = 2 * ((back > 0) & (lab > 0)).sum() / ((back > 0).sum() + (lab > 0).sum())
        assert dice > 0.85


def test_image_values_match_a_hand_computation_without_resampling(raw4, tmp_path):
    out = tmp_path / "prep"
    run(
        PreprocessConfig(
            raw=raw4,
            out=out,
            workers=1,
            target_spacing=(1.0, 1.0, 3.0),
            crop_foreground=False,
            ct_window=(-100, 300),
        )
    )
    case = Store(out).case("case002")
    ref = nib.as_closest_canonical(nib.load(raw4 / "images/case002_0000.nii.gz"))
    expected = (np.clip(ref.get_fdata(), -100, 300) + 100) / 400 * 2 - 1
    assert np.allclose(case.affine, ref.affine)
    np.testing.assert_allclose(case.read()[0].astype(np.float64), expected, atol=2e-3)  # float16
    ref_label = np.asarray(
        nib.as_closest_canonical(nib.load(raw4 / "labels/case002.nii.gz")).dataobj
    )
    assert np.array_equal(case.read_label(), ref_label)
    back, _ = restore_original(case.read_label(), case.attrs)
    assert np.array_equal(back, np.asarray(nib.load(raw4 / "labels/case002.nii.gz").dataobj))


def test_store_reader_errors(prep4, tmp_path):
    with pytest.raises(InputError, match="no store.zarr"):
        Store(tmp_path)
    store = Store(prep4)
    with pytest.raises(InputError, match="not in the store index"):
        store.case("nope")
    # a case group without its completion marker is refused with the reason
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(prep4, copy)
    meta = cases_dir(copy) / "case000" / "zarr.json"
    doc = json.loads(meta.read_text())
    del doc["attributes"]["complete"]
    meta.write_text(json.dumps(doc))
    with pytest.raises(InputError, match="incomplete"):
        Store(copy).case("case000")
    (copy / "index.json").unlink()
    with pytest.raises(InputError, match="index is missing"):
        Store(copy)
    restored = pickle.loads(pickle.dumps(store))
    assert restored._zstore is None and np.array_equal(
        restored.case("case000").read_label(), store.case("case000").read_label()
    )


def test_bad_cases_are_recorded_and_the_rest_finish(tmp_path):
    raw = make_raw(tmp_path / "raw", n=3)
    with Catalog(raw / "catalog.db") as cat:
        good = cat.cases()["case000"][0]
        rows = []
        # label on another grid
        nib.save(
            nib.Nifti1Image(np.zeros((28, 24, 11), np.uint8), _affine((1.0, 1.0, 3.0))),
            raw / "labels/badlab.nii.gz",
        )
        rows.append(("badlab", "images/case000_0000.nii.gz", "labels/badlab.nii.gz"))
        # unreadable image
        (raw / "images/broken_0000.nii.gz").write_bytes(b"\x1f\x8b garbage")
        rows.append(("broken", "images/broken_0000.nii.gz", None))
        for cid, image, label in rows:
            cat.add_series(
                [
                    SeriesRecord(
                        **{
                            **good.__dict__,
                            "series_id": cid,
                            "source_key": cid,
                            "case_id": cid,
                            "image_path": image,
                            "label_path": label,
                        }
                    )
                ]
            )
    out = tmp_path / "prep"
    result = run(PreprocessConfig(raw=raw, out=out, workers=1))
    assert (result.done, result.failed) == (3, 2)
    failures = json.loads((out / "failures.json").read_text())["cases"]
    assert sorted(failures) == ["badlab", "broken"]
    assert (
        "labels/badlab.nii.gz" in failures["badlab"]["reason"]
        and "case000_0000.nii.gz" in failures["badlab"]["reason"]
    )
    assert "shape" in failures["badlab"]["reason"]
    assert "broken_0000.nii.gz" in failures["broken"]["reason"]
    assert sorted(json.loads((out / "index.json").read_text())["cases"]) == [
        "case000",
        "case001",
        "case002",
    ]
    # the CLI reports the failures with exit status 1 (a rerun retries only the failed cases)
    from umit.cli import preprocess as cli

    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers())
    args = parser.parse_args(["preprocess", str(raw), "--out", str(out), "--workers", "1"])
    assert args.func(args) == 1


def test_channels_on_different_grids_are_an_error_naming_both_files(tmp_path):
    raw = make_raw(tmp_path / "raw", n=1, n_channels=2)
    with Catalog(raw / "catalog.db") as cat:
        records = cat.cases()["case000"]
    moved = nib.load(raw / records[1].image_path)
    nib.save(
        nib.Nifti1Image(np.asarray(moved.dataobj), moved.affine + np.diag([0, 0, 0.01, 0])),
        raw / records[1].image_path,
    )
    plan = Plan(
        target_spacing=(1, 1, 3),
        channels=[ChannelPlan(name="CT", modality="CT"), ChannelPlan(name="T1", modality="MR")],
    )
    with pytest.raises(GeometryError, match=r"case000_0001.*case000_0000.*affines differ"):
        prepare_case("case000", records, raw, plan)
    with pytest.raises(InputError, match="the plan expects"):
        prepare_case("case000", records[:1], raw, plan)


def test_rerun_skips_done_cases_and_cleans_stale_temps(raw4, tmp_path):
    out = tmp_path / "prep"
    cfg = PreprocessConfig(raw=raw4, out=out, workers=1, chunk_size=16)
    run(cfg)
    before = all_arrays(out)
    stale = cases_dir(out) / ".tmp-case001-deadbeef"
    stale.mkdir()
    (stale / "zarr.json").write_text("{}")
    import shutil

    shutil.rmtree(cases_dir(out) / "case003")
    result = run(cfg)
    assert (result.done, result.skipped, result.failed) == (1, 3, 0)
    assert not stale.exists()
    after = all_arrays(out)
    assert before.keys() == after.keys() and all(
        np.array_equal(before[k], after[k]) for k in before
    )


def test_changed_plan_needs_overwrite_and_plan_file_reuses_a_plan(raw4, prep4, tmp_path):
    cfg = dict(raw=raw4, out=prep4, workers=1, chunk_size=16)
    with pytest.raises(InputError, match=r"target_spacing.*overwrite=true"):
        run(PreprocessConfig(**cfg, target_spacing=(2.0, 2.0, 2.0)))
    assert run(PreprocessConfig(**cfg, target_spacing=(1.5, 1.5, 1.5))).skipped == 4
    other = tmp_path / "prep"
    result = run(PreprocessConfig(raw=raw4, out=other, workers=1, plan_file=prep4 / "plan.json"))
    assert result.done == 4
    assert Plan.load(other).processing_dict() == Plan.load(prep4).processing_dict()
    assert_same_store(prep4, other)
    result = run(
        PreprocessConfig(
            raw=raw4,
            out=other,
            workers=1,
            plan_file=prep4 / "plan.json",
            chunk_size=32,
            overwrite=True,
        )
    )
    assert result.done == 4 and Plan.load(other).chunk_size == 32


@pytest.mark.multiproc
def test_process_pool_gives_the_same_store(raw4, prep4, tmp_path):
    out = tmp_path / "prep"
    result = run(
        PreprocessConfig(
            raw=raw4, out=out, workers=2, target_spacing=(1.5, 1.5, 1.5), chunk_size=16
        )
    )
    assert result.done == 4
    assert_same_store(prep4, out)


@pytest.mark.multiproc
def test_kill_9_then_rerun_equals_an_uninterrupted_run(tmp_path):
    raw = make_raw(tmp_path / "raw", n=12, shape=(32, 32, 12), spacing=(1.0, 1.0, 3.0))
    settings = ["target_spacing=[0.5,0.5,0.5]", "chunk_size=32"]  # ~0.15 s per case
    ref = tmp_path / "ref"
    run(
        PreprocessConfig(raw=raw, out=ref, workers=1, target_spacing=(0.5, 0.5, 0.5), chunk_size=32)
    )

    out = tmp_path / "prep"
    cmd = [sys.executable, "-m", "umit.cli.main", "preprocess", str(raw), "--out", str(out)]
    cmd += ["--workers", "1", *settings]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    folder = cases_dir(out)
    deadline = time.monotonic() + 120
    n_done = 0
    while time.monotonic() < deadline and proc.poll() is None:
        if folder.is_dir():
            n_done = sum(
                1 for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".tmp-")
            )
            if n_done >= 3:
                break
        time.sleep(0.005)
    assert proc.poll() is None, (
        f"the run ended before it could be killed:\n{proc.communicate()[0].decode()}"
    )
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    written = sum(1 for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".tmp-"))
    assert 3 <= written < 12

    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"{12 - written} done, {written} skipped" in done.stdout
    assert not list(out.rglob(".tmp-*"))
    assert_same_store(ref, out)
