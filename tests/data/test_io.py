"""Image readers/writers and reorientation: round trips, clear errors, exact geometry."""

from __future__ import annotations

import gzip

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from umit.data import io
from umit.data.io import (
    IMAGE_SUFFIXES,
    check_finite,
    is_image_file,
    read_image,
    reorient,
    write_image,
)
from umit.data.meta import ImageMeta, affine_from_lps
from umit.errors import InputError

from _shared import require_shared

FORMATS = [".nii", ".nii.gz", ".nrrd", ".mha"]

# Oblique, anisotropic, with an LPS-like flip: a rotation times zooms plus a translation.
_R = np.linalg.qr(np.random.default_rng(0).normal(size=(3, 3)))[0]
OBLIQUE = np.eye(4)
OBLIQUE[:3, :3] = _R @ np.diag([0.7, 1.3, 2.5])
OBLIQUE[:3, 3] = [-101.25, 33.5, 12.125]
SHEARED = OBLIQUE.copy()
SHEARED[0, 1] += 0.4


def volume(dtype, shape=(5, 6, 7), seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if np.issubdtype(dtype, np.floating):
        return (rng.normal(size=shape) * 1000).astype(dtype)
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max, size=shape, endpoint=True, dtype=dtype)


def world(affine: np.ndarray, ijk: np.ndarray) -> np.ndarray:
    return ijk @ affine[:3, :3].T + affine[:3, 3]


# --------------------------------------------------------------------------------------------
# Round trips


@pytest.mark.parametrize("suffix", FORMATS)
@pytest.mark.parametrize("dtype", [np.int16, np.uint8, np.float32, np.float64, np.int32])
@pytest.mark.parametrize("affine", [OBLIQUE, SHEARED], ids=["oblique", "sheared"])
def test_round_trip_is_exact(tmp_path, suffix, dtype, affine):
    data = volume(dtype)
    write_image(tmp_path / f"a{suffix}", data, ImageMeta(affine))
    a, meta_a = read_image(tmp_path / f"a{suffix}")
    assert a.dtype == dtype and a.shape == data.shape
    np.testing.assert_array_equal(a, data)
    # NIfTI-1 stores the affine as float32: ~1e-5 mm on a first write of a float64 affine.
    np.testing.assert_allclose(meta_a.affine, affine, atol=1e-4 if "nii" in suffix else 1e-9)
    # read -> write -> read: bit-exact voxels, affine within 1e-6.
    write_image(tmp_path / f"b{suffix}", a, meta_a)
    b, meta_b = read_image(tmp_path / f"b{suffix}")
    assert b.dtype == a.dtype and np.array_equal(a, b)
    np.testing.assert_allclose(meta_b.affine, meta_a.affine, atol=1e-6, rtol=0)
    assert not list(tmp_path.glob(".tmp-*"))


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mha"])
def test_4d_round_trip(tmp_path, suffix):
    data = volume(np.int16, shape=(4, 5, 6, 3))
    write_image(tmp_path / f"a{suffix}", data, ImageMeta(OBLIQUE))
    a, meta = read_image(tmp_path / f"a{suffix}")
    write_image(tmp_path / f"b{suffix}", a, meta)
    b, meta_b = read_image(tmp_path / f"b{suffix}")
    assert a.shape == b.shape == data.shape
    assert np.array_equal(a, data) and np.array_equal(b, data)
    np.testing.assert_allclose(meta_b.affine, meta.affine, atol=1e-6, rtol=0)


def test_nifti_header_codes_and_no_identifiers(tmp_path):
    write_image(tmp_path / "o.nii.gz", volume(np.int16), ImageMeta(OBLIQUE, source="/secret/Doe"))
    write_image(tmp_path / "s.nii.gz", volume(np.int16), ImageMeta(SHEARED))
    o = nib.load(tmp_path / "o.nii.gz").header
    s = nib.load(tmp_path / "s.nii.gz").header
    assert (int(o["sform_code"]), int(o["qform_code"])) == (1, 1)
    np.testing.assert_allclose(o.get_qform(), OBLIQUE, atol=1e-4)  # qform holds a rigid+zoom
    assert (int(s["sform_code"]), int(s["qform_code"])) == (1, 0)  # a shear it cannot hold
    for h in (o, s):
        assert h["descrip"].item() == b"" and h["aux_file"].item() == b""
        assert len(h.extensions) == 0
    assert b"secret" not in gzip.decompress((tmp_path / "o.nii.gz").read_bytes())


