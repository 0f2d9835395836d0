"""`umit ingest`: formats, geometry kept, bad inputs recorded, resumable after kill -9, no PHI."""

from __future__ import annotations

import gzip
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from umit.cli.main import main as cli_main
from umit.data.io import read_image
from umit.ingest.catalog import Catalog
from umit.ingest.run import IngestConfig, run

OBLIQUE = np.array(
    [
        [0.9, -0.1, 0.05, -20.0],
        [0.1, 1.2, 0.0, 10.0],
        [0.0, 0.02, 2.5, -30.0],
        [0, 0, 0, 1],
    ]
)


def _nifti(path: Path, array: np.ndarray, affine: np.ndarray = OBLIQUE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, affine), path)
    return path


def _volume(seed: int, shape=(12, 10, 8), dtype=np.int16) -> np.ndarray:
    return np.random.default_rng(seed).integers(-1000, 1000, size=shape).astype(dtype)


def _ingest(src: Path, out: Path, **kw) -> tuple:
    result = run(IngestConfig(src=src, out=out, **kw), progress=False)
    return result, Catalog(out / "catalog.db")


def test_folder_of_files_keeps_voxels_and_geometry(tmp_path):
    src = tmp_path / "src"
    vol = _volume(0)
    _nifti(src / "a" / "ct1.nii.gz", vol)
    lab = (vol > 0).astype(np.uint8)
    _nifti(src / "a" / "ct1_seg.nii.gz", lab)
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(_volume(1).transpose(2, 1, 0))
    img.SetSpacing((0.7, 0.8, 3.0))
    img.SetOrigin((1.0, 2.0, 3.0))
    sitk.WriteImage(img, str(src / "b.nrrd"))
    sitk.WriteImage(img, str(src / "c.mha"))

    result, cat = _ingest(src, tmp_path / "raw")
    assert (result.ingested, result.failed) == (3, 0)
    rows = {r.source: r for r in cat.series()}
    assert set(rows) == {"a/ct1.nii.gz", "b.nrrd", "c.mha"}
    r = rows["a/ct1.nii.gz"]
    assert r.label_path is not None and r.source_format == "nifti"
    out_img, out_meta = read_image(tmp_path / "raw" / r.image_path)
    np.testing.assert_array_equal(out_img, vol)
    np.testing.assert_allclose(out_meta.affine, OBLIQUE, atol=1e-6)
    out_lab, lab_meta = read_image(tmp_path / "raw" / r.label_path)
    np.testing.assert_array_equal(out_lab, lab)
    np.testing.assert_allclose(lab_meta.affine, OBLIQUE, atol=1e-6)
    assert rows["b.nrrd"].spacing == pytest.approx((0.7, 0.8, 3.0))
    # an ITK image with identity direction is LPS: stored axes point to L, P, S in RAS terms
    assert rows["c.mha"].orientation == "LPS"
    assert (tmp_path / "raw" / "config.yaml").is_file()


BAD_INPUTS = {
    "truncated.nii.gz": "truncated",
    "text.nii.gz": "not",
    "corrupt.nii.gz": "",
    "flat.nii.gz": "2D",
    "nans.nii.gz": "NaN",
    "mismatch.nii.gz": "label",
}


