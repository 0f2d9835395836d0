"""DICOM series discovery and loading on synthetic series written with pydicom, and real data.

Every synthetic series gets shuffled file names and InstanceNumbers, so only sorting by position
along the slice normal can give the right volume. Geometry is checked three ways: against the
affine computed by hand from the header values, against SimpleITK's ImageSeriesReader, and by
the voxel values themselves.
"""

from __future__ import annotations

import logging
import re
import shutil

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from umit.data.io import read_image, reorient
from umit.data.meta import affine_from_lps
from umit.errors import GeometryError, InputError
from umit.ingest import dicom
from umit.ingest.dicom import (
    EXTRA_FIELDS,
    age_band,
    discover_series,
    load_series,
    parse_age,
    slice_normal,
)
from umit.ingest.read import read_volume

from _shared import (
    IDENTIFIERS,
    ds_round,
    expected_affine,
    require_shared,
    rotation,
    write_ct_series,
    write_enhanced_ct,
)

SHAPE = (5, 6, 7)  # (i = columns, j = rows, k = slices): all different to catch transposes


def stored_volume(seed: int = 0, shape=SHAPE, high: int = 3000) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, high, size=shape, dtype=np.uint16)


def sitk_series(folder, series_uid: str | None = None):
    """SimpleITK's reading of a series: array (i, j, k) and RAS affine."""
    reader = sitk.ImageSeriesReader()
    names = reader.GetGDCMSeriesFileNames(str(folder), series_uid or "")
    reader.SetFileNames(names)
    img = reader.Execute()
    array = np.ascontiguousarray(sitk.GetArrayFromImage(img).transpose(2, 1, 0))
    direction = np.asarray(img.GetDirection()).reshape(3, 3)
    return array, affine_from_lps(direction, img.GetSpacing(), img.GetOrigin())


def discover_one(folder):
    found, unreadable = discover_series(folder)
    assert len(found) == 1, found
    assert unreadable == []
    return found[0]


# --------------------------------------------------------------------------------------------
# Synthetic series


def test_axial_series_sorted_by_position_not_name(tmp_path):
    stored = stored_volume()
    write_ct_series(tmp_path, stored, rng=np.random.default_rng(1))
    series = discover_one(tmp_path)
    assert series.n_slices == SHAPE[2] and series.modality == "CT"
    array, meta = load_series(series)

    assert array.dtype == np.int16 and array.shape == SHAPE
    np.testing.assert_array_equal(array, stored.astype(np.int32) - 1024)
    normal = np.array([0.0, 0.0, 1.0])
    want = expected_affine((1, 0, 0, 0, 1, 0), (0.8, 0.7), (-20, -30, 40), 2.5 * normal)
    np.testing.assert_allclose(meta.affine, want, atol=1e-9)
    assert meta.spacing == pytest.approx((0.7, 0.8, 2.5))
    assert meta.orientation == "LPS" and meta.modality == "CT"
    assert meta.source == str(tmp_path)

    ref, ref_affine = sitk_series(tmp_path)
    np.testing.assert_array_equal(array, ref)
    np.testing.assert_allclose(meta.affine, ref_affine, atol=1e-4)


