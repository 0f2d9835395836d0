"""DP-SGD for ``umit finetune --dp``: Opacus clipping, noise, accounting and Poisson sampling.

What changes under DP, and nothing else (the training loop stays the one loop):

* **Data**: each optimizer step takes a Poisson sample of the training cases (every case joins
  with probability ``q = batch_size / N``; Opacus ``UniformWithReplacementSampler``), as the
  privacy accounting assumes. An "epoch" is ``1 / q`` such steps; empty batches still make a
  (noise-only) step, since skipping them would reveal that the sample was empty.
* **Per-sample gradients** (``p.grad_sample``), by one of two engines:

  - ``loop`` (default): one forward/backward per sample. Works for every model (our ViT
    encoders keep ``cls_token`` / ``pos_embed`` on the encoder and are called through
    ``forward_features``, so Opacus' module hooks never see them; the CNNs add residuals in
    place and use a custom autograd convolution, which full backward hooks and functorch
    reject). Memory: one per-sample gradient per parameter and sample, as Opacus.
  - ``hooks``: Opacus ``GradSampleModule`` (vectorised, faster) for models built only from
    layers Opacus supports and called through ``__call__``; models it cannot handle fail with
    Opacus' error at the first step.

* **Optimizer**: the AdamW of :func:`umit.train.optim.build_optimizer` (same groups, schedules and
  layer decay) wrapped in Opacus ``DPOptimizer``: clip each sample's gradient to
  ``max_grad_norm``, sum, add Gaussian noise of std ``noise_multiplier * max_grad_norm``, divide
  by the expected batch size. An Opacus accountant (RDP or PRV) counts the steps actually taken;
  the noise multiplier is calibrated up front so that ``train.total_steps`` steps spend at most
  ``target_epsilon`` at ``delta``.

The privacy unit is a training case (patient): each case must appear once in the dataset
(``samples_per_case=1``, no class balancing). BatchNorm (which mixes samples of a batch) and norms
with running statistics (data-dependent buffers released without noise) are refused.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Mapping
from itertools import islice
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field
from torch import nn

from umit.config import UmitConfig
from umit.errors import InputError
from umit.train import distributed as du
from umit.train.checkpoint import update_artifact
from umit.train.config import TrainConfig
from umit.train.optim import build_optimizer

log = logging.getLogger(__name__)


class DPConfig(UmitConfig):
    """DP-SGD settings (the ``dp`` section of ``umit finetune``)."""

    enabled: bool = False
    """Train with DP-SGD (``umit finetune --dp``)."""
    target_epsilon: float = Field(default=8.0, gt=0)
    """Privacy budget epsilon to spend over ``train.total_steps`` steps."""
    delta: float | None = Field(default=None, gt=0, lt=1)
    """Privacy parameter delta; ``None``: ``1 / (10 N)`` for ``N`` training cases."""
    max_grad_norm: float = Field(default=1.0, gt=0)
    """Per-sample gradient clipping norm (L2 over all trainable parameters)."""
    accountant: Literal["rdp", "prv"] = "rdp"
    """Opacus privacy accountant: ``rdp`` (Renyi DP, conservative) or ``prv`` (tighter)."""
    grad_sample_mode: Literal["loop", "hooks"] = "loop"
    """Per-sample gradients: ``loop`` (any model) or Opacus ``GradSampleModule`` hooks."""


def default_delta(n: int) -> float:
    """``1 / (10 N)``: well below the ``1 / N`` at which releasing one record would be allowed."""
    return 1.0 / (10.0 * n)


def check_dp_model(model: nn.Module) -> None:
    """Refuse modules that break per-sample privacy: BatchNorm and norms with running stats."""
    bad = []
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            bad.append(f"{name or 'model'} ({type(m).__name__}: mixes the samples of a batch)")
        elif isinstance(m, nn.modules.instancenorm._InstanceNorm) and m.track_running_stats:
            bad.append(
                f"{name} ({type(m).__name__} with track_running_stats: data-dependent buffers)"
            )
    if bad:
        raise InputError(
            None,
            "DP-SGD needs per-sample gradients and no data-dependent buffers; replace these "
            f"modules by GroupNorm / InstanceNorm / LayerNorm: {', '.join(bad[:8])}",
        )


def check_dp_train(cfg: TrainConfig) -> None:
    """Loop settings that DP-SGD cannot honour, refused up front with the reason."""

    problems = []
    if cfg.grad_accum_steps != 1:
        problems.append("train.grad_accum_steps must be 1 (one Poisson batch per step)")
    if cfg.clip_grad_norm is not None:
        problems.append("train.clip_grad_norm must be null (DP clips per sample: dp.max_grad_norm)")
    if cfg.precision == "fp16":
        problems.append("train.precision=fp16 is not supported (use fp32 or bf16)")
    if cfg.compile:
        problems.append("train.compile must be false")
    if du.world_size() > 1:
        problems.append("DP-SGD runs in one process (no DDP/FSDP)")
    if problems:
        raise InputError(None, "DP-SGD: " + "; ".join(problems))


def batch_len(batch: Any) -> int:
    """Samples in a collated batch (0 for the empty batch of a Poisson draw)."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0])
    if isinstance(batch, Mapping):
        batch = list(batch.values())
    if isinstance(batch, list | tuple):
        for item in batch:
            if isinstance(item, torch.Tensor | Mapping):
                return batch_len(item)
        return len(batch[0]) if batch and isinstance(batch[0], list | tuple) else 0
    return 0