def _make_bad_inputs(src: Path) -> None:
    good = _nifti(src / "good.nii.gz", _volume(3))
    data = good.read_bytes()
    (src / "truncated.nii.gz").write_bytes(data[: len(data) // 2])
    (src / "text.nii.gz").write_text("this is not an image\n")
    raw = bytearray(gzip.compress(bytes(nib.Nifti1Image(_volume(4), OBLIQUE).to_bytes())))
    raw[len(raw) // 2 : len(raw) // 2 + 64] = os.urandom(64)  # damage the deflate stream
    (src / "corrupt.nii.gz").write_bytes(bytes(raw))
    _nifti(src / "flat.nii.gz", _volume(5, shape=(12, 10, 1)))
    nans = _volume(6).astype(np.float32)
    nans[2, 3, 4] = np.nan
    _nifti(src / "nans.nii.gz", nans)
    _nifti(src / "mismatch.nii.gz", _volume(7))
    _nifti(src / "mismatch_seg.nii.gz", np.zeros((12, 10, 9), np.uint8))  # wrong shape


def test_bad_inputs_become_failure_rows_and_the_rest_lands(tmp_path, capsys):
    src = tmp_path / "src"
    _make_bad_inputs(src)
    code = cli_main(["ingest", str(src), "--out", str(tmp_path / "raw")])
    assert code == 1  # failures are reported in the exit status
    out = capsys.readouterr().out
    assert "1 new item(s)" in out and f"{len(BAD_INPUTS)} failed" in out
    with Catalog(tmp_path / "raw" / "catalog.db") as cat:
        assert [r.source for r in cat.series()] == ["good.nii.gz"]
        failures = {Path(f["source"]).name: f["reason"] for f in cat.failures()}
    assert set(failures) == set(BAD_INPUTS)
    for name, word in BAD_INPUTS.items():
        assert name in failures[name], failures[name]  # every reason names its file
        assert word.lower() in failures[name].lower(), failures[name]
    # a label whose geometry does not match its image names both problems
    assert "does not match image shape" in failures["mismatch.nii.gz"]


def test_label_with_other_affine_is_rejected(tmp_path):
    src = tmp_path / "src"
    _nifti(src / "x.nii.gz", _volume(1))
    moved = OBLIQUE.copy()
    moved[0, 3] += 1.5
    _nifti(src / "x_label.nii.gz", np.zeros((12, 10, 8), np.uint8), moved)
    result, cat = _ingest(src, tmp_path / "raw")
    assert result.failed == 1
    assert "label geometry does not match" in cat.failures()[0]["reason"]


def test_rerun_skips_done_and_failed_items(tmp_path):
    src = tmp_path / "src"
    _make_bad_inputs(src)
    first, _ = _ingest(src, tmp_path / "raw")
    second, _ = _ingest(src, tmp_path / "raw")
    assert second.ingested == 0 and second.skipped == first.found == len(BAD_INPUTS) + 1
    assert second.failed == first.failed
    third, _ = _ingest(src, tmp_path / "raw", retry_failed=True)
    assert third.ingested == 0 and third.failed == first.failed


def _msd_collection(root: Path, n: int = 3) -> Path:
    """MSD layout: 4D multi-channel images listed in dataset.json, plus attributes.csv."""
    training = []
    for i in range(n):
        img = np.stack([_volume(10 + i), _volume(20 + i)], axis=-1)  # (i, j, k, C)
        _nifti(root / "imagesTr" / f"brain_{i:03d}.nii.gz", img)
        _nifti(root / "labelsTr" / f"brain_{i:03d}.nii.gz", (img[..., 0] > 500).astype(np.uint8))
        training.append(
            {
                "image": f"./imagesTr/brain_{i:03d}.nii.gz",
                "label": f"./labelsTr/brain_{i:03d}.nii.gz",
            }
        )
    _nifti(root / "imagesTs" / "brain_100.nii.gz", np.stack([_volume(1), _volume(2)], axis=-1))
    spec = {
        "name": "toy",
        "modality": {"0": "FLAIR", "1": "T1w"},
        "labels": {"0": "background", "1": "tumour"},
        "training": training,
        "test": ["./imagesTs/brain_100.nii.gz"],
    }
    (root / "dataset.json").write_text(json.dumps(spec))
    (root / "attributes.csv").write_text(
        "case_id,sex,age,site\nbrain_000,female,45,s1\nbrain_001,M,71,s2\nbrain_002,,,\n"
    )
    return root


def test_msd_collection_channels_labels_attributes(tmp_path):
    src = _msd_collection(tmp_path / "msd")
    result, cat = _ingest(src, tmp_path / "raw")
    assert (result.ingested, result.failed) == (4, 0)
    cases = cat.cases()
    assert set(cases) == {"brain_000", "brain_001", "brain_002", "brain_100"}
    b0 = cases["brain_000"]
    assert [c.channel_name for c in b0] == ["FLAIR", "T1w"]
    assert {c.modality for c in b0} == {"MR"} and b0[0].source_format == "msd"
    assert (b0[0].sex, b0[0].age_band, b0[0].site, b0[0].split) == ("F", "40-59", "s1", "train")
    assert cases["brain_001"][0].age_band == "60-79"
    assert cases["brain_002"][0].sex is None
    assert cases["brain_100"][0].split == "test" and cases["brain_100"][0].label_path is None
    ch1, _ = read_image(tmp_path / "raw" / b0[1].image_path)
    np.testing.assert_array_equal(ch1, _volume(20))


def test_nnunet_collection_by_file_convention(tmp_path):
    root = tmp_path / "Dataset001_Toy"
    for case in ("c1", "c2"):
        for ch in range(2):
            _nifti(root / "imagesTr" / f"{case}_{ch:04d}.nii.gz", _volume(ch + len(case)))
        _nifti(root / "labelsTr" / f"{case}.nii.gz", np.ones((12, 10, 8), np.uint8))
    spec = {
        "channel_names": {"0": "CT", "1": "PET"},
        "labels": {"background": 0, "x": 1},
        "file_ending": ".nii.gz",
    }
    (root / "dataset.json").write_text(json.dumps(spec))
    result, cat = _ingest(root, tmp_path / "raw")
    assert (result.ingested, result.failed) == (2, 0)
    rows = cat.series()
    assert [(r.case_id, r.channel_name) for r in rows] == [
        ("c1", "CT"),
        ("c1", "PET"),
        ("c2", "CT"),
        ("c2", "PET"),
    ]
    assert all(r.source_format == "nnunet" and r.label_path for r in rows)
    assert cat.info()["labels"] == {"background": 0, "x": 1}


def test_medmnist_npz(tmp_path):
    rng = np.random.default_rng(0)
    npz = tmp_path / "toymnist3d.npz"
    np.savez(
        npz,
        train_images=rng.integers(0, 255, (3, 8, 8, 8), dtype=np.uint8),
        train_labels=np.array([[0], [1], [1]], np.uint8),
        test_images=rng.integers(0, 255, (2, 8, 8, 8), dtype=np.uint8),
        test_labels=np.array([[1], [0]], np.uint8),
    )
    result, cat = _ingest(npz, tmp_path / "raw")
    assert result.ingested == 5
    rows = cat.series()
    assert [(r.split, r.target) for r in rows] == [
        ("test", 1),
        ("test", 0),
        ("train", 0),
        ("train", 1),
        ("train", 1),
    ]
    img, meta = read_image(tmp_path / "raw" / rows[2].image_path)
    np.testing.assert_array_equal(img, np.load(npz)["train_images"][0])
    assert meta.spacing == (1.0, 1.0, 1.0)


def test_bad_medmnist_and_missing_source(tmp_path):
    from umit.errors import InputError

    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(InputError, match="bad.npz"):
        run(IngestConfig(src=bad, out=tmp_path / "raw"), progress=False)
    with pytest.raises(InputError, match="does not exist"):
        run(IngestConfig(src=tmp_path / "nope", out=tmp_path / "raw2"), progress=False)
    flat = tmp_path / "flat.npz"
    np.savez(flat, train_images=np.zeros((2, 8, 8), np.uint8))
    with pytest.raises(InputError, match="3D volumes"):
        run(IngestConfig(src=flat, out=tmp_path / "raw3"), progress=False)


def test_same_case_id_from_two_collections_is_a_failure(tmp_path):
    _msd_collection(tmp_path / "src" / "one", n=1)
    _msd_collection(tmp_path / "src" / "two", n=1)
    result, cat = _ingest(tmp_path / "src", tmp_path / "raw")
    assert result.failed == 2  # brain_000 and brain_100 of the second collection
    assert all("already ingested from another source" in f["reason"] for f in cat.failures())


def _snapshot(raw: Path) -> dict:
    """Catalog rows (minus timestamps) and file contents: what must match after a resume."""
    con = sqlite3.connect(raw / "catalog.db")
    rows = con.execute("SELECT * FROM series ORDER BY series_id").fetchall()
    cols = [d[0] for d in con.execute("SELECT * FROM series").description]
    con.close()
    rows = [tuple(v for c, v in zip(cols, r, strict=False) if c != "ingested_at") for r in rows]
    files = {
        str(p.relative_to(raw)): np.asarray(nib.load(p).dataobj).tobytes()
        for p in sorted(raw.rglob("*.nii.gz"))
    }
    return {"rows": rows, "files": files}


@pytest.mark.slow
def test_kill_9_during_ingest_then_rerun_equals_uninterrupted(tmp_path):
    src = tmp_path / "src"
    for i in range(30):
        _nifti(
            src / f"case_{i:02d}.nii.gz",
            np.random.default_rng(i).normal(size=(48, 48, 40)).astype(np.float32),
        )
    raw_a, raw_b = tmp_path / "raw_a", tmp_path / "raw_b"
    for raw in (raw_a, raw_b):
        raw.mkdir()
        (raw / ".umit_secret").write_text("00" * 32)  # same pseudonym key for both runs
    _ingest(src, raw_a)
    cmd = [sys.executable, "-m", "umit.cli.main", "ingest", str(src), "--out", str(raw_b)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:
        time.sleep(0.05)
        assert proc.poll() is None, "ingest ended before it could be killed"
        db = raw_b / "catalog.db"
        try:
            n = (
                sqlite3.connect(db).execute("SELECT COUNT(*) FROM series").fetchone()[0]
                if db.exists()
                else 0
            )
        except sqlite3.OperationalError:
            n = 0
        if n >= 8:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    n_before = (
        sqlite3.connect(raw_b / "catalog.db").execute("SELECT COUNT(*) FROM series").fetchone()[0]
    )
    assert 8 <= n_before < 30, "the kill must land mid-run for this test to mean anything"
    result, _ = _ingest(src, raw_b)
    assert result.skipped == n_before and result.failed == 0
    assert _snapshot(raw_a) == _snapshot(raw_b)
    assert not list(raw_b.rglob(".tmp-*"))


def test_dicom_ingest_keeps_geometry_and_copies_no_identifiers(tmp_path):
    from umit.ingest.dicom import discover_series, load_series

    from _shared import IDENTIFIERS, write_ct_series

    src = tmp_path / "PACS_export"
    rng = np.random.default_rng(0)
    stored = rng.integers(0, 2000, size=(10, 12, 6)).astype(np.int16)
    extra = {
        "PatientSex": "F",
        "PatientAge": "047Y",
        "Manufacturer": "ACME",
        "BodyPartExamined": "ABDOMEN",
    }
    write_ct_series(src / "s1", stored, iop=(0.96, 0.28, 0, -0.28, 0.96, 0), extra=extra)
    write_ct_series(src / "s2", stored[:, :, :4], extra={"PatientID": "OTHER-9"})
    result, cat = _ingest(src, tmp_path / "raw")
    assert (result.ingested, result.failed) == (2, 0)
    rows = sorted(cat.series(), key=lambda r: r.shape[2], reverse=True)
    r = rows[0]
    assert (r.modality, r.sex, r.age_band, r.manufacturer, r.body_part) == (
        "CT",
        "F",
        "40-59",
        "ACME",
        "ABDOMEN",
    )
    assert r.case_id.startswith("dicom_") and r.subject_id and r.subject_id != rows[1].subject_id
    # voxels and geometry equal the DICOM reader's (itself checked against SimpleITK)
    series = sorted(discover_series(src)[0], key=lambda s: -s.n_slices)[0]
    ref, ref_meta = load_series(series)
    img, meta = read_image(tmp_path / "raw" / r.image_path)
    np.testing.assert_array_equal(img, ref)
    np.testing.assert_allclose(meta.affine, ref_meta.affine, atol=1e-4)
    # no identifier in any byte of the catalog or of the written NIfTI files (headers included)
    blobs = [(tmp_path / "raw" / "catalog.db").read_bytes()]
    blobs += [gzip.decompress(p.read_bytes()) for p in (tmp_path / "raw").rglob("*.nii.gz")]
    for value in [*IDENTIFIERS.values(), "OTHER-9", "PACS_export/s1"]:
        for part in str(value).replace("^", " ").split():
            if len(part) >= 4:
                assert not any(part.encode() in b for b in blobs), f"{part!r} leaked"


@pytest.mark.realdata
def test_real_dicom_series_ingest_matches_simpleitk(tmp_path):
    import SimpleITK as sitk

    from umit.data.meta import affine_from_lps

    from _shared import require_shared

    src = require_shared("totalsegmentator", "example_ct_dicom")
    result, cat = _ingest(src, tmp_path / "raw")
    assert (result.ingested, result.failed) == (1, 0)
    rec = cat.series()[0]
    img, meta = read_image(tmp_path / "raw" / rec.image_path)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(src)))
    ref = reader.Execute()
    ref_affine = affine_from_lps(
        np.array(ref.GetDirection()).reshape(3, 3),
        np.array(ref.GetSpacing()),
        np.array(ref.GetOrigin()),
    )
    np.testing.assert_allclose(meta.affine, ref_affine, atol=1e-3)
    np.testing.assert_array_equal(img, sitk.GetArrayFromImage(ref).transpose(2, 1, 0))
    assert rec.contrast == "yes" and rec.modality == "CT"


def test_variable_spacing_ct_is_refused_clearly_then_resampled_on_request(tmp_path, capsys, caplog):
    from _shared import write_ct_series

    # A clinical head CT: 13 slices 4.2 mm apart, then 13 more 7.4 mm apart.
    z = np.array([4.2 * k for k in range(13)] + [50.4 + 7.4 * k for k in range(1, 14)])
    stored = np.random.default_rng(7).integers(0, 2000, size=(6, 5, 26)).astype(np.uint16)
    write_ct_series(tmp_path / "src" / "head", stored, positions=[[0, 0, 10 + v] for v in z])
    raw = tmp_path / "raw"
    assert cli_main(["ingest", str(tmp_path / "src"), "--out", str(raw)]) == 1
    with Catalog(raw / "catalog.db") as cat:
        (failure,) = cat.failures()
    assert failure["source"] == "head [26 slices]"
    changes = "slice spacing changes: 4.20 mm for slices 0-12, 7.40 mm for slices 12-25"
    assert changes in failure["reason"] and "set resample_nonuniform=true" in failure["reason"]
    assert changes in capsys.readouterr().out

    # The rerun the message points to: resample the failed series onto 4.2 mm slices.
    with caplog.at_level("INFO", logger="umit.ingest"):
        code = cli_main(
            ["ingest", str(tmp_path / "src"), "--out", str(raw), "resample_nonuniform=true"]
            + ["retry_failed=true"]
        )
    assert code == 0
    transform = "resampled nonuniform slices 4.2/7.4 mm -> 4.2 mm (26 -> 35 slices)"
    with Catalog(raw / "catalog.db") as cat:
        assert cat.failures() == []
        (rec,) = cat.series()
    assert rec.transform == transform and rec.shape == (6, 5, 35) and rec.dtype == "float32"
    assert rec.spacing == pytest.approx((0.7, 0.8, 4.2))
    assert f"head [26 slices]: {transform}" in caplog.text
    img, meta = read_image(raw / rec.image_path)
    values = stored.astype(np.float64) - 1024
    want = np.stack(
        [[np.interp(4.2 * np.arange(35), z, values[i, j]) for j in range(5)] for i in range(6)]
    )
    np.testing.assert_allclose(img, want, rtol=0, atol=1e-3)
    np.testing.assert_array_equal(img[:, :, :13], values[:, :, :13])
    np.testing.assert_allclose(meta.affine[:3, 2], [0, 0, 4.2], atol=1e-6)


def test_console_and_log_lines_of_a_failed_file_name_it(tmp_path, capsys, caplog):
    from _shared import write_ct_series

    src = tmp_path / "src"
    write_ct_series(src / "ct", np.zeros((4, 5, 6), np.uint16))
    (src / "broken").mkdir()
    (src / "broken" / "scan_0001.dcm").write_text("not DICOM at all, just text\n")
    with caplog.at_level("WARNING", logger="umit.ingest"):
        code = cli_main(["ingest", str(src), "--out", str(tmp_path / "raw")])
    assert code == 1
    line = "broken/scan_0001.dcm: not a valid DICOM file (no DICOM attributes found)"
    printed = [x for x in capsys.readouterr().out.splitlines() if "FAILED" in x]
    assert printed == [f"  FAILED {line}"]
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("failed:")]
    assert logged == [f"failed: {line}"]
    with Catalog(tmp_path / "raw" / "catalog.db") as cat:
        assert [(f["source"], f["reason"]) for f in cat.failures()] == [
            ("broken/scan_0001.dcm", line)
        ]
        assert len(cat.series()) == 1


def test_failure_lines_name_the_source_once():
    from umit.ingest.run import failure_line

    assert failure_line("a/x.dcm", "truncated") == "a/x.dcm: truncated"
    named = "/data/src/a/x.nii.gz: contains 1 NaN/Inf voxel(s)"
    assert failure_line("a/x.nii.gz", named) == named
    series = "/data/src/head: missing slice(s) between ..."
    assert failure_line("head [26 slices]", series) == series
    assert (
        failure_line(". [3 slices]", "/data/src: 2D image") == ". [3 slices]: /data/src: 2D image"
    )
    assert failure_line("toy.npz#train/3", "toy.npz#train/3: NaN") == "toy.npz#train/3: NaN"


@pytest.mark.parametrize("flagged", [True, False])
def test_localizers_are_set_aside_and_reported(tmp_path, capsys, flagged):
    from umit.deid.secret import load_or_create_secret, replace_uid

    from _shared import write_ct_series

    src, raw = tmp_path / "src", tmp_path / "raw"
    write_ct_series(src / "ct", np.zeros((4, 5, 6), np.uint16), series_uid="1.2.826.0.7.1")
    # A 3-image scout (series 1): one image per plane, flagged LOCALIZER or not.
    image_type = ("ORIGINAL", "PRIMARY", "LOCALIZER" if flagged else "OTHER")
    for iop in ((1, 0, 0, 0, 1, 0), (1, 0, 0, 0, 0, -1), (0, 1, 0, 0, 0, -1)):
        write_ct_series(
            src / "scout",
            np.zeros((4, 4, 1), np.uint16),
            iop=iop,
            series_uid="1.2.826.0.7.2",
            image_type=image_type,
            extra={"SeriesNumber": 1},
        )
    assert cli_main(["ingest", str(src), "--out", str(raw)]) == 0  # a deliberate skip, no failure
    out = capsys.readouterr().out
    secret = load_or_create_secret(raw)
    uid = replace_uid(secret, "1.2.826.0.7.2")
    reason = (
        "localizer: 3 image(s) with ImageType LOCALIZER"
        if flagged
        else "localizer: 3 image(s) in different orientations, at most 3 per orientation: "
        "too few for a volume"
    )
    assert "set aside (not failures): localizer images of 1 series" in out
    assert f"  SET ASIDE scout [3 images]: CT series number 1 (deid UID {uid}): {reason}" in out
    assert "1.2.826.0.7.2" not in out  # the series is named by its deid UID only
    with Catalog(raw / "catalog.db") as cat:
        assert cat.failures() == [] and [r.source for r in cat.series()] == ["ct [6 slices]"]
        (row,) = cat.set_aside()
    assert {k: row[k] for k in row if k not in ("source_key", "set_aside_at")} == {
        "source": "scout [3 images]",
        "kind": "localizer",
        "reason": reason,
        "n_images": 3,
        "modality": "CT",
        "series_number": 1,
        "deid_series_uid": uid,
    }
    # The returned result carries the report too; a rerun reports it again, once.
    result, cat = _ingest(src, raw)
    assert (result.ingested, result.failed) == (0, 0) and result.set_aside == cat.set_aside()
    assert len(result.set_aside) == 1 and result.set_aside[0]["reason"] == reason
