"""``umit export`` -> ONNX and ``umit predict --backend onnxruntime``: onnxruntime equals torch
within 1e-4 (UNETR, SwinUNETR, the classifier, a CNN at another size), the metadata carries what
predict needs, the TorchScript fallback is taken only when dynamo fails and is recorded, predict
gives the torch masks and probabilities, and bad files fail naming the file."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import onnx
import pytest
import torch
from torch import nn

from umit.cli.main import main as cli
from umit.data.plan import ChannelPlan, Plan
from umit.data.store import Store
from umit.errors import InputError
from umit.finetune.run import FinetuneConfig, save_model
from umit.inference.export import ExportConfig, ExportError, spatial_policy
from umit.inference.export import run as export
from umit.inference.onnx_backend import OnnxModel
from umit.inference.predict import PredictConfig, Predictor
from umit.inference.predict import run as predict
from umit.models import create_model

pytest.importorskip("onnxruntime", reason="the onnx extra is not installed (pip install .[onnx])")
pytest.importorskip("onnxscript", reason="the onnx extra is not installed (pip install .[onnx])")

SWIN_SMALL = {"depths": (2, 1, 1, 1), "window_size": 4}  # stage 1 has a shifted window


def ct_plan(n_channels: int = 1) -> Plan:
    return Plan(
        target_spacing=(2.0, 2.0, 3.0),
        channels=[
            ChannelPlan(
                name=f"ch{i}", modality="CT", scheme="ct_window", clip_low=-1000, clip_high=1000
            )
            for i in range(n_channels)
        ],
        crop_foreground=False,
    )


def jitter(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random init leaves some layers at zero (heads, output convs): add seeded noise to every
    parameter so that every path reaches the output and a wrong graph shows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model.eval()


def saved(tmp_path: Path, net: nn.Module, roi, task="segmentation", plan=None, **extra) -> Path:
    cfg = FinetuneConfig(
        data=tmp_path,
        task=task,
        crop_size=roi,
        sw_overlap=0.5,
        **({"label_key": "sex"} if task == "classification" else {}),
    )
    return save_model(net, tmp_path / "best.pt", plan=plan or ct_plan(), cfg=cfg, extra=extra)


def meta_of(path: Path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


def check_equal(net: nn.Module, onnx_path: Path, shape, seed=1) -> float:
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        ref = net(x)
    got = OnnxModel(onnx_path)(x)
    assert got.shape == ref.shape
    diff = float((got - ref).abs().max())
    assert diff <= 1e-4, diff
    assert float(ref.abs().max()) > 1e-2  # not a trivially zero output
    return diff


@pytest.mark.parametrize(
    "name,build,roi,why",
    [
        pytest.param(
            "unetr",
            lambda: create_model(
                "unetr", encoder="vit3d_test_p16", img_size=32, in_chans=1, out_channels=3
            ),
            (32, 32, 32),
            "position table",
            marks=pytest.mark.slow,  # ~35 s on 2 loaded cores (the exporter's first use)
        ),
        pytest.param(
            "swin_unetr",
            lambda: create_model(
                "swin_unetr",
                encoder="swin3d_test",
                encoder_args=SWIN_SMALL,
                img_size=32,
                in_chans=1,
                out_channels=3,
            ),  # fmt: skip
            (32, 32, 64),
            "window size",
            marks=pytest.mark.slow,  # ~40 s of tracing on 2 shared cores
        ),
    ],
)
def test_segmentation_models_export_and_equal_torch(tmp_path, name, build, roi, why):
    torch.manual_seed(0)
    net = jitter(build())
    model = saved(tmp_path, net, roi, label_names={"liver": 1, "spleen": 2})
    meta = export(ExportConfig(model=model, out=tmp_path / f"{name}.onnx"))
    assert meta["umit.exporter"] == "dynamo" and meta["umit.exporter_note"] == ""
    dyn = meta["umit.dynamic"]
    assert dyn["batch"] and not dyn["spatial"] and why in dyn["why"]
    assert dyn["input_shape"][1:] == [1, *roi]
    check_equal(net, tmp_path / f"{name}.onnx", (3, 1, *roi))  # batch 3: never traced
    # what predict needs is in the file, equal to best.pt's
    stored = meta_of(tmp_path / f"{name}.onnx")
    art = torch.load(model, weights_only=True)
    assert json.loads(stored["umit.spec"]) == art["spec"]
    assert Plan.model_validate(json.loads(stored["umit.plan"])) == ct_plan()
    assert json.loads(stored["umit.source"])["sha256"] and stored["umit.model_name"] == name


def test_classifier_exports_and_equals_torch(tmp_path):
    torch.manual_seed(0)
    net = jitter(
        create_model("classifier", encoder="vit3d_test_p16", img_size=32, in_chans=1, num_classes=3)
    )
    model = saved(tmp_path, net, (32, 32, 32), "classification", class_names=["a", "b", "c"])
    meta = export(ExportConfig(model=model, out=tmp_path / "cls.onnx"))
    assert meta["umit.exporter"] == "dynamo" and meta["umit.dynamic"]["batch"]
    check_equal(net, tmp_path / "cls.onnx", (3, 1, 32, 32, 32))
    graph = OnnxModel(tmp_path / "cls.onnx")
    assert graph.spec["class_names"] == ["a", "b", "c"]
    # a window of another size than the static graph's is refused, naming the ONNX file
    with pytest.raises(InputError, match="axis 2 is fixed at 32") as e:
        graph(torch.zeros(1, 1, 24, 32, 32))
    assert str(tmp_path / "cls.onnx") in str(e.value)


@pytest.fixture(scope="module")
def cnn_onnx(tiny_ct_store, tmp_path_factory) -> tuple[nn.Module, Path, Path, dict]:
    """A tiny ResUNet on the tiny store's plan: (net, best.pt, M.onnx from `umit export`,
    its metadata)."""
    root = tmp_path_factory.mktemp("cnn_onnx")
    torch.manual_seed(0)
    net = jitter(create_model("resunet3d", in_chans=1, out_channels=3, features=(4, 8)))
    cfg = FinetuneConfig(data=tiny_ct_store, crop_size=(16, 16, 16), sw_overlap=0.5)
    model = save_model(net, root / "best.pt", plan=Store(tiny_ct_store).plan, cfg=cfg, extra={})
    out = root / "m.onnx"
    assert cli(["export", "--model", str(model), "--format", "onnx", "--out", str(out)]) == 0
    meta = {k: json.loads(v) if v.startswith(("{", "[")) else v for k, v in meta_of(out).items()}
    return net, model, out, meta


def test_cnn_exports_with_dynamic_spatial_axes(cnn_onnx):
    net, _, out, meta = cnn_onnx
    assert spatial_policy(net)[0] and meta["umit.exporter"] == "dynamo"
    assert meta["umit.dynamic"]["spatial"] and meta["umit.dynamic"]["batch"]
    assert "1x1x32x16x16" in meta["umit.verified"]["max_abs_diff"]  # checked at a second size
    check_equal(net, out, (1, 1, 24, 16, 40))  # another size, never traced


class DataDependent(nn.Module):
    """A branch on a tensor value: torch.export refuses it, the TorchScript tracer records the
    branch taken (always the first one here, so the traced graph is right)."""

    def __init__(self, in_chans: int = 1, out_channels: int = 2):
        super().__init__()
        self.conv = nn.Conv3d(in_chans, out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.abs().mean() >= 0:  # data-dependent for torch.export, always true
            return self.conv(x)
        return -self.conv(x)


def export_test_branchy(**kwargs) -> DataDependent:
    return DataDependent(**kwargs)


def test_torchscript_fallback_only_when_dynamo_fails_and_recorded(tmp_path, register_models):
    register_models(export_test_branchy)
    torch.manual_seed(0)
    net = jitter(create_model("export_test_branchy"))
    model = saved(tmp_path, net, (8, 8, 8))
    with pytest.raises(ExportError, match="dynamo exporter failed") as err:
        export(ExportConfig(model=model, out=tmp_path / "d.onnx", exporter="dynamo"))
    assert str(model) in str(err.value) and not (tmp_path / "d.onnx").exists()
    meta = export(ExportConfig(model=model, out=tmp_path / "m.onnx"))
    assert meta["umit.exporter"] == "torchscript"
    assert meta["umit.exporter_note"].startswith("dynamo exporter failed:")
    assert meta_of(tmp_path / "m.onnx")["umit.exporter"] == "torchscript"
    check_equal(net, tmp_path / "m.onnx", (3, 1, 8, 8, 8))


def test_predict_onnx_equals_torch_end_to_end(tiny_ct_store, cnn_onnx, tmp_path):
    """The same raw CT through ``umit predict`` with best.pt (torch) and with M.onnx
    (onnxruntime): the same mask on the input's grid, and the same affine."""
    store = Store(tiny_ct_store)
    _, model, onnx_path, _ = cnn_onnx
    raw_dir = tiny_ct_store.parent / "raw"
    (tmp_path / "in").mkdir()
    for c in sorted(store.index)[:2]:
        src = raw_dir / store.case(c).attrs["source_images"][0]
        (tmp_path / "in" / f"{c}.nii.gz").write_bytes(src.read_bytes())
    s_torch = predict(PredictConfig(inputs=tmp_path / "in", model=model, out=tmp_path / "pt"))
    code = cli(["predict", str(tmp_path / "in"), "--model", str(onnx_path),
                "--backend", "onnxruntime", "--out", str(tmp_path / "ox")])  # fmt: skip
    assert code == 0 and not s_torch["failures"]
    for row in s_torch["outputs"]:
        name = Path(row["mask"]).name
        a, b = nib.load(tmp_path / "pt" / name), nib.load(tmp_path / "ox" / name)
        want, got = np.asarray(a.dataobj), np.asarray(b.dataobj)
        assert len(np.unique(want)) > 1  # a non-trivial mask
        np.testing.assert_array_equal(got, want)
        np.testing.assert_allclose(b.affine, a.affine, atol=1e-6)


