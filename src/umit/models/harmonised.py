"""A segmenter that sees every contrast phase, synthesised by a frozen cross-phase network.

A cross-phase network (``umit pretrain method=cross_phase scope=network``, trained on unlabeled
multiphase exams) predicts from one contrast phase of a crop what every phase looks like there:
the input plus a predicted change per phase. Wherever its prediction is right, its output is the
same whatever phase it was shown. Put in front of a task model, frozen, it turns a series of any
phase into the same P-channel "all phases" input, so a segmenter trained on a few labeled series
of one phase meets the same kind of input on a series of a phase none of them had (the case
docs/evidence.md finds cross-phase fine-tuning does not fix). The front also shows each enhancing
organ enhanced, a cue learned without labels.

:class:`PhaseHarmonisedModel` (registered as ``phase_harmonised``) holds both parts. The front is
rebuilt from plain arguments and its weights travel in the state dict, so the saved model is one
self-contained file like any other. Only the task model trains: the front's parameters have
``requires_grad=False`` and it stays in eval mode whatever ``train()`` is called with.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from umit.models.registry import create_model, register_model

__all__ = ["PhaseHarmonisedModel"]


class PhaseHarmonisedModel(nn.Module):
    """``net(front_input + front(front_input))``: a frozen cross-phase front, then the task model.

    Args:
        front: the cross-phase network, ``in_chans`` inputs to ``P`` outputs (the predicted change
            of each phase; the input is added back, broadcast over the phases, as in pretraining).
        net: the task model, built with ``in_chans=P``.
    """

    def __init__(self, front: nn.Module, net: nn.Module):
        super().__init__()
        self.front = front.eval().requires_grad_(False)
        self.net = net

    @property
    def encoder(self) -> nn.Module:
        """The task model's encoder (``freeze``, ``encoder_lr_scale``); never the front's."""
        return self.net.encoder

    @property
    def out_channels(self) -> int | None:
        return getattr(self.net, "out_channels", None)

    def train(self, mode: bool = True) -> PhaseHarmonisedModel:
        """The task model's mode; the front stays in eval (no dropout, fixed statistics)."""
        super().train(mode)
        self.front.eval()
        return self

    def harmonise(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, D, H, W) one phase -> (B, P, D, H, W) every phase, without gradients."""
        with torch.no_grad():
            return x + self.front(x)  # (B, 1, ...) broadcast over the P predicted changes

    def forward(self, x: torch.Tensor) -> Any:
        return self.net(self.harmonise(x))

    def no_weight_decay(self) -> set[str]:
        inner = getattr(self.net, "no_weight_decay", lambda: set())()
        return {f"net.{n}" for n in inner}

    def layer_id_fn(self) -> Callable[[str], int]:
        """The task model's layer ids under ``net.`` (the front is frozen: no optimizer group)."""
        from umit.models.heads import wrapped_layer_id_fn  # noqa: PLC0415 (heads imports registry)

        return wrapped_layer_id_fn(self.net)


@register_model
def phase_harmonised(
    model: str,
    front_model: str,
    front_args: dict[str, Any],
    model_args: dict[str, Any] | None = None,
    in_chans: int | None = None,
    **kwargs: Any,
) -> PhaseHarmonisedModel:
    """``create_model("phase_harmonised", model="unetr", model_args={...}, front_model="unetr",
    front_args={..., "in_chans": 1, "out_channels": 3})``.

    ``in_chans`` is the input's: one CT channel, which the front takes. The task model is built
    with one input channel per phase the front predicts. Other keyword arguments go to it.

    Raises:
        ValueError: the front's arguments lack ``out_channels``, the input or the front has more
            than one channel, or the task model's ``in_chans`` is not the number of phases.
    """
    front_args = dict(front_args)
    phases = front_args.get("out_channels")
    if not isinstance(phases, int) or phases < 2:
        raise ValueError(
            f"a harmonising front needs out_channels >= 2 (one per phase), got {phases!r}"
        )
    takes = int(front_args.get("in_chans", 1))
    if takes != 1 or (in_chans is not None and int(in_chans) != 1):
        raise ValueError(
            f"a cross-phase front predicts each phase from one CT channel; it takes {takes} "
            f"and in_chans={in_chans} was given"
        )
    args = {**(model_args or {}), **kwargs}
    if args.setdefault("in_chans", phases) != phases:
        raise ValueError(
            f"the task model sees the front's {phases} phases; its in_chans={args['in_chans']}"
        )
    net = create_model(model, **args)  # first: the same random draws as the model alone
    front = create_model(front_model, **front_args)
    return PhaseHarmonisedModel(front, net)
