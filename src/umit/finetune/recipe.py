"""Fine-tuning a pretrained encoder under a fresh decoder: a smaller encoder learning rate and
LP-FT (the decoder / head first on the frozen encoder's features, then everything).

Both guard the pretrained weights against the large, noisy gradients a randomly initialised
decoder sends back in the first steps (Kumar et al., 2022, "Fine-Tuning can Distort Pretrained
Features"). :func:`encoder_recipe` wraps the task and, when needed, supplies the optimizer; with
the defaults (scale 1, no frozen steps) it changes nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from umit.errors import InputError
from umit.train.config import TrainConfig
from umit.train.optim import LayerIdFn, make_optimizer, param_groups

ENCODER_PREFIX = "encoder."


def encoder_of(model: nn.Module) -> nn.Module:
    """``model.encoder``, or an :class:`InputError` naming the model that has none."""
    encoder = getattr(model, "encoder", None)
    if not isinstance(encoder, nn.Module):
        raise InputError(
            None,
            f"encoder_lr_scale / encoder_frozen_steps need a model with an encoder; "
            f"{type(model).__name__} has none (set encoder_lr_scale=1.0, encoder_frozen_steps=0)",
        )
    return encoder


def scale_encoder_groups(groups: list[dict], scale: float) -> list[dict]:
    """Split each parameter group into its encoder part (``lr_scale`` times ``scale``) and the
    rest (unchanged); empty parts are dropped. Groups carry ``param_names`` as
    :func:`~umit.train.optim.param_groups` writes them."""
    out = []
    for g in groups:
        for is_encoder in (True, False):
            idx = [
                i
                for i, n in enumerate(g["param_names"])
                if n.startswith(ENCODER_PREFIX) == is_encoder
            ]
            if not idx:
                continue
            out.append(
                {
                    **g,
                    "params": [g["params"][i] for i in idx],
                    "param_names": [g["param_names"][i] for i in idx],
                    "lr_scale": g["lr_scale"] * (scale if is_encoder else 1.0),
                }
            )
    return out


def encoder_lr_optimizer(
    cfg: TrainConfig, scale: float, layer_id_fn: LayerIdFn | None = None
) -> Callable[[nn.Module], torch.optim.Optimizer]:
    """An optimizer factory for the loop: ``cfg.optimizer`` over :func:`~umit.train.optim.param_groups`
    (layer decay as ``cfg`` asks) with the encoder's groups at ``scale`` times the learning
    rate. Fused on CPU and CUDA, like the loop's own optimizer."""

    def make(module: nn.Module) -> torch.optim.Optimizer:
        decay = cfg.layer_decay if layer_id_fn is not None else 1.0
        groups = scale_encoder_groups(param_groups(module, layer_id_fn, decay), scale)
        devices = {p.device.type for p in module.parameters()}
        return make_optimizer(groups, cfg, fused=devices <= {"cpu", "cuda"} or None)

    return make


class EncoderFrozenFirst:
    """A task whose model's encoder is frozen for the first ``steps`` optimizer steps (LP-FT).

    The encoder's parameters get ``requires_grad=False`` while frozen, so no gradient reaches
    them (nor the optimizer's moments or weight decay) and the backward pass stops at the
    decoder; from step ``steps`` on they train with the rest. The step count is saved with the
    loop's checkpoints, so a resumed run freezes exactly as an uninterrupted one. Every other
    task hook is the wrapped task's. Single-process or DDP with unused parameters allowed:
    DDP's default reducer expects the same parameters to need gradients on every step.
    """

    def __init__(self, task: Any, encoder: nn.Module, steps: int):
        self.task = task
        self.steps = int(steps)
        self.step = 0
        self._params = [p for p in encoder.parameters() if p.requires_grad]

    @property
    def frozen(self) -> bool:
        return self.step < self.steps

    def __getattr__(self, name: str) -> Any:  # optional hooks of the wrapped task
        if "task" not in self.__dict__:
            raise AttributeError(name)
        return getattr(self.__dict__["task"], name)

    def __call__(self, batch: Any) -> Mapping[str, torch.Tensor]:
        for p in self._params:
            p.requires_grad_(not self.frozen)
        return self.task(batch)

    def on_step_end(self, step: int) -> None:
        self.step = step + 1
        hook = getattr(self.task, "on_step_end", None)
        if callable(hook):
            hook(step)

    def state_dict(self) -> dict[str, Any]:
        inner = getattr(self.task, "state_dict", None)
        return {"step": self.step, "task": inner() if callable(inner) else None}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.step = int(state["step"])
        inner = getattr(self.task, "load_state_dict", None)
        if state.get("task") is not None and callable(inner):
            inner(state["task"])


def encoder_recipe(
    model: nn.Module,
    task: Any,
    cfg: TrainConfig,
    *,
    lr_scale: float = 1.0,
    frozen_steps: int = 0,
    layer_id_fn: LayerIdFn | None = None,
) -> tuple[Any, Callable[[nn.Module], torch.optim.Optimizer] | None]:
    """The task (wrapped by :class:`EncoderFrozenFirst` when ``frozen_steps``) and the
    optimizer factory (None: the loop's own) for an encoder LR ``lr_scale`` and LP-FT.

    Raises:
        InputError: the model has no encoder, or the encoder would stay frozen for the whole
            schedule (that is ``freeze=encoder``).
    """
    if lr_scale == 1.0 and frozen_steps == 0:
        return task, None
    encoder = encoder_of(model)
    if frozen_steps >= cfg.total_steps:
        raise InputError(
            None,
            f"encoder_frozen_steps ({frozen_steps}) must be below the schedule's total_steps "
            f"({cfg.total_steps}); for an encoder frozen throughout set freeze=encoder",
        )
    if frozen_steps:
        task = EncoderFrozenFirst(task, encoder, frozen_steps)
    factory = encoder_lr_optimizer(cfg, lr_scale, layer_id_fn) if lr_scale != 1.0 else None
    return task, factory
