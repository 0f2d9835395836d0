"""Siemens mosaic DICOM: the CSA header parser, un-tiling and the corrected slice positions.

The mosaics are written by the tests from known volumes (tiles, CSA header and private tags built
byte by byte), so the expected voxels are the volume itself and the expected affine is computed
by hand from the header values. nibabel's ``MosaicWrapper`` and, where installed, dcm2niix read
the same files as independent references.
"""

from __future__ import annotations

import gzip
import shutil
import struct
import subprocess
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from umit.data.io import read_image, reorient
from umit.errors import GeometryError, InputError
from umit.ingest.dicom import discover_series, load_series
from umit.ingest.dicom.csa import CsaError, csa_floats, parse_csa

with warnings.catch_warnings():  # nibabel warns that its DICOM readers are experimental
    warnings.simplefilter("ignore")
    from nibabel.nicom import csareader, dicomwrappers

from _shared import (
    csa_header_bytes,
    expected_affine,
    rotation,
    write_mosaic_series,
)

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def volume(seed: int, shape: tuple[int, int, int]) -> np.ndarray:
    """A known (i = columns, j = rows, k = slices) uint16 volume."""
    return np.random.default_rng(seed).integers(1, 4000, size=shape, dtype=np.uint16)


def load_one(folder):
    found, unreadable = discover_series(folder)
    assert len(found) == 1 and unreadable == []
    return load_series(found[0])