def test_oblique_series_with_float_rescale(tmp_path):
    r = rotation(20, -35, 50)
    iop = (*r[:, 0], *r[:, 1])
    stored = stored_volume(2)
    write_ct_series(
        tmp_path, stored, iop=iop, slope=0.5, intercept=-10.25, slice_step=1.7, origin=(3, 4, 5)
    )
    array, meta = load_series(discover_one(tmp_path))

    assert array.dtype == np.float32
    np.testing.assert_array_equal(array, (stored * 0.5 - 10.25).astype(np.float32))
    iop_r = ds_round(iop)
    normal = np.cross(iop_r[:3], iop_r[3:])
    positions = [ds_round(np.array([3, 4, 5]) + k * 1.7 * normal) for k in range(SHAPE[2])]
    step = (positions[-1] - positions[0]) / (SHAPE[2] - 1)
    np.testing.assert_allclose(
        meta.affine, expected_affine(iop, (0.8, 0.7), (3, 4, 5), step), atol=1e-9
    )
    ref, ref_affine = sitk_series(tmp_path)
    np.testing.assert_array_equal(array, ref.astype(np.float32))
    np.testing.assert_allclose(meta.affine, ref_affine, atol=1e-4)
    # The voxel (i, j, k) sits where DICOM says: IPP_k + i * col_sp * row_cos + j * row_sp * col_cos.
    i, j, k = 4, 5, 6
    lps = positions[k] + i * 0.7 * iop_r[:3] + j * 0.8 * iop_r[3:]
    world = meta.affine @ [i, j, k, 1]
    np.testing.assert_allclose(world[:3], lps * [-1, -1, 1], atol=1e-6)


def test_gantry_tilt_keeps_the_measured_step_vector(tmp_path):
    stored = stored_volume(3)
    tilt = np.array([0.0, 0.6, 2.0])  # slices move along y as they advance along z (tilt)
    positions = [np.array([-20.0, -30.0, 40.0]) + k * tilt for k in range(SHAPE[2])]
    write_ct_series(tmp_path, stored, positions=positions)
    array, meta = load_series(discover_one(tmp_path))
    np.testing.assert_array_equal(array, stored.astype(np.int32) - 1024)
    np.testing.assert_allclose(meta.affine[:3, 2], tilt * [-1, -1, 1], atol=1e-9)
    for k, p in enumerate(positions):  # each slice origin lands on its ImagePositionPatient
        np.testing.assert_allclose((meta.affine @ [0, 0, k, 1])[:3], p * [-1, -1, 1], atol=1e-9)


def test_descending_positions_and_large_values_give_float32(tmp_path):
    stored = stored_volume(4, high=60000)
    write_ct_series(tmp_path, stored, slice_step=-3.0, intercept=0)
    array, meta = load_series(discover_one(tmp_path))
    # Positions descend with k in the files: the reader orders slices by ascending position.
    assert array.dtype == np.float32  # 60000 does not fit int16
    np.testing.assert_array_equal(array, stored[:, :, ::-1].astype(np.float32))
    assert meta.affine[2, 2] == pytest.approx(3.0)
    ref, ref_affine = sitk_series(tmp_path)
    np.testing.assert_array_equal(array, ref)
    np.testing.assert_allclose(meta.affine, ref_affine, atol=1e-4)


def test_localizers_are_dropped_and_reported(tmp_path):
    series_uid = "1.2.3.4.5"
    write_ct_series(tmp_path, stored_volume(5), series_uid=series_uid)
    # A sagittal localizer flagged in ImageType, of another size, in the same series.
    write_ct_series(
        tmp_path,
        stored_volume(6, shape=(8, 4, 1)),
        iop=(0, 1, 0, 0, 0, -1),
        series_uid=series_uid,
        image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"),
    )
    # Two coronal images without the LOCALIZER flag: an orientation minority.
    write_ct_series(
        tmp_path, stored_volume(7, shape=(5, 6, 2)), iop=(1, 0, 0, 0, 0, -1), series_uid=series_uid
    )
    found, _ = discover_series(tmp_path)
    assert len(found) == 1
    series = found[0]
    assert series.n_slices == SHAPE[2] and len(series.files) == SHAPE[2]
    reasons = [reason for _, reason in series.skipped]
    assert len(reasons) == 3
    assert sum("localizer (ImageType LOCALIZER)" in r for r in reasons) == 1
    assert sum("orientation minority" in r for r in reasons) == 2
    array, _ = load_series(series)
    np.testing.assert_array_equal(array, stored_volume(5).astype(np.int32) - 1024)
    (report,) = found.set_aside  # one report for the series, naming all three images
    assert sorted(report.files) == sorted(p for p, _ in series.skipped)
    assert report.reason == (
        "localizer: 1 image(s) with ImageType LOCALIZER; "
        "2 image(s) in another orientation than the series' volume"
    )
    assert report.series_uid == series_uid and not report.whole_series


