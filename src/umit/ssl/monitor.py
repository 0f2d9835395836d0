"""Online monitor of pretraining: kNN and linear-probe scores of the frozen encoder (DINO-style).

A fixed, labeled subset of non-test cases (centre crops) is embedded with the encoder in eval mode
(pooled features, :func:`umit.models.heads.pooled_features`); a fixed stratified 50/50 split gives
a cosine kNN accuracy and a logistic-regression (standardized features) accuracy and AUC. A run
whose encoder learns nothing shows flat or chance-level scores within minutes.

The pure functions here (:func:`centre_crop_or_pad`, :func:`fit_probes`) are shared with
``umit probe`` (:mod:`umit.eval.probes`), which imports them from this lower layer.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, balanced_accuracy_score, roc_auc_score
from sklearn.model_selection import train_test_split
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from umit.data.cases import centre_crop_or_pad
from umit.models.heads import pooled_features

log = logging.getLogger(__name__)

__all__ = ["Monitor", "build_monitor", "centre_crop_or_pad", "fit_probes"]


def fit_probes(
    x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray, k: int
) -> dict[str, Any]:
    """Linear (logistic regression) and kNN (cosine, distance-weighted) probe scores."""

    classes = np.unique(y_train)
    out: dict[str, Any] = {}
    models = {
        "linear": make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000, C=0.1)),
        "knn": KNeighborsClassifier(
            n_neighbors=min(k, len(y_train)), metric="cosine", weights="distance"
        ),
    }
    for name, model in models.items():
        model.fit(x_train, y_train)
        pred = model.predict(x_test)
        res = {
            "accuracy": float(accuracy_score(y_test, pred)),
            "balanced_accuracy": float(balanced_accuracy_score(y_test, pred)),
        }
        if len(np.unique(y_test)) > 1:
            proba = model.predict_proba(x_test)
            if len(classes) == 2:
                res["auc"] = float(roc_auc_score(y_test, proba[:, 1]))
            elif set(np.unique(y_test)) <= set(classes):
                res["auc"] = float(roc_auc_score(y_test, proba, multi_class="ovr", labels=classes))
        out[name] = res
    return out


class Monitor:
    """kNN / probe scores of an encoder on fixed labeled volumes.

    Args:
        encoder: the encoder being pretrained (shared, not copied).
        volumes: (N, C, D, H, W) float32 crops.
        labels: (N,) labels (strings).
        k: neighbours of the kNN classifier.
        seed: seed of the fixed split.
        batch_size: volumes per forward pass.
    """

    def __init__(
        self,
        encoder: torch.nn.Module,
        volumes: np.ndarray,
        labels: np.ndarray,
        k: int = 10,
        seed: int = 0,
        batch_size: int = 8,
    ):
        self.encoder = encoder
        self.volumes = torch.from_numpy(np.ascontiguousarray(volumes, dtype=np.float32))
        self.labels = np.asarray(labels).astype(str)
        self.k = k
        self.batch_size = batch_size
        idx = np.arange(len(self.labels))
        counts = {v: int((self.labels == v).sum()) for v in set(self.labels.tolist())}
        stratify = self.labels if min(counts.values()) >= 2 else None
        self.train_idx, self.test_idx = train_test_split(
            idx, test_size=0.5, random_state=seed, stratify=stratify
        )

    @torch.no_grad()
    def features(self) -> np.ndarray:
        """(N, F) pooled features in eval mode (the encoder's mode is restored)."""

        enc = self.encoder
        was_training = enc.training
        enc.eval()
        device = next(enc.parameters()).device
        feats = []
        for i in range(0, len(self.volumes), self.batch_size):
            x = self.volumes[i : i + self.batch_size].to(device)
            feats.append(pooled_features(enc, x).float().cpu().numpy())
        enc.train(was_training)
        return np.concatenate(feats)

    def __call__(self, step: int = 0) -> dict[str, float]:
        f = self.features()
        tr, te = self.train_idx, self.test_idx
        scores = fit_probes(f[tr], self.labels[tr], f[te], self.labels[te], self.k)
        out = {
            "knn_acc": scores["knn"]["accuracy"],
            "probe_acc": scores["linear"]["accuracy"],
        }
        if "auc" in scores["linear"]:
            out["probe_auc"] = scores["linear"]["auc"]
        if "auc" in scores["knn"]:
            out["knn_auc"] = scores["knn"]["auc"]
        return out


def build_monitor(
    encoder: torch.nn.Module,
    store: Any,
    cases: list[str],
    label_key: str,
    max_cases: int,
    crop_size: tuple[int, int, int],
    seed: int,
    k: int = 10,
) -> Monitor | None:
    """A :class:`Monitor` over up to ``max_cases`` labeled ``cases`` (None when it cannot work)."""
    labeled = {}
    for c in cases:
        v = store.index[c].get(label_key)
        if isinstance(v, list) and len(v) == 1:
            v = v[0]
        if v is not None:
            labeled[c] = str(v)
    if len(labeled) < 4 or len(set(labeled.values())) < 2:
        log.warning(
            "monitor: label %r has %d labeled cases in %d classes; need >= 4 cases, 2 classes "
            "(monitor off)",
            label_key,
            len(labeled),
            len(set(labeled.values())),
        )
        return None
    ids = sorted(labeled)
    if len(ids) > max_cases:
        order = np.random.default_rng(seed).permutation(len(ids))[:max_cases]
        ids = sorted(ids[i] for i in order)
    vols = []
    for c in ids:
        case = store.case(c)
        vols.append(
            centre_crop_or_pad(np.asarray(case.read(), np.float32), crop_size, case.pad_values)
        )
    return Monitor(encoder, np.stack(vols), np.array([labeled[c] for c in ids]), k=k, seed=seed)
