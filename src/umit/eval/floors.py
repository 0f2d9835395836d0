"""Floors of a classification label-efficiency experiment: what no fine-tuning at all reaches.

Two rows computed on exactly the labeled subset a fine-tuned arm gets (same budget, same seed):

* ``floor_voxel_count``: logistic regression on one feature, the number of foreground voxels
  (channel 0 above the channel's pad/background value) of the store image;
* ``floor_random_probe``: a linear probe (standardized features, ``LogisticRegression(C=0.1)`` as
  in :func:`umit.ssl.monitor.fit_probes`) on the pooled features of a randomly initialised encoder
  (the architecture of one arm, seeded like the fine-tuning run).

Both are scored on the test split and written like a fine-tuned cell (``eval/per_case.csv`` and
``result.json``) so tables and paired comparisons treat them as arms.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from umit.data.cases import case_label, centred_input
from umit.data.store import Store
from umit.finetune.run import FinetuneConfig, build_model, class_names, split_finetune_cases
from umit.models.heads import pooled_features

FLOOR_VOXELS = "floor_voxel_count"
FLOOR_PROBE = "floor_random_probe"


def foreground_voxels(store: Store, case_id: str) -> float:
    """Voxels of channel 0 above the channel's pad (background) value."""
    case = store.case(case_id)
    img = np.asarray(case.read()[0], np.float32)
    pad = float(case.pad_values[0]) if case.pad_values else 0.0
    return float((img > pad + 1e-6).sum())


@torch.no_grad()
def random_features(
    ft: FinetuneConfig,
    store: Store,
    cases: list[str],
    n_classes: int,
    seed: int,
    calibrate: list[str] | None = None,
) -> np.ndarray:
    """(N, F) pooled features of the arm's model at random initialisation (seeded).

    Features are :func:`multiscale_features` of the encoder; BatchNorm layers first get running
    statistics of the ``calibrate`` images (training-pool images, no labels, never test) rather
    than the initial mean 0 / variance 1.
    """
    first = store.case(cases[0])
    torch.manual_seed(seed)
    model = build_model(ft, int(first.read().shape[0]), n_classes)
    size = tuple(ft.crop_size)

    def batches(ids: list[str]):
        for i in range(0, len(ids), 16):
            yield torch.stack([centred_input(store, c, size) for c in ids[i : i + 16]])

    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if norms and calibrate:
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # a cumulative average over all calibration batches
        model.train()
        with torch.no_grad():
            for x in batches(calibrate):
                model(x)
    model.eval()
    encoder = getattr(model, "encoder", model)
    with torch.no_grad():
        return np.concatenate([multiscale_features(encoder, x).numpy() for x in batches(cases)])


def multiscale_features(encoder: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(B, sum C_i) spatial means of every level of ``forward_intermediates`` (ViT blocks, CNN
    stages), concatenated: a random-feature floor from the last level alone is degenerate for
    a ResNet, whose zero-initialised residual branches make its last stage the same constant
    for every input (measured: feature std across AdrenalMNIST3D cases 0 at stage 4, 0.01-0.03
    at stages 1-3)."""
    if not callable(getattr(encoder, "forward_intermediates", None)):
        return pooled_features(encoder, x).float()  # a model without levels: its pooled output
    maps = encoder.forward_intermediates(x)  # [(B, C_i, d_i, h_i, w_i)]
    return torch.cat([m.float().flatten(2).mean(dim=2) for m in maps], dim=1)


def _fit_score(x_tr: np.ndarray, y_tr: np.ndarray, x_te: np.ndarray, C: float) -> np.ndarray:
    """Class probabilities on the test cases from a standardized logistic regression."""

    n_classes = int(y_tr.max()) + 1 if y_tr.size else 0
    if len(np.unique(y_tr)) < 2:  # a single labeled class: predict it with certainty
        proba = np.zeros((len(x_te), max(n_classes, 2)))
        proba[:, int(y_tr[0])] = 1.0
        return proba
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000, C=C))
    model.fit(x_tr, y_tr)
    proba = np.zeros((len(x_te), max(n_classes, 2)))
    proba[:, model.classes_] = model.predict_proba(x_te)
    return proba


def floor_rows(ft: FinetuneConfig, seed: int, C: float = 0.1) -> dict[str, list[dict]]:
    """Per-case test rows (case_id, label, score, pred) of both floors for one budget and seed.

    ``ft`` is the fine-tuning config of the cell (its label subset and architecture are used).
    """
    store = Store(ft.data)
    cases = split_finetune_cases(store, ft)
    train = cases["train"]
    names = class_names(store, train, ft.label_key)
    test = [c for c in cases["test"] if str(case_label(store.index[c], ft.label_key)) in set(names)]
    y_tr = np.array([names.index(str(case_label(store.index[c], ft.label_key))) for c in train])
    y_te = np.array([names.index(str(case_label(store.index[c], ft.label_key))) for c in test])
    vox_tr = np.array([[foreground_voxels(store, c)] for c in train])
    vox_te = np.array([[foreground_voxels(store, c)] for c in test])
    pool = sorted(set(train) | set(cases["unlabeled"]))[:256]
    f = random_features(ft, store, train + test, max(len(names), 2), seed, calibrate=pool)
    probas = {
        FLOOR_VOXELS: _fit_score(vox_tr, y_tr, vox_te, C=1.0),
        FLOOR_PROBE: _fit_score(f[: len(train)], y_tr, f[len(train) :], C=C),
    }
    out = {}
    for name, proba in probas.items():
        out[name] = [
            {
                "case_id": c,
                "label": int(y),
                "score": float(p[1]) if proba.shape[1] == 2 else [float(v) for v in p],
                "pred": names[int(np.argmax(p))] if int(np.argmax(p)) < len(names) else "",
            }
            for c, y, p in zip(test, y_te, proba, strict=True)
        ]
    return out
