"""Linear-probe and kNN evaluation of a frozen encoder: is pretraining learning anything useful?

Each case of a preprocessed store is turned into one feature vector (the encoder's final tokens:
mean of patch tokens, plus the class token when there is one) from a centred crop (padded with
the channel's background value when the volume is smaller). A logistic regression (on
standardized features) and a cosine kNN classifier are fit on the training cases and scored on
held-out cases against any per-case label of the store index (``target`` for MedMNIST, or a
catalog attribute such as ``contrast`` or ``site`` for phantoms). Comparing with the same encoder
at random initialization (``compare_random``) shows what pretraining added.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import Field
from sklearn.model_selection import train_test_split

from umit.config import UmitConfig, save_config
from umit.data.cases import centre_crop_or_pad
from umit.data.store import Store
from umit.errors import InputError
from umit.models import create_model
from umit.ssl.monitor import fit_probes
from umit.train.checkpoint import load_encoder
from umit.utils.fileio import atomic_write_json

__all__ = ["ProbeConfig", "extract_features", "fit_probes", "run"]

log = logging.getLogger(__name__)


class ProbeConfig(UmitConfig):
    """Settings of ``umit probe``."""

    encoder: Path
    """Encoder checkpoint (``encoder.pt`` from ``umit pretrain``, or an MAE training checkpoint)."""
    data: Path
    """Preprocessed store (PREP folder) with a per-case label."""
    out: Path | None = None
    """Folder for probe.json and config.yaml (default: beside the encoder)."""
    label_key: str = "target"
    """Per-case label in the store index: ``target`` or a catalog attribute (sex, site, contrast...)."""
    train_splits: list[str] = Field(default_factory=lambda: ["train"])
    """Splits the probes are fit on (cases without a split use a seeded stratified hold-out)."""
    eval_split: str = "test"
    """Split the probes are scored on."""
    holdout_fraction: float = Field(default=0.3, gt=0, lt=1)
    """Hold-out fraction when the store has no splits."""
    input_size: tuple[int, int, int] | None = None
    """Centred crop fed to the encoder (default: the encoder's img_size)."""
    k: int = Field(default=20, ge=1)
    """Neighbours of the kNN classifier."""
    compare_random: bool = True
    """Also probe the same architecture with random weights (same seed), as the baseline."""
    batch_size: int = Field(default=8, ge=1)
    """Volumes per forward pass."""
    seed: int = 0
    """Seed of the hold-out split and of the random-init baseline."""


@torch.no_grad()
def extract_features(
    encoder: torch.nn.Module, volumes: list[np.ndarray], batch_size: int = 8
) -> np.ndarray:
    """(N, F) features: mean patch token (+ class token) of ``forward_features``."""
    encoder.eval()
    feats = []
    P = getattr(encoder, "num_prefix_tokens", 0)
    for i in range(0, len(volumes), batch_size):
        x = torch.from_numpy(np.stack(volumes[i : i + batch_size]))
        tokens = encoder.forward_features(x)  # (B, P + L, C)
        f = tokens[:, P:].mean(dim=1)
        if P:
            f = torch.cat([f, tokens[:, 0]], dim=1)  # (B, C) -> (B, 2C)
        feats.append(f.float().numpy())
    return np.concatenate(feats)


def split_for_probe(
    labels: dict[str, Any], splits: dict[str, str | None], cfg: ProbeConfig
) -> tuple[list[str], list[str]]:
    """Train / eval case ids: the store's splits when present, else a stratified hold-out."""
    train = [c for c in labels if splits.get(c) in cfg.train_splits]
    test = [c for c in labels if splits.get(c) == cfg.eval_split]
    if train and test:
        return sorted(train), sorted(test)

    ids = sorted(labels)
    y = [str(labels[c]) for c in ids]
    counts = {v: y.count(v) for v in set(y)}
    stratify = y if min(counts.values()) >= 2 else None
    tr, te = train_test_split(
        ids, test_size=cfg.holdout_fraction, random_state=cfg.seed, stratify=stratify
    )
    return sorted(tr), sorted(te)


def run(cfg: ProbeConfig) -> dict[str, Any]:
    """Probe the encoder (and its random-init twin); writes and returns the scores."""

    encoder, ckpt = load_encoder(cfg.encoder)
    store = Store(cfg.data)
    labels = {
        c: e.get(cfg.label_key) for c, e in store.index.items() if e.get(cfg.label_key) is not None
    }
    labels = {c: (v[0] if isinstance(v, list) and len(v) == 1 else v) for c, v in labels.items()}
    if len(set(map(str, labels.values()))) < 2:
        raise InputError(
            cfg.data, f"label {cfg.label_key!r} has fewer than 2 classes over the store's cases"
        )
    splits = {c: store.index[c].get("split") for c in labels}
    train_ids, test_ids = split_for_probe(labels, splits, cfg)
    size = tuple(cfg.input_size or ckpt["model_args"].get("img_size") or (64, 64, 64))
    if isinstance(size[0], list):  # stored as nested lists
        size = tuple(size[0])
    size = tuple(int(s) for s in (size if len(size) == 3 else (size[0],) * 3))

    def volumes(ids: list[str]) -> list[np.ndarray]:
        out = []
        for c in ids:
            case = store.case(c)
            out.append(
                centre_crop_or_pad(np.asarray(case.read(), dtype=np.float32), size, case.pad_values)
            )
        return out

    v_train, v_test = volumes(train_ids), volumes(test_ids)
    to_y = np.vectorize(str)
    y_train = to_y(np.array([labels[c] for c in train_ids], dtype=object))
    y_test = to_y(np.array([labels[c] for c in test_ids], dtype=object))
    results: dict[str, Any] = {
        "encoder": str(cfg.encoder),
        "label_key": cfg.label_key,
        "n_train": len(train_ids),
        "n_test": len(test_ids),
        "classes": sorted(set(y_train.tolist())),
        "input_size": list(size),
    }
    encoders = {"pretrained": encoder}
    if cfg.compare_random:
        torch.manual_seed(cfg.seed)
        # the same architecture as loaded (works for encoder.pt and MAE training checkpoints)
        encoders["random_init"] = create_model(encoder.model_name, **dict(encoder.model_args))
    for name, enc in encoders.items():
        f_train = extract_features(enc, v_train, cfg.batch_size)
        f_test = extract_features(enc, v_test, cfg.batch_size)
        results[name] = fit_probes(f_train, y_train, f_test, y_test, cfg.k)
    out = cfg.out or Path(cfg.encoder).parent
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out, name="probe_config.yaml")
    atomic_write_json(out / f"probe_{cfg.label_key}.json", results)
    results["written"] = str(out / f"probe_{cfg.label_key}.json")
    return results
