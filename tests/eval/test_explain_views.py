"""The "Where the model looked" report section: maps of store cases on the store grid, drawn in
RAS views through the query voxel."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from _hand_vit import CUBE, PLAN, affines, hand_vit
from umit.data.io import reorient
from umit.data.meta import ImageMeta
from umit.eval.explain_views import case_map, explain_section, plot_heat_views, ras_index
from umit.models import create_model
from umit.train.checkpoint import InferenceSpec, load_model, save_artifact


class FakeCase:
    """A store case of one 16³ image with a bright cube (what ``StoreCase`` offers)."""

    def __init__(self, case_id: str, affine: np.ndarray, bright: bool = True):
        self.case_id = case_id
        self.affine = affine
        self.pad_values = [0.0]
        self.image = np.zeros((1, 16, 16, 16), np.float32)
        if bright:
            self.image[(0, *CUBE)] = 1.0
        self.label = np.zeros((16, 16, 16), np.uint8)
        self.label[CUBE] = 1

    def read(self) -> np.ndarray:
        return self.image

    def read_label(self) -> np.ndarray:
        return self.label


class FakeStore:
    def __init__(self, cases: list[FakeCase]):
        self.cases = {c.case_id: c for c in cases}

    def case(self, case_id: str) -> FakeCase:
        return self.cases[case_id]


def _classifier(tmp_path):
    spec = InferenceSpec(task="classification", roi_size=(16, 16, 16), class_names=["a", "b"])
    path = save_artifact(tmp_path / "best.pt", "model", hand_vit(), plan=PLAN, spec=spec)
    return (*load_model(path), path)


@pytest.mark.parametrize("orient", ["ras", "lps", "oblique"])
def test_case_map_peaks_on_the_attended_patch_of_the_store_grid(tmp_path, orient):
    model, ckpt, path = _classifier(tmp_path)
    case = FakeCase("c1", affines()[orient])
    cube = np.zeros((16, 16, 16), bool)
    cube[CUBE] = True
    for voxel in (None, (13, 1, 2)):  # the class token, and a query far from the cube
        heat, info = case_map(model, ckpt, path, case, voxel)
        assert info["method"] == "attention" and heat.shape == (16, 16, 16)
        np.testing.assert_array_equal(heat >= heat.max() - 1e-6, cube)


def test_ras_index_is_the_same_world_point():
    shape, point = (16, 12, 8), (3, 10, 6)
    for name, affine in affines().items():
        _, ras_meta = reorient(np.zeros(shape), ImageMeta(affine=affine), "RAS")
        idx = ras_index(point, shape, affine)
        np.testing.assert_allclose(
            ras_meta.affine @ [*idx, 1.0], affine @ [*point, 1.0], atol=1e-6, err_msg=name
        )


def test_section_shows_the_most_confident_case_of_each_class(tmp_path):
    model, ckpt, path = _classifier(tmp_path)
    store = FakeStore([FakeCase(f"c{i}", affines()["lps"]) for i in range(3)])
    rows = [
        {"case_id": "c0", "label": 0, "score": 0.30},
        {"case_id": "c1", "label": 0, "score": 0.10},  # most confident "a": P(b) lowest
        {"case_id": "c2", "label": 1, "score": 0.80},
    ]
    sec = explain_section(model, ckpt, path, store, rows)
    assert sec is not None and len(sec.figures) == 2
    captions = " ".join(f.caption for f in sec.figures)
    assert "Most confident a: c1 (p = 0.900)" in captions
    assert "Most confident b: c2 (p = 0.800)" in captions
    assert all(f.png.startswith(b"\x89PNG") for f in sec.figures)


def test_segmentation_section_queries_the_worst_structure(tmp_path):
    torch.manual_seed(0)
    net = create_model("unetr", encoder="vit3d_test_p4", img_size=16, in_chans=1, out_channels=3,
                       feature_size=8).eval()  # fmt: skip
    spec = InferenceSpec(task="segmentation", roi_size=(16, 16, 16))
    path = save_artifact(tmp_path / "best.pt", "model", net, plan=PLAN, spec=spec)
    model, ckpt = load_model(path)
    store = FakeStore([FakeCase(c, affines()["ras"]) for c in ("good", "mid", "bad")])
    rows = [
        {"case_id": "good", "dice_mean": 0.9, "dice_1": 0.9, "dice_2": 0.95},
        {"case_id": "mid", "dice_mean": 0.5, "dice_1": 0.3, "dice_2": 0.7},
        {"case_id": "bad", "dice_mean": 0.1, "dice_1": 0.05, "dice_2": 0.2},
    ]
    sec = explain_section(model, ckpt, path, store, rows, {1: "liver", 2: "spleen"})
    assert sec is not None and [f.name for f in sec.figures] == ["explain-mid", "explain-bad"]
    assert all("queried at the centre of liver" in f.caption for f in sec.figures)


def test_a_model_that_cannot_be_explained_leaves_a_note(tmp_path, monkeypatch):
    model, ckpt, path = _classifier(tmp_path)
    store = FakeStore([FakeCase("c0", affines()["ras"])])

    def broken(*args, **kwargs):
        raise RuntimeError("no attention recorded")

    monkeypatch.setattr("umit.eval.explain_views.case_map", broken)
    sec = explain_section(model, ckpt, path, store, [{"case_id": "c0", "label": 1, "score": 0.7}])
    assert sec is not None and not sec.figures
    assert "c0: not explained (no attention recorded)" in sec.text


def test_plot_heat_views_rejects_bad_shapes():
    with pytest.raises(ValueError, match="same 3-D shape"):
        plot_heat_views(np.zeros((4, 4, 4)), np.zeros((4, 4, 3)), centre=(1, 1, 1))
    with pytest.raises(ValueError, match="outside the volume"):
        plot_heat_views(np.zeros((4, 4, 4)), np.zeros((4, 4, 4)), centre=(4, 1, 1))