TRI_PLANE = ((1, 0, 0, 0, 1, 0), (1, 0, 0, 0, 0, -1), (0, 1, 0, 0, 0, -1))  # axial, cor., sag.


@pytest.mark.parametrize("flagged", [True, False])
@pytest.mark.parametrize("per_plane", [1, 3])
def test_scout_series_are_set_aside(tmp_path, flagged, per_plane):
    image_type = ("ORIGINAL", "PRIMARY", "LOCALIZER" if flagged else "OTHER")
    for n, iop in enumerate(TRI_PLANE):
        write_ct_series(
            tmp_path,
            stored_volume(40 + n, shape=(4, 4, per_plane)),
            iop=iop,
            series_uid="1.2.3.9",
            image_type=image_type,
        )
    found, unreadable = discover_series(tmp_path)
    assert list(found) == [] and unreadable == []
    (report,) = found.set_aside
    assert report.whole_series and len(report.files) == 3 * per_plane
    assert report.series_uid == "1.2.3.9" and report.series_number == 3
    assert report.reason == (
        f"localizer: {3 * per_plane} image(s) with ImageType LOCALIZER"
        if flagged
        else f"localizer: {3 * per_plane} image(s) in different orientations, at most 3 per "
        "orientation: too few for a volume"
    )
    assert len(found.skipped) == 3 * per_plane


def test_small_stacks_in_one_orientation_are_no_scout(tmp_path):
    # Two 3-image stacks of one orientation and two sizes: small volumes, not a localizer.
    write_ct_series(tmp_path, stored_volume(50, shape=(4, 4, 3)), series_uid="1.2.3.8")
    write_ct_series(tmp_path, stored_volume(51, shape=(5, 4, 3)), series_uid="1.2.3.8")
    found, _ = discover_series(tmp_path)
    assert [s.n_slices for s in found] == [3, 3] and found.set_aside == []


def test_two_series_in_one_folder(tmp_path):
    write_ct_series(tmp_path, stored_volume(8))
    write_ct_series(tmp_path, stored_volume(9, shape=(4, 4, 3)), origin=(0, 0, 0))
    found, _ = discover_series(tmp_path)
    assert sorted(s.n_slices for s in found) == [3, SHAPE[2]]
    assert len({s.key for s in found}) == 2
    with pytest.raises(InputError, match=r"holds 2 DICOM series.*umit ingest"):
        read_volume(tmp_path)


