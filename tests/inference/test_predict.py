"""``umit predict``: the saved plan is applied exactly as ``umit preprocess`` does, and masks come
back on the input's own grid (voxel for voxel), for NIfTI, NRRD and DICOM inputs."""

from __future__ import annotations

import json
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import ndimage
from torch import nn

from umit.cli.main import main as cli
from umit.data.io import read_image, write_image
from umit.data.meta import ImageMeta
from umit.data.plan import ChannelPlan, Plan
from umit.data.store import Store
from umit.errors import InputError
from umit.finetune.run import FinetuneConfig, save_model
from umit.inference.predict import PredictConfig, find_inputs, run
from umit.inference.segment import predict_case_classification
from umit.ingest.dicomweb import parse_series_url
from umit.ingest.read import read_volume
from umit.models import create_model
from umit.preprocess.normalize import normalize_channel
from umit.preprocess.resample import reorient_to_ras, restore_original, spacing_of

from _orthanc import free_port
from _shared import require_shared

BONE_HU = 150.0


class ThresholdSegmenter(nn.Module):
    """Two-class 'model' whose argmax is ``normalized intensity > threshold``: its prediction on
    the input grid is known exactly, so any flip, shift or resampling error shows."""

    def __init__(self, threshold: float = 0.0, in_chans: int = 1):
        super().__init__()
        self.threshold = nn.Parameter(torch.tensor(float(threshold)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = x[:, :1] - self.threshold  # (B, 1, X, Y, Z)
        return torch.cat([-d, d], dim=1)  # (B, 2, X, Y, Z): class 1 above the threshold


def predict_test_threshold(**kwargs) -> ThresholdSegmenter:
    return ThresholdSegmenter(**kwargs)


@pytest.fixture(autouse=True)
def _stand_in_models(register_models):
    register_models(predict_test_threshold)


def ct_plan(spacing: tuple[float, float, float], crop: bool = True) -> Plan:
    return Plan(
        target_spacing=spacing,
        channels=[
            ChannelPlan(
                name="image", modality="CT", scheme="ct_window", clip_low=-1000, clip_high=1000
            )
        ],
        crop_foreground=crop,
        crop_margin_mm=3.0,
    )


def save_threshold_model(path: Path, plan: Plan, hu: float = BONE_HU, roi=(32, 32, 32)) -> Path:
    t = float(normalize_channel(np.full((1, 1, 1), hu, np.float32), plan.channels[0])[0].item())
    model = create_model("predict_test_threshold", threshold=t)
    cfg = FinetuneConfig(data=path.parent, crop_size=roi, sw_overlap=0.25)
    return save_model(model, path, plan=plan, cfg=cfg, extra={"label_names": {"bone": 1}})


def synthetic_ct(shape=(30, 26, 20)) -> np.ndarray:
    """Air, an off-centre body box of soft tissue, and asymmetric 'bones' far from the threshold."""
    rng = np.random.default_rng(0)
    vol = np.full(shape, -1000, np.int16)
    vol[4:25, 3:22, 2:18] = 40
    vol[6:10, 5:8, 4:15] = 700
    vol[15:22, 12:20, 10:12] = 900
    vol[4:25, 3:22, 2:18] += rng.integers(-30, 30, size=(21, 19, 16), dtype=np.int16)
    return vol


# An LPS-stored, axis-permuted, anisotropic grid: i -> -y (P), j -> +z (S), k -> -x (L).
PERMUTED_AFFINE = np.array(
    [[0.0, 0.0, -2.5, 40.0], [-1.2, 0.0, 0.0, 12.0], [0.0, 1.5, 0.0, -30.0], [0, 0, 0, 1.0]]
)


def test_mask_is_exact_on_a_permuted_lps_grid_without_resampling(tmp_path):
    vol = synthetic_ct()
    src = write_image(tmp_path / "ct.nii.gz", vol, ImageMeta(affine=PERMUTED_AFFINE))
    _, ras_affine = reorient_to_ras(vol.astype(np.float32), PERMUTED_AFFINE)
    plan = ct_plan(spacing_of(ras_affine))  # the input's RAS spacing: no resampling
    model = save_threshold_model(tmp_path / "best.pt", plan)
    s = run(PredictConfig(inputs=src, model=model, out=tmp_path / "out"))
    assert not s["failures"] and s["task"] == "segmentation"
    out = nib.load(s["outputs"][0]["mask"])
    assert out.shape == vol.shape
    np.testing.assert_allclose(out.affine, nib.load(src).affine, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(out.dataobj), (vol > BONE_HU).astype(np.uint8))


def test_mask_overlays_the_input_after_resampling(tmp_path):
    vol = synthetic_ct()
    src = write_image(tmp_path / "ct.nrrd", vol, ImageMeta(affine=PERMUTED_AFFINE))
    model = save_threshold_model(tmp_path / "best.pt", ct_plan((2.0, 2.0, 2.0)))
    s = run(PredictConfig(inputs=src, model=model, out=tmp_path / "out"))
    mask, meta = read_image(s["outputs"][0]["mask"])  # NRRD in, NRRD out
    assert s["outputs"][0]["mask"].endswith(".nrrd")
    np.testing.assert_allclose(meta.affine, PERMUTED_AFFINE, atol=1e-6)
    ref, got = vol > BONE_HU, mask > 0
    dice = 2 * (ref & got).sum() / (ref.sum() + got.sum())
    assert dice > 0.7, dice  # small structures, a coarser grid and back
    # every disagreement lies on the structures' one-voxel boundary (the coarse grid is under
    # two input voxels wide on every axis): no flip, no shift
    cube = np.ones((3, 3, 3), bool)
    edge = ndimage.binary_dilation(ref, cube) & ~ndimage.binary_erosion(ref, cube)
    assert not (ref ^ got)[~edge].any()
    # ... and nothing lands where the input is air: a flipped or shifted mask would
    assert not (mask[vol == -1000] > 0).any()


def test_predict_equals_the_store_pipeline(tiny_ct_store, tmp_path):
    """A raw file through ``predict`` gives the mask that the store case gives through the
    sliding-window inferer and ``restore_original``: one plan code path, no drift."""
    from umit.inference.sliding_window import SlidingWindowInferer

    store = Store(tiny_ct_store)
    case_id = sorted(store.index)[0]
    case = store.case(case_id)
    torch.manual_seed(0)
    net = create_model("resunet3d", in_chans=1, out_channels=3, features=(4, 8), img_size=16)
    cfg = FinetuneConfig(data=tiny_ct_store, crop_size=(16, 16, 16), sw_overlap=0.5)
    model = save_model(net, tmp_path / "best.pt", plan=store.plan, cfg=cfg, extra={})
    raw = tiny_ct_store.parent / "raw" / case.attrs["source_images"][0]
    s = run(PredictConfig(inputs=raw, model=model, out=tmp_path / "pred.nii.gz"))
    assert s["outputs"][0]["mask"] == str(tmp_path / "pred.nii.gz")
    got = np.asarray(nib.load(tmp_path / "pred.nii.gz").dataobj)

    net.eval()
    inferer = SlidingWindowInferer(
        (16, 16, 16), overlap=0.5, sw_batch_size=2, output="argmax",
        padding_value=float(case.pad_values[0]),
    )  # fmt: skip
    with torch.no_grad():
        x = torch.from_numpy(np.asarray(case.read(), np.float32))[None]
        on_store = inferer(net, x).reshape(case.shape[1:]).numpy().astype(np.uint8)
    expected, affine = restore_original(on_store, case.attrs)
    assert len(np.unique(got)) > 1  # a non-trivial mask
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_allclose(nib.load(tmp_path / "pred.nii.gz").affine, affine, atol=1e-6)


def test_classification_probabilities_match_the_store_input(tiny_ct_store, tmp_path):
    store = Store(tiny_ct_store)
    torch.manual_seed(0)
    net = create_model(
        "classifier", encoder="vit3d_test_p16", img_size=32, in_chans=1, num_classes=2
    ).eval()
    cfg = FinetuneConfig(
        data=tiny_ct_store, task="classification", crop_size=(32, 32, 32), label_key="sex"
    )
    model = save_model(
        net, tmp_path / "best.pt", plan=store.plan, cfg=cfg, extra={"class_names": ["F", "M"]}
    )
    raw_dir = tiny_ct_store.parent / "raw"
    ids = sorted(store.index)[:3]
    for c in ids:  # a folder of inputs: one batch
        src = raw_dir / store.case(c).attrs["source_images"][0]
        (tmp_path / "in").mkdir(exist_ok=True)
        (tmp_path / "in" / f"{c}.nii.gz").write_bytes(src.read_bytes())
    assert (
        cli(["predict", str(tmp_path / "in"), "--model", str(model), "--out", str(tmp_path / "o")])
        == 0
    )
    rows = {
        Path(r["input"]).name[:-7]: r
        for r in json.loads((tmp_path / "o/predictions.json").read_text())
    }
    for c in ids:
        want = predict_case_classification(net, store, c, (32, 32, 32))
        got = [rows[c]["probabilities"][n] for n in ("F", "M")]
        np.testing.assert_allclose(got, want, atol=1e-6)
    header = (tmp_path / "o/predictions.csv").read_text().splitlines()[0]
    assert header == "input,predicted,p_F,p_M"


def test_bad_inputs_fail_clearly_and_the_batch_continues(tmp_path):
    vol = synthetic_ct()
    folder = tmp_path / "in"
    folder.mkdir()
    write_image(folder / "good.nii.gz", vol, ImageMeta(affine=np.diag([1.5, 1.5, 2.0, 1.0])))
    write_image(
        folder / "two_channels.nii.gz",
        np.stack([vol, vol], axis=-1),
        ImageMeta(affine=np.eye(4)),
    )
    (folder / "broken.nii.gz").write_bytes(b"not a nifti")
    model = save_threshold_model(tmp_path / "best.pt", ct_plan((1.5, 1.5, 2.0)))
    code = cli(["predict", str(folder), "--model", str(model), "--out", str(tmp_path / "out")])
    assert code == 1
    failures = json.loads((tmp_path / "out/failures.json").read_text())
    assert set(failures) == {str(folder / "two_channels.nii.gz"), str(folder / "broken.nii.gz")}
    assert "1 channel(s)" in failures[str(folder / "two_channels.nii.gz")]
    assert (tmp_path / "out/good.nii.gz").is_file()

    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no images found"):
        find_inputs(tmp_path / "empty")
    with pytest.raises(InputError, match="no such file"):
        find_inputs(tmp_path / "missing.nii.gz")
    with pytest.raises(InputError, match="nope.pt: checkpoint not found"):
        run(PredictConfig(inputs=folder / "good.nii.gz", model=tmp_path / "nope.pt"))
    torch.save(
        {"kind": "encoder", "model_name": "vit3d_test", "model_args": {}, "state_dict": {}},
        tmp_path / "encoder.pt",
    )
    with pytest.raises(InputError, match="holds a pretrained encoder .*expected a fine-tuned"):
        run(PredictConfig(inputs=folder / "good.nii.gz", model=tmp_path / "encoder.pt"))


# ------------------------------------------------------------------------------ real CT
@pytest.mark.realdata
def test_real_totalsegmentator_ct_nifti_round_trip(tmp_path):
    """The mask of the real abdomen CT has the input's exact header geometry, and the bone
    threshold through a 2 mm model grid and back agrees with the one on the input grid."""
    src = require_shared("totalsegmentator/example_ct_sm.nii.gz")
    model = save_threshold_model(tmp_path / "best.pt", ct_plan((2.0, 2.0, 2.0)), roi=(48, 48, 32))
    s = run(PredictConfig(inputs=src, model=model, out=tmp_path / "out"))
    img, out = nib.load(src), nib.load(s["outputs"][0]["mask"])
    assert out.shape == img.shape
    np.testing.assert_array_equal(out.affine, img.affine)
    ref = np.asarray(img.dataobj) > BONE_HU
    got = np.asarray(out.dataobj) > 0
    dice = 2 * (ref & got).sum() / (ref.sum() + got.sum())
    assert dice > 0.8, dice


@pytest.mark.realdata
def test_real_dicom_series_mask_overlays_the_series_and_its_rib_labels(tmp_path):
    """DICOM in (LPS, JPEG 2000), NIfTI mask out on the series' grid. The bone mask through a
    1.5 mm model grid matches the threshold on the series itself, and in world space it covers
    TotalSegmentator's rib labels of this series (stored LAS): flipped or shifted it would not.
    (Measured: 74% of rib voxels covered; 16% flipped left-right, 3% front-back, 61% shifted by
    two voxels.)"""
    series = require_shared("totalsegmentator/example_ct_dicom")
    seg = nib.load(require_shared("totalsegmentator/example_seg_dicom.nii.gz"))
    vol, meta = read_volume(series)
    model = save_threshold_model(tmp_path / "best.pt", ct_plan((1.5, 1.5, 2.0)), roi=(64, 64, 16))
    run(PredictConfig(inputs=series, model=model, out=tmp_path / "bone.nii.gz"))
    out = nib.load(tmp_path / "bone.nii.gz")
    assert out.shape == vol.shape
    np.testing.assert_allclose(out.affine, meta.affine, atol=1e-4)
    got, ref = np.asarray(out.dataobj) > 0, vol > BONE_HU
    assert 2 * (got & ref).sum() / (got.sum() + ref.sum()) > 0.8
    bone, bone_affine = reorient_to_ras(np.asarray(out.dataobj), out.affine)
    labels, labels_affine = reorient_to_ras(np.asarray(seg.dataobj), seg.affine)
    np.testing.assert_allclose(bone_affine, labels_affine, atol=1e-3)
    ribs = (labels >= 92) & (labels <= 115)  # rib_left_1 .. rib_right_12 (TotalSegmentator v2)
    covered = (bone[ribs] > 0).mean()
    assert covered > 0.65, covered
    assert (bone[::-1][ribs] > 0).mean() < covered / 2  # left-right flipped
    assert (np.roll(bone, 2, axis=0)[ribs] > 0).mean() < covered - 0.05  # shifted 2 voxels


def test_model_and_channel_mismatches_fail_clearly(tmp_path):
    vol = synthetic_ct()
    src = write_image(tmp_path / "ct.nii.gz", vol, ImageMeta(affine=np.eye(4)))
    two = ct_plan((1.0, 1.0, 1.0))
    two = two.model_copy(
        update={"channels": [two.channels[0], two.channels[0].model_copy(update={"name": "b"})]}
    )
    model = save_threshold_model(tmp_path / "two.pt", two)
    s = run(PredictConfig(inputs=src, model=model, out=tmp_path / "o1"))
    assert "3D image, but the model expects 2 channels" in s["failures"][str(src)]

    ckpt = torch.load(model, weights_only=True)
    ckpt["plan"] = None
    torch.save(ckpt, tmp_path / "noplan.pt")
    with pytest.raises(InputError, match="carries no preprocessing plan"):
        run(PredictConfig(inputs=src, model=tmp_path / "noplan.pt"))
    with pytest.raises(ValueError, match="suffix must be one of"):
        run(PredictConfig(inputs=src, model=model, suffix=".png"))


def test_dicomweb_inputs_are_checked_before_anything_runs(tmp_path, capsys):
    """Malformed DICOMweb inputs exit 2 without echoing the URL (it may hold a password); a
    server that cannot be reached exits 1 after bounded retries; nothing is written. (Against a
    real PACS: tests/inference/test_pacs_roundtrip.py.)"""
    root = "dicomweb+http://127.0.0.1:8042/dicom-web"
    assert parse_series_url(f"{root}/studies/1.2/series/3.4/") == (
        "http://127.0.0.1:8042/dicom-web", "1.2", "3.4",
    )  # fmt: skip
    assert parse_series_url("dicomweb+https://pacs/rs/studies/1.2") == (
        "https://pacs/rs",
        "1.2",
        None,
    )
    out, model = tmp_path / "o", tmp_path / "never-read.pt"
    for url, why in [
        ("dicomweb+http://u:s3cr3t@pacs/dw/studies/1.2/series/3.4", "holds credentials"),
        (root, "must name a series or a study"),
        (f"{root}/studies/1.2/instances/3.4", "must name a series or a study"),
        (f"{root}/studies/1.2/series/abc", "not a DICOM UID: 'abc'"),
        (f"{root}/studies/1.2/series/3.4?s3cr3t=1", "must not have a query"),
        ("http://pacs/dw/studies/1.2", "unsupported input URL scheme 'http'"),
    ]:
        assert cli(["predict", url, "--model", str(model), "--out", str(out)]) == 2, url
        err = capsys.readouterr().err
        assert why in err and "s3cr3t" not in err, err
    url = f"dicomweb+http://127.0.0.1:{free_port()}/dw/studies/1.2/series/3.4"
    t = time.perf_counter()
    code = cli(["predict", url, "--model", str(model), "--out", str(out), "pacs_retries=1",
                "pacs_backoff_s=0", "pacs_timeout_s=2"])  # fmt: skip
    assert code == 1 and time.perf_counter() - t < 10
    err = capsys.readouterr().err
    assert "cannot reach http://127.0.0.1:" in err and "after 2 attempt(s)" in err
    assert not out.exists()
