"""Bias mitigation in fine-tuning: the training cases' group (a catalog attribute carried in the
store index: site, sex, age band, scanner, ...) balances what the model learns from.

* ``sample``: group-balanced sampling. The training case list repeats the cases of smaller
  groups (in turn, deterministically) until every group has as many entries as the largest, so
  each group is drawn equally often; the loss is unchanged.
* ``reweight``: group-reweighted loss. Each crop's loss is weighted ``w_g = N / (G * n_g)``
  (``n_g`` training cases in group ``g`` of ``G``, ``N`` in all): every group contributes
  equally in expectation, and the mean weight over the training set is one.
* ``dro``: group DRO (Sagawa et al., 2020, online version): a distribution ``q`` over groups is
  moved towards the groups with the highest loss (``q_g <- q_g * exp(eta * L_g)``, renormalised)
  and the loss is ``sum_g q_g * L_g`` over the groups in the batch. ``q`` lives in the task, not
  in checkpoints: a resumed DRO run restarts it from uniform.

Per-crop losses come from calling the wrapped task once per crop of the batch (the same FLOPs;
the models here have no batch statistics: instance norm / layer norm).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from umit.data.cases import balanced_cases
from umit.errors import InputError

__all__ = ["GroupWeightedTask", "case_groups", "group_balanced_cases", "group_weights"]

MISSING = "unknown"


def case_groups(index: Mapping[str, Mapping[str, Any]], cases: list[str], key: str) -> dict:
    """case id -> group value of attribute ``key`` (missing values form the group ``unknown``).

    Raises:
        InputError: no case carries the attribute, or only one group is present.
    """
    groups = {c: str(index[c].get(key) or MISSING) for c in cases}
    present = sorted(set(groups.values()))
    if all(g == MISSING for g in present):
        attrs = sorted({k for c in cases for k in index[c]})
        raise InputError(
            None, f"balance_by={key!r}: no training case has it (case attributes: {attrs})"
        )
    if len(present) < 2:
        raise InputError(
            None, f"balance_by={key!r}: every training case is in group {present[0]!r}"
        )
    return groups


def group_balanced_cases(cases: list[str], groups: Mapping[str, str]) -> list[str]:
    """Cases of smaller groups repeated until every group has as many entries as the largest."""
    names = sorted(set(groups[c] for c in cases))
    ids = {g: i for i, g in enumerate(names)}
    return balanced_cases(cases, {c: ids[groups[c]] for c in cases})


def group_weights(cases: list[str], groups: Mapping[str, str]) -> dict[str, float]:
    """Group -> ``N / (G * n_g)``."""
    counts: dict[str, int] = {}
    for c in cases:
        counts[groups[c]] = counts.get(groups[c], 0) + 1
    n, k = len(cases), len(counts)
    return {g: n / (k * m) for g, m in counts.items()}


class GroupWeightedTask:
    """Wraps a training task: per-crop losses combined by group weights (``reweight``) or by
    group DRO (``dro``). Reports the weighted loss as ``loss``, the plain mean as
    ``loss_unweighted``; the DRO distribution ``q`` is saved in training checkpoints."""

    def __init__(
        self,
        task: Any,
        groups: Mapping[str, str],
        weights: Mapping[str, float],
        mode: str = "reweight",
        dro_eta: float = 0.01,
    ):
        if mode not in ("reweight", "dro"):
            raise ValueError(f"mode must be 'reweight' or 'dro', got {mode!r}")
        self.task = task
        self.groups = dict(groups)
        self.weights = dict(weights)
        self.mode = mode
        self.dro_eta = float(dro_eta)
        self.names = sorted(self.weights)
        self.q = torch.full((len(self.names),), 1.0 / len(self.names), dtype=torch.float64)

    def trainable_module(self) -> nn.Module:
        return self.task.trainable_module()

    def set_trainable_module(self, module: nn.Module) -> None:
        self.task.set_trainable_module(module)

    def state_dict(self) -> dict[str, Any]:
        return {"q": self.q.tolist(), "names": self.names}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if list(state.get("names", [])) == self.names:
            self.q = torch.tensor(state["q"], dtype=torch.float64)

    def per_crop_losses(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """(B,) losses, one call of the wrapped task per crop."""
        n = len(batch["case_id"])
        losses = []
        for i in range(n):
            one = {k: (v[i : i + 1] if torch.is_tensor(v) else [v[i]]) for k, v in batch.items()}
            losses.append(self.task(one)["loss"])
        return torch.stack(losses)

    def __call__(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        per = self.per_crop_losses(batch)  # (B,)
        g = [self.groups[c] for c in batch["case_id"]]
        if self.mode == "reweight":
            w = torch.tensor([self.weights[x] for x in g], dtype=per.dtype, device=per.device)
            return {"loss": (w * per).mean(), "loss_unweighted": per.mean().detach()}
        present = {}
        for j, name in enumerate(self.names):
            sel = [i for i, x in enumerate(g) if x == name]
            if sel:
                present[j] = per[sel].mean()
                self.q[j] *= float(torch.exp(self.dro_eta * present[j].detach().float()))
        self.q /= self.q.sum()
        loss = sum(float(self.q[j]) * lg for j, lg in present.items())
        return {"loss": loss, "loss_unweighted": per.mean().detach()}
