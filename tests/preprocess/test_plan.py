"""Plan round trip, the fingerprint rules and the intensity schemes, against hand computations."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from pydantic import ValidationError

from umit.data.plan import ChannelPlan, Plan
from umit.errors import InputError
from umit.ingest.catalog import Catalog, SeriesRecord
from umit.preprocess.fingerprint import compute_fingerprint, sample_case_ids, target_spacing_rule
from umit.preprocess.normalize import body_mask, normalize_channel
from umit.preprocess.plan import apply_overrides, plan_from_fingerprint


def _fingerprint(**extra) -> dict:
    return {
        "target_spacing": [0.8, 0.8, 2.5],
        "channels": [
            {
                "name": "CT",
                "modality": "CT",
                "p00_5": -900.0,
                "p99_5": 1200.0,
                "mean": 50.0,
                "std": 300.0,
            },
            {
                "name": "T1",
                "modality": "MR",
                "p00_5": 3.0,
                "p99_5": 900.0,
                "mean": 300.0,
                "std": 100.0,
            },
        ],
        "n_cases": 3,
        **extra,
    }


# -- plan ----------------------------------------------------------------------------------------


def test_plan_defaults_and_round_trip(tmp_path):
    plan = plan_from_fingerprint(
        _fingerprint(cases={"a": {}}), labels={"background": 0, "liver": 1}
    )
    ct, t1 = plan.channels
    assert (ct.scheme, ct.clip_low, ct.clip_high) == ("ct_window", -900.0, 1200.0)
    assert (t1.scheme, t1.clip_low) == ("mri_zscore", None)
    assert plan.image_dtype == "float16" and plan.chunk_size == 64 and plan.label_dtype == "uint8"
    assert "cases" not in plan.fingerprint  # per-case geometry stays in fingerprint.json
    path = plan.save(tmp_path / "plan.json")
    assert not list(tmp_path.glob(".tmp-*"))
    loaded = Plan.load(path)
    assert loaded == plan and loaded.processing_hash() == plan.processing_hash()
    assert Plan.load(tmp_path) == plan  # a PREP folder works too
    # every field documents itself; the dtype choice says why
    assert all(f.description for f in Plan.model_fields.values())
    assert "halves" in Plan.model_fields["image_dtype"].description


def test_plan_overrides():
    plan = plan_from_fingerprint(
        _fingerprint(),
        target_spacing=(1, 1, 1),
        ct_window=(-100, 200),
        scheme={"T1": "none"},
        image_dtype="float32",
        chunk_size=None,
    )
    assert (
        plan.target_spacing == (1.0, 1.0, 1.0)
        and plan.image_dtype == "float32"
        and plan.chunk_size == 64
    )
    assert (plan.channels[0].clip_low, plan.channels[0].clip_high) == (-100.0, 200.0)
    assert plan.channels[1].scheme == "none"
    zs = apply_overrides(plan, scheme={"CT": "ct_zscore"}, crop_foreground=False)
    assert (
        zs.channels[0].scheme == "ct_zscore"
        and zs.channels[0].mean == 50.0
        and not zs.crop_foreground
    )
    assert zs.differences(plan) == ["channels", "crop_foreground"]
    with pytest.raises(InputError, match="unknown scheme"):
        plan_from_fingerprint(_fingerprint(), scheme="hounsfield")
    with pytest.raises(InputError, match="unknown channels"):
        plan_from_fingerprint(_fingerprint(), scheme={"FLAIR": "none"})
    with pytest.raises(InputError, match="target_spacing"):
        plan_from_fingerprint(_fingerprint(), target_spacing=(1, 0, 1))


def test_plan_load_errors_name_the_file(tmp_path):
    with pytest.raises(InputError, match="not found"):
        Plan.load(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(InputError, match=r"bad\.json.*not valid JSON"):
        Plan.load(bad)
    data = plan_from_fingerprint(_fingerprint()).model_dump(mode="json")
    data["image_dtype"] = "int8"
    bad.write_text(json.dumps(data))
    with pytest.raises(InputError, match="image_dtype"):
        Plan.load(bad)


def test_channel_plan_validation():
    with pytest.raises(ValidationError, match="clip_low"):
        ChannelPlan(name="CT", modality="CT", scheme="ct_window")
    with pytest.raises(ValidationError, match="must be <"):
        ChannelPlan(name="CT", scheme="ct_window", clip_low=100, clip_high=-100)
    with pytest.raises(ValidationError, match="positive std"):
        ChannelPlan(name="CT", scheme="ct_zscore", clip_low=-1, clip_high=1, mean=0, std=0)


# -- fingerprint rules ---------------------------------------------------------------------------


def test_target_spacing_is_the_median_when_isotropic_enough():
    spacings = [[0.7, 0.7, 1.0], [0.8, 0.8, 1.5], [0.9, 0.9, 2.0]]
    assert target_spacing_rule(spacings) == ((0.8, 0.8, 1.5), None)


def test_target_spacing_uses_10th_percentile_for_a_thick_axis():
    z = np.array([5.0] * 8 + [2.5, 3.0])
    spacings = np.stack([np.full(10, 0.8), np.full(10, 0.8), z], axis=1)
    target, axis = target_spacing_rule(spacings)
    assert axis == 2 and target[:2] == (0.8, 0.8)
    assert target[2] == pytest.approx(np.percentile(z, 10)) and target[2] < 5.0
    # never finer than the coarsest other axis (nnU-Net's guard)
    spacings = np.array([[0.5, 1.6, 6.0]] * 7 + [[0.5, 1.6, 1.0]] * 3)
    target, axis = target_spacing_rule(spacings)
    assert axis == 2 and target == pytest.approx((0.5, 1.6, 1.6))


def test_case_sampling_is_deterministic_subset():
    ids = [f"c{i:03d}" for i in range(100)]
    a = sample_case_ids(ids, 10, seed=3)
    assert a == sample_case_ids(reversed(ids), 10, seed=3) and len(a) == 10 and set(a) <= set(ids)
    assert sample_case_ids(ids[:5], 10) == ids[:5]


def _raw_case(raw, cat, cid, arrays, affine, label=None, modalities=("CT",), names=None):
    names = names or [m for m in modalities]
    recs = []
    for c, arr in enumerate(arrays):
        rel = f"images/{cid}_{c:04d}.nii.gz"
        (raw / "images").mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(arr, affine), raw / rel)
        lab_rel = None
        if label is not None:
            lab_rel = f"labels/{cid}.nii.gz"
            (raw / "labels").mkdir(exist_ok=True)
            nib.save(nib.Nifti1Image(label, affine), raw / lab_rel)
        recs.append(
            SeriesRecord(
                series_id=f"{cid}-{c}", source_key=f"{cid}-{c}", case_id=cid, image_path=rel, label_path=lab_rel,
                source="test", source_format="nifti", shape=arr.shape, spacing=(1.0, 1.0, 1.0), orientation="RAS",
                channel=c, channel_name=names[c], modality=modalities[c],
            )
        )  # fmt: skip
    cat.add_series(recs)


def test_fingerprint_stats_and_ras_spacing(tmp_path):
    raw = tmp_path / "raw"
    # file axes are (S, R, A): spacings (3, 1, 2) in file order are (1, 2, 3) in RAS order
    aff = np.zeros((4, 4))
    aff[:3, :3] = [[0, 1, 0], [0, 0, 2], [3, 0, 0]]
    aff[3, 3] = 1
    rng = np.random.default_rng(0)
    fg_values = []
    with Catalog(raw / "catalog.db") as cat:
        for i in range(3):
            ct = np.full((6, 10, 8), -1000, np.int16)
            ct[1:5, 2:8, 2:6] = rng.integers(-50, 200, size=(4, 6, 4))
            label = np.zeros(ct.shape, np.uint8)
            label[2:4, 3:6, 3:5] = 1 + i % 2
            fg_values.append(ct[label > 0])
            _raw_case(raw, cat, f"c{i}", [ct], aff, label=label)
        mr = np.zeros((6, 10, 8), np.float32)
        mr[2:4, 2:9, 1:7] = 100 + rng.normal(0, 10, size=(2, 7, 6))
        _raw_case(raw, cat, "m0", [mr], aff, modalities=("CT",))
        cases = cat.cases()
    fp = compute_fingerprint(raw, cases, max_cases=0, voxels_per_case=10_000)
    assert fp["n_cases"] == 4 and fp["median_spacing"] == pytest.approx([1.0, 2.0, 3.0])
    assert fp["median_shape"] == [10, 8, 6]
    assert fp["label_values"] == [0, 1, 2]
    # foreground: label > 0 for the labeled cases, > -500 HU for the unlabeled "CT" one
    v = np.concatenate([*fg_values, mr[mr > -500]]).astype(np.float64)
    (st,) = fp["channels"]
    assert st["n_voxels"] == v.size
    assert st["mean"] == pytest.approx(v.mean(), rel=1e-5) and st["std"] == pytest.approx(
        v.std(), rel=1e-5
    )
    assert st["p00_5"] == pytest.approx(np.percentile(v, 0.5), rel=1e-5)
    assert st["p99_5"] == pytest.approx(np.percentile(v, 99.5), rel=1e-5)
    assert (
        compute_fingerprint(raw, cases, max_cases=0, voxels_per_case=10_000) == fp
    )  # deterministic


# -- normalization -------------------------------------------------------------------------------


def test_ct_window_maps_window_to_minus_one_one():
    ch = ChannelPlan(name="CT", modality="CT", scheme="ct_window", clip_low=-100, clip_high=300)
    x = np.array([-1000, -100, 0, 100, 300, 2000], np.int16)
    out, pad, _ = normalize_channel(x, ch)
    np.testing.assert_allclose(out, [-1, -1, -0.5, 0, 1, 1], atol=1e-6)
    assert pad == -1.0 and out.dtype == np.float32


def test_ct_zscore_is_nnunet_ct_normalization():
    ch = ChannelPlan(
        name="CT", modality="CT", scheme="ct_zscore", clip_low=-200, clip_high=400, mean=40, std=80
    )
    x = np.array([-1000, -200, 40, 120, 1000], np.float32)
    out, pad, _ = normalize_channel(x, ch)
    np.testing.assert_allclose(out, (np.clip(x, -200, 400) - 40) / 80, atol=1e-6)
    assert pad == pytest.approx((-200 - 40) / 80)


def test_mri_zscore_uses_per_volume_nonzero_stats_after_clipping():
    rng = np.random.default_rng(0)
    x = np.zeros((20, 20, 20), np.float32)
    x[5:15, 5:15, 5:15] = rng.gamma(4.0, 50.0, size=(10, 10, 10))
    ch = ChannelPlan(
        name="T1", modality="MR", scheme="mri_zscore", percentile_low=1, percentile_high=99
    )
    out, pad, stats = normalize_channel(x, ch)
    fg = x[x != 0].astype(np.float64)
    lo, hi = np.percentile(fg, [1, 99])
    c = np.clip(fg, lo, hi)
    np.testing.assert_allclose(out[x != 0], (c - c.mean()) / c.std(), atol=1e-4)
    assert pad == pytest.approx((lo - c.mean()) / c.std(), rel=1e-5)
    assert out[0, 0, 0] == pytest.approx(pad)
    assert stats["clip_low"] == pytest.approx(lo) and stats["mean"] == pytest.approx(
        c.mean(), rel=1e-6
    )


def test_body_mask_defaults():
    x = np.array([-1000, -600, -400, 0, 5])
    assert body_mask(x, "CT").tolist() == [False, False, True, True, True]
    assert body_mask(x, "MR").tolist() == [True, True, True, False, True]
    assert body_mask(x, "MR", threshold=0).tolist() == [False, False, False, False, True]
