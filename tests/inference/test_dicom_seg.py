"""DICOM SEG of a predicted mask: valid (dciodvfy), referencing the source series' own images and
UIDs, and equal to the NIfTI mask voxel for voxel in the series' frame — read back both per
source image and by patient coordinates — on synthetic series (axial, oblique, shuffled files,
enhanced multi-frame, de-identified by umit) and on the real JPEG 2000 CT and oblique head MR."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
from _seg_checks import (
    LABELMAP_VALIDATOR_ERRORS,
    dciodvfy,
    frames_of,
    read_back_by_source,
    read_back_in_space,
    sop_uids,
)

from umit.cli.main import main as cli
from umit.data.io import write_image
from umit.data.meta import ImageMeta
from umit.errors import GeometryError, InputError
from umit.inference.dicom_seg import Algorithm, file_sha256, plan_segments, write_dicom_seg
from umit.inference.predict import PredictConfig, run
from umit.ingest.read import read_volume
from umit.preprocess.resample import reorient_to_ras

from _fake_dicomweb import fake_stow, stored_reply
from _orthanc import free_port
from _shared import IDENTIFIERS, require_shared, rotation, write_ct_series, write_enhanced_ct

ALGO = Algorithm("tiny_unet", "0.1.0", "0123456789abcdef" * 4)
SEG_SOP = "1.2.840.10008.5.1.4.1.1.66.4"
LABELMAP_SOP = "1.2.840.10008.5.1.4.1.1.66.7"


def synthetic_volume(shape=(28, 22, 10)) -> np.ndarray:
    """Stored values (cols, rows, slices) with an asymmetric bright block and a brighter one."""
    rng = np.random.default_rng(1)
    vol = rng.integers(900, 1100, size=shape).astype(np.int16)  # ~ -124..76 HU after rescale
    vol[3:9, 4:15, 1:7] = 1900  # ~ 876 HU
    vol[15:25, 12:20, 4:10] = 1500
    return vol


def known_mask(vol: np.ndarray) -> np.ndarray:
    """Label values 1 (liver), 2 (kidney_left) and an unnamed 5; 3 (spleen) stays empty."""
    mask = np.zeros(vol.shape, np.uint8)
    mask[vol == 1500] = 1
    mask[vol == 1900] = 2
    mask[0:2, 0:3, 8:10] = 5
    return mask


NAMES = {"background": 0, "liver": 1, "kidney_left": 2, "spleen": 3}


def oblique_iop() -> list[float]:
    r = rotation(20, -15, 30)
    return [*r[:, 0], *r[:, 1]]


# ------------------------------------------------------------------------------ the writer
def test_binary_seg_of_an_oblique_shuffled_series_equals_the_mask(tmp_path):
    vol = synthetic_volume()
    paths = write_ct_series(tmp_path / "ct", vol, iop=oblique_iop(), slice_step=2.0)
    image, meta = read_volume(tmp_path / "ct")
    np.testing.assert_array_equal(image, vol.astype(np.int32) - 1024)  # the grid the mask is on
    mask = known_mask(vol)
    written = write_dicom_seg(
        mask, tmp_path / "ct", tmp_path / "ct.seg.dcm", affine=meta.affine,
        label_names=NAMES, algorithm=ALGO,
    )  # fmt: skip
    uids = sop_uids(paths)  # in slice order k
    assert written.source_sop_instance_uids == uids
    np.testing.assert_array_equal(read_back_by_source(written.path, uids), mask)
    np.testing.assert_array_equal(read_back_in_space(written.path, meta.affine, mask.shape), mask)

    seg = hd.seg.segread(written.path)
    assert seg.SOPClassUID == SEG_SOP and seg.SegmentationType == "BINARY"
    src = pydicom.dcmread(paths[0], stop_before_pixels=True)
    assert seg.StudyInstanceUID == src.StudyInstanceUID
    assert seg.FrameOfReferenceUID == src.FrameOfReferenceUID
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == src.SeriesInstanceUID
    assert {i.ReferencedSOPInstanceUID for i in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence} == set(uids)  # fmt: skip
    assert seg.SeriesInstanceUID.startswith("2.25.") and seg.SOPInstanceUID.startswith("2.25.")
    assert seg.SeriesInstanceUID != src.SeriesInstanceUID
    assert seg.DimensionOrganizationSequence[0].DimensionOrganizationUID.startswith("2.25.")
    # segments: named labels in value order, the empty one described, the unnamed value kept
    described = {int(s.SegmentNumber): s for s in seg.SegmentSequence}
    assert [described[n].SegmentLabel for n in (1, 2, 3, 4)] == [
        "liver", "kidney_left", "spleen", "label_5",
    ]  # fmt: skip
    assert [s.value for s in written.segments] == [1, 2, 3, 5]
    assert [s.voxels for s in written.segments] == [int((mask == v).sum()) for v in (1, 2, 3, 5)]
    kidney = described[2].SegmentedPropertyTypeCodeSequence[0]
    assert (kidney.CodeValue, kidney.CodeMeaning) == ("64033007", "Kidney")
    assert kidney.SegmentedPropertyTypeModifierCodeSequence[0].CodeValue == "7771000"  # Left
    assert described[1].SegmentedPropertyCategoryCodeSequence[0].CodeValue == "123037004"
    assert described[4].SegmentedPropertyTypeCodeSequence[0].CodeValue == "85756007"  # fallback
    assert written.fallback_labels == ["label_5"]
    algo = described[1].SegmentationAlgorithmIdentificationSequence[0]
    assert algo.AlgorithmName == "tiny_unet"
    assert algo.AlgorithmVersion == "umit 0.1.0 sha256:0123456789ab"
    assert described[1].SegmentAlgorithmType == "AUTOMATIC"
    assert seg.ManufacturerModelName == "tiny_unet" and seg.Manufacturer == "UMIT"
    # the empty segment has no frames; the others one per slice they touch
    per_segment = [
        int(f.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        for f in seg.PerFrameFunctionalGroupsSequence
    ]
    assert 3 not in per_segment
    assert per_segment.count(1) == int(np.any(mask == 1, axis=(0, 1)).sum())
    dciodvfy(written.path)


def test_labelmap_seg_equals_the_mask(tmp_path):
    """LABELMAP (Sup 243): highdicom 0.28 writes and reads it; the dciodvfy of Debian bookworm
    predates it (its only complaints are the unknown IOD and the background segment 0)."""
    vol = synthetic_volume()
    paths = write_ct_series(tmp_path / "ct", vol)
    _, meta = read_volume(tmp_path / "ct")
    mask = known_mask(vol)
    written = write_dicom_seg(
        mask, tmp_path / "ct", tmp_path / "lm.dcm", affine=meta.affine, label_names=NAMES,
        algorithm=ALGO, seg_type="labelmap",
    )  # fmt: skip
    seg = hd.seg.segread(written.path)
    assert seg.SOPClassUID == LABELMAP_SOP and seg.SegmentationType == "LABELMAP"
    np.testing.assert_array_equal(read_back_by_source(written.path, sop_uids(paths)), mask)
    np.testing.assert_array_equal(read_back_in_space(written.path, meta.affine, mask.shape), mask)
    dciodvfy(written.path, allowed_errors=LABELMAP_VALIDATOR_ERRORS)


def test_enhanced_multiframe_source_with_shuffled_frames(tmp_path):
    vol = synthetic_volume((20, 16, 8))
    iop = oblique_iop()
    r = np.asarray(iop)
    normal = np.cross(r[:3], r[3:])
    positions = [np.array([-10.0, 5.0, 30.0]) + k * 2.5 * normal for k in range(8)]
    order = [3, 0, 7, 1, 6, 2, 5, 4]
    (tmp_path / "mf").mkdir()
    path = write_enhanced_ct(
        tmp_path / "mf" / "enhanced.dcm", vol, iop=iop, pixel_spacing=(0.9, 0.8),
        positions=positions, frame_order=order,
    )  # fmt: skip
    ds = pydicom.dcmread(path)
    ds.FrameOfReferenceUID = ds.StudyInstanceUID + ".1"
    ds.save_as(path, enforce_file_format=True)
    _, meta = read_volume(tmp_path / "mf")
    mask = known_mask(vol)
    written = write_dicom_seg(
        mask, tmp_path / "mf", tmp_path / "mf.seg.dcm", affine=meta.affine, label_names=NAMES,
        algorithm=ALGO,
    )  # fmt: skip
    seg = hd.seg.segread(written.path)
    got = seg.get_pixels_by_source_frame(
        ds.SOPInstanceUID, [f + 1 for f in range(8)], combine_segments=True, relabel=False
    )  # (frames, rows, cols), frame f holds slice order[f]
    lut = np.array([0, 1, 2, 3, 5])
    np.testing.assert_array_equal(lut[got], frames_of(mask)[order])
    np.testing.assert_array_equal(read_back_in_space(written.path, meta.affine, mask.shape), mask)
    dciodvfy(written.path)


def test_seg_of_a_series_deidentified_by_umit_references_its_pseudonymous_uids(tmp_path):
    from umit.deid.engine import DeidConfig
    from umit.deid.engine import run as deid

    vol = synthetic_volume()
    write_ct_series(tmp_path / "raw", vol)
    result = deid(DeidConfig(src=tmp_path / "raw", out=tmp_path / "deid"), progress=False)
    assert result.failed == 0
    (series_dir,) = {p.parent for p in (tmp_path / "deid").rglob("*.dcm") if "audit" not in p.parts}
    _, meta = read_volume(series_dir)
    written = write_dicom_seg(
        known_mask(vol), series_dir, tmp_path / "seg.dcm", affine=meta.affine,
        label_names=NAMES, algorithm=ALGO,
    )  # fmt: skip
    src = pydicom.dcmread(next(series_dir.glob("*.dcm")), stop_before_pixels=True)
    seg = pydicom.dcmread(written.path)
    assert seg.StudyInstanceUID == src.StudyInstanceUID
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == src.SeriesInstanceUID
    assert seg.PatientID == src.PatientID and seg.PatientName == src.PatientName
    refs = {i.ReferencedSOPInstanceUID for i in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}  # fmt: skip
    assert refs == {pydicom.dcmread(p).SOPInstanceUID for p in series_dir.glob("*.dcm")}
    blob = written.path.read_bytes()
    for key, value in IDENTIFIERS.items():
        assert value.encode() not in blob, f"{key} leaked into the SEG"
    raw_uids = {pydicom.dcmread(p).StudyInstanceUID for p in (tmp_path / "raw").iterdir()}
    assert not any(u.encode() in blob for u in raw_uids)
    dciodvfy(written.path)


def test_an_empty_prediction_still_gives_a_valid_seg(tmp_path):
    """Nothing found is a result too: the named segments are described, every frame is empty."""
    vol = synthetic_volume()
    paths = write_ct_series(tmp_path / "ct", vol)
    _, meta = read_volume(tmp_path / "ct")
    empty = np.zeros(vol.shape, np.uint8)
    written = write_dicom_seg(
        empty, tmp_path / "ct", tmp_path / "empty.dcm", affine=meta.affine,
        label_names={"liver": 1}, algorithm=ALGO,
    )  # fmt: skip
    assert [(s.coding.label, s.voxels) for s in written.segments] == [("liver", 0)]
    np.testing.assert_array_equal(read_back_by_source(written.path, sop_uids(paths)), empty)
    dciodvfy(written.path)
    with pytest.raises(ValueError, match="nothing to write"):
        write_dicom_seg(empty, tmp_path / "ct", tmp_path / "x.dcm", affine=meta.affine,
                        label_names={}, algorithm=ALGO)  # fmt: skip


def test_masks_off_the_series_grid_and_unreferenceable_series_are_refused(tmp_path):
    vol = synthetic_volume()
    write_ct_series(tmp_path / "ct", vol)
    _, meta = read_volume(tmp_path / "ct")
    mask = known_mask(vol)
    kw = dict(label_names=NAMES, algorithm=ALGO)
    with pytest.raises(GeometryError, match="not on this series' grid"):
        write_dicom_seg(mask[:-1], tmp_path / "ct", tmp_path / "x.dcm", affine=meta.affine, **kw)
    shifted = meta.affine.copy()
    shifted[:3, 3] += 0.5 * shifted[:3, 2]  # half a slice
    with pytest.raises(GeometryError, match="not on one of its slices"):
        write_dicom_seg(mask, tmp_path / "ct", tmp_path / "x.dcm", affine=shifted, **kw)
    finer = meta.affine @ np.diag([0.5, 0.5, 1.0, 1.0])  # same origin and size, half the pixel
    with pytest.raises(GeometryError, match="has pixel spacing"):
        write_dicom_seg(mask, tmp_path / "ct", tmp_path / "x.dcm", affine=finer, **kw)
    with pytest.raises(GeometryError, match="no source image lies on slice 10"):
        write_dicom_seg(
            np.concatenate([mask, mask[:, :, :1]], axis=2), tmp_path / "ct", tmp_path / "x.dcm",
            affine=meta.affine, **kw,
        )  # fmt: skip
    with pytest.raises(ValueError, match="seg_type must be one of"):
        write_dicom_seg(
            mask, tmp_path / "ct", tmp_path / "x.dcm", affine=meta.affine, seg_type="fractional",
            **kw,
        )  # fmt: skip
    with pytest.raises(ValueError, match="3D integer array"):
        write_dicom_seg(mask > 0, tmp_path / "ct", tmp_path / "x.dcm", affine=meta.affine, **kw)
    with pytest.raises(ValueError, match="share the value 2"):
        plan_segments(mask, {"liver": 2, "spleen": 2})
    # a series whose study UID was blanked cannot be referenced
    write_ct_series(tmp_path / "blank", vol, extra={"StudyInstanceUID": ""})
    _, meta = read_volume(tmp_path / "blank")
    with pytest.raises(InputError, match="StudyInstanceUID missing or empty"):
        write_dicom_seg(mask, tmp_path / "blank", tmp_path / "x.dcm", affine=meta.affine, **kw)
    assert not (tmp_path / "x.dcm").exists()
    assert not list(tmp_path.glob(".tmp-*"))  # nothing half-written


# ------------------------------------------------------------------------------ umit predict
def test_predict_dicom_seg_end_to_end_equals_the_nifti_mask(tmp_path, tiny_model):
    vol = synthetic_volume()
    paths = write_ct_series(tmp_path / "in" / "ct1", vol, iop=oblique_iop(), slice_step=2.0)
    code = cli([
        "predict", str(tmp_path / "in"), "--model", str(tiny_model), "--out",
        str(tmp_path / "out"), "--dicom-seg",
    ])  # fmt: skip
    assert code == 0
    nifti = nib.load(tmp_path / "out" / "ct1.nii.gz")
    mask = np.asarray(nifti.dataobj)
    assert 0 < (mask == 1).sum() < mask.size  # a non-trivial prediction
    seg_file = tmp_path / "out" / "ct1.seg.dcm"
    _, meta = read_volume(tmp_path / "in" / "ct1")
    np.testing.assert_allclose(nifti.affine, meta.affine, atol=1e-5)
    np.testing.assert_array_equal(read_back_by_source(seg_file, sop_uids(paths)), mask)
    np.testing.assert_array_equal(read_back_in_space(seg_file, nifti.affine, mask.shape), mask)
    seg = pydicom.dcmread(seg_file)
    algo = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert algo.AlgorithmName == "seg_test_threshold"
    assert algo.AlgorithmVersion.endswith(f"sha256:{file_sha256(tiny_model)[:12]}")
    assert seg.SegmentSequence[0].SegmentLabel == "liver"
    dciodvfy(seg_file)


def test_predict_dicom_seg_on_a_nifti_input_records_why_and_keeps_the_mask(tmp_path, tiny_model):
    vol = synthetic_volume().astype(np.int16) - 1024
    src = write_image(tmp_path / "ct.nii.gz", vol, ImageMeta(affine=np.diag([1.0, 1, 2, 1])))
    s = run(PredictConfig(inputs=src, model=tiny_model, out=tmp_path / "o", dicom_seg=True))
    assert "not a DICOM series folder" in s["failures"][str(src)]
    assert (tmp_path / "o" / "ct.nii.gz").is_file() and not list((tmp_path / "o").glob("*.dcm"))
    assert json.loads((tmp_path / "o" / "failures.json").read_text()) == s["failures"]


# ------------------------------------------------------------------------------ real data
@pytest.mark.realdata
def test_real_jpeg2000_ct_with_totalsegmentator_labels(tmp_path):
    """The 20-slice JPEG 2000 CT with TotalSegmentator's own labels of it (42 structures).

    Its anonymizer blanked StudyInstanceUID and SeriesInstanceUID (and the dataset's SOP UIDs,
    which the file meta still holds): the writer refuses such a series by name. The test then
    fills the two series-level UIDs in a copy (pixels untouched, still JPEG 2000) and writes."""
    import shutil

    series = require_shared("totalsegmentator/example_ct_dicom")
    labels = nib.load(require_shared("totalsegmentator/example_seg_dicom.nii.gz"))
    _, meta = read_volume(series)
    # TotalSegmentator's labels (stored LAS) onto the series' grid (stored LPS): both to RAS,
    # then back along the series' axes
    lab_ras, lab_affine = reorient_to_ras(np.asarray(labels.dataobj), labels.affine)
    probe, probe_affine = reorient_to_ras(np.zeros(labels.shape), meta.affine)
    np.testing.assert_allclose(lab_affine, probe_affine, atol=1e-3)
    mask = np.flip(lab_ras, axis=(0, 1)).astype(np.uint8)  # RAS -> the series' LPS order
    assert mask.shape == (512, 512, 20) and len(np.unique(mask)) > 20
    names = {"spleen": 1, "kidney_right": 2, "kidney_left": 3, "gallbladder": 4, "liver": 5}
    with pytest.raises(InputError, match="StudyInstanceUID missing or empty; Series"):
        write_dicom_seg(mask, series, tmp_path / "x.dcm", affine=meta.affine,
                        label_names=names, algorithm=ALGO)  # fmt: skip

    copy = tmp_path / "ct"
    copy.mkdir()
    study, series_uid = "2.25.1" + "0" * 30, "2.25.2" + "0" * 30
    for p in sorted(series.iterdir()):
        ds = pydicom.dcmread(p)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series_uid
        ds.save_as(copy / p.name)
        assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.90"  # JPEG 2000 lossless
    image, meta = read_volume(copy)
    written = write_dicom_seg(
        mask, copy, tmp_path / "ct.seg.dcm", affine=meta.affine, label_names=names, algorithm=ALGO
    )
    present = set(np.unique(mask).tolist()) - {0}
    assert [s.value for s in written.segments] == sorted(present | set(names.values()))
    assert [s.voxels for s in written.segments if s.value in (2, 3, 4)] == [0, 0, 0]  # absent
    liver = next(s for s in written.segments if s.coding.label == "liver")
    assert liver.voxels > 10_000 and liver.coding.type.value == "10200004"
    np.testing.assert_array_equal(read_back_in_space(written.path, meta.affine, mask.shape), mask)
    ordered = sorted(copy.iterdir(), key=lambda p: float(pydicom.dcmread(p).ImagePositionPatient[2]))  # fmt: skip
    if meta.affine[2, 2] < 0:
        ordered = ordered[::-1]
    uids = [str(pydicom.dcmread(p).file_meta.MediaStorageSOPInstanceUID) for p in ordered]
    assert written.source_sop_instance_uids == uids
    np.testing.assert_array_equal(read_back_by_source(written.path, uids), mask)
    dciodvfy(written.path)
    shutil.rmtree(copy)


@pytest.mark.realdata
def test_real_oblique_head_mr_threshold_mask(tmp_path):
    series = require_shared("head_mr_dicom_sag_anon")
    image, meta = read_volume(series)
    mask = np.zeros(image.shape, np.uint8)
    mask[image > np.percentile(image, 70)] = 1  # "head"
    mask[image > np.percentile(image, 99.5)] = 2  # "lesion"
    written = write_dicom_seg(
        mask, series, tmp_path / "mr.seg.dcm", affine=meta.affine,
        label_names={"head": 1, "lesion": 2}, algorithm=ALGO,
    )  # fmt: skip
    assert [s.coding.type.value for s in written.segments] == ["69536005", "52988006"]
    np.testing.assert_array_equal(read_back_in_space(written.path, meta.affine, mask.shape), mask)
    files = sorted(series.glob("*.dcm"))
    src = [pydicom.dcmread(p, stop_before_pixels=True) for p in files]
    normal = np.cross(*np.reshape(np.asarray(src[0].ImageOrientationPatient, float), (2, 3)))
    ordered = sorted(src, key=lambda d: float(np.dot(normal, np.asarray(d.ImagePositionPatient, float))))  # fmt: skip
    uids = [str(d.SOPInstanceUID) for d in ordered]
    assert written.source_sop_instance_uids == uids
    np.testing.assert_array_equal(read_back_by_source(written.path, uids), mask)
    warnings = dciodvfy(written.path)
    assert warnings  # the source's own retired person-name forms are copied along (reported)


def test_predict_stow_sends_the_seg_and_records_a_refusal(
    tmp_path, tiny_model, monkeypatch, capsys
):
    """The answers a real PACS will not give on demand (a refusal, a 403); the round trip into
    a real Orthanc is test_pacs_roundtrip.py."""
    vol = synthetic_volume()
    write_ct_series(tmp_path / "ct", vol)
    monkeypatch.setenv("UMIT_PACS_AUTH", "radiology:s3cret")
    with fake_stow((200, stored_reply(["x"]), 0)) as server:
        s = run(PredictConfig(inputs=tmp_path / "ct", model=tiny_model, out=tmp_path / "o",
                              stow=f"dicomweb+{server.url}", stow_retries=0))  # fmt: skip
    assert not s["failures"]
    seg = s["outputs"][0]["dicom_seg"]  # --stow implies --dicom-seg
    assert {k: seg["stow"][k] for k in ("url", "status", "attempts")} == {
        "url": server.url + "/studies", "status": 200, "attempts": 1,
    }  # fmt: skip
    (req,) = server.received
    assert req.parts == [("application/dicom", Path(seg["path"]).read_bytes())]
    assert req.headers["Authorization"] == "Basic " + base64.b64encode(b"radiology:s3cret").decode()
    saved = (tmp_path / "o" / "predict_config.yaml").read_text()
    assert "s3cret" not in saved and "radiology" not in saved

    # the PACS refuses the instance: recorded per instance, the SEG stays
    reply = stored_reply([], failed={"x": 0xA900})
    with fake_stow((202, reply, 0)) as server:
        s = run(PredictConfig(inputs=tmp_path / "ct", model=tiny_model, out=tmp_path / "o1",
                              stow=server.url, stow_retries=0))  # fmt: skip
    why = s["failures"][str(tmp_path / "ct")]
    assert "refused 1 of 1 instance(s) (HTTP 202; first x: FailureReason 0xA900" in why
    assert s["outputs"][0]["dicom_seg"]["stow"]["status"] == 202
    with fake_stow((403, None, 0)) as server:
        s = run(PredictConfig(inputs=tmp_path / "ct", model=tiny_model, out=tmp_path / "o2",
                              stow=server.url, stow_retries=2))  # fmt: skip
    why = s["failures"][str(tmp_path / "ct")]
    assert why.startswith("stow: ") and "HTTP 403" in why and "the SEG was written" in why
    assert len(server.received) == 1 and Path(s["outputs"][0]["dicom_seg"]["path"]).is_file()
    assert json.loads((tmp_path / "o2" / "failures.json").read_text()) == s["failures"]
    # server down: the first SEG is tried (bounded retries), the next ones are not
    for name in ("a", "b"):
        write_ct_series(tmp_path / "two" / name, vol)
    s = run(PredictConfig(inputs=tmp_path / "two", model=tiny_model, out=tmp_path / "o4",
                          stow=f"http://127.0.0.1:{free_port()}/dw", stow_retries=1,
                          stow_backoff_s=0))  # fmt: skip
    first, second = (s["failures"][str(tmp_path / "two" / n)] for n in "ab")
    assert "cannot reach http://127.0.0.1:" in first and "after 2 attempt(s)" in first
    assert second.startswith("stow: not sent, cannot reach") and "(the SEG was written" in second

    # refused before any prediction: credentials in the URL, an unreadable auth file
    with pytest.raises(ValueError, match="holds credentials") as err:
        run(PredictConfig(inputs=tmp_path / "ct", model=tiny_model, stow="http://u:pw@pacs/dw"))
    assert "pw@" not in str(err.value)
    code = cli(["predict", str(tmp_path / "ct"), "--model", str(tiny_model), "--out",
                str(tmp_path / "o5"), "--stow", "dicomweb+http://u:pw@pacs/dw"])  # fmt: skip
    assert code == 2 and "holds credentials" in capsys.readouterr().err
    with pytest.raises(ValueError, match="cannot read the auth file"):
        run(PredictConfig(inputs=tmp_path / "ct", model=tiny_model, out=tmp_path / "o3",
                          stow="http://pacs/dw", stow_auth_file=tmp_path / "none"))  # fmt: skip
    assert not (tmp_path / "o3").exists()
