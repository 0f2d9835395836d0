"""The PACS round trip of issue #13, against a real Orthanc (``pacs``), with the commands a user
runs:

1. a CT series is stored in the PACS (STOW-RS, :meth:`DicomWebClient.store_instances`);
2. ``umit ingest dicomweb+http://...`` pulls it from there into RAW (de-identified NIfTI);
3. the series is retrieved as DICOM files (WADO-RS) and ``umit predict --dicom-seg --stow
   dicomweb+http://...`` writes the mask, writes the DICOM SEG and stores it back in the PACS;
4. the SEG is found in the study (QIDO-RS, Modality=SEG) and retrieved (WADO-RS).

The SEG that comes back is the file predict wrote, byte for byte; it references the series as
the PACS holds it (same study, the series' UID, every instance); read with highdicom it equals
the NIfTI mask of the same run voxel for voxel, both per source image and by patient
coordinates; dciodvfy finds no error; and predicting on the NIfTI that ``umit ingest`` wrote
gives the same voxels in world space. Each test prints the time of each leg (``-s`` shows it).
"""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
from _seg_checks import dciodvfy, read_back_by_source, read_back_in_space

from umit.cli.main import main as cli
from umit.ingest.dicomweb import dicom_json_value
from umit.ingest.read import read_volume
from umit.preprocess.resample import reorient_to_ras

from _shared import require_shared, write_ct_series

pytestmark = pytest.mark.pacs


def ct_volume(shape=(40, 32, 12)) -> np.ndarray:
    """Stored values (cols, rows, slices): soft tissue (~0 HU) with a 'bone' block (~900 HU)
    the threshold model labels, off centre so a flip would show."""
    vol = np.random.default_rng(7).integers(950, 1100, size=shape).astype(np.int16)
    vol[4:14, 6:20, 2:9] = 1900
    vol[25:36, 18:28, 6:12] = 1700
    return vol


