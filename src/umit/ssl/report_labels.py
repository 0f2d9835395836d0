"""Weak multi-label pretraining from report-derived labels (``method=report_labels``).

Many studies have a report and no voxel labels; ``umit labels from-reports`` turns each report
into present / absent / uncertain / not_mentioned per finding. This wrapper puts a linear
multi-label head on any encoder (pooled features through the feature API) and trains both with
binary cross-entropy on those labels; an unknown label (uncertain or not_mentioned under an
"ignore" policy) is masked out of the loss. The encoder is then fine-tuned as after any other
pretraining. The logged ``baseline_loss`` is the BCE of predicting each finding's training
prevalence for every case, what a model that ignores the image scores.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from umit.models.heads import feature_dim, pooled_features

__all__ = ["LabeledCrops", "ReportLabels3D", "label_matrix"]


def label_matrix(
    cases: list[str], targets: Mapping[str, Mapping[str, int]], findings: list[str]
) -> tuple[np.ndarray, np.ndarray]:
    """``(values, mask)``, both (N, K) float32: finding ``k`` of case ``n`` and whether known.

    Args:
        cases: Case ids (rows).
        targets: Finding -> case -> 0/1 (cases without a label are absent from the mapping).
        findings: Finding names (columns).
    """
    values = np.zeros((len(cases), len(findings)), dtype=np.float32)
    mask = np.zeros_like(values)
    for k, f in enumerate(findings):
        for n, c in enumerate(cases):
            if c in targets[f]:
                values[n, k] = float(targets[f][c])
                mask[n, k] = 1.0
    return values, mask


class LabeledCrops(Dataset):
    """Adds ``report_targets`` and ``report_mask`` (K,) to each crop of ``dataset`` by its
    ``case_id``; forwards ``set_epoch`` so crops and augmentation stay per-epoch."""

    def __init__(self, dataset: Any, cases: list[str], values: np.ndarray, mask: np.ndarray):
        self.dataset = dataset
        self.row = {c: i for i, c in enumerate(cases)}
        self.values = torch.from_numpy(values)
        self.mask = torch.from_numpy(mask)

    def __len__(self) -> int:
        return len(self.dataset)

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = dict(self.dataset[index])
        i = self.row[sample["case_id"]]
        sample["report_targets"] = self.values[i]
        sample["report_mask"] = self.mask[i]
        return sample


class ReportLabels3D(nn.Module):
    """Encoder + linear multi-label head, masked BCE.

    Args:
        encoder: Any encoder with the feature API.
        findings: Finding names, one output each (kept in the artifact for the record).
        prevalence: (K,) training prevalence of each finding, for ``baseline_loss``.
    """

    model_name = "report_labels3d"

    def __init__(self, encoder: nn.Module, findings: list[str], prevalence: np.ndarray):
        super().__init__()
        if not findings:
            raise ValueError("report_labels needs at least one finding")
        self.encoder = encoder
        self.findings = list(findings)
        self.head = nn.Linear(feature_dim(encoder), len(findings))
        p = torch.as_tensor(np.clip(prevalence, 1e-3, 1 - 1e-3), dtype=torch.float32)
        self.register_buffer("prior_logit", torch.log(p / (1 - p)), persistent=False)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, D, H, W) -> (B, K) finding logits."""
        return self.head(pooled_features(self.encoder, x))

    @staticmethod
    def masked_bce(logits: torch.Tensor, y: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        per = F.binary_cross_entropy_with_logits(logits.float(), y, reduction="none")  # (B, K)
        return (per * m).sum() / m.sum().clamp_min(1.0)

    def forward(
        self, batch: Mapping[str, torch.Tensor], generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        """``batch``: ``image`` (B, C, D, H, W), ``report_targets`` and ``report_mask`` (B, K)."""
        x, y, m = batch["image"], batch["report_targets"].float(), batch["report_mask"].float()
        logits = self.logits(x)
        loss = self.masked_bce(logits, y, m)
        with torch.no_grad():
            base = self.masked_bce(self.prior_logit.expand_as(y), y, m)
            known = m > 0
            acc = ((logits > 0).float() == y)[known].float().mean() if known.any() else loss * 0
        return {"loss": loss, "baseline_loss": base, "label_acc": acc}


def validation_batches(
    store_dir: Any,
    crop_size: tuple[int, int, int],
    cases: list[str],
    n_crops: int,
    seed: int,
    labeled: LabeledCrops,
) -> list[dict[str, torch.Tensor]]:
    """Fixed validation crops of held-out ``cases`` with their labels, one crop per batch."""
    from umit.data.dataset import StoreCropDataset

    cases = [c for c in cases if c in labeled.row]
    if not cases:
        return []
    ds = StoreCropDataset(
        store_dir,
        crop_size,
        cases=cases,
        samples_per_case=max(1, -(-n_crops // len(cases))),
        foreground_prob=0.0,
        seed=seed,
        with_label=False,
    )
    out = []
    for i in range(min(n_crops, len(ds))):
        s = ds[i]
        row = labeled.row[s["case_id"]]
        out.append(
            {
                "image": s["image"].unsqueeze(0),
                "report_targets": labeled.values[row].unsqueeze(0),
                "report_mask": labeled.mask[row].unsqueeze(0),
            }
        )
    return out
