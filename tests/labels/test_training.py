"""Report labels as training signal: ``umit finetune task=classification`` reading the labels
table, and ``umit pretrain method=report_labels`` (masked multi-label BCE on the encoder)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from umit.errors import InputError
from umit.labels.table import LabelsTableConfig, table_targets
from umit.models import create_model
from umit.ssl.report_labels import ReportLabels3D, label_matrix


@pytest.fixture(scope="module")
def labeled_store(findings_raw, tmp_path_factory):
    """(RAW with report labels, PREP) of the findings phantoms."""
    from umit.labels.run import FromReportsConfig
    from umit.labels.run import run as from_reports
    from umit.preprocess.run import PreprocessConfig
    from umit.preprocess.run import run as preprocess

    root = tmp_path_factory.mktemp("labeled")
    raw = root / "raw"
    shutil.copytree(findings_raw, raw)
    from_reports(
        FromReportsConfig(reports=findings_raw.parent / "src" / "reports.csv", catalog=raw)
    )
    preprocess(
        PreprocessConfig(raw=raw, out=root / "prep", workers=1, target_spacing=(3.2, 3.2, 4.0))
    )
    return raw, root / "prep"


def _bce(p_logit: np.ndarray, y: np.ndarray) -> np.ndarray:
    p = 1 / (1 + np.exp(-p_logit))
    return -(y * np.log(p) + (1 - y) * np.log(1 - p))


def test_masked_bce_and_baseline_match_a_hand_computation():
    values, mask = label_matrix(["a", "b", "c"], {"f": {"a": 1, "c": 0}, "g": {"b": 1}}, ["f", "g"])
    assert values.tolist() == [[1, 0], [0, 1], [0, 0]] and mask.tolist() == [[1, 0], [0, 1], [1, 0]]
    enc = create_model("resnet3d_test", in_chans=1, num_classes=0)
    model = ReportLabels3D(enc, ["f", "g"], np.array([0.25, 0.9]))
    x = torch.randn(3, 1, 16, 16, 16)
    batch = {"image": x, "report_targets": torch.tensor(values), "report_mask": torch.tensor(mask)}
    out = model(batch)
    logits = model.logits(x).detach().numpy()
    want = (_bce(logits, values) * mask).sum() / mask.sum()
    assert out["loss"].item() == pytest.approx(want, rel=1e-5)
    prior = np.log(np.array([0.25, 0.9]) / np.array([0.75, 0.1]))
    base = (_bce(np.broadcast_to(prior, values.shape), values) * mask).sum() / mask.sum()
    assert float(out["baseline_loss"]) == pytest.approx(base, rel=1e-5)


@pytest.mark.usefixtures("one_thread")
def test_report_labels_head_learns_a_visible_finding():
    """Finding 0 = a bright blob in the volume, finding 1 = noise (masked out for half the
    cases): the wrapper learns finding 0 far below the prevalence baseline."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    n = 16
    x = torch.randn(n, 1, 16, 16, 16, generator=g) * 0.3
    y0 = (torch.arange(n) % 2).float()
    x[y0 == 1, :, 5:11, 5:11, 5:11] += 2.0
    y = torch.stack([y0, torch.randint(0, 2, (n,), generator=g).float()], 1)
    m = torch.stack([torch.ones(n), (torch.arange(n) < n // 2).float()], 1)
    model = ReportLabels3D(
        create_model("vit3d_test_p8", img_size=16, in_chans=1, num_classes=0),
        ["a", "b"],
        np.array([0.5, 0.5]),
    )
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(60):
        out = model({"image": x, "report_targets": y, "report_mask": m})
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        logits = model.logits(x)
    first = torch.nn.functional.binary_cross_entropy_with_logits(logits[:, 0], y0)
    assert float(first) < 0.1 * float(np.log(2)), float(first)
    assert ((logits[:, 0] > 0).float() == y0).all()


@pytest.mark.usefixtures("one_thread")
def test_pretrain_report_labels_then_finetune_on_table_labels(labeled_store, tmp_path):
    from umit.finetune.run import FinetuneConfig
    from umit.finetune.run import run as finetune
    from umit.ssl.pretrain import PretrainConfig
    from umit.ssl.pretrain import run as pretrain
    from umit.train.checkpoint import load_artifact

    raw, prep = labeled_store
    train = {
        "total_steps": 4,
        "batch_size": 2,
        "warmup_steps": 1,
        "eval_every": 2,
        "progress": False,
    }
    summary = pretrain(
        PretrainConfig.model_validate(
            {
                "data": prep,
                "out": tmp_path / "rl",
                "method": "report_labels",
                "model": "vit3d_test_p8",
                "crop_size": [16, 16, 16],
                "val_cases": 2,
                "val_crops": 2,
                "report_labels": {"labels": {"catalog": str(raw)}},
                "train": train,
            }
        )
    )
    assert summary["method"] == "report_labels" and summary["steps"] == 4
    last = summary["last_eval"]
    assert last["val_baseline_loss"] > 0 and np.isfinite(last["val_loss"])
    art = load_artifact(tmp_path / "rl" / "encoder.pt")
    assert art["method"] == "report_labels" and art["model_name"] == "vit3d_test_p8"

    labels = {"catalog": str(raw), "uncertain": "present"}
    cfg = FinetuneConfig.model_validate(
        {
            "data": prep,
            "out": tmp_path / "ft",
            "task": "classification",
            "label_key": "pleural_effusion",
            "labels": labels,
            "model": "classifier",
            "model_args": {"encoder": "vit3d_test_p8"},
            "pretrained": tmp_path / "rl" / "encoder.pt",
            "crop_size": [16, 16, 16],
            "val_fraction": 0.2,
            "train": train,
        }
    )
    s = finetune(cfg)
    targets = table_targets(LabelsTableConfig(catalog=raw, uncertain="present"), "pleural_effusion")
    assert s["n_train"] + s.get("n_val", 0) >= 1
    ckpt = load_artifact(tmp_path / "ft" / "best.pt")
    used = ckpt["cases"]["train"] + ckpt["cases"]["val"]
    assert used and all(c in targets for c in used)  # only cases the table labels
    assert ckpt["class_names"] == ["0", "1"] and ckpt["label_key"] == "pleural_effusion"
    # umit evaluate takes the reference from the table too (here: the test split's 2 cases)
    from umit.eval.evaluate import EvaluateConfig
    from umit.eval.evaluate import run as evaluate

    ev = evaluate(
        EvaluateConfig(
            model=tmp_path / "ft" / "best.pt",
            data=prep,
            labels=LabelsTableConfig(catalog=raw, uncertain="present"),
            case_figures=False,
            n_boot=10,
        )
    )
    per_case = (tmp_path / "ft" / "eval_test" / "per_case.csv").read_text().splitlines()
    assert len(per_case) == 1 + sum(
        c in targets for c in ("phantom_ct_test_0000", "phantom_ct_test_0001")
    )
    assert ev is not None
    with pytest.raises(InputError, match=r"catalog.db: the labels table has no 'ascitis' rows"):
        finetune(cfg.model_copy(update={"label_key": "ascitis", "out": tmp_path / "x"}))
