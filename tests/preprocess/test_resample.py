"""Geometry of preprocessing against scipy.ndimage and hand computations."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from umit.data.meta import translate_affine
from umit.errors import InputError
from umit.preprocess.resample import (
    foreground_bbox,
    nearest_indices,
    ras_geometry,
    read_nifti,
    reorient_to_ras,
    resample_factors,
    resample_image,
    resample_label,
    restore_original,
    scale_affine,
    spacing_of,
)


def _oblique_lps_affine(spacing=(0.8, 0.9, 2.5), origin=(12.0, -30.0, 40.0)) -> np.ndarray:
    """Voxel axes running roughly L, P, S with a small rotation (an LPS-ish DICOM-like volume)."""
    t = np.deg2rad(7.0)
    rot = np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]])
    aff = np.eye(4)
    aff[:3, :3] = rot @ np.diag([-1.0, -1.0, 1.0]) @ np.diag(spacing)
    aff[:3, 3] = origin
    return aff


def _world(affine: np.ndarray, idx: np.ndarray) -> np.ndarray:
    return idx @ affine[:3, :3].T + affine[:3, 3]


def test_reorient_to_ras_keeps_every_voxel_at_its_world_position():
    # permuted + flipped axes: array axis 0 runs S, axis 1 runs L, axis 2 runs P
    aff = np.zeros((4, 4))
    aff[:3, :3] = np.array([[0, -0.9, 0], [0, 0, -0.8], [2.5, 0, 0]])
    aff[:, 3] = [5.0, 6.0, -7.0, 1.0]
    arr = np.arange(5 * 6 * 7, dtype=np.int32).reshape(5, 6, 7)
    out, new_aff = reorient_to_ras(arr, aff)
    assert "".join(nib.orientations.aff2axcodes(new_aff)) == "RAS"
    assert out.shape == (6, 7, 5)
    assert np.allclose(spacing_of(new_aff), (0.9, 0.8, 2.5))
    # every new voxel holds the value of the old voxel at the same world point
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in out.shape], indexing="ij"), -1).reshape(
        -1, 3
    )
    old_idx = np.rint(_world(np.linalg.inv(aff), _world(new_aff, idx))).astype(int)
    assert np.array_equal(out[tuple(idx.T)], arr[tuple(old_idx.T)])
    geo_aff, geo_shape = ras_geometry(aff, arr.shape)
    assert geo_shape == out.shape and np.allclose(geo_aff, new_aff)


def test_linear_resampling_matches_scipy_map_coordinates():
    rng = np.random.default_rng(0)
    arr = rng.normal(size=(17, 13, 9)).astype(np.float32)
    s, new_shape = resample_factors(arr.shape, (0.8, 0.9, 2.5), (1.1, 0.7, 1.0))
    out = resample_image(arr, s, new_shape, order=1)
    coords = np.meshgrid(
        *[np.arange(n) * f for n, f in zip(new_shape, s, strict=True)], indexing="ij"
    )
    ref = ndimage.map_coordinates(arr.astype(np.float64), coords, order=1, mode="nearest")
    assert out.shape == new_shape == (round(17 * 0.8 / 1.1), round(13 * 0.9 / 0.7), round(9 * 2.5))
    np.testing.assert_allclose(out, ref, atol=1e-5)


def test_trilinear_reproduces_a_linear_ramp_at_new_voxel_centres():
    aff = _oblique_lps_affine()
    shape = (20, 18, 8)
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    g = np.array([0.01, -0.02, 0.015])
    ramp = (_world(aff, idx.reshape(-1, 3)) @ g + 0.3).reshape(shape).astype(np.float32)
    s, new_shape = resample_factors(shape, spacing_of(aff), (1.0, 1.0, 1.0))
    out = resample_image(ramp, s, new_shape, order=1)
    new_aff = scale_affine(aff, s)
    assert np.allclose(spacing_of(new_aff), (1.0, 1.0, 1.0))
    new_idx = np.stack(np.meshgrid(*[np.arange(n) for n in new_shape], indexing="ij"), -1).reshape(
        -1, 3
    )
    expected = (_world(new_aff, new_idx) @ g + 0.3).reshape(new_shape)
    inside = tuple(slice(0, int(np.floor((n - 1) / f)) + 1) for n, f in zip(shape, s, strict=True))
    np.testing.assert_allclose(out[inside], expected[inside], atol=1e-4)


def test_separable_cubic_matches_scipy_affine_transform():
    rng = np.random.default_rng(3)
    arr = rng.normal(size=(17, 13, 9)).astype(np.float32)
    for target in [(1.1, 0.7, 1.0), (0.3, 2.0, 2.5)]:
        s, new_shape = resample_factors(arr.shape, (0.8, 0.9, 2.5), target)
        ref = ndimage.affine_transform(
            arr.astype(np.float64), s, output_shape=new_shape, order=3, mode="nearest"
        )
        np.testing.assert_allclose(resample_image(arr, s, new_shape, order=3), ref, atol=1e-5)


def test_cubic_resampling_is_close_to_linear_on_a_ramp():
    # a cubic B-spline reproduces a ramp exactly, away from the edge-repeat boundary
    ramp = np.add.outer(
        np.add.outer(np.arange(24.0), 0.5 * np.arange(24.0)), 0.25 * np.arange(24.0)
    )
    s, new_shape = resample_factors(ramp.shape, (1, 1, 1), (0.7, 0.7, 0.7))
    cubic = resample_image(ramp, s, new_shape, order=3)
    linear = resample_image(ramp, s, new_shape, order=1)
    inner = tuple(slice(10, n - 10) for n in new_shape)
    np.testing.assert_allclose(cubic[inner], linear[inner], atol=1e-3)
    with pytest.raises(ValueError, match="order"):
        resample_image(ramp, s, new_shape, order=2)


def test_blob_centroid_keeps_its_world_position():
    aff = _oblique_lps_affine()
    shape = (40, 36, 14)
    centre_world = _world(aff, np.array([[21.3, 15.7, 6.2]]))[0]
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).reshape(-1, 3)
    d2 = ((_world(aff, idx) - centre_world) ** 2).sum(1)
    blob = np.exp(-d2 / (2 * 4.0**2)).reshape(shape).astype(np.float32)
    label = (d2 < 6.0**2).reshape(shape).astype(np.uint8)
    s, new_shape = resample_factors(shape, spacing_of(aff), (1.5, 1.5, 1.5))
    new_aff = scale_affine(aff, s)
    new_idx = np.stack(np.meshgrid(*[np.arange(n) for n in new_shape], indexing="ij"), -1).reshape(
        -1, 3
    )

    def centroid(affine, index, weights):
        w = weights.reshape(-1).astype(np.float64)
        return (_world(affine, index) * w[:, None]).sum(0) / w.sum()

    half_voxel = 0.5 * 1.5
    moved = centroid(new_aff, new_idx, resample_image(blob, s, new_shape)) - centroid(
        aff, idx, blob
    )
    assert np.linalg.norm(moved) < half_voxel
    moved = centroid(new_aff, new_idx, resample_label(label, s, new_shape)) - centroid(
        aff, idx, label
    )
    assert np.linalg.norm(moved) < half_voxel


def test_label_nearest_neighbour_matches_scipy_and_invents_no_values():
    rng = np.random.default_rng(1)
    label = rng.integers(0, 4, size=(15, 11, 9)).astype(np.uint8)
    s = np.array([10 / 7, 0.7, 1.0])  # scales whose sample points never fall on .5 ties
    new_shape = (10, 16, 9)
    out = resample_label(label, s, new_shape)
    coords = np.meshgrid(
        *[np.arange(n) * f for n, f in zip(new_shape, s, strict=True)], indexing="ij"
    )
    ref = ndimage.map_coordinates(label, coords, order=0, mode="nearest")
    assert np.array_equal(out, ref)
    assert set(np.unique(out)) <= set(np.unique(label))
    assert out.dtype == np.uint8


def test_resampling_is_skipped_when_spacing_already_matches():
    arr = np.random.default_rng(2).normal(size=(7, 8, 9)).astype(np.float32)
    s, new_shape = resample_factors(arr.shape, (1.0, 1.0005, 2.0), (1.0, 1.0, 2.0))
    assert np.array_equal(s, [1.0, 1.0, 1.0]) and new_shape == arr.shape
    assert np.array_equal(resample_image(arr, s, new_shape), arr)
    # only the mismatching axis is interpolated; the others are copied exactly
    s, new_shape = resample_factors(arr.shape, (1.0, 1.0, 2.0), (1.0, 1.0, 1.0))
    out = resample_image(arr, s, new_shape)
    assert new_shape == (7, 8, 18) and np.array_equal(out[:, :, ::2], arr)


def test_nearest_indices_round_half_up_and_clamp():
    assert nearest_indices(4, 1.5, 4).tolist() == [0, 2, 3, 3]  # 0, 1.5->2, 3, 4.5->3 (clamped)


def test_foreground_bbox_with_margin_and_empty_mask():
    mask = np.zeros((10, 12, 8), bool)
    mask[3:5, 6, 2:7] = True
    assert foreground_bbox(mask, 2) == ((1, 7), (4, 9), (0, 8))
    assert foreground_bbox(np.zeros((3, 3, 3), bool)) is None


def test_translate_affine_moves_origin_to_crop_start():
    aff = _oblique_lps_affine()
    start = np.array([3, -2, 5])
    crop_aff = translate_affine(aff, start)
    assert np.allclose(crop_aff @ [0, 0, 0, 1], aff @ [*start, 1])
    assert np.allclose(crop_aff[:3, :3], aff[:3, :3])


def test_restore_original_undoes_reorient_and_crop_exactly():
    aff = _oblique_lps_affine(spacing=(1.0, 1.0, 2.0))
    label = np.zeros((12, 10, 6), np.uint8)
    label[4:8, 2:5, 1:4] = 2
    ras, ras_aff = reorient_to_ras(label, aff)
    bbox = foreground_bbox(ras > 0, 1)
    cropped = ras[tuple(slice(a, b) for a, b in bbox)]
    attrs = {
        "ras_shape": list(ras.shape),
        "crop_bbox": [list(b) for b in bbox],
        "resample_scale": [1.0, 1.0, 1.0],
        "shape": [1, *cropped.shape],
        "original_affine": aff.tolist(),
        "original_shape": list(label.shape),
    }
    back, back_aff = restore_original(cropped, attrs)
    assert np.array_equal(back, label) and np.allclose(back_aff, aff)


def test_read_nifti_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"not a nifti at all")
    with pytest.raises(InputError, match="bad.nii.gz"):
        read_nifti(bad)
    with pytest.raises(InputError, match="not found"):
        read_nifti(tmp_path / "missing.nii.gz")
    four_d = tmp_path / "4d.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4, 2), np.float32), np.eye(4)), four_d)
    with pytest.raises(InputError, match="3D"):
        read_nifti(four_d)
    squeezable = tmp_path / "sq.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4, 1), np.float32), np.eye(4)), squeezable)
    assert read_nifti(squeezable)[0].shape == (4, 4, 4)