def round_trip(orthanc, series: Path, tmp_path: Path, model: Path, capsys) -> dict:
    """Run the four legs on the DICOM files under ``series``; check the SEG that comes back;
    returns the figures of each leg."""
    client = orthanc.client()
    auth = orthanc.write_auth_file(tmp_path / "pacs-auth")
    files = sorted(p for p in series.iterdir() if p.is_file())
    first = pydicom.dcmread(files[0], stop_before_pixels=True)
    study, series_uid = str(first.StudyInstanceUID), str(first.SeriesInstanceUID)
    legs: dict[str, float] = {}

    t = time.perf_counter()  # 1. the series goes into the PACS
    sent = client.store_instances(files)
    legs["upload"] = time.perf_counter() - t
    assert len(sent.stored) == len(files) and not sent.failed

    t = time.perf_counter()  # 2. umit ingest from the PACS
    raw = tmp_path / "raw"
    args = [orthanc.ingest_url, "--out", str(raw), "--study", study, "--auth-file", str(auth)]
    assert cli(["ingest", *args]) == 0
    legs["ingest"] = time.perf_counter() - t
    (ingested,) = sorted((raw / "images").glob("*.nii.gz"))

    t = time.perf_counter()  # 3a. the series as DICOM files, for predict
    folder = tmp_path / "from_pacs" / "ct"
    got = client.retrieve_series(study, series_uid, folder)
    legs["retrieve"] = time.perf_counter() - t
    assert got.n_instances == len(files)

    capsys.readouterr()
    t = time.perf_counter()  # 3b. predict, SEG, STOW-RS back
    out = tmp_path / "out"
    args = [str(folder), "--model", str(model), "--out", str(out), "--dicom-seg"]
    args += ["--stow", orthanc.ingest_url, "--auth-file", str(auth), "sw_batch_size=32"]
    assert cli(["predict", *args]) == 0
    legs["predict"] = time.perf_counter() - t
    printed = capsys.readouterr().out
    assert f"sent to {orthanc.dicomweb_url}/studies" in printed
    seg_s, stow_s = (float(x) for x in re.search(r"written in ([\d.]+) s.*in ([\d.]+) s", printed).groups())  # fmt: skip
    legs["seg_write"], legs["stow"] = seg_s, stow_s
    mask_file, seg_file = out / "ct.nii.gz", out / "ct.seg.dcm"
    for p in out.iterdir():  # the auth file's path is recorded, never what it holds
        assert orthanc.auth[1].encode() not in p.read_bytes(), p

    t = time.perf_counter()  # 4. the SEG, found in the study and retrieved
    (found,) = client.search_series(study, {"Modality": "SEG"})
    seg_uid = dicom_json_value(found, "SeriesInstanceUID")
    back = client.retrieve_series(study, seg_uid, tmp_path / "seg_from_pacs")
    legs["seg_retrieve"] = time.perf_counter() - t
    (seg_back,) = sorted(back.folder.iterdir())

    # the SEG in the PACS is the file predict wrote, on the series as the PACS holds it
    assert seg_back.read_bytes() == seg_file.read_bytes()
    seg = hd.seg.segread(seg_back)
    assert seg.StudyInstanceUID == study and seg.SeriesInstanceUID == seg_uid
    (ref,) = seg.ReferencedSeriesSequence
    assert ref.SeriesInstanceUID == series_uid
    in_pacs = {
        dicom_json_value(i, "SOPInstanceUID") for i in client.search_instances(study, series_uid)
    }
    assert {i.ReferencedSOPInstanceUID for i in ref.ReferencedInstanceSequence} == in_pacs
    assert len(client.search_series(study)) == 2  # the CT and its SEG, nothing else

    # its voxels are the NIfTI mask's, per source image and in patient space
    nifti = nib.load(mask_file)
    mask = np.asarray(nifti.dataobj)
    assert 0 < (mask == 1).sum() < mask.size  # a non-trivial prediction
    _, meta = read_volume(folder)
    np.testing.assert_allclose(nifti.affine, meta.affine, atol=1e-4)
    uids = _uids_in_slice_order(folder, meta.affine)
    np.testing.assert_array_equal(read_back_by_source(seg_back, uids), mask)
    np.testing.assert_array_equal(read_back_in_space(seg_back, nifti.affine, mask.shape), mask)
    dciodvfy(seg_back)

    # the NIfTI path: predicting on what umit ingest wrote gives the same voxels in world space
    assert cli(["predict", str(ingested), "--model", str(model), "--out", str(tmp_path / "o2"),
                "sw_batch_size=32"]) == 0  # fmt: skip
    other = nib.load(tmp_path / "o2" / ingested.name)
    a, a_affine = reorient_to_ras(mask, nifti.affine)
    b, b_affine = reorient_to_ras(np.asarray(other.dataobj), other.affine)
    np.testing.assert_allclose(a_affine, b_affine, atol=1e-3)
    np.testing.assert_array_equal(a, b)

    legs["mb_series"] = sum(p.stat().st_size for p in files) / 1e6
    legs["mb_seg"] = seg_file.stat().st_size / 1e6
    legs["mb_nifti"] = mask_file.stat().st_size / 1e6
    legs["seg_frames"] = int(seg.NumberOfFrames)
    print(f"\nround trip {series.name}: " + ", ".join(f"{k} {v:.3f}" for k, v in legs.items()))
    return legs


def _uids_in_slice_order(folder: Path, affine: np.ndarray) -> list[str]:
    """SOP Instance UIDs of the files in ``folder`` by slice index ``k`` of the grid ``affine``
    (RAS), from each file's ImagePositionPatient (LPS)."""
    to_ijk = np.linalg.inv(affine)
    by_k = {}
    for p in folder.iterdir():
        ds = pydicom.dcmread(p, stop_before_pixels=True)
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        k = (to_ijk @ [-x, -y, z, 1.0])[2]
        by_k[round(k)] = str(ds.SOPInstanceUID)
        assert abs(k - round(k)) < 1e-3
    assert sorted(by_k) == list(range(len(by_k)))
    return [by_k[k] for k in sorted(by_k)]


def test_round_trip_synthetic_ct(orthanc_empty, tmp_path, tiny_model, capsys):
    write_ct_series(tmp_path / "src" / "ct", ct_volume(), slice_step=2.0)
    round_trip(orthanc_empty, tmp_path / "src" / "ct", tmp_path, tiny_model, capsys)


@pytest.mark.realdata
@pytest.mark.slow
def test_round_trip_real_abdomen_ct(orthanc_empty, tmp_path, tiny_model, capsys):
    """The 134-slice TCIA abdomen CT (512 x 512, 70.6 MB)."""
    src = require_shared("abdomen_ct_dicom_tcia")
    series = tmp_path / "src" / "ct"
    series.mkdir(parents=True)
    for p in sorted(src.glob("*.dcm")):
        shutil.copy(p, series / p.name)
    round_trip(orthanc_empty, series, tmp_path, tiny_model, capsys)
