"""The PACS round trip of issue #13, against a real Orthanc (``pacs``), with the commands a user
runs:

1. a CT series is stored in the PACS (STOW-RS, :meth:`DicomWebClient.store_instances`);
2. ``umit ingest dicomweb+http://...`` pulls it from there into RAW (de-identified NIfTI);
3. ``umit predict dicomweb+http://.../studies/UID/series/UID --dicom-seg --stow
   dicomweb+http://...`` retrieves the series (WADO-RS), writes the mask, writes the DICOM SEG
   and stores it back in the PACS;
4. the SEG is found in the study (QIDO-RS, Modality=SEG) and retrieved (WADO-RS).

The SEG that comes back is the file predict wrote, byte for byte; it references the series as
the PACS holds it (same study, the series' UID, every instance); read with highdicom it equals
the NIfTI mask of the same run voxel for voxel, both per source image and by patient
coordinates; dciodvfy finds no error; and predicting on the NIfTI that ``umit ingest`` wrote
gives the same voxels in world space. Each test prints the time of each leg (``-s`` shows it).

Then ``umit predict`` on a DICOMweb series against the same files on disk (the same mask,
byte for byte, and the same SEG frames), on a whole study (outputs by series UID, a series that
fails to decode as a failure row, SEG series left out), and its errors before inference (a wrong
password, a series or study the PACS does not have).
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import time
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
from _seg_checks import dciodvfy, read_back_by_source, read_back_in_space, sop_uids

from umit.cli.main import main as cli
from umit.inference.dicomweb_input import TMP_DIR
from umit.ingest.dicomweb import dicom_json_value
from umit.ingest.read import read_volume
from umit.preprocess.resample import reorient_to_ras

from _shared import corrupt_pixels, new_uid, require_shared, rotation, write_ct_series

pytestmark = pytest.mark.pacs


def ct_volume(shape=(40, 32, 12)) -> np.ndarray:
    """Stored values (cols, rows, slices): soft tissue (~0 HU) with a 'bone' block (~900 HU)
    the threshold model labels, off centre so a flip would show."""
    vol = np.random.default_rng(7).integers(950, 1100, size=shape).astype(np.int16)
    vol[4:14, 6:20, 2:9] = 1900
    vol[25:36, 18:28, 6:12] = 1700
    return vol


def round_trip(orthanc, series: Path, tmp_path: Path, model: Path, capsys, caplog) -> dict:
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

    capsys.readouterr()
    caplog.set_level(logging.INFO, logger="umit.inference.dicomweb_input")
    t = time.perf_counter()  # 3. predict on the series in the PACS (WADO-RS), SEG, STOW-RS back
    out = tmp_path / "out"
    url = f"{orthanc.ingest_url}/studies/{study}/series/{series_uid}"
    args = [url, "--model", str(model), "--out", str(out), "--dicom-seg"]
    args += ["--stow", orthanc.ingest_url, "--auth-file", str(auth), "sw_batch_size=32"]
    assert cli(["predict", *args]) == 0
    legs["predict"] = time.perf_counter() - t
    printed = capsys.readouterr().out
    mask_file, seg_file = out / f"{series_uid}.nii.gz", out / f"{series_uid}.seg.dcm"
    assert (
        f"{url} -> {mask_file}" in printed and f"sent to {orthanc.dicomweb_url}/studies" in printed
    )
    seg_s, stow_s = (float(x) for x in re.search(r"written in ([\d.]+) s.*in ([\d.]+) s", printed).groups())  # fmt: skip
    legs["seg_write"], legs["stow"] = seg_s, stow_s
    n, _, retrieve_s = re.search(r"retrieved (\d+) instance\(s\), ([\d.]+) MB in ([\d.]+) s", caplog.text).groups()  # fmt: skip
    assert int(n) == len(files)
    legs["retrieve"] = float(retrieve_s)
    # the retrieved series is gone; the auth file's path is recorded, never what it holds
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [mask_file.name, seg_file.name, "predict_config.yaml"]
    )
    for p in out.iterdir():
        assert orthanc.auth[1].encode() not in p.read_bytes(), p
    config = (out / "predict_config.yaml").read_text()
    assert f"inputs: {url}" in config and f"pacs_auth_file: {auth}" in config

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
    _, meta = read_volume(series)  # the files that went into the PACS
    np.testing.assert_allclose(nifti.affine, meta.affine, atol=1e-4)
    uids = _uids_in_slice_order(series, meta.affine)
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


def test_round_trip_synthetic_ct(orthanc_empty, tmp_path, tiny_model, capsys, caplog):
    write_ct_series(tmp_path / "src" / "ct", ct_volume(), slice_step=2.0)
    round_trip(orthanc_empty, tmp_path / "src" / "ct", tmp_path, tiny_model, capsys, caplog)


@pytest.mark.realdata
@pytest.mark.slow
def test_round_trip_real_abdomen_ct(orthanc_empty, tmp_path, tiny_model, capsys, caplog):
    """The 134-slice TCIA abdomen CT (512 x 512, 70.6 MB)."""
    src = require_shared("abdomen_ct_dicom_tcia")
    series = tmp_path / "src" / "ct"
    series.mkdir(parents=True)
    for p in sorted(src.glob("*.dcm")):
        shutil.copy(p, series / p.name)
    round_trip(orthanc_empty, series, tmp_path, tiny_model, capsys, caplog)


# ------------------------------------------------------------------- umit predict dicomweb+...
def test_predict_from_dicomweb_equals_predict_from_disk(orthanc_empty, tmp_path, tiny_model):
    """The same oblique series predicted from the PACS and from a folder: the same mask file,
    byte for byte (uncompressed, so the bytes are the header and the voxels), and SEGs with the
    same frames on the same source images."""
    r = rotation(20, -15, 30)
    paths = write_ct_series(
        tmp_path / "src" / "ct", ct_volume(), iop=[*r[:, 0], *r[:, 1]], slice_step=2.0
    )
    orthanc_empty.upload(tmp_path / "src" / "ct")
    first = pydicom.dcmread(paths[0], stop_before_pixels=True)
    study, series_uid = str(first.StudyInstanceUID), str(first.SeriesInstanceUID)
    auth = orthanc_empty.write_auth_file(tmp_path / "pacs-auth")
    common = ["--model", str(tiny_model), "--dicom-seg", "suffix=.nii", "sw_batch_size=32"]
    disk, web = tmp_path / "disk", tmp_path / "web"
    assert cli(["predict", str(tmp_path / "src" / "ct"), "--out", str(disk), *common]) == 0
    url = f"{orthanc_empty.ingest_url}/studies/{study}/series/{series_uid}"
    assert cli(["predict", url, "--out", str(web), "--auth-file", str(auth), *common]) == 0

    mask = (web / f"{series_uid}.nii").read_bytes()
    assert mask == (disk / "ct.nii").read_bytes()
    assert (np.asarray(nib.load(web / f"{series_uid}.nii").dataobj) == 1).any()  # not trivial
    uids = sop_uids(paths)  # in slice order
    web_seg, disk_seg = web / f"{series_uid}.seg.dcm", disk / "ct.seg.dcm"
    np.testing.assert_array_equal(
        read_back_by_source(web_seg, uids), read_back_by_source(disk_seg, uids)
    )
    a, b = pydicom.dcmread(web_seg), pydicom.dcmread(disk_seg)
    for keyword in ("StudyInstanceUID", "FrameOfReferenceUID", "NumberOfFrames"):
        assert a[keyword].value == b[keyword].value, keyword
    refs = [[i.to_json_dict() for i in ds.ReferencedSeriesSequence] for ds in (a, b)]
    assert refs[0] == refs[1] and refs[0][0]["0020000E"]["Value"] == [series_uid]
    assert not (web / TMP_DIR).exists()


def test_predict_a_whole_study(orthanc_empty, tmp_path, tiny_model):
    """``.../studies/UID``: every image series, outputs named by series UID; a series that
    cannot be decoded is a failure row named by its URL; SEG series in the study are left out."""
    study = new_uid()
    src = tmp_path / "src"
    a = write_ct_series(src / "a", ct_volume(), study_uid=study, extra={"SeriesNumber": 1})
    b = write_ct_series(
        src / "b", ct_volume((24, 20, 6)), study_uid=study, extra={"SeriesNumber": 2}
    )
    bad = write_ct_series(src / "c", ct_volume((8, 8, 4)), study_uid=study)
    corrupt_pixels(bad)
    orthanc_empty.upload(src)
    uid = {
        k: str(pydicom.dcmread(p[0]).SeriesInstanceUID)
        for k, p in zip("abc", (a, b, bad), strict=True)
    }
    auth = orthanc_empty.write_auth_file(tmp_path / "pacs-auth")
    url = f"{orthanc_empty.ingest_url}/studies/{study}"
    args = ["--model", str(tiny_model), "--auth-file", str(auth), "sw_batch_size=32"]
    out = tmp_path / "o1"
    assert cli(["predict", url, "--out", str(out), "--stow", orthanc_empty.ingest_url, *args]) == 1
    names = {p.name for p in out.iterdir()}
    assert names == {
        "predict_config.yaml", "failures.json",
        *(f"{uid[k]}{ext}" for k in "ab" for ext in (".nii.gz", ".seg.dcm")),
    }  # fmt: skip
    failures = json.loads((out / "failures.json").read_text())
    assert list(failures) == [f"{url}/series/{uid['c']}"]
    assert "decode" in failures[f"{url}/series/{uid['c']}"]
    for k, paths in (("a", a), ("b", b)):  # each mask is its own series'
        image, _ = read_volume(paths[0].parent)
        assert nib.load(out / f"{uid[k]}.nii.gz").shape == image.shape
    client = orthanc_empty.client()
    assert len(client.search_series(study, {"Modality": "SEG"})) == 2  # both SEGs went back

    out = tmp_path / "o2"  # again: the two SEG series are left out, not failures
    assert cli(["predict", url, "--out", str(out), *args]) == 1
    assert {p.name for p in out.glob("*.nii.gz")} == {f"{uid[k]}.nii.gz" for k in "ab"}
    assert list(json.loads((out / "failures.json").read_text())) == [f"{url}/series/{uid['c']}"]


def test_predict_from_dicomweb_fails_clearly_before_inference(
    orthanc_empty, tmp_path, tiny_model, capsys, monkeypatch
):
    write_ct_series(tmp_path / "src" / "ct", ct_volume())
    orthanc_empty.upload(tmp_path / "src" / "ct")
    (study,) = orthanc_empty.client().search_studies()
    study = dicom_json_value(study, "StudyInstanceUID")
    wrong = tmp_path / "wrong-auth"
    wrong.write_text(f"{orthanc_empty.auth[0]}:nope\n")
    wrong.chmod(0o600)
    out = tmp_path / "o"

    def predict(url: str, *extra: str) -> tuple[int, str]:
        code = cli(["predict", url, "--model", str(tiny_model), "--out", str(out), *extra])
        return code, capsys.readouterr().err

    code, err = predict(f"{orthanc_empty.ingest_url}/studies/{study}", "--auth-file", str(wrong))
    assert code == 1 and f"authentication failed for {orthanc_empty.dicomweb_url}" in err
    assert "nope" not in err and not out.exists()

    monkeypatch.setenv("UMIT_PACS_AUTH", ":".join(orthanc_empty.auth))  # the other source
    code, err = predict(f"{orthanc_empty.ingest_url}/studies/{study}/series/1.2.3.4")
    assert code == 1 and f"series 1.2.3.4 not found in study {study}" in err
    code, err = predict(f"{orthanc_empty.ingest_url}/studies/1.2.3.4/series/5.6")
    assert code == 1 and "series 5.6 not found in study 1.2.3.4" in err
    code, err = predict(f"{orthanc_empty.ingest_url}/studies/1.2.3.4")
    assert code == 1 and "study 1.2.3.4 not found" in err
    assert not out.exists()


def test_series_that_cannot_be_retrieved_are_failure_rows(
    orthanc_empty, tmp_path, tiny_model, monkeypatch
):
    """An HTTP error for one series is its failure row; after a lost server the rest of the
    study is recorded as not tried (not each waiting through the retries); nothing stays."""
    from umit.ingest.dicomweb import DicomWebClient, DicomWebError, ServerUnreachable

    study = new_uid()
    for n, name in enumerate("abc", start=1):
        write_ct_series(tmp_path / "src" / name, ct_volume((8, 8, 4)), study_uid=study,
                        extra={"SeriesNumber": n})  # fmt: skip
    orthanc_empty.upload(tmp_path / "src")
    uids = [str(pydicom.dcmread(next((tmp_path / "src" / n).iterdir())).SeriesInstanceUID) for n in "abc"]  # fmt: skip
    calls = []

    def failing(self, study_uid, series_uid, folder, transfer_syntax="*"):
        calls.append(series_uid)
        if series_uid == uids[0]:
            raise DicomWebError(f"{self.url}: GET /studies/.../series failed with HTTP 500")
        raise ServerUnreachable(f"cannot reach {self.url} after 4 attempt(s): refused")

    monkeypatch.setattr(DicomWebClient, "retrieve_series", failing)
    monkeypatch.setenv("UMIT_PACS_AUTH", ":".join(orthanc_empty.auth))
    url = f"{orthanc_empty.ingest_url}/studies/{study}"
    out = tmp_path / "o"
    assert cli(["predict", url, "--model", str(tiny_model), "--out", str(out)]) == 1
    assert calls == uids[:2]
    failures = json.loads((out / "failures.json").read_text())
    a, b, c = (failures.pop(f"{url}/series/{u}") for u in uids)
    assert not failures
    assert a.startswith("retrieve: ") and "HTTP 500" in a
    assert b.startswith("retrieve: cannot reach") and c.startswith("retrieve: not tried, cannot")
    assert {p.name for p in out.iterdir()} == {"predict_config.yaml", "failures.json"}