def test_predict_onnx_classification_equals_torch(tiny_ct_store, tmp_path):
    store = Store(tiny_ct_store)
    torch.manual_seed(0)
    net = jitter(
        create_model("classifier", encoder="vit3d_test_p16", img_size=32, in_chans=1, num_classes=2)
    )
    cfg = FinetuneConfig(
        data=tiny_ct_store, task="classification", crop_size=(32, 32, 32), label_key="sex"
    )
    model = save_model(net, tmp_path / "best.pt", plan=store.plan, cfg=cfg, extra={"class_names": ["F", "M"]})  # fmt: skip
    export(ExportConfig(model=model, out=tmp_path / "m.onnx"))
    src = (
        tiny_ct_store.parent / "raw" / store.case(sorted(store.index)[0]).attrs["source_images"][0]
    )
    a = predict(PredictConfig(inputs=src, model=model, out=tmp_path / "a"))["outputs"][0]
    b = predict(PredictConfig(inputs=src, model=tmp_path / "m.onnx", out=tmp_path / "b"))
    b = b["outputs"][0]
    assert a["predicted"] == b["predicted"]
    for k in ("F", "M"):
        assert abs(a["probabilities"][k] - b["probabilities"][k]) <= 1e-5
    assert 0.01 < a["probabilities"]["F"] < 0.99  # not saturated: a real comparison


