"""Synthetic phantoms: determinism, anatomy, intensities, geometry, and the collection writer."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from umit.data.phantoms import (
    AGE_BANDS,
    CT_CONTRASTS,
    CT_LABELS,
    CT_SITES,
    MR_CONTRASTS,
    MR_LABELS,
    MR_SITES,
    SEXES,
    SubjectAttributes,
    brain_mask,
    make_ct_phantom,
    make_mr_phantom,
    sample_attributes,
    site_grid_shape,
    write_phantom_collection,
)
from umit.errors import InputError

CT_SHAPE = (40, 40, 32)
CT_HU_SHAPE = (64, 64, 40)  # big enough for the aorta to have voxels free of partial volume
MR_SHAPE = (40, 48, 40)


def ct_attrs(site="site_a", contrast="none", sex="F", age="40-59") -> SubjectAttributes:
    scanner = CT_SITES[site].scanners[0]
    return SubjectAttributes(sex, age, site, scanner.manufacturer, scanner.model, contrast)


def mr_attrs(site="site_a", contrast="none", sex="F", age="40-59") -> SubjectAttributes:
    scanner = MR_SITES[site].scanners[0]
    return SubjectAttributes(sex, age, site, scanner.manufacturer, scanner.model, contrast)


def world(ph, mask: np.ndarray) -> np.ndarray:
    """RAS world coordinates (N, 3) of the voxels in ``mask``."""
    idx = np.argwhere(mask).astype(np.float64)
    return idx @ ph.meta.affine[:3, :3].T + ph.meta.affine[:3, 3]


def interior(mask: np.ndarray) -> np.ndarray:
    """The mask eroded by one voxel (the mask itself if erosion would empty it)."""
    eroded = ndimage.binary_erosion(mask)
    return eroded if eroded.any() else mask


# ---------------------------------------------------------------------------------------------
# Determinism and attributes


@pytest.mark.parametrize("make, shape", [(make_ct_phantom, CT_SHAPE), (make_mr_phantom, MR_SHAPE)])
def test_same_seed_is_bit_identical_and_seeds_differ(make, shape):
    a, b, c = make(7, shape), make(7, shape), make(8, shape)
    assert a.meta.channel_names == tuple(a.images)
    for name in a.images:
        assert a.images[name].tobytes() == b.images[name].tobytes()
    assert np.array_equal(a.label, b.label)
    assert np.array_equal(a.meta.affine, b.meta.affine)
    assert a.attributes == b.attributes
    same_grid = a.label.shape == c.label.shape
    assert not same_grid or not np.array_equal(a.label, c.label)
    assert a.meta.source.endswith(":7") and a.meta.extra == a.attributes.to_dict()


def test_one_seed_gives_the_same_anatomy_at_every_site():
    # The field of view is fixed in mm, so organ volumes in mm^3 agree across spacings.
    volumes = {}
    for site in CT_SITES:
        ph = make_ct_phantom(4, CT_SHAPE, ct_attrs(site))
        voxel = float(np.prod(ph.meta.spacing))
        volumes[site] = np.array([(ph.label == k).sum() * voxel for k in (1, 3, 4, 5, 8)])
        assert ph.label.shape == site_grid_shape(CT_SHAPE, "ct", site)
    ref = volumes["site_a"]
    for site, vol in volumes.items():
        np.testing.assert_allclose(vol, ref, rtol=0.2, err_msg=site)


def test_sample_attributes_valid_and_sites_differ():
    rng = np.random.default_rng(0)
    draws = [sample_attributes(rng, "ct") for _ in range(3000)]
    assert {d.sex for d in draws} <= set(SEXES)
    assert {d.age_band for d in draws} <= set(AGE_BANDS)
    assert {d.contrast for d in draws} == set(CT_CONTRASTS)
    assert {d.site for d in draws} == set(CT_SITES)

    def frac(site, pred):
        sub = [d for d in draws if d.site == site]
        return sum(map(pred, sub)) / len(sub)

    # Populations and protocols differ by site (what subgroup analyses should find).
    assert frac("site_b", lambda d: d.sex == "M") > frac("site_c", lambda d: d.sex == "M") + 0.15
    assert frac("site_a", lambda d: d.age_band == "60-79") > 0.35
    assert frac("site_b", lambda d: d.age_band == "18-39") > 0.3
    assert frac("site_a", lambda d: d.contrast == "portal") > 0.6
    assert frac("site_c", lambda d: d.contrast == "none") > 0.5
    mr = [sample_attributes(rng, "MR") for _ in range(200)]
    assert {d.contrast for d in mr} == set(MR_CONTRASTS)


# ---------------------------------------------------------------------------------------------
# CT


def test_ct_labels_complete_with_plausible_volume_fractions():
    windows = {  # fraction of the body (labels > 0)
        2: (0.02, 0.12),
        3: (0.02, 0.12),
        4: (0.04, 0.16),
        5: (0.002, 0.02),
        6: (0.002, 0.015),
        7: (0.002, 0.015),
        8: (0.008, 0.04),
        9: (0.002, 0.025),
    }
    for seed in range(4):
        ph = make_ct_phantom(seed, CT_SHAPE)
        assert ph.label.dtype == np.uint8 and ph.images["CT"].dtype == np.int16
        assert ph.label_names == CT_LABELS
        assert set(np.unique(ph.label)) == set(CT_LABELS)
        body = (ph.label > 0).sum()
        assert 0.25 < body / ph.label.size < 0.6
        for k, (lo, hi) in windows.items():
            fraction = (ph.label == k).sum() / body
            assert lo < fraction < hi, (seed, CT_LABELS[k], fraction)


def test_ct_hu_per_organ_measured():
    windows = {  # mean HU inside each label (eroded by one voxel), no contrast
        0: (-1030, -820),  # air, and the patient table where the site keeps it
        1: (-120, 40),
        2: (-900, -600),
        3: (-900, -600),
        4: (30, 90),
        5: (25, 75),
        6: (15, 60),
        7: (15, 60),
        8: (150, 500),
        9: (5, 80),  # small: partial volume with the surrounding fat
    }
    for site in CT_SITES:
        for sex, age in (("F", "80+"), ("M", "18-39")):
            ph = make_ct_phantom(1, CT_HU_SHAPE, ct_attrs(site, "none", sex, age))
            ct = ph.images["CT"].astype(np.float64)
            assert ct.min() >= -1024
            for k, (lo, hi) in windows.items():
                mean = ct[interior(ph.label == k)].mean()
                assert lo < mean < hi, (site, sex, age, CT_LABELS[k], mean)
            if not CT_SITES[site].table:
                air = ndimage.binary_erosion(ph.label == 0, iterations=3)
                assert -1010 < ct[air].mean() < -988


def test_contrast_phases_enhance_vessels_liver_and_kidneys():
    mean = {}
    for contrast in CT_CONTRASTS:
        ph = make_ct_phantom(2, CT_HU_SHAPE, ct_attrs("site_c", contrast))
        ct = ph.images["CT"].astype(np.float64)
        mean[contrast] = {k: ct[interior(ph.label == k)].mean() for k in (4, 6, 9)}
    assert mean["arterial"][9] > mean["none"][9] + 150  # aorta ~ +250..350 HU
    assert mean["arterial"][9] > mean["portal"][9] + 50
    assert mean["portal"][9] > mean["none"][9] + 60
    assert 95 < mean["portal"][4] < 140 and mean["portal"][4] > mean["none"][4] + 35
    assert mean["arterial"][6] > mean["none"][6] + 50


def test_ct_noise_level_differs_by_site_as_specified():
    stds = {}
    for site, proto in CT_SITES.items():
        ph = make_ct_phantom(5, (64, 64, 32), ct_attrs(site))
        liver = ndimage.binary_erosion(ph.label == 4, iterations=2)
        stds[site] = ph.images["CT"][liver].astype(np.float64).std()
        assert stds[site] == pytest.approx(proto.noise, rel=0.3), site
    assert stds["site_b"] > stds["site_a"] > stds["site_c"]


@pytest.mark.parametrize("site", sorted(CT_SITES))
def test_ct_liver_on_patient_right_whatever_the_stored_orientation(site):
    # nibabel RAS+: world x increases towards the patient's Right. The liver is on the right,
    # the spleen on the left, so liver x > spleen x; the lungs are above the kidneys.
    proto = CT_SITES[site]
    for seed in range(3):
        ph = make_ct_phantom(seed, CT_SHAPE, ct_attrs(site))
        assert ph.meta.orientation == proto.orientation
        axes = np.abs(nib.orientations.io_orientation(ph.meta.affine)[:, 0]).astype(int)
        assert np.allclose(ph.meta.spacing, np.asarray(proto.spacing)[axes])
        liver, spleen = world(ph, ph.label == 4).mean(0), world(ph, ph.label == 5).mean(0)
        assert liver[0] > spleen[0] + 10
        assert world(ph, ph.label == 3).mean(0)[0] > world(ph, ph.label == 2).mean(0)[0]
        assert world(ph, ph.label == 7).mean(0)[0] > world(ph, ph.label == 6).mean(0)[0]
        lungs = world(ph, (ph.label == 2) | (ph.label == 3)).mean(0)
        kidneys = world(ph, (ph.label == 6) | (ph.label == 7)).mean(0)
        assert lungs[2] > kidneys[2] + 10
        # The spine is posterior to the aorta (anterior = +y).
        assert world(ph, ph.label == 9).mean(0)[1] > world(ph, ph.label == 8).mean(0)[1]


def test_default_ct_phantom_is_fast_enough():
    import time

    start = time.perf_counter()
    ph = make_ct_phantom(0)
    assert time.perf_counter() - start < 1.0
    assert 0.3e6 < ph.label.size < 1.2e6


# ---------------------------------------------------------------------------------------------
# MR


def _lesion_seed(site: str = "site_a") -> int:
    for seed in range(30):
        if (make_mr_phantom(seed, (32, 32, 32), mr_attrs(site)).label == 5).any():
            return seed
    raise AssertionError("no lesion in 30 seeds")


def test_mr_labels_and_tissue_contrasts_measured():
    seed = _lesion_seed()
    for site in MR_SITES:
        ph = make_mr_phantom(seed, MR_SHAPE, mr_attrs(site))
        assert ph.label_names == MR_LABELS
        assert set(np.unique(ph.label)) == set(MR_LABELS)
        assert all(img.dtype == np.float32 and img.min() >= 0 for img in ph.images.values())
        m = {
            seq: {k: img[interior(ph.label == k)].mean() for k in range(2, 6)}
            for seq, img in ph.images.items()
        }
        csf, gm, wm, lesion = 2, 3, 4, 5
        assert m["T1"][wm] > 1.2 * m["T1"][gm] > 1.2 * m["T1"][csf], site
        assert m["T2"][csf] > max(m["T2"][gm], m["T2"][wm], m["T2"][lesion]), site
        assert m["FLAIR"][csf] < 0.5 * min(m["FLAIR"][gm], m["FLAIR"][wm]), site
        assert m["T2"][lesion] > m["T2"][wm] and m["FLAIR"][lesion] > m["FLAIR"][gm], site


def test_mr_gadolinium_enhances_lesion_on_t1_only():
    seed = _lesion_seed()
    plain = make_mr_phantom(seed, MR_SHAPE, mr_attrs(contrast="none"))
    gad = make_mr_phantom(seed, MR_SHAPE, mr_attrs(contrast="gadolinium"))
    lesion = plain.label == 5
    assert np.array_equal(plain.label, gad.label)
    assert gad.images["T1"][lesion].mean() > 1.3 * plain.images["T1"][lesion].mean()
    assert gad.images["T2"][lesion].mean() == pytest.approx(plain.images["T2"][lesion].mean())


def test_mr_brain_mask_inside_head_and_anatomy_oriented():
    for site, proto in MR_SITES.items():
        ph = make_mr_phantom(3, MR_SHAPE, mr_attrs(site))
        assert ph.meta.orientation == proto.orientation
        assert ph.label.shape == site_grid_shape(MR_SHAPE, "mr", site)
        brain = brain_mask(ph.label)
        assert brain.any() and np.array_equal(brain, np.isin(ph.label, (2, 3, 4, 5)))
        # Every brain voxel is enclosed: no brain voxel touches the background.
        grown = ndimage.binary_dilation(brain)
        assert not (grown & (ph.label == 0)).any()
        b, head = world(ph, brain), world(ph, ph.label == 1)
        centre = b.mean(0)
        assert centre[2] > head[:, 2].mean() + 3  # neck and face below the brain (+z superior)
        # The face (nose, lips) makes the head reach further anteriorly (+y) than posteriorly.
        assert head[:, 1].max() - centre[1] > centre[1] - head[:, 1].min() + 1


def test_mr_noise_and_scanner_differ_by_site():
    ratios = {}
    for site in MR_SITES:
        ph = make_mr_phantom(3, MR_SHAPE, mr_attrs(site))
        t1 = ph.images["T1"]
        far = ndimage.binary_erosion(ph.label == 0, iterations=3)
        ratios[site] = t1[far].mean() / t1[interior(ph.label == 4)].mean()
    assert ratios["site_b"] > ratios["site_c"] > ratios["site_a"]


# ---------------------------------------------------------------------------------------------
# Argument checks


def test_bad_arguments_raise_value_errors_naming_the_value():
    with pytest.raises(ValueError, match="-1"):
        make_ct_phantom(-1)
    with pytest.raises(ValueError, match=r"\(8, 32, 32\)"):
        make_ct_phantom(0, shape=(8, 32, 32))
    with pytest.raises(ValueError, match="shape"):
        make_mr_phantom(0, shape=(32, 32))
    with pytest.raises(ValueError, match="site_x"):
        make_ct_phantom(0, CT_SHAPE, SubjectAttributes("F", "18-39", "site_x", "a", "b"))
    with pytest.raises(ValueError, match="gadolinium"):
        make_ct_phantom(0, CT_SHAPE, ct_attrs(contrast="gadolinium"))
    with pytest.raises(ValueError, match="'X'"):
        SubjectAttributes("X", "18-39", "site_a", "a", "b")
    with pytest.raises(ValueError, match="pet"):
        sample_attributes(np.random.default_rng(0), "pet")
    for kwargs, bad in [
        ({"n": 0}, "0"),
        ({"n": 2, "modality": "pet"}, "pet"),
        ({"n": 2, "shape": (16, 16, 4)}, r"\(16, 16, 4\)"),
        ({"n": 2, "n_test": -1}, "-1"),
        ({"n": 2, "workers": 0}, "workers"),
        ({"n": 2, "seed": -3}, "-3"),
    ]:
        with pytest.raises(ValueError, match=bad):
            write_phantom_collection("/nonexistent/never-written", **kwargs)
    assert not Path("/nonexistent/never-written").exists()


# ---------------------------------------------------------------------------------------------
# Collections on disk


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_ct_collection_layout_geometry_and_resume(tmp_path):
    shape = (32, 32, 32)
    root = write_phantom_collection(
        tmp_path / "ct", n=3, modality="ct", seed=1, shape=shape, n_test=1
    )
    ds = json.loads((root / "dataset.json").read_text())
    assert ds["channel_names"] == {"0": "CT"} and ds["file_ending"] == ".nii.gz"
    assert ds["labels"] == {name: k for k, name in CT_LABELS.items()}
    assert ds["numTraining"] == 3 == len(ds["training"]) and len(ds["test"]) == 1
    assert ds["training"][1] == {
        "image": ["./imagesTr/phantom_ct_0001_0000.nii.gz"],
        "label": "./labelsTr/phantom_ct_0001.nii.gz",
    }
    assert ds["test"][0] == {
        "image": ["./imagesTs/phantom_ct_test_0000_0000.nii.gz"],
        "label": "./labelsTs/phantom_ct_test_0000.nii.gz",
    }
    assert (root / "labelsTs" / "phantom_ct_test_0000.nii.gz").is_file()

    rows = _read_csv(root / "attributes.csv")
    assert list(rows[0]) == [
        "case_id",
        "sex",
        "age_band",
        "site",
        "manufacturer",
        "model",
        "contrast",
    ]
    assert [r["case_id"] for r in rows] == [
        "phantom_ct_0000",
        "phantom_ct_0001",
        "phantom_ct_0002",
        "phantom_ct_test_0000",
    ]
    for entry, row in zip(ds["training"], rows, strict=False):
        case_seed = ds["phantom"]["case_seeds"][row["case_id"]]
        ph = make_ct_phantom(case_seed, shape)
        assert row == {"case_id": row["case_id"], **ph.attributes.to_dict()}
        img = nib.load(root / entry["image"][0])
        lab = nib.load(root / entry["label"])
        for loaded, expected in ((img, ph.images["CT"]), (lab, ph.label)):
            assert np.allclose(loaded.affine, ph.meta.affine)
            hdr = loaded.header
            assert int(hdr["sform_code"]) == 1 and int(hdr["qform_code"]) == 1
            assert np.allclose(hdr.get_qform(), ph.meta.affine, atol=1e-4)
            assert hdr["descrip"].tobytes().strip(b"\x00") == b""
            assert loaded.get_data_dtype() == expected.dtype
            assert np.array_equal(np.asanyarray(loaded.dataobj), expected)
    assert not list(root.rglob(".tmp-*"))

    # Resume: nothing is rewritten; a missing file is regenerated identically.
    label_path = root / ds["training"][2]["label"]
    mtime = (root / ds["training"][0]["label"]).stat().st_mtime_ns
    label_path.unlink()
    (root / "labelsTr" / ".tmp-dead-phantom_ct_0002.nii.gz").write_bytes(b"half")
    write_phantom_collection(root, n=3, modality="ct", seed=1, shape=shape, n_test=1)
    assert (root / ds["training"][0]["label"]).stat().st_mtime_ns == mtime
    expected = make_ct_phantom(ds["phantom"]["case_seeds"]["phantom_ct_0002"], shape).label
    assert np.array_equal(np.asanyarray(nib.load(label_path).dataobj), expected)
    assert not list(root.rglob(".tmp-*"))
    with pytest.raises(InputError, match="seed"):
        write_phantom_collection(root, n=3, modality="ct", seed=2, shape=shape)


def test_collection_seeds_do_not_share_subjects():
    from umit.data.phantoms.collection import _case_seed

    a = {_case_seed(0, "train", i) for i in range(50)}
    b = {_case_seed(1, "train", i) for i in range(50)}
    t = {_case_seed(0, "test", i) for i in range(50)}
    assert not a & b and not a & t


@pytest.mark.multiproc
def test_mr_collection_with_workers_matches_direct_generation(tmp_path):
    shape = (32, 32, 32)
    root = write_phantom_collection(tmp_path / "mr", n=2, modality="mr", shape=shape, workers=2)
    ds = json.loads((root / "dataset.json").read_text())
    assert ds["channel_names"] == {"0": "T1", "1": "T2", "2": "FLAIR"}
    assert ds["labels"]["white_matter"] == 4
    for entry in ds["training"]:
        case_id = Path(entry["label"]).name.removesuffix(".nii.gz")
        ph = make_mr_phantom(ds["phantom"]["case_seeds"][case_id], shape)
        assert len(entry["image"]) == 3
        for rel, name in zip(entry["image"], ph.meta.channel_names, strict=True):
            loaded = nib.load(root / rel)
            assert np.allclose(loaded.affine, ph.meta.affine)
            assert np.array_equal(np.asanyarray(loaded.dataobj), ph.images[name])  # lossless
        assert np.array_equal(np.asanyarray(nib.load(root / entry["label"]).dataobj), ph.label)
    assert len(_read_csv(root / "attributes.csv")) == 2