def test_write_casts_to_dtype_and_refuses_bad_targets(tmp_path):
    data = np.linspace(-3.4, 300.6, 5 * 6 * 7).reshape(5, 6, 7)
    write_image(tmp_path / "a.nii", data, ImageMeta(np.eye(4)), dtype=np.int16)
    a, _ = read_image(tmp_path / "a.nii")
    assert a.dtype == np.int16 and np.array_equal(a, np.rint(data))
    with pytest.raises(ValueError, match="cannot hold"):
        write_image(tmp_path / "b.nii", data, ImageMeta(np.eye(4)), dtype=np.uint8)
    with pytest.raises(ValueError, match="suffix"):
        write_image(tmp_path / "a.mhd", data, ImageMeta(np.eye(4)))
    mask = np.zeros((4, 4, 4), bool)
    mask[1:3] = True
    write_image(tmp_path / "m.nrrd", mask, ImageMeta(np.eye(4)))
    m, _ = read_image(tmp_path / "m.nrrd")
    assert m.dtype == np.uint8 and np.array_equal(m, mask)


def test_failed_write_leaves_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "a.nii.gz"
    write_image(path, volume(np.int16), ImageMeta(OBLIQUE))
    before = path.read_bytes()

    def broken_save(img, filename):
        with open(filename, "wb") as f:
            f.write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(nib, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        write_image(path, volume(np.int16, seed=1), ImageMeta(OBLIQUE))
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.nii.gz"]


def test_nifti_scaling_and_qform_only(tmp_path):
    raw = volume(np.int16)
    img = nib.Nifti1Image(raw, OBLIQUE, dtype=np.int16)
    img.header.set_slope_inter(0.5, -7.0)
    nib.save(img, tmp_path / "scaled.nii.gz")
    data, _ = read_image(tmp_path / "scaled.nii.gz")
    assert data.dtype == np.float32
    np.testing.assert_array_equal(data, (raw * 0.5 - 7.0).astype(np.float32))

    img = nib.Nifti1Image(raw, None)
    img.set_qform(OBLIQUE, code=1)
    img.set_sform(np.diag([9.0, 9.0, 9.0, 1.0]), code=0)  # sform code 0: ignored
    nib.save(img, tmp_path / "q.nii")
    data, meta = read_image(tmp_path / "q.nii")
    assert data.dtype == np.int16
    np.testing.assert_allclose(meta.affine, OBLIQUE, atol=1e-4)


def test_itk_reader_converts_lps_to_ras(tmp_path):
    data = volume(np.int16)
    img = sitk.GetImageFromArray(data.transpose(2, 1, 0))
    direction = _R
    img.SetDirection(direction.ravel().tolist())
    img.SetSpacing((0.5, 0.75, 2.0))
    img.SetOrigin((10.0, -20.0, 30.0))
    sitk.WriteImage(img, str(tmp_path / "x.mha"))
    a, meta = read_image(tmp_path / "x.mha")
    assert np.array_equal(a, data)
    np.testing.assert_allclose(
        meta.affine, affine_from_lps(direction, (0.5, 0.75, 2.0), (10, -20, 30)), atol=1e-9
    )
    # Physical point of voxel (1, 2, 3) per ITK (LPS) = our affine's point (RAS) with x, y negated.
    p = np.asarray(img.TransformIndexToPhysicalPoint((1, 2, 3)))
    np.testing.assert_allclose(meta.affine @ [1, 2, 3, 1], [-p[0], -p[1], p[2], 1], atol=1e-9)

    vec = sitk.GetImageFromArray(np.stack([data.transpose(2, 1, 0)] * 2, axis=-1), True)
    sitk.WriteImage(vec, str(tmp_path / "v.nrrd"))
    v, _ = read_image(tmp_path / "v.nrrd")
    assert v.shape == (*data.shape, 2) and np.array_equal(v[..., 1], data)


# --------------------------------------------------------------------------------------------
# Bad inputs


def test_missing_and_unknown_files(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        read_image(tmp_path / "nope.nii.gz")
    (tmp_path / "x.png").write_bytes(b"\x89PNG")
    with pytest.raises(InputError, match="unknown image format"):
        read_image(tmp_path / "x.png")


def test_truncated_and_garbage_files(tmp_path):
    write_image(tmp_path / "a.nii.gz", volume(np.float32, shape=(20, 20, 20)), ImageMeta(OBLIQUE))
    data = (tmp_path / "a.nii.gz").read_bytes()
    (tmp_path / "cut.nii.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match=r"cut\.nii\.gz: truncated or corrupt gzip"):
        read_image(tmp_path / "cut.nii.gz")
    raw = gzip.decompress(data)
    (tmp_path / "cut.nii").write_bytes(raw[: len(raw) - 100])
    with pytest.raises(InputError, match="truncated or corrupt"):
        read_image(tmp_path / "cut.nii")
    rng = np.random.default_rng(0)
    for name in ("junk.nii", "junk.nii.gz", "junk.nrrd", "junk.mha"):
        (tmp_path / name).write_bytes(rng.integers(0, 256, 2000, dtype=np.uint8).tobytes())
        with pytest.raises(InputError, match=name.replace(".", r"\.")):
            read_image(tmp_path / name)
    write_image(tmp_path / "b.nrrd", volume(np.float32, shape=(20, 20, 20)), ImageMeta(OBLIQUE))
    data = (tmp_path / "b.nrrd").read_bytes()
    (tmp_path / "cut.nrrd").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="truncated or corrupt"):
        read_image(tmp_path / "cut.nrrd")


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mha"])
def test_damaged_compressed_voxels_are_caught(tmp_path, suffix):
    # The readers decode only the bytes they need and never reach the stream's checksum: a
    # damaged deflate stream could come back as wrong voxels without the explicit check.
    write_image(tmp_path / f"a{suffix}", volume(np.int16, shape=(12, 10, 8)), ImageMeta(OBLIQUE))
    raw = bytearray((tmp_path / f"a{suffix}").read_bytes())
    mid = len(raw) // 2
    raw[mid : mid + 64] = np.random.default_rng(1).integers(0, 256, 64, np.uint8).tobytes()
    (tmp_path / f"b{suffix}").write_bytes(bytes(raw))
    with pytest.raises(InputError, match=r"b\.(nii\.gz|nrrd|mha): truncated or corrupt"):
        read_image(tmp_path / f"b{suffix}")


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd"])
@pytest.mark.parametrize("shape", [(5, 6, 1), (1, 6, 7)])
def test_2d_images_are_refused(tmp_path, suffix, shape):
    if suffix == ".nii.gz":
        nib.save(nib.Nifti1Image(np.zeros(shape, np.int16), np.eye(4)), tmp_path / f"a{suffix}")
    else:
        sitk.WriteImage(
            sitk.GetImageFromArray(np.zeros(shape[::-1], np.int16)), str(tmp_path / f"a{suffix}")
        )
    with pytest.raises(InputError, match="2D image, expected a 3D volume"):
        read_image(tmp_path / f"a{suffix}")


def test_2d_arrays_are_refused(tmp_path):
    nib.save(nib.Nifti1Image(np.zeros((5, 6), np.int16), np.eye(4)), tmp_path / "a.nii")
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((6, 5), np.int16)), str(tmp_path / "a.nrrd"))
    for name in ("a.nii", "a.nrrd"):
        with pytest.raises(InputError, match="2D image"):
            read_image(tmp_path / name)


