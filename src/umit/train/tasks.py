"""The Task protocol: what the training loop needs from a method (SSL, segmentation, ...).

A task owns its model(s) and turns one batch into ``dict(loss=tensor, **logs)``. The loop
optimizes ``task.trainable_module()``; logs are scalars (or tensors, averaged) that the loop
averages over the logging window and across processes.

Required:
    ``task(batch) -> Mapping[str, Tensor]`` with a scalar ``"loss"``.
    ``task.trainable_module() -> nn.Module``: the (unwrapped) module whose parameters are
    optimized, saved in checkpoints and wrapped for DDP/FSDP.

Optional (looked up with ``getattr``; a method returning None means "not reported"):
    ``set_trainable_module(module)``: receives the DDP-wrapped / compiled module; ``__call__``
        must then call that object so DDP can synchronize gradients. Required when the loop
        wraps the module (several processes with DDP, or ``compile=True``).
    ``to(device)``: move everything the task owns (default: the trainable module is moved).
    ``flops_per_sample(batch) -> float``: training FLOPs (forward + backward) per sample.
    ``tokens_per_sample(batch) -> float``: tokens (e.g. patches) per sample.
    ``on_step_end(step)``: after optimizer step ``step`` (0-based, the schedule index), e.g.
        an EMA teacher update with ``momentum[step]``.
    ``state_dict()`` / ``load_state_dict(state)``: extra state (teacher weights, centers) as
        plain data, saved in and restored from checkpoints.
    ``evaluate(step) -> Mapping[str, float]``: validation metrics, run every ``eval_every``.

A task whose model computes the loss itself (an SSL wrapper module whose ``forward(batch)``
returns the dict) can use :class:`ModuleTask` as is.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from umit.train.losses import dice_ce_loss


@runtime_checkable
class Task(Protocol):
    def __call__(self, batch: Any) -> Mapping[str, torch.Tensor]: ...

    def trainable_module(self) -> nn.Module: ...


class ModuleTask:
    """A task whose module's ``forward(batch)`` returns ``dict(loss=..., **logs)``."""

    def __init__(self, module: nn.Module):
        self.module = module
        self._call: nn.Module = module

    def trainable_module(self) -> nn.Module:
        return self.module

    def set_trainable_module(self, module: nn.Module) -> None:
        self._call = module

    def __call__(self, batch: Any) -> Mapping[str, torch.Tensor]:
        return self._call(batch)


class RegressionTask(ModuleTask):
    """Tiny supervised example: ``batch = (x, y)`` (or ``{"x", "y"}``), MSE loss, MAE log.

    Args:
        model: maps ``x`` to a prediction shaped like ``y``.
        flops_per_sample: training FLOPs per sample to report; default ``6 * num_params``
            (forward 2 FLOPs per weight and sample, backward twice that; exact for an MLP).
        tokens_per_sample: tokens per sample to report (None: not reported).
    """

    def __init__(
        self,
        model: nn.Module,
        flops_per_sample: float | None = None,
        tokens_per_sample: float | None = None,
    ):
        super().__init__(model)
        n_params = sum(p.numel() for p in model.parameters())
        self._flops = 6.0 * n_params if flops_per_sample is None else float(flops_per_sample)
        self._tokens = tokens_per_sample

    @staticmethod
    def _unpack(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(batch, Mapping):
            return batch["x"], batch["y"]
        x, y = batch
        return x, y

    def __call__(self, batch: Any) -> dict[str, torch.Tensor]:
        x, y = self._unpack(batch)
        pred = self._call(x)
        # Losses in float32 even under autocast: bf16 sums lose the small differences.
        pred = pred.float()
        loss = F.mse_loss(pred, y.float())
        return {"loss": loss, "mae": (pred - y).abs().mean().detach()}

    def flops_per_sample(self, batch: Any) -> float:
        return self._flops

    def tokens_per_sample(self, batch: Any) -> float | None:
        return self._tokens


class SegmentationTask(ModuleTask):
    """DiceCE on crops ``{"image", "label"}``; deep supervision (a list of outputs, finest
    first) weighted 1, 1/2, 1/4, ... and normalised, as nnU-Net does. ``ce_weight`` scales the
    cross-entropy term (the Dice term has weight 1)."""

    def __init__(self, module: nn.Module, ce_weight: float = 1.0):
        super().__init__(module)
        self.ce_weight = float(ce_weight)

    @property
    def model(self) -> nn.Module:
        return self.module

    def __call__(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        out = self._call(batch["image"])
        return {"loss": segmentation_loss(out, batch["label"], self.ce_weight)}


def segmentation_loss(
    out: torch.Tensor | list[torch.Tensor] | tuple[torch.Tensor, ...],
    label: torch.Tensor,
    ce_weight: float = 1.0,
) -> torch.Tensor:
    """DiceCE of logits (B, K, D, H, W) against ``label`` (B, 1, D, H, W); a list of outputs
    (deep supervision, finest first) is weighted 1, 1/2, 1/4, ... and normalised."""
    if not isinstance(out, list | tuple):
        return dice_ce_loss(out, label, ce_weight=ce_weight)
    weights = [0.5**i for i in range(len(out))]
    total = sum(weights)
    loss = out[0].new_zeros((), dtype=torch.float32)
    for w, o in zip(weights, out, strict=True):
        lab = (
            label
            if o.shape[2:] == label.shape[2:]
            else F.interpolate(label.float(), size=o.shape[2:], mode="nearest").long()
        )
        loss = loss + (w / total) * dice_ce_loss(o, lab, ce_weight=ce_weight)
    return loss


class ClassificationTask(ModuleTask):
    """Cross-entropy on a per-case label: ``targets`` maps ``batch["case_id"]`` to a class index."""

    def __init__(self, model: nn.Module, targets: Mapping[str, int]):
        super().__init__(model)
        self.targets = dict(targets)

    @property
    def model(self) -> nn.Module:
        return self.module

    def __call__(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        y = torch.tensor([self.targets[c] for c in batch["case_id"]], device=batch["image"].device)
        logits = self._call(batch["image"])
        loss = F.cross_entropy(logits.float(), y)
        acc = (logits.argmax(1) == y).float().mean().detach()
        return {"loss": loss, "acc": acc}
