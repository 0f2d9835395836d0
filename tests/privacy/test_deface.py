"""Defacing: the brain is never touched, the face is removed, the surface loses its relief.

Phantom heads carry the truth: labels give the brain (``brain_mask``), and the phantom's tissue
map (rebuilt here from its seed) gives the nose and lips. Phantoms are made at twice the default
field of view (160 x 192 x 160 mm) so that a 5 mm margin is to scale for a head.
"""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from umit.cli.main import main as cli_main
from umit.data import phantoms as P
from umit.data.io import read_image, reorient, write_image
from umit.data.meta import ImageMeta
from umit.data.phantoms._common import _streams
from umit.data.phantoms.mr import _T_NOSE, _mr_anatomy, _paint_mr
from umit.data.phantoms.scanner import _Grid, _ras_grid_shape, _to_storage
from umit.errors import InputError
from umit.ingest.read import read_volume
from umit.privacy.deface import deface, deface_file

from _shared import require_shared

SHAPE = (160, 192, 160)


def _tissue(ph: P.Phantom, seed: int) -> np.ndarray:
    """The phantom's tissue-class map on its stored grid (nose/lips, eyes are classes there)."""
    proto = P.MR_SITES[ph.attributes.site]
    _, rng_anat, _ = _streams(seed, "mr")
    p = _mr_anatomy(rng_anat, ph.attributes)
    s = float(min(np.asarray(SHAPE) * np.asarray(P.MR_REFERENCE_SPACING))) / 2
    g = _Grid(_ras_grid_shape(SHAPE, "mr", proto), proto.spacing, (s, s, s))
    tissue = _paint_mr(g, p)
    _, stored, affine = _to_storage({}, tissue, g.affine(proto.world_center), proto.orientation)
    assert np.allclose(affine, ph.meta.affine)
    return stored


def _phantom(seed: int, site: str) -> tuple[P.Phantom, np.ndarray]:
    attrs = P.SubjectAttributes("F", "18-39", site, "x", "y")
    ph = P.make_mr_phantom(seed, SHAPE, attrs)
    return ph, _tissue(ph, seed)


@pytest.fixture(scope="module", params=[(0, "site_a"), (3, "site_b")], ids=["RAS", "LPS"])
def defaced_phantom(request):
    seed, site = request.param
    ph, tissue = _phantom(seed, site)
    img = ph.images["T1"]
    brain = P.brain_mask(ph.label)
    result = deface(img, ph.meta, brain_mask=brain)
    return ph, tissue, img, brain, result


def test_phantom_brain_bit_identical(defaced_phantom):
    _, _, img, brain, result = defaced_phantom
    assert result.image.dtype == img.dtype
    assert np.array_equal(result.image[brain], img[brain])
    assert result.report["brain_voxels_altered"] == 0
    assert not (result.removed & brain).any()


def test_phantom_face_removed(defaced_phantom):
    _, tissue, img, _, result = defaced_phantom
    # Measured on 18 phantoms (seeds 0-5 x 3 sites): 0.92-1.00 of nose + lip voxels removed.
    features = tissue == _T_NOSE
    assert result.removed[features].mean() >= 0.9
    assert np.all(result.image[result.removed] == result.fill_value)
    assert 0.05 < result.report["removed_head_fraction"] < 0.2  # the face, not half the head


def test_phantom_depth_map_flattened(defaced_phantom):
    dc = defaced_phantom[4].report["depth_check"]
    tip = dc["strongest_feature"]
    assert tip["protrusion_before_mm"] >= 8.0  # the nose stands out before
    assert tip["protrusion_after_mm"] <= 3.0
    assert tip["surface_moved_back_mm"] >= 20.0
    assert dc["relief_retained_fraction"] < 0.2  # measured 0.05-0.06
    assert dc["after"]["relief_rms_mm"] < 0.5 * dc["before"]["relief_rms_mm"]


def test_orientation_invariance():
    """The same head stored RAS and LPS (and permuted PIR) loses the same world-space voxels."""
    ph, _ = _phantom(1, "site_a")
    img, meta = ph.images["T1"], ph.meta
    brain = P.brain_mask(ph.label).astype(np.uint8)
    ref = deface(img, meta, brain_mask=brain, check=False).removed
    for code in ("LPS", "PIR"):
        img2, meta2 = reorient(img, meta, code)
        brain2, _ = reorient(brain, meta, code)
        removed2 = deface(img2, meta2, brain_mask=brain2, check=False).removed
        back, meta_back = reorient(removed2.astype(np.uint8), meta2, "RAS")
        assert np.allclose(meta_back.affine, meta.affine)
        dice = 2 * (ref & (back > 0)).sum() / (ref.sum() + (back > 0).sum())
        assert dice > 0.999, (code, dice)