def index_batch(batch: Any, i: int) -> Any:
    """Sample ``i`` of a collated batch, kept as a batch of one (tensors and lists sliced)."""
    if isinstance(batch, torch.Tensor):
        return batch[i : i + 1]
    if isinstance(batch, Mapping):
        return type(batch)({k: index_batch(v, i) for k, v in batch.items()})
    if isinstance(batch, list):
        return batch[i : i + 1]
    if isinstance(batch, tuple):
        return tuple(index_batch(v, i) for v in batch)
    return batch


def _collate_or_empty(collate: Callable[[list[Any]], Any]) -> Callable[[list[Any]], Any]:
    def fn(items: list[Any]) -> Any:
        return {} if not items else collate(items)

    return fn


class DPTask:
    """Wraps a task so that each call leaves per-sample gradients in ``p.grad_sample``.

    ``loop``: per-sample losses are differentiated here one sample at a time; the returned
    ``loss`` is then a detached leaf, so the loop's ``backward()`` adds nothing. ``hooks``: the
    task calls Opacus' ``GradSampleModule`` and the loop's ``backward()`` fills ``grad_sample``.
    """

    def __init__(self, task: Any, engine: DPSGD, mode: str):
        self.task = task
        self.engine = engine
        self.mode = mode
        module = task.trainable_module()
        self.params = [p for p in module.parameters() if p.requires_grad]
        if not self.params:
            raise InputError(None, "DP-SGD: the model has no trainable parameters")
        if mode == "hooks":
            from opacus import GradSampleModule  # optional: Opacus (--dp)

            setter = getattr(task, "set_trainable_module", None)
            if not callable(setter):
                raise InputError(
                    None,
                    f"{type(task).__name__} has no set_trainable_module(); use dp.grad_sample_mode=loop",
                )
            self.gsm = GradSampleModule(module, loss_reduction="mean", strict=False)
            setter(self.gsm)

    def trainable_module(self) -> nn.Module:
        return self.task.trainable_module()

    def state_dict(self) -> dict[str, Any]:
        return {"dp": self.engine.report(), "accountant_history": self.engine.history()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.engine.set_history(state.get("accountant_history") or [])

    def _empty(self) -> dict[str, torch.Tensor]:
        for p in self.params:
            p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
        return {"loss": torch.zeros((), device=self.params[0].device, requires_grad=True)}

    def __call__(self, batch: Any) -> dict[str, torch.Tensor]:
        n = batch_len(batch)
        if n == 0:
            return self._empty()
        if self.mode == "hooks":
            return dict(self.task(batch))
        grads = [torch.zeros((n, *p.shape), dtype=p.dtype, device=p.device) for p in self.params]
        logs: dict[str, list[torch.Tensor]] = {}
        for i in range(n):
            out = self.task(index_batch(batch, i))
            g = torch.autograd.grad(out["loss"], self.params, allow_unused=True)
            for k, gk in enumerate(g):
                if gk is not None:
                    grads[k][i] = gk
            for key, v in out.items():
                logs.setdefault(key, []).append(torch.as_tensor(v).detach().float().mean())
        for p, g in zip(self.params, grads, strict=True):
            p.grad_sample = g
        res = {k: torch.stack(v).mean() for k, v in logs.items()}
        res["loss"] = res["loss"].clone().requires_grad_(True)  # a leaf: backward() is a no-op
        return res


class DPSGD:
    """DP-SGD for one training run: the wrapped task, the Poisson loader and the DP optimizer.

    Args:
        cfg: DP settings.
        task: the (non-private) task; its per-sample loss must depend on that sample only.
        dataset: map-style training dataset, one item per privacy unit (case).
        train: the loop settings (batch size = expected Poisson batch, total steps, seed).
        num_units: distinct cases behind ``dataset`` (must equal ``len(dataset)``).
        layer_id_fn: layer-wise LR decay, passed to :func:`build_optimizer`.
        collate_fn: collate of non-empty batches (default: torch's).
    """

    def __init__(
        self,
        cfg: DPConfig,
        task: Any,
        dataset: Any,
        train: TrainConfig,
        *,
        num_units: int | None = None,
        layer_id_fn: Callable[[str], int] | None = None,
        collate_fn: Callable[[list[Any]], Any] | None = None,
    ):
        try:
            from opacus.accountants import create_accountant  # optional: Opacus (--dp)
            from opacus.accountants.utils import get_noise_multiplier  # optional: Opacus
        except ImportError as exc:
            raise InputError(
                None, "DP-SGD needs Opacus: pip install 'umit[privacy]' (opacus>=1.5)"
            ) from exc
        check_dp_train(train)
        check_dp_model(task.trainable_module())
        n = len(dataset)
        if num_units is not None and num_units != n:
            raise InputError(
                None,
                f"DP-SGD protects cases: the training set must hold each case once, but it has "
                f"{n} items for {num_units} cases (set samples_per_case=1 and class_balanced=false)",
            )
        if train.batch_size > n:
            raise InputError(
                None, f"DP-SGD: batch_size {train.batch_size} exceeds the {n} training cases"
            )
        self.cfg = cfg
        self.train = train
        self.dataset = dataset
        self.n = n
        self.sample_rate = train.batch_size / n
        self.delta = cfg.delta if cfg.delta is not None else default_delta(n)
        self.noise_multiplier = float(
            get_noise_multiplier(
                target_epsilon=cfg.target_epsilon,
                target_delta=self.delta,
                sample_rate=self.sample_rate,
                steps=train.total_steps,
                accountant=cfg.accountant,
            )
        )
        self.accountant = create_accountant(cfg.accountant)
        self.layer_id_fn = layer_id_fn
        self.collate_fn = _collate_or_empty(
            collate_fn or torch.utils.data.default_collate  # type: ignore[attr-defined]
        )
        self.optimizer: torch.optim.Optimizer | None = None
        self.task = DPTask(task, self, cfg.grad_sample_mode)
        log.info(
            "DP-SGD: N=%d, q=%.4g, %d steps, sigma=%.4g for epsilon=%g at delta=%.3g",
            n,
            self.sample_rate,
            train.total_steps,
            self.noise_multiplier,
            cfg.target_epsilon,
            self.delta,
        )

    # -- data ------------------------------------------------------------------------------
    def loader(self, epoch: int, start_batch: int) -> Iterator[Any]:
        """Poisson batches of ``epoch`` (``1 / q`` of them) from ``start_batch`` on; a loader
        factory for :class:`~umit.train.loop.Trainer`, seeded by ``(train.seed, epoch)``."""
        from opacus.utils.uniform_sampler import UniformWithReplacementSampler  # optional: Opacus

        gen = torch.Generator()
        gen.manual_seed(
            int(np.random.SeedSequence([self.train.seed, epoch, 7]).generate_state(1)[0])
        )
        sampler = UniformWithReplacementSampler(
            num_samples=self.n, sample_rate=self.sample_rate, generator=gen
        )
        if hasattr(self.dataset, "set_epoch"):  # random crops/augmentations drawn per epoch
            self.dataset.set_epoch(epoch)
        batches = islice(iter(sampler), start_batch, None)
        for idx in batches:
            yield self.collate_fn([self.dataset[i] for i in idx])

    # -- optimizer -------------------------------------------------------------------------
    def optimizer_factory(self, module: nn.Module) -> torch.optim.Optimizer:
        """AdamW (our groups and schedules) wrapped in Opacus ``DPOptimizer`` with the accountant."""
        from opacus.optimizers import DPOptimizer  # optional: Opacus (--dp)

        base = build_optimizer(module, self.train, self.layer_id_fn)
        opt = DPOptimizer(
            base,
            noise_multiplier=self.noise_multiplier,
            max_grad_norm=self.cfg.max_grad_norm,
            expected_batch_size=self.train.batch_size,
            loss_reduction="mean",
        )
        opt.attach_step_hook(self.accountant.get_optimizer_hook_fn(sample_rate=self.sample_rate))
        self.optimizer = opt
        return opt

    # -- accounting ------------------------------------------------------------------------
    def history(self) -> list[list[float]]:
        return [[float(s), float(q), int(k)] for s, q, k in self.accountant.history]

    def set_history(self, history: list[list[float]]) -> None:
        self.accountant.history = [(float(s), float(q), int(k)) for s, q, k in history]

    @property
    def steps(self) -> int:
        return int(sum(k for _, _, k in self.accountant.history))

    def epsilon(self) -> float:
        """Epsilon spent so far at ``delta`` (0 before the first step)."""
        if self.steps == 0:
            return 0.0
        return float(self.accountant.get_epsilon(delta=self.delta))

    def report(self) -> dict[str, Any]:
        """Plain-data record of the guarantee: for checkpoints, summaries and reports."""
        return {
            "epsilon": self.epsilon(),
            "delta": self.delta,
            "target_epsilon": self.cfg.target_epsilon,
            "noise_multiplier": self.noise_multiplier,
            "max_grad_norm": self.cfg.max_grad_norm,
            "sample_rate": self.sample_rate,
            "expected_batch_size": self.train.batch_size,
            "steps": self.steps,
            "planned_steps": self.train.total_steps,
            "n_train": self.n,
            "accountant": self.cfg.accountant,
            "grad_sample_mode": self.cfg.grad_sample_mode,
            "unit": "case",
        }


def stamp_report(path: str | Path, report: Mapping[str, Any]) -> None:
    """Replace the ``dp`` record of a saved model file (atomically)."""

    update_artifact(path, dp=dict(report))


def format_dp(report: Mapping[str, Any] | None) -> str:
    """One line for summaries: ``(epsilon=1.98, delta=1e-05) DP-SGD, sigma=..., C=..., ...``."""
    if not report:
        return "not differentially private"
    eps = report.get("epsilon")
    eps_s = "inf" if eps is None or not math.isfinite(eps) else f"{eps:.3g}"
    return (
        f"({eps_s}, {report['delta']:.3g})-DP per case: DP-SGD with noise multiplier "
        f"{report['noise_multiplier']:.3g}, clip {report['max_grad_norm']:g}, sample rate "
        f"{report['sample_rate']:.3g}, {report['steps']} steps ({report['accountant']} accountant)"
    )