def test_non_finite_affine_and_voxels(tmp_path):
    nib.save(
        nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4)), tmp_path / "nan_affine.nii"
    )
    header = nib.load(tmp_path / "nan_affine.nii").header.copy()
    header["srow_x"] = [np.nan, 0, 0, 0]  # patch the bytes: nibabel would not write it
    with open(tmp_path / "nan_affine.nii", "r+b") as f:
        f.write(header.binaryblock)
    assert int(nib.load(tmp_path / "nan_affine.nii").header["sform_code"]) > 0
    with pytest.raises(InputError, match="non-finite affine"):
        read_image(tmp_path / "nan_affine.nii")

    data = np.zeros((4, 4, 4), np.float32)
    data[1, 2, 3] = np.nan
    data[0, 0, 0] = np.inf
    nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / "nan.nii.gz")
    with pytest.raises(InputError, match=r"1 NaN and 1 Inf"):
        read_image(tmp_path / "nan.nii.gz")
    with pytest.raises(InputError, match="NaN"):
        check_finite(data, "x")
    check_finite(np.zeros(3, np.int16), "x")  # integers cannot be non-finite


def test_is_image_file(tmp_path):
    assert set(IMAGE_SUFFIXES) == {".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd"}
    for name in ("a.nii", "A.NII.GZ", "x.nrrd", "x.nhdr", "y.mha", "y.mhd"):
        assert is_image_file(tmp_path / name), name
    for name in ("a.gz", "a.dcm", ".tmp-1234-a.nii.gz", "nii", "a.json"):
        assert not is_image_file(tmp_path / name), name
    (tmp_path / "folder.nii").mkdir()
    assert not is_image_file(tmp_path / "folder.nii")