def test_empty_folder_is_no_series(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(InputError, match="no readable DICOM image series"):
        read_volume(tmp_path)


def test_read_volume_of_a_series_folder(tmp_path):
    write_ct_series(tmp_path / "a" / "b", stored_volume(10))
    array, meta = read_volume(tmp_path)
    np.testing.assert_array_equal(array, stored_volume(10).astype(np.int32) - 1024)
    assert meta.source == str(tmp_path / "a" / "b")


def test_series_key_is_stable_and_patient_id_is_hidden(tmp_path):
    write_ct_series(tmp_path / "x", stored_volume(), series_uid="1.2.840.99.1")
    first = discover_one(tmp_path / "x")
    shutil.copytree(tmp_path / "x", tmp_path / "moved")
    second = discover_one(tmp_path / "moved")
    assert first.key == second.key and re.fullmatch(r"[0-9a-f]{64}", first.key)
    assert first.patient_key == IDENTIFIERS["PatientID"]
    assert IDENTIFIERS["PatientID"] not in repr(first)


def test_extra_holds_only_non_identifying_attributes(tmp_path):
    extra = {
        "PatientSex": "F",
        "PatientAge": "042Y",
        "BodyPartExamined": "ABDOMEN",
        "Manufacturer": "ACME",
        "ManufacturerModelName": "Scan 9000",
        "ContrastBolusAgent": "Iohexol",
        "KVP": "120",
    }
    write_ct_series(tmp_path, stored_volume(), extra=extra)
    _, meta = load_series(discover_one(tmp_path))
    assert tuple(meta.extra) == EXTRA_FIELDS
    assert meta.extra["sex"] == "F" and meta.extra["age_years"] == 42.0
    assert age_band(meta.extra["age_years"]) == "40-59"
    assert meta.extra["body_part"] == "ABDOMEN" and meta.extra["contrast"] == "yes"
    assert (meta.extra["manufacturer"], meta.extra["model"]) == ("ACME", "Scan 9000")
    assert meta.extra["kvp"] == 120.0 and meta.extra["slice_thickness"] == 2.5
    assert meta.extra["transfer_syntax"] == "1.2.840.10008.1.2.1"
    text = repr(meta) + repr(meta.extra)
    for value in IDENTIFIERS.values():
        assert value not in text
    assert "2.25." not in text  # no instance / series / study UIDs


def test_4d_series_grouped_by_position_and_ordered_in_time(tmp_path):
    n_t = 3
    stored = stored_volume(11, shape=(4, 5, 4 * n_t))  # slice s = k * n_t + t
    positions, per_slice = [], []
    rng = np.random.default_rng(5)
    times = rng.permutation(n_t)  # temporal order is not file or instance order
    for k in range(4):
        for t in range(n_t):
            positions.append([1.0, 2.0, 3.0 + 2.0 * k])
            per_slice.append(
                {
                    "TemporalPositionIdentifier": int(times[t]) + 1,
                    "AcquisitionTime": f"10{times[t]:02d}00",
                }
            )
    write_ct_series(tmp_path, stored, positions=positions, per_slice=per_slice)
    array, meta = load_series(discover_one(tmp_path))
    assert array.shape == (4, 5, 4, n_t)
    for k in range(4):
        for t in range(n_t):
            s = k * n_t + int(np.flatnonzero(times == t)[0])
            np.testing.assert_array_equal(
                array[:, :, k, t], stored[:, :, s].astype(np.int32) - 1024
            )
    assert meta.spacing[2] == pytest.approx(2.0)

    # One image fewer at one position: the 4D pattern is broken.
    write_ct_series(
        tmp_path / "broken", stored[:, :, :-1], positions=positions[:-1], per_slice=per_slice[:-1]
    )
    with pytest.raises(GeometryError, match="inconsistent number of images per slice position"):
        load_series(discover_one(tmp_path / "broken"))


def test_duplicate_position_in_3d_series(tmp_path):
    positions = [[0, 0, 2.0 * k] for k in range(6)] + [[0, 0, 4.0]]
    write_ct_series(tmp_path, stored_volume(12, shape=(4, 4, 7)), positions=positions)
    with pytest.raises(GeometryError, match="duplicate slice positions"):
        load_series(discover_one(tmp_path))


def test_missing_slice(tmp_path):
    positions = [[0, 0, 2.0 * k] for k in range(8) if k != 5]
    write_ct_series(tmp_path, stored_volume(13, shape=(4, 4, 7)), positions=positions)
    with pytest.raises(
        GeometryError, match=r"missing slice\(s\) between positions 8\.000 and 12\.000"
    ):
        load_series(discover_one(tmp_path))


def test_non_uniform_spacing(tmp_path):
    z = [0.0, 2.0, 4.0, 6.5, 8.0, 10.0]
    write_ct_series(tmp_path, stored_volume(14, shape=(4, 4, 6)), positions=[[0, 0, v] for v in z])
    with pytest.raises(GeometryError) as err:
        load_series(discover_one(tmp_path))
    assert (
        "slice spacing changes: 2.00 mm for slices 0-2, 2.50 mm for slices 2-3, "
        "1.50 mm for slices 3-4, 2.00 mm for slices 4-5"
    ) in str(err.value)


# Clinical head CT: 13 slices 4.2 mm apart (slices 0-12), then 13 more 7.4 mm apart (12-25).
HEAD_Z = [4.2 * k for k in range(13)] + [50.4 + 7.4 * k for k in range(1, 14)]


def test_variable_spacing_is_refused_naming_where_it_changes(tmp_path):
    write_ct_series(
        tmp_path, stored_volume(30, shape=(4, 5, 26)), positions=[[1, 2, 40 + z] for z in HEAD_Z]
    )
    with pytest.raises(GeometryError) as err:
        load_series(discover_one(tmp_path))
    message = str(err.value)
    assert str(tmp_path) in message and "(series number 3)" in message
    assert "slice spacing changes: 4.20 mm for slices 0-12, 7.40 mm for slices 12-25" in message
    assert (
        "set resample_nonuniform=true to resample onto a uniform grid at the smallest "
        "spacing, 4.20 mm"
    ) in message


def _interp_along_k(stored: np.ndarray, z: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Voxel-by-voxel np.interp along the slice axis: the hand computation of a resampling."""
    out = np.empty(stored.shape[:2] + (len(targets),))
    for i in range(stored.shape[0]):
        for j in range(stored.shape[1]):
            out[i, j] = np.interp(targets, z, stored[i, j].astype(np.float64))
    return out


@pytest.mark.parametrize("tilt", [0.0, 0.3])
def test_variable_spacing_resampled_at_the_smallest_spacing(tmp_path, tilt):
    stored = stored_volume(31, shape=(4, 5, 26))
    direction = np.array([0.0, tilt, 1.0])  # tilt: slices shift along y as they advance in z
    origin = np.array([1.0, 2.0, 40.0])
    positions = [origin + z * direction for z in HEAD_Z]
    write_ct_series(tmp_path, stored, positions=positions, slope=0.5, intercept=-1000)
    array, meta = load_series(discover_one(tmp_path), resample_nonuniform=True)

    # The grid runs from the first slice at 4.2 mm along the normal up to the last slice:
    # floor(146.6 / 4.2) + 1 = 35 slices.
    targets = 4.2 * np.arange(35)
    assert array.shape == (4, 5, 35) and array.dtype == np.float32
    values = stored * 0.5 - 1000
    np.testing.assert_array_equal(array[:, :, :13], values[:, :, :13])  # slices 0-12 as they were
    want = _interp_along_k(values, np.asarray(HEAD_Z), targets)
    np.testing.assert_allclose(array, want, rtol=0, atol=1e-3)
    # e.g. target 13 (54.6 mm) lies between slices 12 (50.4) and 13 (57.8): 4.2/7.4 of the way
    w = 4.2 / 7.4
    np.testing.assert_allclose(
        array[:, :, 13], (1 - w) * values[:, :, 12] + w * values[:, :, 13], atol=1e-3
    )

    step = 4.2 * direction  # normal component 4.2 mm; the tilt is kept
    np.testing.assert_allclose(meta.affine[:3, 2], step * [-1, -1, 1], atol=1e-9)
    assert meta.spacing[2] == pytest.approx(float(np.linalg.norm(step)))
    for m in (0, 13, 34):  # each new slice's origin lies on the line through the original ones
        want_lps = origin + targets[m] * direction
        np.testing.assert_allclose((meta.affine @ [0, 0, m, 1])[:3], want_lps * [-1, -1, 1])
    assert meta.extra["transform"] == (
        "resampled nonuniform slices 4.2/7.4 mm -> 4.2 mm (26 -> 35 slices)"
    )


def test_resampling_refuses_a_stray_close_slice_and_missing_slices(tmp_path):
    z = [0.0, 5.0, 10.0, 10.4, 15.4, 20.4]  # a stray slice 0.4 mm from its neighbour
    write_ct_series(
        tmp_path / "a", stored_volume(32, shape=(4, 4, 6)), positions=[[0, 0, v] for v in z]
    )
    with pytest.raises(GeometryError, match=r"would make 52 slices from 6 \(more than 4x\)"):
        load_series(discover_one(tmp_path / "a"), resample_nonuniform=True)
    z = [2.0 * k for k in range(8) if k != 5]  # a missing slice is no spacing change
    write_ct_series(
        tmp_path / "b", stored_volume(33, shape=(4, 4, 7)), positions=[[0, 0, v] for v in z]
    )
    with pytest.raises(GeometryError, match=r"missing slice\(s\) between positions 8\.000"):
        load_series(discover_one(tmp_path / "b"), resample_nonuniform=True)


def test_small_spacing_jitter_uses_mean_step_and_warns(tmp_path, caplog):
    z = [0.0, 2.0, 4.01, 6.0, 8.0]  # 0.5 % deviation: below the 1 % default limit
    write_ct_series(tmp_path, stored_volume(15, shape=(4, 4, 5)), positions=[[0, 0, v] for v in z])
    with caplog.at_level(logging.WARNING, logger="umit.ingest.dicom"):
        _, meta = load_series(discover_one(tmp_path))
    assert meta.affine[2, 2] == pytest.approx(2.0)
    assert "slice spacing varies" in caplog.text
    with pytest.raises(GeometryError, match="non-uniform"):
        load_series(discover_one(tmp_path), max_relative_spacing_deviation=0.001)


def test_single_slice_is_2d(tmp_path):
    write_ct_series(tmp_path, stored_volume(16, shape=(4, 4, 1)))
    with pytest.raises(InputError, match="2D image"):
        load_series(discover_one(tmp_path))


def test_unreadable_non_dicom_and_dicomdir_files(tmp_path):
    paths = write_ct_series(tmp_path, stored_volume(17, shape=(4, 4, 8)))
    victim = paths[3]
    data = victim.read_bytes()
    (tmp_path / "cut.dcm").write_bytes(data[: len(data) - 20])  # a copy cut in the pixel data
    (tmp_path / "head.dcm").write_bytes(data[:300])  # cut inside the header
    (tmp_path / "garbage.dcm").write_bytes(b"\x00\xff" * 200)
    (tmp_path / "LICENSE").write_text("MIT License\n")
    (tmp_path / "DICOMDIR").write_bytes(b"\0" * 200)
    found, unreadable = discover_series(tmp_path, progress=True)
    assert len(found) == 1 and found[0].n_slices == 8
    assert found.n_non_dicom == 1 and found.n_dicomdir == 1
    bad = {p.name: reason for p, reason in unreadable}
    assert set(bad) == {"cut.dcm", "head.dcm", "garbage.dcm"}
    assert "truncated" in bad["cut.dcm"]
    assert found.unreadable is unreadable
    load_series(found[0])

    # A file truncated after discovery fails at load time, naming the file.
    victim.write_bytes(data[: len(data) - 20])
    with pytest.raises(InputError, match=re.escape(victim.name)):
        load_series(found[0])


def test_simpleitk_fallback_when_pydicom_cannot_decode(tmp_path, monkeypatch):
    write_ct_series(tmp_path, stored_volume(18), slope=2.0, intercept=-5)
    series = discover_one(tmp_path)
    direct, meta = load_series(series)

    def no_decoder(ds):
        raise NotImplementedError("no decoder for this transfer syntax")

    monkeypatch.setattr(dicom.pixels, "_decode_pydicom", no_decoder)
    fallback, meta2 = load_series(series)  # SimpleITK applies the rescale itself
    np.testing.assert_array_equal(fallback, direct)
    np.testing.assert_array_equal(meta.affine, meta2.affine)


@pytest.mark.parametrize("shared_measures", [True, False])
def test_enhanced_multiframe_matches_single_frame(tmp_path, shared_measures):
    r = rotation(10, 5, -30)
    iop = (*r[:, 0], *r[:, 1])
    stored = stored_volume(19)
    normal = np.cross(ds_round(iop)[:3], ds_round(iop)[3:])
    positions = [np.array([5.0, -6.0, 7.0]) + 1.5 * k * normal for k in range(SHAPE[2])]
    write_ct_series(tmp_path / "single", stored, iop=iop, positions=positions, intercept=-1000)
    order = np.random.default_rng(3).permutation(SHAPE[2]).tolist()
    write_enhanced_ct(
        tmp_path / "enhanced.dcm",
        stored,
        iop=iop,
        pixel_spacing=(0.8, 0.7),
        positions=positions,
        frame_order=order,
        intercept=-1000,
        shared_measures=shared_measures,
    )
    found, _ = discover_series(tmp_path / "enhanced.dcm")
    assert len(found) == 1 and found[0].multiframe and found[0].n_slices == SHAPE[2]
    array, meta = load_series(found[0])
    ref, ref_meta = load_series(discover_one(tmp_path / "single"))
    np.testing.assert_array_equal(array, ref)
    np.testing.assert_allclose(meta.affine, ref_meta.affine, atol=1e-9)


def test_helpers():
    np.testing.assert_allclose(slice_normal([1, 0, 0, 0, 1, 0]), [0, 0, 1])
    np.testing.assert_allclose(slice_normal([0, 1, 0, 0, 0, -1]), [-1, 0, 0])
    with pytest.raises(ValueError, match="parallel"):
        slice_normal([1, 0, 0, 1, 0, 0])
    assert [age_band(a) for a in (None, 0, 17.9, 18, 39.5, 40, 59, 60, 79.9, 80, 104)] == [
        None, "0-17", "0-17", "18-39", "18-39", "40-59", "40-59", "60-79", "60-79", "80+", "80+"
    ]  # fmt: skip
    with pytest.raises(ValueError, match="age_years"):
        age_band(-1)
    assert parse_age("042Y") == 42.0 and parse_age("006M") == 0.5
    assert parse_age("014D") == pytest.approx(14 / 365.25) and parse_age(None) is None
    assert parse_age("") is None and parse_age("abc") is None


# --------------------------------------------------------------------------------------------
# Real data (../shared/data)


@pytest.fixture(scope="module")
def abdomen():
    folder = require_shared("abdomen_ct_dicom_tcia")
    found, unreadable = discover_series(folder)
    array, meta = load_series(found[0])
    ref, ref_affine = sitk_series(folder)
    return found, unreadable, array, meta, ref, ref_affine


@pytest.mark.realdata
def test_real_abdomen_ct_matches_simpleitk(abdomen):
    found, unreadable, array, meta, ref, ref_affine = abdomen
    # 134 slices + "Citations" and "LICENSE" text files.
    assert len(found) == 1 and found.n_non_dicom == 2 and unreadable == []
    assert array.shape == (512, 512, 134) and array.dtype == np.int16
    # Measured: affine identical to SimpleITK's (max difference 0.0 mm), voxels identical.
    assert np.abs(meta.affine - ref_affine).max() < 1e-3
    assert array.shape == ref.shape and np.array_equal(array, ref)
    assert meta.spacing == pytest.approx((1.07421875, 1.07421875, 3.0))
    assert meta.modality == "CT" and meta.extra["body_part"] == "CHEST"


@pytest.mark.realdata
def test_real_oblique_head_mr_matches_simpleitk():
    folder = require_shared("head_mr_dicom_sag_anon")
    found, unreadable = discover_series(folder)
    # The folder's 194 files are 192 DICOM slices plus README.md and LICENSE (non-DICOM).
    assert len(found) == 1 and found[0].n_slices == 192
    assert found.n_non_dicom == 2 and unreadable == [] and found[0].skipped == []
    array, meta = load_series(found[0])
    ref, ref_affine = sitk_series(folder)
    # Measured: max affine difference 6.6e-15 mm; SimpleITK returns uint16, we int16 (same values).
    assert np.abs(meta.affine - ref_affine).max() < 1e-3
    assert array.shape == ref.shape and np.array_equal(array, ref)
    assert array.shape == (256, 256, 192) and meta.orientation == "PIR"
    assert meta.extra["age_years"] == 3.0 and meta.extra["magnetic_field_strength"] == 3.0


@pytest.mark.realdata
def test_real_jpeg2000_ct_matches_simpleitk_and_its_segmentation():
    folder = require_shared("totalsegmentator", "example_ct_dicom")
    series = discover_one(folder)
    array, meta = load_series(series)
    assert pydicom.dcmread(
        series.files[0], stop_before_pixels=True
    ).file_meta.TransferSyntaxUID == (
        "1.2.840.10008.1.2.4.90"
    )  # JPEG 2000 lossless, decoded by pylibjpeg-openjpeg
    ref, ref_affine = sitk_series(folder)
    # Measured: max affine difference 0.0 mm, voxels identical.
    assert np.abs(meta.affine - ref_affine).max() < 1e-3
    assert array.shape == ref.shape and np.array_equal(array, ref)

    # TotalSegmentator's segmentation of this series is stored LAS (j flipped) while the series
    # reads LPS; reoriented to RAS both have shape (512, 512, 20) and the same affine (measured
    # max difference 0.0 mm), so the mask overlays the CT voxel for voxel.
    seg, seg_meta = read_image(folder.parent / "example_seg_dicom.nii.gz")
    assert (meta.orientation, seg_meta.orientation) == ("LPS", "LAS")
    ct_ras, ct_ras_meta = reorient(array, meta, "RAS")
    seg_ras, seg_ras_meta = reorient(seg, seg_meta, "RAS")
    assert ct_ras.shape == seg_ras.shape == (512, 512, 20)
    assert np.abs(ct_ras_meta.affine - seg_ras_meta.affine).max() < 1e-3
    # The overlay is right: labelled voxels are soft tissue, not air.
    assert -200 < ct_ras[seg_ras > 0].mean() < 300


@pytest.mark.realdata
def test_real_monai_ct_dicom_has_a_gap():
    folder = require_shared("monai_testing_data", "CT_DICOM")
    series = discover_one(folder)
    # Its 4 slices are instances 18, 180, 181, 182 of a 1.25 mm series: 161 slices are missing
    # between z = -99.48 and 103.02. SimpleITK reads the folder as 4 slices 68.3 mm apart (only a
    # warning): silently wrong. We refuse it.
    with pytest.raises(
        GeometryError, match=r"missing slice\(s\) between positions -99\.480 and 103\.020"
    ):
        load_series(series)
    # The three contiguous slices read fine and agree with SimpleITK.
    contiguous = [p for p in series.files if p.name != "17106"]
    sub = dicom.DicomSeries(
        series_uid=series.series_uid,
        study_uid=series.study_uid,
        patient_key=None,
        files=contiguous,
        modality=series.modality,
        description=series.description,
        n_slices=3,
    )
    array, meta = load_series(sub)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder))[1:])
    img = reader.Execute()
    ref_affine = affine_from_lps(
        np.asarray(img.GetDirection()).reshape(3, 3), img.GetSpacing(), img.GetOrigin()
    )
    # Measured: max affine difference 0.0 mm, voxels identical.
    assert np.abs(meta.affine - ref_affine).max() < 1e-3
    np.testing.assert_array_equal(array, sitk.GetArrayFromImage(img).transpose(2, 1, 0))
    assert meta.extra["age_years"] == 42.0
    text = repr(meta)
    assert "Archibald" not in text and "Doe" not in text
