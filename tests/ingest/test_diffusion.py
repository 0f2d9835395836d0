"""Diffusion-weighted DICOM: b-values and gradient directions per time point, in the catalog and
in FSL ``.bval`` / ``.bvec`` files beside a 4D NIfTI (``split_4d=false``).

The expected bvecs are computed by hand from the header values: the projection of each gradient
(LPS) on the written image's voxel axes, x negated because the image's affine has a positive
determinant (FSL reads such images with the x axis reversed). A second check maps each bvec back
to the world the way FSL-convention readers (dipy, MRtrix) do, using only the written NIfTI.
"""

from __future__ import annotations

import shutil
import subprocess

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from umit.cli.main import main as cli_main
from umit.errors import GeometryError
from umit.ingest.bvecs import fsl_bvecs
from umit.ingest.catalog import Catalog
from umit.ingest.dicom import discover_series, load_series
from umit.ingest.dicom.diffusion import Diffusion, diffusion_table, read_diffusion
from umit.ingest.run import IngestConfig, run

from _shared import (
    ds_round,
    rotation,
    write_ct_series,
    write_enhanced_ct,
    write_mosaic_series,
)

B_VALUES = [0.0, 1000.0, 1000.0]
G1 = np.array([0.6, -0.48, 0.64])  # unit vectors in the patient frame (LPS)
G2 = np.array([0.0, 0.8, -0.6])
DIRECTIONS = [np.zeros(3), G1, G2]
OBLIQUE = rotation(12, -20, 35)
OBLIQUE_IOP = (*OBLIQUE[:, 0], *OBLIQUE[:, 1])


def expected_bvecs(iop) -> np.ndarray:
    """By hand: bvec = (-g.row, g.column, g.normal) for each gradient g (rows x, y, z).

    umit writes a DICOM series with i along the row cosine, j along the column cosine and k along
    their cross product; in RAS that affine has a positive determinant, so FSL's x is negated.
    """
    iop = ds_round(iop)
    row, col = iop[:3], iop[3:]
    normal = np.cross(row, col)
    normal /= np.linalg.norm(normal)
    return np.array([[-(g @ row), g @ col, g @ normal] for g in DIRECTIONS]).T