def test_ct_head_brain_untouched():
    """A CT head (phantom tissues mapped to HU), brain estimated by HU window inside bone."""
    ph, tissue = _phantom(2, "site_a")
    hu = np.array([-1000, -60, 1200, 8, 40, 28, 35, 20, 45, 30, 45, 10, -20], dtype=np.float32)
    rng = np.random.default_rng(0)
    ct = (hu[tissue] + rng.normal(0.0, 8.0, tissue.shape)).astype(np.int16)
    meta = ImageMeta(ph.meta.affine, source="ct_head", modality="CT")
    result = deface(ct, meta, check=False)
    brain = P.brain_mask(ph.label)
    assert np.array_equal(result.image[brain], ct[brain])
    assert result.fill_value < -900  # air
    # The estimated CT brain is generous (1.1-1.3 x the true one): only 0.6-0.7 of the nose goes.
    assert result.removed[tissue == _T_NOSE].mean() > 0.5


@pytest.mark.parametrize("seed, site", [(1, "site_a"), (4, "site_b")])
def test_estimated_brain_mask_spares_true_brain(seed, site):
    """With the brain estimated from T1 intensities, the labelled brain is still untouched.

    Measured over seeds 0-5 x 3 sites: 14/18 defaced with 0 labelled-brain voxels altered and
    0.92-1.00 of the nose removed; 4/18 refused (below).
    """
    ph, tissue = _phantom(seed, site)
    img = ph.images["T1"]
    result = deface(img, ph.meta, check=False)
    assert result.report["brain_mask"] == "estimated"
    assert np.array_equal(result.image[result.brain], img[result.brain])
    brain = P.brain_mask(ph.label)
    assert np.array_equal(result.image[brain], img[brain])
    assert result.removed[tissue == _T_NOSE].mean() >= 0.9


def test_implausible_brain_estimate_refused():
    """When the heuristic finds no brain under the vertex it refuses instead of cutting."""
    ph, _ = _phantom(2, "site_a")
    with pytest.raises(InputError, match="implausible brain estimate.*--brain-mask"):
        deface(ph.images["T1"], ph.meta, check=False)


# --------------------------------------------------------------------------------------------
# Bad inputs


def _write(path, array, affine=None):
    write_image(path, array, ImageMeta(np.eye(4) if affine is None else affine))
    return path


def test_2d_image_rejected(tmp_path):
    path = tmp_path / "slice.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((64, 64), np.int16), np.eye(4)), str(path))
    with pytest.raises(InputError, match="slice.nii.gz") as info:
        deface_file(path, tmp_path / "out")
    assert "2D" in str(info.value)


def test_empty_volume_rejected(tmp_path):
    path = _write(tmp_path / "zeros.nii.gz", np.zeros((40, 40, 40), np.int16))
    with pytest.raises(InputError, match="zeros.nii.gz.*empty"):
        deface_file(path, tmp_path / "out")


def test_brain_mask_on_another_grid_rejected(tmp_path):
    img = _write(tmp_path / "img.nii.gz", np.ones((40, 40, 40), np.int16))
    small = _write(tmp_path / "small_mask.nii.gz", np.ones((20, 40, 40), np.uint8))
    with pytest.raises(InputError, match="small_mask.nii.gz.*shape"):
        deface_file(img, tmp_path / "out", brain_mask=small)
    shifted = _write(
        tmp_path / "shifted_mask.nii.gz", np.ones((40, 40, 40), np.uint8), np.diag([2, 2, 2, 1])
    )
    with pytest.raises(InputError, match="shifted_mask.nii.gz.*geometry"):
        deface_file(img, tmp_path / "out", brain_mask=shifted)


def test_no_head_rejected(tmp_path):
    """A uniform ball with noise: no scalp or skull around any 'brain'."""
    g = np.mgrid[:60, :60, :60] - 29.5
    ball = (np.sqrt((g**2).sum(0)) < 25) * 500.0
    noisy = ball + np.random.default_rng(0).normal(0, 5, ball.shape)
    path = _write(tmp_path / "ball.nii.gz", np.abs(noisy).astype(np.int16))
    with pytest.raises(InputError, match="ball.nii.gz"):
        deface_file(path, tmp_path / "out", modality="MR")
    torso = P.make_ct_phantom(0, (48, 48, 32))
    path = _write(tmp_path / "torso.nii.gz", torso.images["CT"], torso.meta.affine)
    with pytest.raises(InputError, match="torso.nii.gz"):
        deface_file(path, tmp_path / "out", modality="CT")


