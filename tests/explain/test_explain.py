"""``umit explain``: hand-built models whose attention (or gradient) is known, on RAS, LPS and
oblique inputs; the maps must peak exactly on the input voxels where the model looks."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from _hand_vit import CUBE, PLAN, affines, hand_vit
from umit.cli.main import main as cli_main
from umit.data.io import read_image, write_image
from umit.data.meta import ImageMeta
from umit.errors import InputError
from umit.explain.attention import attention_rollout, record_attention
from umit.explain.gradcam import gradcam
from umit.explain.run import ExplainConfig, run
from umit.models import create_model
from umit.train.checkpoint import InferenceSpec, save_artifact


def save_model(model: torch.nn.Module, path: Path, task: str = "classification") -> Path:
    spec = InferenceSpec(task=task, roi_size=(16, 16, 16), class_names=["a", "b"])
    return save_artifact(path, "model", model, plan=PLAN, spec=spec)


def write_case(path: Path, affine: np.ndarray, shape=(16, 16, 16)) -> Path:
    img = np.zeros(shape, np.float32)
    img[CUBE] = 1.0
    return write_image(path, img, ImageMeta(affine=affine))


def world(affine: np.ndarray, mask: np.ndarray) -> np.ndarray:
    idx = np.argwhere(mask)
    return (affine[:3, :3] @ idx.T).T + affine[:3, 3]


def test_rollout_matches_hand_product():
    a1 = torch.softmax(torch.randn(1, 2, 5, 5), -1)
    a2 = torch.softmax(torch.randn(1, 2, 5, 5), -1)
    eye = torch.eye(5)
    m1 = 0.5 * a1.mean(1)[0] + 0.5 * eye
    m2 = 0.5 * a2.mean(1)[0] + 0.5 * eye
    want = m2 @ m1  # rows already sum to one
    torch.testing.assert_close(attention_rollout([a1, a2])[0], want)


def test_recorded_attention_equals_explicit_softmax():
    torch.manual_seed(0)
    model = create_model("vit3d_test_p4", img_size=8, in_chans=1).eval()
    x = torch.randn(1, 1, 8, 8, 8)
    with torch.no_grad(), record_attention(model) as attn:
        model(x)
    assert len(attn) == 2 and attn[0].shape == (1, 3, 9, 9)
    # independent: the first block's attention from its normed input, by hand
    tokens = model._embed(x)
    h = model.blocks[0].norm1(tokens)
    W, bias = model.blocks[0].attn.qkv.weight, model.blocks[0].attn.qkv.bias
    q = (h @ W[:48].T + bias[:48]).view(1, 9, 3, 16).transpose(1, 2)
    k = (h @ W[48:96].T + bias[48:96]).view(1, 9, 3, 16).transpose(1, 2)
    want = torch.softmax(q @ k.transpose(-1, -2) / 4.0, -1)
    torch.testing.assert_close(attn[0], want.detach(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("orient", ["ras", "lps", "oblique"])
def test_attention_peaks_on_the_attended_patch_in_world_mm(tmp_path, orient):
    affine = affines()[orient]
    src = write_case(tmp_path / "case.nii.gz", affine)
    model = save_model(hand_vit(), tmp_path / "best.pt")
    cube = np.zeros((16, 16, 16), bool)
    cube[CUBE] = True
    # query from the class token, and from a voxel far from the cube (named in world mm)
    far = (affine @ np.array([13.0, 1.0, 2.0, 1.0]))[:3].tolist()
    for query in ("cls", far):
        s = run(ExplainConfig(inputs=src, model=model, out=tmp_path / "x", query=query))
        row = s["outputs"][0]
        for kind in ("mean", "rollout", "heads"):
            arr, meta = read_image(row["maps"][kind])
            np.testing.assert_allclose(meta.affine, affine, atol=1e-5)  # input's grid
            maps = arr[..., None] if arr.ndim == 3 else arr
            for h in range(maps.shape[-1]):
                m = maps[..., h]
                peak = m >= m.max() - 1e-6
                np.testing.assert_array_equal(peak, cube, err_msg=f"{orient} {query} {kind}")
        np.testing.assert_allclose(world(affine, peak).mean(0), world(affine, cube).mean(0))
        assert cube[tuple(row["peak_voxel"])]
        if query != "cls":
            assert row["query_voxel"] == [13, 1, 2]
    # the class-token mean attention: all of it on the cube's one patch (the hand weights)
    mean = nib.load(row["maps"]["mean"]).get_fdata()
    assert mean[cube].min() > 0.99 and mean[~cube].max() < 1e-3


def test_cli_writes_maps_png_and_summary(tmp_path):
    # LPS, larger than the 16³ input: the centred crop's patches line up with the cube again
    src = write_case(tmp_path / "case.nii.gz", affines()["lps"], shape=(24, 24, 16))
    model = save_model(hand_vit(depth=1), tmp_path / "best.pt")
    out = tmp_path / "out"
    rc = cli_main(["explain", str(src), "--model", str(model), "--out", str(out), "layer=0"])
    assert rc == 0
    summary = json.loads((out / "explain.json").read_text())
    row = summary["outputs"][0]
    assert summary["method"] == "attention" and row["layers"] == 1 and row["heads"] == 3
    assert (out / "case_overlay.png").stat().st_size > 1000
    arr, _ = read_image(out / "case_rollout.nii.gz")
    assert arr.shape == (24, 24, 16)  # the input's grid; the 16³ centred crop is mapped back
    cube = np.zeros((24, 24, 16), bool)
    cube[CUBE] = True
    window = np.zeros_like(cube)
    window[4:20, 4:20, :] = True  # the centred crop of the flipped store grid, mapped back
    np.testing.assert_array_equal(arr >= arr.max() - 1e-6, cube)
    assert arr[~window].max() == 0 and arr[window].min() > 0  # rollout: every token gets some


def test_bad_inputs_are_named(tmp_path):
    src = write_case(tmp_path / "case.nii.gz", affines()["ras"])
    model = save_model(hand_vit(depth=1), tmp_path / "best.pt")
    s = run(ExplainConfig(inputs=src, model=model, out=tmp_path / "o", query=(900.0, 0, 0)))
    (why,) = s["failures"].values()  # a batch records the input's failure and goes on
    assert "case.nii.gz" in why and "query [900.0, 0.0, 0.0] mm lies outside" in why
    with pytest.raises(InputError, match="case.nii.gz.*no such file|no such file"):
        run(ExplainConfig(inputs=tmp_path / "nope.nii.gz", model=model, out=tmp_path / "o"))
    cnn = create_model("resnet3d_test", num_classes=2, in_chans=1)
    cnn_path = save_model(cnn, tmp_path / "cnn.pt")
    with pytest.raises(InputError, match=r"cnn.pt.*no attention layer \(a CNN\)"):
        run(ExplainConfig(inputs=src, model=cnn_path, out=tmp_path / "o", method="attention"))
    noc = create_model(
        "classifier", encoder="vit3d_test_p4", num_classes=2, pool="mean", img_size=16,
        in_chans=1, encoder_args={"class_token": False},
    )  # fmt: skip
    with pytest.raises(InputError, match="no class token"):
        run(ExplainConfig(inputs=src, model=save_model(noc, tmp_path / "n.pt"), out=tmp_path))
    with pytest.raises(ValueError, match="query must be"):
        ExplainConfig(inputs=src, model=model, query="centre")
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"not an image")
    s = run(ExplainConfig(inputs=bad, model=model, out=tmp_path / "o2"))
    assert "bad.nii.gz" in next(iter(s["failures"]))


class _CamEncoder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv3d(1, 2, 1, bias=False)
        with torch.no_grad():
            self.stem.weight[:, 0, 0, 0, 0] = torch.tensor([1.0, -1.0])
        self.feature_info = [{"num_chs": 2, "reduction": 1, "module": "stem"}]


class _CamNet(torch.nn.Module):
    """Logit 1 = sum of feature 0 over a fixed region M: dS/dA_0 = M, dS/dA_1 = 0."""

    def __init__(self, region: torch.Tensor):
        super().__init__()
        self.encoder = _CamEncoder()
        self.register_buffer("region", region)

    def forward(self, x):
        a = self.encoder.stem(x)
        s = (a[:, 0] * self.region).sum(dim=(1, 2, 3))
        return torch.stack([-s, s], dim=1)


def test_gradcam_equals_hand_computation():
    torch.manual_seed(0)
    region = torch.zeros(8, 8, 8)
    region[2:5, 3:6, 1:4] = 1.0
    x = torch.rand(1, 1, 8, 8, 8) - 0.3
    cam, _ = gradcam(_CamNet(region), x, lambda o: o[0, 1])
    # weights: w_0 = mean(M) > 0, w_1 = 0 -> relu(w_0 · x) / max
    want = torch.relu(region.mean() * x[0, 0])
    torch.testing.assert_close(cam, want / want.max())


def test_gradcam_cli_on_a_cnn_segmenter(tmp_path):
    torch.manual_seed(0)
    src = write_case(tmp_path / "case.nii.gz", affines()["oblique"])
    net = create_model("resunet3d", in_chans=1, out_channels=2, features=(4, 8), img_size=16)
    model = save_model(net, tmp_path / "best.pt", task="segmentation")
    out = tmp_path / "cam"
    rc = cli_main(["explain", str(src), "--model", str(model), "--out", str(out),
                   "target_class=1"])  # fmt: skip
    assert rc == 0
    summary = json.loads((out / "explain.json").read_text())
    assert summary["method"] == "gradcam"
    arr, meta = read_image(out / "case_gradcam.nii.gz")
    np.testing.assert_allclose(meta.affine, affines()["oblique"], atol=1e-5)
    assert arr.shape == (16, 16, 16) and arr.min() >= 0 and arr.max() <= 1 + 1e-6


def test_swin_window_attention_recomputed_exactly():
    """The recomputed window weights reproduce each block's attention output (shifted windows
    with a mask, and a grid padded up to the window)."""
    from umit.explain.attention import record_window_attention, window_attention_weights
    from umit.models.swin3d import SwinBlock3D, window_partition

    torch.manual_seed(0)
    model = create_model("swin3d_test", img_size=20, in_chans=1, window_size=3).eval()
    x = torch.randn(1, 1, 20, 20, 20)
    seen = []

    def check(block, args, _out):
        h, window, shift, mask = args
        A, padded, shifted = window_attention_weights(block, h, window, shift, mask)
        g = block.norm1(h)
        pad = [(-s) % w for s, w in zip(g.shape[1:4], window, strict=True)]
        g = torch.nn.functional.pad(g, (0, 0, 0, pad[2], 0, pad[1], 0, pad[0]))
        if shifted:
            g = torch.roll(g, shifts=tuple(-s for s in shift), dims=(1, 2, 3))
        win = window_partition(g, window)
        want = block.attn(win, mask if shifted else None)
        Bw, N, C = win.shape
        v = block.attn.qkv(win).reshape(Bw, N, 3, block.attn.num_heads, -1)[:, :, 2]
        got = block.attn.proj((A @ v.transpose(1, 2)).transpose(1, 2).reshape(Bw, N, C))
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
        seen.append((shifted, any(pad)))

    hooks = [m.register_forward_hook(check) for m in model.modules() if isinstance(m, SwinBlock3D)]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    assert (True, True) in seen and (False, True) in seen  # shifted + padded blocks were checked
    with torch.no_grad(), record_window_attention(model) as maps:
        model(x)
    assert len(maps) == 8 and maps[0].shape == (1, 3, 10, 10, 10)
    # attention received: every window's queries spread a total of N_window over its tokens
    with torch.no_grad(), record_window_attention(model, query=(0.52, 0.52, 0.52)) as rows:
        model(x)
    r = rows[0][0].sum(0)  # (10, 10, 10): the query token's row, summed over heads
    assert r.sum().item() == pytest.approx(3.0, abs=1e-4)  # one softmax row per head
    nz = np.argwhere(r.numpy() > 0)
    assert (nz.max(0) - nz.min(0) < 3).all() and r[5, 5, 5] > 0  # only the query's 3³ window


def test_swin_classifier_maps_on_the_input_grid(tmp_path):
    src = write_case(tmp_path / "case.nii.gz", affines()["oblique"])
    net = create_model(
        "classifier", encoder="swin3d_test", num_classes=2, img_size=16, in_chans=1
    )  # fmt: skip
    model = save_model(net, tmp_path / "best.pt")
    far = (affines()["oblique"] @ np.array([13.0, 1.0, 2.0, 1.0]))[:3].tolist()
    s = run(ExplainConfig(inputs=src, model=model, out=tmp_path / "o", query=far))
    row = s["outputs"][0]
    assert s["method"] == "attention" and row["method"] == "window_attention"
    mean, meta = read_image(row["maps"]["mean"])
    np.testing.assert_allclose(meta.affine, affines()["oblique"], atol=1e-5)
    heads, _ = read_image(row["maps"]["heads"])
    assert mean.shape == (16, 16, 16) and heads.shape[:3] == (16, 16, 16)
    # the first block's row of the query token lies in the query's window: near voxel (13, 1, 2)
    assert mean[13, 1, 2] > 0 and (tmp_path / "o" / "case_overlay.png").is_file()


def test_a_harmonising_front_is_not_explained(tmp_path):
    """Behind a cross-phase front (itself a UNETR), the maps are the task model's: its encoder's
    attention layers only, or Grad-CAM for a CNN, not the front's attention."""
    torch.manual_seed(0)
    src = write_case(tmp_path / "case.nii.gz", affines()["ras"])
    unetr = {"encoder": "vit3d_test_p8", "feature_size": 8, "img_size": (16, 16, 16)}
    front = {"model_name": "unetr", "args": {**unetr, "in_chans": 1, "out_channels": 3}}
    layers = {}
    for name, net, args in [
        ("plain", "unetr", {**unetr, "in_chans": 1}),
        ("behind", "unetr", unetr),
        ("cnn", "resunet3d", {"features": (4, 8), "img_size": 16}),
    ]:
        if name == "plain":
            model = create_model(net, out_channels=2, **args)
        else:
            model = create_model("phase_harmonised", model=net, model_args=args, out_channels=2,
                                 front_model=front["model_name"], front_args=front["args"])  # fmt: skip
        path = save_model(model, tmp_path / f"{name}.pt", task="segmentation")
        out = tmp_path / name
        assert cli_main(["explain", str(src), "--model", str(path), "--out", str(out)]) == 0
        summary = json.loads((out / "explain.json").read_text())
        layers[name] = (summary["method"], summary["outputs"][0].get("layers"))
    assert layers["plain"][0] == "attention" and layers["plain"][1] >= 1
    assert layers["behind"] == layers["plain"]  # not twice as many: the front is left out
    assert layers["cnn"][0] == "gradcam"