def fsl_to_world(bvecs: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """An FSL-convention reader's view: flip x if det > 0, then apply the affine's rotation (its
    columns scaled to unit length: bvecs live in mm-scaled voxel axes).

    Returns unit RAS directions, one per row (zeros stay zeros)."""
    linear = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
    v = np.array(bvecs, dtype=float)
    if np.linalg.det(linear) > 0:
        v[0] = -v[0]
    w = (linear @ v).T
    n = np.linalg.norm(w, axis=1, keepdims=True)
    return np.divide(w, n, out=np.zeros_like(w), where=n > 0)


def write_dwi_series(folder, *, iop=OBLIQUE_IOP, private: bool = False, n_slices: int = 4):
    """Single-frame MR files: ``n_slices`` positions x 3 time points, standard diffusion tags
    (or Siemens private ones); returns the stored volume ``(i, j, k, t)``."""
    stored = np.random.default_rng(0).integers(0, 3000, size=(5, 6, n_slices * 3), dtype=np.uint16)
    iop_r = ds_round(iop)
    normal = np.cross(iop_r[:3], iop_r[3:])
    positions, per_slice = [], []
    for k in range(n_slices):
        for t in range(3):
            positions.append(np.array([4.0, -3.0, 20.0]) + 2.5 * k * normal)
            tags = {"TemporalPositionIdentifier": t + 1, "AcquisitionTime": f"0900{t:02d}"}
            if not private:
                tags["DiffusionBValue"] = B_VALUES[t]
                tags["DiffusionGradientOrientation"] = [float(v) for v in DIRECTIONS[t]]
            per_slice.append(tags)
    paths = write_ct_series(
        folder,
        stored,
        iop=iop,
        positions=positions,
        per_slice=per_slice,
        modality="MR",
        intercept=0,
        extra={"Manufacturer": "SIEMENS"},
    )
    if private:  # the Siemens MR header's B_value / DiffusionGradientDirection only
        for s, path in enumerate(paths):
            ds = pydicom.dcmread(path)
            block = ds.private_block(0x0019, "SIEMENS MR HEADER", create=True)
            block.add_new(0x0C, "IS", str(int(B_VALUES[s % 3])))
            block.add_new(0x0E, "FD", [float(v) for v in DIRECTIONS[s % 3]])
            ds.save_as(path)
    # slice s = k * 3 + t -> (i, j, k, t)
    return stored.reshape(5, 6, n_slices, 3).astype(np.int16)


def ingest(src, out, **kw):
    result = run(IngestConfig(src=src, out=out, **kw), progress=False)
    assert result.failed == 0, result.failures
    return Catalog(out / "catalog.db")


def read_fsl(stem):
    bvals = np.loadtxt(f"{stem}.bval", ndmin=1)
    bvecs = np.loadtxt(f"{stem}.bvec", ndmin=2)
    return bvals, bvecs


# --------------------------------------------------------------------------------------------
# Reading one image's encoding


def _ds(**kw) -> Dataset:
    ds = Dataset()
    for key, value in kw.items():
        setattr(ds, key, value)
    return ds


def test_read_diffusion_from_each_source():
    g = [0.6, -0.48, 0.64]
    std = read_diffusion(_ds(DiffusionBValue=800.0, DiffusionGradientOrientation=g))
    assert std.b_value == 800 and np.allclose(std.direction, g)
    # inside the Diffusion Gradient Direction Sequence
    seq = _ds(DiffusionGradientDirectionSequence=Sequence([_ds(DiffusionGradientOrientation=g)]))
    seq.DiffusionBValue = 700.0
    assert np.allclose(read_diffusion(seq).direction, g)
    # an enhanced file's MR Diffusion functional group wins over the top level
    group = _ds(DiffusionBValue=1500.0, DiffusionGradientOrientation=[0.0, 0.0, 2.0])
    both = read_diffusion(_ds(DiffusionBValue=5.0), None, group)
    assert both.b_value == 1500 and np.allclose(both.direction, [0, 0, 1])  # normalised
    # Siemens MR header private elements
    ds = Dataset()
    block = ds.private_block(0x0019, "SIEMENS MR HEADER", create=True)
    block.add_new(0x0C, "IS", "1000")
    block.add_new(0x0E, "FD", g)
    assert read_diffusion(ds) == Diffusion(1000.0, pytest.approx(np.array(g)))
    # ... also as raw bytes (VR UN after a system that did not know the tags)
    un = Dataset()
    block = un.private_block(0x0019, "SIEMENS MR HEADER", create=True)
    block.add_new(0x0C, "UN", b"1000")
    block.add_new(0x0E, "UN", np.asarray(g, dtype="<f8").tobytes())
    assert read_diffusion(un) == Diffusion(1000.0, pytest.approx(np.array(g)))
    # Siemens CSA: B_value and, without DiffusionGradientDirection, the B_matrix eigenvector
    b_matrix = 1000 * np.outer(g, g)
    csa = {
        "B_value": ["1000"],
        "B_matrix": [f"{v:.6f}" for v in b_matrix[np.triu_indices(3)]],
    }
    from_csa = read_diffusion(Dataset(), csa)
    assert from_csa.b_value == 1000 and abs(from_csa.direction @ g) == pytest.approx(1, abs=1e-6)
    # GE: b-value + 1e9 offset; GE's gradients are in the logical frame and not used
    ge = Dataset()
    ge.private_block(0x0043, "GEMS_PARM_01", create=True).add_new(
        0x39, "IS", ["1000001000", "8", "0", "0"]
    )
    ge.private_block(0x0019, "GEMS_ACQU_01", create=True).add_new(0xBB, "DS", "0.6")
    assert read_diffusion(ge) == Diffusion(1000.0, None)
    # Philips private b-value and (RL, AP, FH) direction
    ph = Dataset()
    ph.private_block(0x2001, "Philips Imaging DD 001", create=True).add_new(0x03, "FL", 900.0)
    block = ph.private_block(0x2005, "Philips MR Imaging DD 001", create=True)
    for offset, v in zip((0xB0, 0xB1, 0xB2), g, strict=True):
        block.add_new(offset, "FL", v)
    philips = read_diffusion(ph)
    assert philips.b_value == 900 and np.allclose(philips.direction, g, atol=1e-6)
    # b=0 and isotropic (trace) images have no direction; no b-value: no encoding
    assert np.array_equal(read_diffusion(_ds(DiffusionBValue=0.0)).direction, np.zeros(3))
    iso = read_diffusion(_ds(DiffusionBValue=1000.0, DiffusionDirectionality="ISOTROPIC"))
    assert np.array_equal(iso.direction, np.zeros(3))
    assert read_diffusion(_ds(EchoTime=80.0)) is None


def test_diffusion_table_checks_slices_agree(tmp_path):
    d = [Diffusion(0.0, np.zeros(3)), Diffusion(1000.0, G1)]
    groups = [np.array([0, 1]), np.array([2, 3])]  # two positions x two time points
    table = diffusion_table([d[0], d[1], d[0], d[1]], groups, tmp_path)
    assert table.b_values == [0.0, 1000.0]
    assert np.allclose(table.directions, [[0, 0, 0], G1])
    unknown = diffusion_table([d[0], Diffusion(1000.0, None)] * 2, groups, tmp_path)
    assert unknown.b_values == [0.0, 1000.0] and unknown.directions is None
    assert diffusion_table([None] * 4, groups, tmp_path) is None
    with pytest.raises(
        GeometryError, match=r"time point 2 mixes b-values across slices \(500, 1000"
    ):
        diffusion_table([d[0], d[1], d[0], Diffusion(500.0, G1)], groups, tmp_path)
    with pytest.raises(GeometryError, match="time point 2 mixes gradient directions"):
        diffusion_table([d[0], d[1], d[0], Diffusion(1000.0, G2)], groups, tmp_path)


def test_fsl_bvecs_by_hand_on_simple_orientations():
    axial = np.diag([-2.0, -2.0, 3.0, 1.0])  # LPS storage: i -> L, j -> P, k -> S; det > 0
    # g along L, P, S: projections (1, 0, 0), (0, 1, 0), (0, 0, 1); FSL's x negated
    np.testing.assert_allclose(fsl_bvecs(np.eye(3), axial), np.diag([-1.0, 1.0, 1.0]), atol=1e-12)
    las = np.diag([-2.0, 2.0, 3.0, 1.0])  # rows flipped (as dcm2niix writes): det < 0, no flip
    np.testing.assert_allclose(fsl_bvecs(np.eye(3), las), np.diag([1.0, -1.0, 1.0]), atol=1e-12)


# --------------------------------------------------------------------------------------------
# A 4D DWI series through `umit ingest`


def test_dwi_standard_tags_catalog_and_fsl_files(tmp_path):
    stored = write_dwi_series(tmp_path / "src")
    array, meta = load_series(discover_series(tmp_path / "src")[0][0])
    np.testing.assert_array_equal(array, stored)
    assert meta.extra["b_values"] == B_VALUES
    np.testing.assert_allclose(meta.extra["gradient_directions"], DIRECTIONS, atol=1e-6)

    # split_4d=true (default): one 3D file per time point; the catalog carries the table
    with ingest(tmp_path / "src", tmp_path / "split") as cat:
        rows = cat.series()
    assert [r.channel for r in rows] == [0, 1, 2] and all(len(r.shape) == 3 for r in rows)
    for r in rows:
        assert r.extra["b_values"] == B_VALUES and r.extra["n_timepoints"] == 3
        np.testing.assert_allclose(r.extra["gradient_directions"], DIRECTIONS, atol=1e-6)
        assert "bvec_path" not in r.extra
    assert not list((tmp_path / "split").rglob("*.bvec"))

    # split_4d=false: one 4D file, time last, with .bval / .bvec beside it
    with ingest(tmp_path / "src", tmp_path / "raw", split_4d=False) as cat:
        (row,) = cat.series()
    assert row.shape == (5, 6, 4, 3) and row.extra["n_timepoints"] == 3
    img = nib.load(tmp_path / "raw" / row.image_path)
    assert img.shape == (5, 6, 4, 3)
    np.testing.assert_array_equal(np.asarray(img.dataobj), stored)
    stem = tmp_path / "raw" / row.image_path.removesuffix(".nii.gz")
    assert row.extra["bval_path"] == f"{row.image_path.removesuffix('.nii.gz')}.bval"
    assert (tmp_path / "raw" / row.extra["bvec_path"]).is_file()
    bvals, bvecs = read_fsl(stem)
    np.testing.assert_array_equal(bvals, B_VALUES)
    assert bvecs.shape == (3, 3)
    np.testing.assert_allclose(bvecs, expected_bvecs(OBLIQUE_IOP), atol=1e-5)
    assert np.linalg.det(img.affine[:3, :3]) > 0
    # FSL-convention readers get the scanner's gradients back from the NIfTI alone (RAS = -x, -y, z)
    world = fsl_to_world(bvecs, img.affine)
    for t, g in enumerate(DIRECTIONS):
        np.testing.assert_allclose(world[t], g * [-1, -1, 1], atol=1e-5)


def test_dwi_siemens_private_tags_and_cli_split_4d_false(tmp_path, capsys):
    stored = write_dwi_series(tmp_path / "src", private=True)
    code = cli_main(
        ["ingest", str(tmp_path / "src"), "--out", str(tmp_path / "raw"), "split_4d=false"]
    )
    assert code == 0, capsys.readouterr().out
    with Catalog(tmp_path / "raw" / "catalog.db") as cat:
        (row,) = cat.series()
    assert row.extra["b_values"] == B_VALUES
    np.testing.assert_allclose(row.extra["gradient_directions"], DIRECTIONS, atol=1e-6)
    np.testing.assert_array_equal(
        np.asarray(nib.load(tmp_path / "raw" / row.image_path).dataobj), stored
    )
    bvals, bvecs = read_fsl(tmp_path / "raw" / row.image_path.removesuffix(".nii.gz"))
    np.testing.assert_array_equal(bvals, B_VALUES)
    np.testing.assert_allclose(bvecs, expected_bvecs(OBLIQUE_IOP), atol=1e-5)


def test_dwi_mosaic_series_with_siemens_private_tags(tmp_path):
    vols = [
        np.random.default_rng(t).integers(1, 4000, (6, 5, 3), dtype=np.uint16) for t in range(3)
    ]
    per_volume = [
        {"siemens_b": int(b), "siemens_direction": g}
        for b, g in zip(B_VALUES, DIRECTIONS, strict=True)
    ]
    write_mosaic_series(tmp_path / "src", vols, iop=OBLIQUE_IOP, per_volume=per_volume)
    with ingest(tmp_path / "src", tmp_path / "raw", split_4d=False) as cat:
        (row,) = cat.series()
    assert row.shape == (6, 5, 3, 3)
    data = np.asarray(nib.load(tmp_path / "raw" / row.image_path).dataobj)
    for t in range(3):
        np.testing.assert_array_equal(data[..., t], vols[t])
    bvals, bvecs = read_fsl(tmp_path / "raw" / row.image_path.removesuffix(".nii.gz"))
    np.testing.assert_array_equal(bvals, B_VALUES)
    np.testing.assert_allclose(bvecs, expected_bvecs(OBLIQUE_IOP), atol=1e-5)


def test_enhanced_multiframe_dwi_reads_the_mr_diffusion_group(tmp_path):
    n_k = 3
    stored = np.random.default_rng(1).integers(0, 2000, size=(5, 6, n_k * 3), dtype=np.uint16)
    positions = [
        [0.0, 0.0, 2.0 * (s // 3)] for s in range(n_k * 3)
    ]  # slice s: k = s // 3, t = s % 3
    path = write_enhanced_ct(
        tmp_path / "dwi.dcm",
        stored,
        iop=(1, 0, 0, 0, 1, 0),
        pixel_spacing=(1.0, 1.0),
        positions=positions,
        frame_order=list(range(n_k * 3)),
        intercept=0,
    )
    ds = pydicom.dcmread(path)
    for f, item in enumerate(ds.PerFrameFunctionalGroupsSequence):
        t = f % 3
        group = _ds(DiffusionBValue=B_VALUES[t], DiffusionDirectionality="DIRECTIONAL")
        group.DiffusionGradientDirectionSequence = Sequence(
            [_ds(DiffusionGradientOrientation=[float(v) for v in DIRECTIONS[t]])]
        )
        item.MRDiffusionSequence = Sequence([group])
    ds.save_as(path)
    array, meta = load_series(discover_series(path)[0][0])
    assert array.shape == (5, 6, n_k, 3)
    assert meta.extra["b_values"] == B_VALUES
    np.testing.assert_allclose(meta.extra["gradient_directions"], DIRECTIONS, atol=1e-6)


def test_ge_b_values_without_directions_write_no_bvec(tmp_path):
    write_dwi_series(tmp_path / "src", private=False)
    for path in (tmp_path / "src").iterdir():  # keep GE's b-value only
        ds = pydicom.dcmread(path)
        b = float(ds.DiffusionBValue)
        del ds.DiffusionBValue, ds.DiffusionGradientOrientation
        ds.private_block(0x0043, "GEMS_PARM_01", create=True).add_new(
            0x39, "IS", [str(int(b) + 1_000_000_000), "0", "0", "0"]
        )
        ds.save_as(path)
    with ingest(tmp_path / "src", tmp_path / "raw", split_4d=False) as cat:
        (row,) = cat.series()
    assert row.extra["b_values"] == B_VALUES and row.extra.get("gradient_directions") is None
    assert (tmp_path / "raw" / row.extra["bval_path"]).is_file() and "bvec_path" not in row.extra


# --------------------------------------------------------------------------------------------
# dcm2niix, where installed (Debian package `dcm2niix`), as a reference for the bvecs


@pytest.mark.skipif(shutil.which("dcm2niix") is None, reason="dcm2niix not installed")
def test_mosaic_dwi_bvecs_agree_with_dcm2niix_in_the_world(tmp_path):
    vols = [
        np.random.default_rng(t).integers(1, 4000, (6, 5, 3), dtype=np.uint16) for t in range(3)
    ]
    per_volume = []
    for b, g in zip(B_VALUES, DIRECTIONS, strict=True):
        csa = {"B_value": ("IS", [str(int(b))])}
        if b > 0:  # dcm2niix reads the CSA header's fields
            csa["DiffusionGradientDirection"] = ("FD", [f"{v:.8f}" for v in g])
        per_volume.append({"csa": csa})
    write_mosaic_series(tmp_path / "src", vols, iop=OBLIQUE_IOP, per_volume=per_volume)
    with ingest(tmp_path / "src", tmp_path / "raw", split_4d=False) as cat:
        (row,) = cat.series()
    ours = nib.load(tmp_path / "raw" / row.image_path)
    our_bvals, our_bvecs = read_fsl(tmp_path / "raw" / row.image_path.removesuffix(".nii.gz"))
    np.testing.assert_array_equal(our_bvals, B_VALUES)  # read from the CSA header

    out = tmp_path / "d2n"
    out.mkdir()
    subprocess.run(
        ["dcm2niix", "-z", "n", "-f", "x", "-o", str(out), str(tmp_path / "src")],
        check=True,
        capture_output=True,
    )
    ref = nib.load(out / "x.nii")
    ref_bvals, ref_bvecs = read_fsl(out / "x")
    np.testing.assert_array_equal(ref_bvals, B_VALUES)
    # The files differ (dcm2niix flips the rows: det < 0), the gradients in the world agree.
    assert np.linalg.det(ref.affine[:3, :3]) < 0 < np.linalg.det(ours.affine[:3, :3])
    np.testing.assert_allclose(
        fsl_to_world(our_bvecs, ours.affine), fsl_to_world(ref_bvecs, ref.affine), atol=1e-4
    )