def test_cli_batch_records_failures(tmp_path):
    ph, _ = _phantom(0, "site_a")
    src = tmp_path / "in"
    _write(src / "head.nii.gz", ph.images["T1"].astype(np.int16), ph.meta.affine)
    _write(src / "mask_head.nii.gz", P.brain_mask(ph.label).astype(np.uint8), ph.meta.affine)
    _write(src / "zeros.nii.gz", np.zeros((20, 20, 20), np.int16))
    out = tmp_path / "out"
    # A brain mask fits one volume only: refused for a folder of three.
    assert cli_main(["deface", str(src), "--out", str(out), "--brain-mask", "x.nii.gz"]) == 2
    rc = cli_main(
        [
            "deface",
            str(src / "head.nii.gz"),
            "--out",
            str(out),
            "--brain-mask",
            str(src / "mask_head.nii.gz"),
            "--save-brain-mask",
        ]
    )
    assert rc == 0
    defaced, meta = read_image(out / "head_defaced.nii.gz")
    assert np.allclose(meta.affine, ph.meta.affine, atol=1e-4)
    rc = cli_main(["deface", str(src), "--out", str(out / "batch"), "png=false"])
    assert rc == 1  # zeros.nii.gz (and the mask file, which is no head) failed
    summary = json.loads((out / "batch" / "deface_summary.json").read_text())
    failed = {f["input"].rsplit("/", 1)[-1] for f in summary["failed"]}
    assert "zeros.nii.gz" in failed
    assert [d["input"].rsplit("/", 1)[-1] for d in summary["defaced"]] == ["head.nii.gz"]
    assert not list((out / "batch").glob(".tmp-*"))


# --------------------------------------------------------------------------------------------
# The real head MR (oblique sagittal MPRAGE DICOM of a child, face present)


@pytest.fixture(scope="module")
def real_mr(tmp_path_factory):
    folder = require_shared("head_mr_dicom_sag_anon")
    out = tmp_path_factory.mktemp("deface_real")
    report = deface_file(folder, out, save_brain_mask=True)
    return folder, out, report


@pytest.mark.realdata
def test_real_mr_brain_unchanged(real_mr):
    folder, out, report = real_mr
    original, meta = read_volume(folder)
    defaced, meta_out = read_image(out / "head_mr_dicom_sag_anon_defaced.nii.gz")
    brain, _ = read_image(out / "head_mr_dicom_sag_anon_brain_mask.nii.gz")
    removed, _ = read_image(out / "head_mr_dicom_sag_anon_face_mask.nii.gz")
    assert np.allclose(meta_out.affine, meta.affine, atol=1e-4)
    assert defaced.dtype == original.dtype
    brain = brain > 0
    assert report["brain_voxels_altered"] == 0
    assert np.array_equal(defaced[brain], original[brain])
    assert not ((defaced != original) & ~(removed > 0)).any()  # only the mask changed
    # A child's intracranial volume, generously estimated (tissue + 4 mm CSF allowance): 1.8 L.
    assert 900 < report["brain_volume_ml"] < 2200


@pytest.mark.realdata
def test_real_mr_face_removed(real_mr):
    _, out, report = real_mr
    removed, meta = read_image(out / "head_mr_dicom_sag_anon_face_mask.nii.gz")
    brain, _ = read_image(out / "head_mr_dicom_sag_anon_brain_mask.nii.gz")
    # Measured: 7.7% of the head (239 mL) removed.
    assert report["removed_head_fraction"] > 0.05
    assert report["removed_head_volume_ml"] > 150
    ijk = np.argwhere(removed > 0)
    world = ijk @ meta.affine[:3, :3].T + meta.affine[:3, 3]
    b = np.argwhere(brain > 0) @ meta.affine[:3, :3].T + meta.affine[:3, 3]
    # Anterior (+y) and inferior (-z) of the brain's centre in RAS mm.
    assert world[:, 1].mean() > b[:, 1].mean() + 30
    assert world[:, 2].mean() < b[:, 2].mean() - 30


@pytest.mark.realdata
def test_real_mr_depth_map_flattened(real_mr):
    _, out, report = real_mr
    dc = report["depth_check"]
    tip = dc["strongest_feature"]  # the nose tip on this scan
    assert tip["protrusion_before_mm"] >= 10.0  # measured 14 mm
    assert tip["protrusion_after_mm"] <= 3.0  # measured 0
    assert tip["surface_moved_back_mm"] >= 30.0  # measured 51 mm
    assert dc["relief_retained_fraction"] < 0.2  # measured 0.01
    assert (out / "head_mr_dicom_sag_anon_depth.png").stat().st_size > 10_000
    saved = json.loads((out / "head_mr_dicom_sag_anon_deface.json").read_text())
    assert saved["brain_voxels_altered"] == 0