def test_a_folder_is_refused_with_the_reader_to_use(tmp_path):
    with pytest.raises(InputError, match="is a folder: DICOM series are read by umit.ingest"):
        read_image(tmp_path)


# --------------------------------------------------------------------------------------------
# Reorientation


@pytest.mark.parametrize("target", ["RAS", "LPS", "PIR", "SLA"])
@pytest.mark.parametrize("source", ["RAS", "LPI", "ASL", "oblique"])
def test_reorient_keeps_world_coordinates(source, target):
    if source == "oblique":
        affine = OBLIQUE
    else:
        ornt = nib.orientations.axcodes2ornt(tuple(source))
        affine = nib.orientations.inv_ornt_aff(ornt, (5, 6, 7))  # RAS voxels -> `source` axes
        affine = np.linalg.inv(affine) @ np.diag([0.7, 1.1, 2.0, 1.0])
        affine[:3, 3] += [10, -20, 30]
    meta = ImageMeta(affine)
    data = np.arange(5 * 6 * 7, dtype=np.int32).reshape(5, 6, 7)
    out, out_meta = reorient(data, meta, target)
    assert out_meta.orientation == target
    assert out.flags.c_contiguous
    # Every voxel keeps its value and its world position.
    ijk = np.argwhere(np.ones(out.shape, bool))
    src = np.linalg.solve(affine, np.c_[world(out_meta.affine, ijk), np.ones(len(ijk))].T).T
    src_idx = np.rint(src[:, :3]).astype(int)
    np.testing.assert_allclose(src[:, :3], src_idx, atol=1e-9)
    np.testing.assert_array_equal(out[tuple(ijk.T)], data[tuple(src_idx.T)])


def test_reorient_4d_and_channel_first():
    meta = ImageMeta(np.diag([-1.0, 2.0, -3.0, 1.0]))  # LAI
    data = np.random.default_rng(0).normal(size=(4, 5, 6, 3))
    out, out_meta = reorient(data, meta, "RAS")  # (i, j, k, t): time axis untouched
    np.testing.assert_array_equal(out, data[::-1, :, ::-1, :])
    assert out_meta.orientation == "RAS"
    cf = np.moveaxis(data, -1, 0)  # (C, i, j, k)
    out_cf, meta_cf = reorient(cf, meta, "RAS", channel_first=True)
    np.testing.assert_array_equal(out_cf, np.moveaxis(out, -1, 0))
    np.testing.assert_array_equal(meta_cf.affine, out_meta.affine)
    np.testing.assert_allclose(out_meta.affine @ [0, 0, 0, 1], meta.affine @ [3, 0, 5, 1])