def header_affine(path, n: int, slice_spacing: float, normal=None) -> np.ndarray:
    """The RAS affine computed by hand from a mosaic file's header values.

    The first slice starts half the difference of mosaic and tile size (in pixels) along each
    in-plane axis away from ImagePositionPatient (the mosaic's top-left corner).
    """
    ds = pydicom.dcmread(path)
    m = int(np.ceil(np.sqrt(n)))
    rows, cols = int(ds.Rows), int(ds.Columns)
    iop = np.asarray([float(v) for v in ds.ImageOrientationPatient])
    ps = np.asarray([float(v) for v in ds.PixelSpacing])
    ipp = np.asarray([float(v) for v in ds.ImagePositionPatient])
    first = (
        ipp + (cols - cols // m) / 2 * ps[1] * iop[:3] + (rows - rows // m) / 2 * ps[0] * iop[3:]
    )
    normal = np.cross(iop[:3], iop[3:]) if normal is None else np.asarray(normal)
    return expected_affine(iop, ps, first, slice_spacing * normal / np.linalg.norm(normal))


# --------------------------------------------------------------------------------------------
# CSA header parser


def test_csa_parser_reads_bytes_built_by_hand():
    data = csa_header_bytes(
        {
            "NumberOfImagesInMosaic": ("US", ["3"]),
            "SliceNormalVector": ("FD", ["0.1", "-0.2", "0.97467943"]),
            "SequenceName": ("SH", ["*ep_b1000#1"]),  # 12 bytes with the NUL: padded to 12
            "Empty": ("IS", []),
        }
    )
    # the layout itself: signature, tag count, first tag name/vm/vr, first item length
    assert data[:4] == b"SV10" and struct.unpack_from("<I", data, 8)[0] == 4
    name, vm, vr, _, n_items, marker = struct.unpack_from("<64si4siii", data, 16)
    assert name.rstrip(b"\0") == b"NumberOfImagesInMosaic" and (vm, n_items, marker) == (1, 3, 77)
    assert vr.rstrip(b"\0") == b"US" and struct.unpack_from("<4i", data, 100)[1] == 2  # "3\0"

    tags = parse_csa(data)
    assert tags == {
        "NumberOfImagesInMosaic": ["3"],
        "SliceNormalVector": ["0.1", "-0.2", "0.97467943"],
        "SequenceName": ["*ep_b1000#1"],
        "Empty": [],
    }
    np.testing.assert_array_equal(csa_floats(tags, "SliceNormalVector"), [0.1, -0.2, 0.97467943])
    assert csa_floats(tags, "SequenceName") is None and csa_floats(tags, "Empty") is None
    assert csa_floats(tags, "Missing") is None

    # nibabel's CSA reader, an independent implementation, reads the same values
    ref = csareader.read(data)
    assert ref["tags"]["NumberOfImagesInMosaic"]["items"] == [3]
    np.testing.assert_allclose(ref["tags"]["SliceNormalVector"]["items"], [0.1, -0.2, 0.97467943])
    assert ref["tags"]["SequenceName"]["items"] == ["*ep_b1000#1"]


def test_csa_parser_refuses_what_is_not_sv10():
    data = csa_header_bytes({"NumberOfImagesInMosaic": ("US", ["3"])})
    with pytest.raises(CsaError, match="not an SV10 CSA header"):
        parse_csa(b"CSA1" + data[4:])
    with pytest.raises(CsaError, match="truncated"):
        parse_csa(data[:60])
    with pytest.raises(CsaError, match="truncated in tag 'NumberOfImagesInMosaic', item 3"):
        parse_csa(data[:-8])
    one = csa_header_bytes({"NumberOfImagesInMosaic": ("US", ["3"])}, extra_items=0)
    with pytest.raises(CsaError, match="item 1: length 2 runs past the end"):
        parse_csa(one[:-3])  # "3\0" + 2 pad bytes, cut inside the value
    with pytest.raises(CsaError, match="claims 0 tags"):
        parse_csa(data[:8] + struct.pack("<II", 0, 77))


# --------------------------------------------------------------------------------------------
# Un-tiling and geometry


def test_axial_mosaic_voxels_and_hand_computed_affine(tmp_path):
    vol = volume(0, (6, 5, 4))  # tiles of 5 rows x 6 columns, 4 slices in a 2 x 2 mosaic
    (path,) = write_mosaic_series(
        tmp_path, [vol], pixel_spacing=(2.5, 2.0), first=(-30, -40, 10), slice_spacing=3.0
    )
    ds = pydicom.dcmread(path)
    assert (ds.Rows, ds.Columns) == (10, 12)
    # The scanner's position is the mosaic's top-left corner: (12 - 6) / 2 columns of 2.0 mm and
    # (10 - 5) / 2 rows of 2.5 mm before the first slice's first voxel.
    np.testing.assert_allclose([float(v) for v in ds.ImagePositionPatient], [-36, -46.25, 10])

    array, meta = load_one(tmp_path)
    np.testing.assert_array_equal(array, vol)
    want = np.array(
        [
            [-2.0, 0.0, 0.0, 30.0],  # i: along a row (LPS +x, RAS -x), 2.0 mm
            [0.0, -2.5, 0.0, 40.0],  # j: down a column (LPS +y), 2.5 mm
            [0.0, 0.0, 3.0, 10.0],  # k: SpacingBetweenSlices along the normal (+z)
            [0.0, 0.0, 0.0, 1.0],
        ]
    )
    np.testing.assert_allclose(meta.affine, want, atol=1e-9)
    assert meta.modality == "MR" and meta.extra["manufacturer"] == "SIEMENS"


def test_oblique_mosaic_with_unused_tiles_matches_hand_affine_and_nibabel(tmp_path):
    r = rotation(15, -25, 40)
    iop = (*r[:, 0], *r[:, 1])
    vol = volume(1, (7, 4, 3))  # 3 slices in a 2 x 2 mosaic: the fourth tile is padding
    (path,) = write_mosaic_series(
        tmp_path, [vol], iop=iop, pixel_spacing=(1.8, 2.2), first=(5, -7, 12), tile_count="csa"
    )
    array, meta = load_one(tmp_path)
    np.testing.assert_array_equal(array, vol)
    np.testing.assert_allclose(meta.affine, header_affine(path, 3, 3.0), atol=1e-6)
    # ... and the first voxel lies where the volume was placed (up to the DS rounding of the header)
    np.testing.assert_allclose(meta.affine[:3, 3], [-5, 7, 12], atol=1e-4)

    # nibabel's MosaicWrapper: data (rows, cols, slices), affine LPS of (row, col, slice) indices
    wrapper = dicomwrappers.wrapper_from_data(pydicom.dcmread(path))
    assert isinstance(wrapper, dicomwrappers.MosaicWrapper)
    np.testing.assert_array_equal(array, wrapper.get_data().transpose(1, 0, 2))
    ref = LPS_TO_RAS @ wrapper.affine[:, [1, 0, 2, 3]]  # to (col, row, slice) and RAS
    np.testing.assert_allclose(meta.affine, ref, atol=1e-5)


def test_tile_count_from_mosaic_ref_acq_times_in_a_3x3_mosaic(tmp_path):
    vol = volume(2, (4, 6, 5))  # 5 slices in a 3 x 3 mosaic of 18 x 12 pixels
    (path,) = write_mosaic_series(tmp_path, [vol], tile_count="times", slice_spacing=2.0)
    assert pydicom.dcmread(path).Rows == 18
    array, meta = load_one(tmp_path)
    np.testing.assert_array_equal(array, vol)
    np.testing.assert_allclose(meta.affine, header_affine(path, 5, 2.0), atol=1e-6)


def test_csa_slice_normal_opposite_to_the_plane_normal(tmp_path):
    """Slices written along -(row x column): the reader orders them along +normal; every voxel
    still lies where nibabel (which follows the CSA normal) puts it."""
    vol = volume(3, (6, 5, 4))
    (path,) = write_mosaic_series(tmp_path, [vol], csa_normal=(0, 0, -1), tile_count="csa")
    array, meta = load_one(tmp_path)
    np.testing.assert_array_equal(array, vol[:, :, ::-1])
    assert meta.affine[2, 2] == pytest.approx(3.0)
    wrapper = dicomwrappers.wrapper_from_data(pydicom.dcmread(path))
    for i, j, k in [(0, 0, 0), (5, 4, 3), (2, 1, 1)]:
        ours = meta.affine @ [i, j, 3 - k, 1]
        theirs = LPS_TO_RAS @ wrapper.affine @ [j, i, k, 1]
        np.testing.assert_allclose(ours, theirs, atol=1e-5)


def test_mosaic_time_series_is_4d(tmp_path):
    vols = [volume(10 + t, (6, 5, 3)) for t in range(3)]
    write_mosaic_series(tmp_path, vols)
    array, _ = load_one(tmp_path)
    assert array.shape == (6, 5, 3, 3)
    for t in range(3):
        np.testing.assert_array_equal(array[..., t], vols[t])


def test_mosaic_ingest_writes_the_volume(tmp_path):
    from umit.ingest.run import IngestConfig, run

    vol = volume(4, (6, 5, 4))
    write_mosaic_series(tmp_path / "src", [vol])
    result = run(IngestConfig(src=tmp_path / "src", out=tmp_path / "raw"), progress=False)
    assert (result.ingested, result.failed) == (1, 0), result.failures
    img, _ = read_image(
        tmp_path / "raw" / "images" / next(p.name for p in (tmp_path / "raw" / "images").iterdir())
    )
    np.testing.assert_array_equal(img, vol)


# --------------------------------------------------------------------------------------------
# What is still refused says what it is


def test_mosaic_without_tile_count_is_named(tmp_path):
    write_mosaic_series(tmp_path / "bare", [volume(5, (6, 5, 4))], tile_count=None, with_csa=False)
    with pytest.raises(
        InputError,
        match=r"Siemens mosaic without a tile count \(no NumberOfImagesInMosaic, no CSA header\)",
    ):
        load_one(tmp_path / "bare")
    write_mosaic_series(tmp_path / "csa", [volume(5, (6, 5, 4))], tile_count=None)
    with pytest.raises(InputError, match=r"without a tile count .*no MosaicRefAcqTimes"):
        load_one(tmp_path / "csa")


def test_mosaic_with_a_corrupt_csa_header_or_a_bad_size(tmp_path):
    (path,) = write_mosaic_series(tmp_path / "corrupt", [volume(6, (6, 5, 4))], tile_count="csa")
    ds = pydicom.dcmread(path)
    ds.private_block(0x0029, "SIEMENS CSA HEADER")[0x10].value = b"SV10" + b"\0" * 12
    ds.save_as(path)
    with pytest.raises(InputError, match=r"without a tile count \(CSA header unreadable: .*0 tags"):
        load_one(tmp_path / "corrupt")

    (path,) = write_mosaic_series(tmp_path / "size", [volume(7, (6, 5, 4))])
    ds = pydicom.dcmread(path)
    ds.private_block(0x0019, "SIEMENS MR HEADER")[0x0A].value = 5  # 3 x 3 tiles in 10 x 12
    ds.save_as(path)
    with pytest.raises(GeometryError, match=r"10x12 pixels cannot hold 3x3 equal tiles"):
        load_one(tmp_path / "size")


# --------------------------------------------------------------------------------------------
# dcm2niix, where installed (Debian package `dcm2niix`), as a second reference


@pytest.mark.skipif(shutil.which("dcm2niix") is None, reason="dcm2niix not installed")
def test_oblique_mosaic_time_series_matches_dcm2niix(tmp_path):
    r = rotation(-10, 20, 30)
    iop = (*r[:, 0], *r[:, 1])
    vols = [volume(20 + t, (8, 6, 3)) for t in range(2)]
    write_mosaic_series(tmp_path / "src", vols, iop=iop, tile_count="csa", first=(1, 2, 3))
    array, meta = load_one(tmp_path / "src")
    out = tmp_path / "d2n"
    out.mkdir()
    subprocess.run(
        ["dcm2niix", "-z", "n", "-b", "n", "-f", "x", "-o", str(out), str(tmp_path / "src")],
        check=True,
        capture_output=True,
    )
    ref = nib.load(out / "x.nii")
    ref_array, ref_meta = reorient(np.asarray(ref.dataobj), _meta(ref.affine), "RAS")
    ours, ours_meta = reorient(array, meta, "RAS")
    np.testing.assert_array_equal(ours, ref_array)
    np.testing.assert_allclose(ours_meta.affine, ref_meta.affine, atol=1e-3)


def _meta(affine):
    from umit.data.meta import ImageMeta

    return ImageMeta(affine=affine)


# --------------------------------------------------------------------------------------------
# A real Siemens DWI mosaic pair and real CSA headers, as shipped in nibabel's test data


def _nibabel_data(name: str):
    path = Path(nib.__file__).parent / "nicom" / "tests" / "data" / name
    if not path.is_file():
        pytest.skip(f"nibabel's test data {name} is not installed")
    return path


def test_real_csa_headers_parse_like_nibabel():
    for name in ("csa2_b0.bin", "csa2_b1000.bin"):
        data = _nibabel_data(name).read_bytes()
        ours, ref = parse_csa(data), csareader.read(data)["tags"]
        assert set(ours) == set(ref) and len(ours) == 83
        for tag, entry in ref.items():
            want = [str(v) if isinstance(v, str) else float(v) for v in entry["items"]]
            got = [
                v if isinstance(w, str) else float(v) for v, w in zip(ours[tag], want, strict=True)
            ]
            assert got == want, tag
        assert ours["NumberOfImagesInMosaic"] == ["48"]


def test_real_siemens_dwi_mosaic_matches_nibabel_and_dcm2niix(tmp_path):
    src = tmp_path / "dwi"
    src.mkdir()
    for name in ("siemens_dwi_0.dcm.gz", "siemens_dwi_1000.dcm.gz"):
        (src / name.removesuffix(".gz")).write_bytes(
            gzip.decompress(_nibabel_data(name).read_bytes())
        )
    array, meta = load_one(src)
    # two 896 x 896 mosaics of 48 slices of 128 x 128, one b=0 and one b=1000 volume
    assert array.shape == (128, 128, 48, 2)
    assert meta.extra["b_values"] == [0.0, 1000.0]
    g = np.array([0.99997449, 0.00505012, -0.00505012])  # the CSA DiffusionGradientDirection
    np.testing.assert_allclose(
        meta.extra["gradient_directions"], [[0, 0, 0], g / np.linalg.norm(g)], atol=1e-6
    )
    for t, name in enumerate(("siemens_dwi_0.dcm", "siemens_dwi_1000.dcm")):
        wrapper = dicomwrappers.wrapper_from_data(pydicom.dcmread(src / name))
        np.testing.assert_array_equal(array[..., t], wrapper.get_data().transpose(1, 0, 2))
        # nibabel keeps the unnormalised column cosine (norm 0.9999997) over the 690 mm
        # mosaic offset: 2e-4 mm apart
        ref = LPS_TO_RAS @ wrapper.affine[:, [1, 0, 2, 3]]
        np.testing.assert_allclose(meta.affine, ref, atol=1e-3)
    if shutil.which("dcm2niix") is None:
        return
    out = tmp_path / "d2n"
    out.mkdir()
    subprocess.run(
        ["dcm2niix", "-z", "n", "-b", "n", "-f", "x", "-o", str(out), str(src)],
        check=True,
        capture_output=True,
    )
    ref_img = nib.load(out / "x.nii")
    ref_array, ref_meta = reorient(np.asarray(ref_img.dataobj), _meta(ref_img.affine), "RAS")
    ours, ours_meta = reorient(array, meta, "RAS")
    np.testing.assert_array_equal(ours, ref_array)
    np.testing.assert_allclose(ours_meta.affine, ref_meta.affine, atol=1e-3)