def test_bad_model_files_fail_naming_the_file(cnn_onnx, tmp_path):
    _, model, good, _ = cnn_onnx
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"this is not a protobuf" * 10)
    with pytest.raises(InputError, match="not a readable ONNX model") as e:
        OnnxModel(garbage)
    assert str(garbage) in str(e.value)
    with pytest.raises(InputError, match="ONNX model not found"):
        OnnxModel(tmp_path / "missing.onnx")
    with pytest.raises(InputError, match="umit export") as e:  # best.pt to the onnx backend
        Predictor(PredictConfig(inputs=tmp_path, model=model, backend="onnxruntime"))
    assert str(model) in str(e.value)
    # an ONNX graph without umit's metadata
    proto = onnx.load(str(good))
    del proto.metadata_props[:]
    bare = tmp_path / "bare.onnx"
    onnx.save(proto, str(bare))
    with pytest.raises(InputError, match=r"without umit metadata \(umit.spec, umit.plan missing\)") as e:  # fmt: skip
        OnnxModel(bare)
    assert str(bare) in str(e.value)
    # metadata whose plan lists 2 channels for a 1-channel graph
    proto = onnx.load(str(good))
    for p in proto.metadata_props:
        if p.key == "umit.plan":
            p.value = ct_plan(2).model_dump_json()
    wrong = tmp_path / "wrong_channels.onnx"
    onnx.save(proto, str(wrong))
    with pytest.raises(InputError, match="takes 1 channel.* plan lists 2") as e:
        OnnxModel(wrong)
    assert str(wrong) in str(e.value)
    # precision is a torch setting
    with pytest.raises(ValueError, match="applies to the torch backend"):
        Predictor(PredictConfig(inputs=tmp_path, model=good, precision="bf16"))
    with pytest.raises(InputError, match="must end in .onnx"):
        export(ExportConfig(model=model, out=tmp_path / "m.pt"))


def test_wrong_channel_input_is_a_recorded_failure_naming_the_image(cnn_onnx, tmp_path):
    from umit.data.io import write_image
    from umit.data.meta import ImageMeta

    _, _, good, _ = cnn_onnx
    folder = tmp_path / "in"
    folder.mkdir()
    vol = np.full((20, 20, 12), -1000, np.int16)
    vol[5:15, 5:15, 3:9] = 400
    write_image(folder / "ok.nii.gz", vol, ImageMeta(affine=np.diag([2.0, 2.0, 3.0, 1.0])))
    two = np.stack([vol, vol], axis=-1)
    write_image(folder / "two.nii.gz", two, ImageMeta(affine=np.diag([2.0, 2.0, 3.0, 1.0])))
    s = predict(PredictConfig(inputs=folder, model=good, out=tmp_path / "out"))
    assert [Path(r["input"]).name for r in s["outputs"]] == ["ok.nii.gz"]
    ((bad, why),) = s["failures"].items()
    assert bad.endswith("two.nii.gz") and "two.nii.gz" in why and "channel" in why