def test_reorient_identity_and_bad_target():
    data = np.zeros((2, 3, 4))
    meta = ImageMeta(np.eye(4), extra={"a": 1})
    out, out_meta = reorient(data, meta, "RAS")
    assert out is data and out_meta is not meta and out_meta.extra == {"a": 1}
    for bad in ("RAR", "XYZ", "RA", "RASS"):
        with pytest.raises(ValueError, match="target orientation"):
            reorient(data, meta, bad)
    with pytest.raises(ValueError, match=r"\(C, i, j, k\)"):
        reorient(data, meta, "LPS", channel_first=True)


# --------------------------------------------------------------------------------------------
# Real data (../shared/data)


@pytest.mark.realdata
@pytest.mark.parametrize("suffix", FORMATS)
def test_real_nifti_round_trip(tmp_path, suffix):
    path = require_shared("totalsegmentator", "example_ct_sm.nii.gz")
    data, meta = read_image(path)
    ref = nib.load(path)
    np.testing.assert_allclose(meta.affine, ref.affine, atol=1e-9)
    assert data.shape == ref.shape and np.array_equal(data, np.asanyarray(ref.dataobj))
    write_image(tmp_path / f"ct{suffix}", data, meta)
    back, back_meta = read_image(tmp_path / f"ct{suffix}")
    assert back.dtype == data.dtype and np.array_equal(back, data)
    np.testing.assert_allclose(back_meta.affine, meta.affine, atol=1e-6, rtol=0)


@pytest.mark.realdata
@pytest.mark.parametrize(
    "name", ["brain1_image.nrrd", "brain1_label.nrrd", "prostate_phantom_subvolume.nrrd"]
)
@pytest.mark.parametrize("suffix", [".nrrd", ".mha", ".nii.gz"])
def test_real_nrrd_round_trip(tmp_path, name, suffix):
    path = require_shared("pyradiomics", "data", name)
    data, meta = read_image(path)
    img = sitk.ReadImage(str(path))
    assert np.array_equal(data, sitk.GetArrayFromImage(img).transpose(2, 1, 0))
    p = np.asarray(img.TransformIndexToPhysicalPoint((3, 2, 1)))
    np.testing.assert_allclose(meta.affine @ [3, 2, 1, 1], [-p[0], -p[1], p[2], 1], atol=1e-6)
    write_image(tmp_path / f"x{suffix}", data, meta)
    back, back_meta = read_image(tmp_path / f"x{suffix}")
    assert back.dtype == data.dtype and np.array_equal(back, data)
    # NIfTI-1 keeps the affine in float32 (a NRRD's float64 survives to ~1e-5 mm).
    tol = 1e-4 if suffix == ".nii.gz" else 1e-6
    np.testing.assert_allclose(back_meta.affine, meta.affine, atol=tol, rtol=0)
    if suffix == ".nii.gz":  # and from there on, exactly
        write_image(tmp_path / "y.nii.gz", back, back_meta)
        again, again_meta = read_image(tmp_path / "y.nii.gz")
        assert np.array_equal(again, back)
        np.testing.assert_allclose(again_meta.affine, back_meta.affine, atol=1e-6, rtol=0)


@pytest.mark.realdata
def test_real_big_endian_nifti_comes_back_native():
    path = require_shared("monai_testing_data", "anatomical.nii")
    data, meta = read_image(path)
    ref = nib.load(path)
    assert ref.get_data_dtype() == np.dtype(">i2")
    assert data.dtype == np.dtype("int16") and data.dtype.isnative
    assert np.array_equal(data, np.asanyarray(ref.dataobj))
    np.testing.assert_allclose(meta.affine, ref.affine, atol=1e-9)


def test_module_exports():
    assert callable(io.read_image) and callable(io.write_image) and callable(io.reorient)
