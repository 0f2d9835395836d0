"""One training loop for every task: iteration-based, AMP, grad accumulation, DDP/FSDP, resume.

``train(task, data, cfg)`` runs ``cfg.total_steps`` optimizer steps. Each step: set this step's
lr and weight decay from the precomputed schedules; ``grad_accum_steps`` micro-batches of
forward (under autocast) and backward of ``loss / grad_accum_steps`` (gradients are
synchronized only on the last micro-batch); optional clipping; optimizer and scaler step;
``task.on_step_end(step)``; then logging, evaluation and checkpointing when due.

Data order is owned by the loop: a seeded, epoch-aware, rank-sharded sampler
(:class:`ShardedSampler`) decides which samples each process reads, and the checkpoint records
the epoch and the samples already consumed in it. A resumed run starts the sampler at that
offset (skipped samples are never read) and restores every rank's RNG state, so a killed run
resumed from its last checkpoint reproduces the uninterrupted run's batches, losses and
weights. (Random augmentations inside DataLoader workers are reproduced across a resume only
when the dataset seeds them per sample; with ``num_workers=0`` they use the restored RNG.)
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler

from umit.config import config_to_dict, save_config
from umit.errors import InputError
from umit.train import checkpoint as ckpt_io
from umit.train import distributed as du
from umit.train.config import TrainConfig
from umit.train.metrics import MetricsWriter, MetricWindow, ProgressBar, si
from umit.train.optim import LayerIdFn, build_optimizer, set_lr_wd
from umit.train.precision import resolve_precision
from umit.train.schedules import Schedules
from umit.utils.fileio import remove_stale_temps

log = logging.getLogger(__name__)

LoaderFactory = Callable[[int, int], Iterable[Any]]
"""``factory(epoch, start_batch)`` -> this rank's micro-batches of ``epoch`` from ``start_batch``
on; must be deterministic in its arguments for resume to be exact."""

# Config keys that decide where a run writes and what it logs, never the weights it trains.
OUTPUT_KEYS = frozenset(
    {"out_dir", "resume", "progress", "log_every", "ckpt_every", "keep_last", "tensorboard"}
)
# Config keys that may change between a run and its resume without a warning.
RESUME_FREE_KEYS = OUTPUT_KEYS | {"total_steps", "eval_every", "num_workers", "device", "compile"}


class ShardedSampler(Sampler[int]):
    """Seeded, epoch-aware, rank-sharded sample order that can start mid-epoch.

    Epoch ``e`` uses the permutation ``numpy.random.default_rng([seed, e])`` of all indices
    (identity without shuffling), cut to a whole number of global micro-batches
    (``batch_size * world_size``). Global micro-batch ``j`` is ``order[j*B*W : (j+1)*B*W]``
    (``B`` = batch size, ``W`` = world size); rank ``r`` reads every ``W``-th sample of it
    starting at ``r``. Hence ``W`` processes with batch ``B`` see exactly the samples one
    process with batch ``W*B`` sees, and ``start`` (global samples already consumed this epoch)
    skips batches without reading them.
    """

    def __init__(
        self,
        length: int,
        batch_size: int,
        world_size: int | None = None,
        rank: int | None = None,
        seed: int = 0,
        shuffle: bool = True,
    ):
        self.length = int(length)
        self.batch_size = int(batch_size)
        self.world_size = du.world_size() if world_size is None else int(world_size)
        self.rank = du.rank() if rank is None else int(rank)
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is not in [0, world_size={self.world_size})")
        self.seed = int(seed)
        self.shuffle = shuffle
        self.epoch = 0
        self.start = 0

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    @property
    def batches_per_epoch(self) -> int:
        """Micro-batches per rank per epoch (the tail that does not fill one is dropped)."""
        return self.length // self.global_batch

    @property
    def samples_per_epoch(self) -> int:
        """Global samples used per epoch."""
        return self.batches_per_epoch * self.global_batch

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select ``epoch``, skipping the first ``start`` global samples (rounded down to a batch)."""
        self.epoch = int(epoch)
        self.start = min(int(start) - int(start) % self.global_batch, self.samples_per_epoch)

    def order(self, epoch: int) -> np.ndarray:
        """Global sample order of ``epoch`` (before the tail is dropped)."""
        if not self.shuffle:
            return np.arange(self.length)
        return np.random.default_rng([self.seed, epoch]).permutation(self.length)

    def __iter__(self) -> Iterator[int]:
        stream = self.order(self.epoch)[self.start : self.samples_per_epoch]
        return iter(stream[self.rank :: self.world_size].tolist())

    def __len__(self) -> int:
        return (self.samples_per_epoch - self.start) // self.world_size


@dataclass
class TrainResult:
    """What one :func:`train` call did."""

    out_dir: Path
    step: int
    """Optimizer steps completed (``total_steps`` unless interrupted)."""
    start_step: int
    """Step this call started from (> 0 after a resume)."""
    checkpoint: Path | None
    """Newest checkpoint written (or resumed from)."""
    resumed_from: Path | None
    metrics: dict[str, Any] = field(default_factory=dict)
    """Last training record (rank 0; empty elsewhere)."""
    history: list[dict[str, Any]] = field(default_factory=list)
    """Records written by this call (rank 0; empty elsewhere)."""
    seconds: float = 0.0


def move_to_device(batch: Any, device: torch.device, non_blocking: bool = False) -> Any:
    """Move every tensor in a nested batch (dict / list / tuple) to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=non_blocking)
    if isinstance(batch, Mapping):
        return type(batch)({k: move_to_device(v, device, non_blocking) for k, v in batch.items()})
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(move_to_device(v, device, non_blocking) for v in batch))
    if isinstance(batch, list | tuple):
        return type(batch)(move_to_device(v, device, non_blocking) for v in batch)
    return batch


def _batch_len(batch: Any, default: int) -> int:
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.ndim else default
    if isinstance(batch, Mapping):
        batch = list(batch.values())
    if isinstance(batch, list | tuple):
        for item in batch:
            n = _batch_len(item, -1)
            if n >= 0:
                return n
    return default


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""

    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002 - the global RNG is the one to seed
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return du.default_device()
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise InputError(None, f"device={name!r} but CUDA is not available (use device=cpu)")
        return du.default_device() if name == "cuda" else torch.device(name)
    return torch.device(name)


def _check_precision(precision: str, device: torch.device) -> None:
    if precision == "fp16" and device.type != "cuda":
        raise InputError(
            None,
            f"precision='fp16' needs a CUDA device (it trains with a gradient scaler); on "
            f"{device.type} use precision='bf16' or 'fp32'",
        )
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise InputError(
            None, "precision='bf16' is not supported by this GPU; use precision='fp16' instead"
        )


class Trainer:
    """Trains ``task.trainable_module()`` on ``data`` following ``cfg``; see :func:`train`.

    Args:
        task: a :class:`~umit.train.tasks.Task`.
        data: a map-style dataset (the loop builds a seeded, sharded, resumable sampler) or a
            :data:`LoaderFactory` ``(epoch, start_batch) -> iterable of micro-batches``.
        cfg: the loop's settings.
        collate_fn: DataLoader collate function for a dataset.
        eval_fn: ``eval_fn(step) -> {name: value}`` run every ``cfg.eval_every`` steps on every
            rank (values are averaged across ranks); default ``task.evaluate`` if it exists.
        plan: the preprocessing plan to store in checkpoints (dict, pydantic model or None).
        data_hash: hash of the dataset manifest to store in checkpoints.
        layer_id_fn: parameter name -> layer id, for layer-wise LR decay (``cfg.layer_decay``).
        optimizer_factory: ``module -> optimizer`` replacing :func:`build_optimizer` (its groups
            may carry ``lr_scale`` / ``wd_scale``).
        run_config: the whole resolved config of the command (e.g. a ``PretrainConfig``); written
            as the run folder's ``config.yaml`` and into every checkpoint as ``run_config``.
    """

    def __init__(
        self,
        task: Any,
        data: Dataset | LoaderFactory,
        cfg: TrainConfig,
        *,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        eval_fn: Callable[[int], Mapping[str, Any]] | None = None,
        plan: Any = None,
        data_hash: str | None = None,
        layer_id_fn: LayerIdFn | None = None,
        optimizer_factory: Callable[[nn.Module], torch.optim.Optimizer] | None = None,
        run_config: Any = None,
    ):
        if not callable(task) or not callable(getattr(task, "trainable_module", None)):
            raise TypeError(
                f"task must be callable (batch -> dict(loss=...)) and have trainable_module(); "
                f"got {type(task).__name__}"
            )
        self.cfg = cfg
        self.task = task
        self.eval_fn = eval_fn if eval_fn is not None else getattr(task, "evaluate", None)
        self.plan = ckpt_io.to_plain(plan, "plan")
        self.run_config = run_config
        self.data_hash = data_hash
        self.out_dir = Path(cfg.out_dir)

        du.init_from_env()
        self.rank, self.world = du.rank(), du.world_size()
        self.is_main = du.is_main()
        self.device = resolve_device(cfg.device)
        # auto -> fp32/bf16 for this device; rank 0's choice for all (one autocast per run)
        self.precision = du.all_gather_object(
            resolve_precision(cfg.precision, self.device).precision
        )[0]
        _check_precision(self.precision, self.device)
        self.sampler: ShardedSampler | None = None
        self._setup_data(data, collate_fn)  # before any collective: bad data fails on every rank
        if self.device.type == "cuda" and cfg.tf32:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

        self.module: nn.Module = task.trainable_module()
        if callable(getattr(task, "to", None)):
            task.to(self.device)
        else:
            self.module.to(self.device)
        self.strategy = du.resolve_strategy(cfg.strategy)
        self.model = du.wrap_model(self.module, self.strategy)
        if cfg.compile:
            self.model.compile()
        if self.model is not self.module:
            setter = getattr(task, "set_trainable_module", None)
            if not callable(setter):
                raise TypeError(
                    f"{type(task).__name__} must define set_trainable_module(module): the loop wraps "
                    f"its module for {self.strategy}, and the task must call the wrapped module"
                )
            setter(self.model)

        # After wrapping: FSDP2 replaces parameters by sharded DTensors.
        if optimizer_factory is not None:
            self.optimizer = optimizer_factory(self.module)
        else:
            # Fused AdamW: one kernel over all parameters. On CPU it ran 4-6.5x faster than the
            # foreach path (equal to 2.4e-7 after 5 steps); FSDP2's DTensors need foreach.
            fused = self.device.type in ("cuda", "cpu") and self.strategy != "fsdp"
            self.optimizer = build_optimizer(self.module, cfg, layer_id_fn, fused=fused or None)
        self.scaler = self._make_scaler()
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)
        self.schedules = Schedules.from_config(cfg)

        self.window = MetricWindow(self.device)
        self.step = 0
        self.epoch = 0
        self.samples_in_epoch = 0
        self.last_checkpoint: Path | None = None
        self.resumed_from: Path | None = None
        self._resume_checked = False

    # ------------------------------------------------------------------ set-up

    def _make_scaler(self) -> torch.amp.GradScaler:
        enabled = self.precision == "fp16"
        if enabled and self.strategy == "fsdp":
            from torch.distributed.fsdp.sharded_grad_scaler import (
                ShardedGradScaler,  # only under FSDP + fp16
            )

            return ShardedGradScaler(self.device.type)
        return torch.amp.GradScaler(self.device.type, enabled=enabled)

    def _setup_data(self, data: Any, collate_fn: Callable | None) -> None:
        cfg = self.cfg
        self.global_micro_batch = cfg.batch_size * self.world
        if isinstance(data, IterableDataset):
            raise TypeError(
                "an IterableDataset has no index order the loop can shard and resume; pass a "
                "map-style dataset or a loader factory (epoch, start_batch) -> iterable"
            )
        if hasattr(data, "__getitem__") and hasattr(data, "__len__"):
            self.dataset = data
            self.factory = None
            self.collate_fn = collate_fn
            self.sampler = ShardedSampler(
                len(data), cfg.batch_size, self.world, self.rank, cfg.seed, cfg.shuffle
            )
            if self.sampler.batches_per_epoch == 0:
                raise InputError(
                    None,
                    f"dataset has {len(data)} samples, fewer than one micro-batch across processes "
                    f"(batch_size {cfg.batch_size} x world size {self.world})",
                )
        elif callable(data):
            self.dataset = None
            self.factory = data
        else:
            raise TypeError(
                f"data must be a map-style dataset or a loader factory, got {type(data).__name__}"
            )

    def _epoch_iterable(self, epoch: int, start_samples: int) -> Iterable[Any]:
        if self.factory is not None:
            return self.factory(epoch, start_samples // self.global_micro_batch)
        assert self.sampler is not None
        self.sampler.set_epoch(epoch, start_samples)
        if hasattr(self.dataset, "set_epoch"):  # random crops/augmentations drawn per epoch
            self.dataset.set_epoch(epoch)
        # Worker seeds come from this generator, not from the global RNG: a function of
        # (seed, epoch, rank) only, so resuming does not shift them.
        gen = torch.Generator()
        gen.manual_seed(
            int(np.random.SeedSequence([self.cfg.seed, epoch, self.rank]).generate_state(1)[0])
        )
        return DataLoader(
            self.dataset,
            batch_size=self.cfg.batch_size,
            sampler=self.sampler,
            num_workers=self.cfg.num_workers,
            collate_fn=self.collate_fn,
            pin_memory=self.device.type == "cuda",
            drop_last=True,
            generator=gen,
        )

    def _batches(self) -> Iterator[Any]:
        """Micro-batches forever, advancing epochs; tracks the position for checkpoints."""
        while True:
            empty = self.samples_in_epoch == 0
            for batch in self._epoch_iterable(self.epoch, self.samples_in_epoch):
                empty = False
                self.samples_in_epoch += self.global_micro_batch
                yield batch
            if empty:
                raise InputError(None, f"the data yielded no batch in epoch {self.epoch}")
            self.epoch += 1
            self.samples_in_epoch = 0

    @property
    def epoch_progress(self) -> float:
        """Epochs completed, with the fraction of the current one when its length is known."""
        if self.sampler is not None:
            return self.epoch + self.samples_in_epoch / self.sampler.samples_per_epoch
        return float(self.epoch)

    # ------------------------------------------------------------- checkpoints

    def state_dict(self) -> dict[str, Any] | None:
        """The checkpoint as plain data (collective; the full dict on rank 0, None elsewhere)."""
        model_sd, optim_sd = ckpt_io.gather_train_state(self.module, self.optimizer)
        task_state = (
            self.task.state_dict() if callable(getattr(self.task, "state_dict", None)) else None
        )
        rank_state = du.all_gather_object(
            {"rng": ckpt_io.rng_state(), "window": self.window.state_dict()}
        )
        if not self.is_main:
            return None
        name, args = ckpt_io.model_identity(self.module, self.task)
        return {
            "format": ckpt_io.FORMAT,
            "format_version": ckpt_io.FORMAT_VERSION,
            "kind": "train_state",
            "model": model_sd,
            "optimizer": ckpt_io.to_plain(optim_sd, "optimizer"),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "task": ckpt_io.to_plain(task_state, "task state"),
            "step": self.step,
            "data": {
                "epoch": self.epoch,
                "samples_in_epoch": self.samples_in_epoch,
                "global_micro_batch": self.global_micro_batch,
                "seed": self.cfg.seed,
                "shuffle": self.cfg.shuffle,
            },
            "world_size": self.world,
            "rank_state": rank_state,
            "model_name": name,
            "model_args": args,
            "config": config_to_dict(self.cfg),
            "run_config": ckpt_io.to_plain(self.run_config, "run_config"),
            "plan": self.plan,
            "versions": ckpt_io.versions(),
            "data_hash": self.data_hash,
        }

    def save_checkpoint(self) -> Path | None:
        """Write ``step_XXXXXX.pt`` + ``latest.pt`` (collective; rank 0 writes)."""
        state = self.state_dict()
        if state is not None:
            self.last_checkpoint = ckpt_io.save_checkpoint(state, self.out_dir, self.cfg.keep_last)
            log.info("checkpoint: %s", self.last_checkpoint)
        return self.last_checkpoint

    def load_state_dict(self, ckpt: Mapping[str, Any]) -> None:
        """Restore model, optimizer, scaler, task state, position and this rank's RNG."""
        # Opacus' DPOptimizer keeps its state in the optimizer it wraps; torch initialises an
        # empty state with one zero-gradient step(), which the DP wrapper refuses without
        # per-sample gradients: restore the wrapped optimizer itself.
        optimizer = getattr(self.optimizer, "original_optimizer", self.optimizer)
        ckpt_io.restore_train_state(self.module, optimizer, ckpt["model"], ckpt.get("optimizer"))
        if ckpt.get("scaler") and self.scaler.is_enabled():
            self.scaler.load_state_dict(ckpt["scaler"])
        if ckpt.get("task") is not None and callable(getattr(self.task, "load_state_dict", None)):
            self.task.load_state_dict(ckpt["task"])
        self.step = int(ckpt["step"])
        data = ckpt.get("data") or {}
        self.epoch = int(data.get("epoch", 0))
        self.samples_in_epoch = int(data.get("samples_in_epoch", 0))
        same_layout = (
            int(data.get("global_micro_batch", -1)) == self.global_micro_batch
            and int(ckpt.get("world_size", -1)) == self.world
        )
        if not same_layout:
            log.warning(
                "resuming with a different batch size or world size (checkpoint: %s x %s ranks; "
                "now: %s x %s): the data order continues from the same sample but is not identical",
                data.get("global_micro_batch"),
                ckpt.get("world_size"),
                self.global_micro_batch,
                self.world,
            )
            self.samples_in_epoch -= self.samples_in_epoch % self.global_micro_batch
        rank_states = ckpt.get("rank_state") or []
        if rank_states:
            mine = rank_states[self.rank % len(rank_states)]
            ckpt_io.set_rng_state(mine["rng"])
            if same_layout:
                self.window.load_state_dict(mine["window"])
        old_cfg = ckpt.get("config") or {}
        new_cfg = config_to_dict(self.cfg)
        changed = sorted(
            k for k in new_cfg if k not in RESUME_FREE_KEYS and old_cfg.get(k) != new_cfg[k]
        )
        if changed and old_cfg:
            log.warning("resuming with changed settings: %s", ", ".join(changed))

    def resume(self) -> Path | None:
        """Load the checkpoint ``cfg.resume`` names, once (:meth:`fit` calls it too); returns
        the file resumed from, or None.

        Calling it before :meth:`fit` lets a caller change the restored state, e.g. a federated
        site loading the new global weights over its own resumed optimizer and data position.
        """
        if not self._resume_checked:
            self._maybe_resume()
            self._resume_checked = True
        return self.resumed_from

    def _maybe_resume(self) -> None:
        """Load the checkpoint ``cfg.resume`` names; rank 0 picks the file, every rank loads it.

        ``auto``: the newest readable checkpoint in ``out_dir``, if any. A folder: the newest
        in that folder (an error if none). A file: that checkpoint.
        """
        resume = self.cfg.resume
        if not resume:
            return
        folder = self.out_dir if resume == "auto" else Path(resume)
        found = None
        if self.is_main and folder.is_dir():
            found = ckpt_io.load_latest(folder, mmap=True)
        path = str(found[0]) if found is not None else None
        path = du.all_gather_object(path)[0]
        if path is None:
            if resume == "auto":
                return
            if folder.is_dir():
                raise InputError(folder, "resume: no readable checkpoint in this folder")
            path = resume  # a file: load_checkpoint names the problem if there is one
        ckpt = found[1] if found is not None else ckpt_io.load_checkpoint(path, mmap=True)
        self.load_state_dict(ckpt)
        self.resumed_from = self.last_checkpoint = Path(path)
        if self.is_main:
            log.info("resumed from %s at step %d", path, self.step)

    # -------------------------------------------------------------- the loop

    def _grad_sync(self, enabled: bool) -> contextlib.AbstractContextManager:
        """Skip the gradient all-reduce on non-final micro-batches (DDP ``no_sync`` / FSDP2)."""
        if self.strategy == "ddp" and not enabled:
            return self.model.no_sync()
        if self.strategy == "fsdp":
            self.module.set_requires_gradient_sync(enabled)
        return contextlib.nullcontext()

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def _task_count(self, name: str, batch: Any, n: int) -> float | None:
        fn = getattr(self.task, name, None)
        if not callable(fn):
            return None
        per_sample = fn(batch)
        return None if per_sample is None else float(per_sample) * n

    def train_step(self, batches: Iterator[Any]) -> None:
        """One optimizer step over ``grad_accum_steps`` micro-batches."""
        cfg, step = self.cfg, self.step
        set_lr_wd(self.optimizer, float(self.schedules.lr[step]), float(self.schedules.wd[step]))
        accum = cfg.grad_accum_steps
        for micro in range(accum):
            batch = next(batches)
            n = _batch_len(batch, cfg.batch_size)
            tokens = self._task_count("tokens_per_sample", batch, n)
            flops = self._task_count("flops_per_sample", batch, n)
            batch = move_to_device(batch, self.device, non_blocking=self.device.type == "cuda")
            with self._grad_sync(micro == accum - 1):
                with self._autocast():
                    out = self.task(batch)
                if not isinstance(out, Mapping) or "loss" not in out:
                    raise TypeError(
                        f"{type(self.task).__name__} must return a dict with a 'loss' entry, got "
                        f"{type(out).__name__}"
                    )
                loss = out["loss"]
                self.scaler.scale(loss / accum).backward()
            self.window.add_micro(out, samples=n, tokens=tokens, flops=flops)
        grad_norm = None
        if cfg.clip_grad_norm is not None:
            self.scaler.unscale_(self.optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), cfg.clip_grad_norm)
            if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor
                grad_norm = grad_norm.full_tensor()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        on_step_end = getattr(self.task, "on_step_end", None)
        if callable(on_step_end):
            on_step_end(step)
        self.step += 1
        self.window.add_step(grad_norm)

    def _record(self, window_seconds: float, elapsed: float) -> dict[str, Any]:
        """Reduce the window into one metrics record (collective)."""
        step = self.step - 1
        red = self.window.reduce()
        self.window.reset()
        rec: dict[str, Any] = {
            "split": "train",
            "step": self.step,
            "epoch": round(self.epoch_progress, 6),
            "lr": float(self.schedules.lr[step]),
            "wd": float(self.schedules.wd[step]),
            "loss": red.pop("loss"),
        }
        rec.update({k: v for k, v in red.items() if not k.startswith("_")})
        dt = max(window_seconds, 1e-9)
        rec["samples_per_s"] = red["_samples"] / dt
        if "_tokens" in red:
            rec["tokens_per_s"] = red["_tokens"] / dt
        if "_flops" in red:
            rec["flops_per_s"] = red["_flops"] / dt
        rec["samples_seen"] = self.step * cfg_global_batch(self.cfg, self.world)
        if self.device.type == "cuda":
            rec["max_mem_gb"] = torch.cuda.max_memory_allocated(self.device) / 1e9
        rec["time_s"] = elapsed
        return rec

    def _evaluate(self) -> dict[str, Any] | None:
        if self.eval_fn is None:
            return None
        self.module.eval()
        try:
            results = dict(self.eval_fn(self.step))
        finally:
            self.module.train()
        return {"split": "eval", "step": self.step, **du.all_reduce_mean(results)}

    def fit(self, until: int | None = None) -> TrainResult:
        """Train from scratch or from the checkpoint ``cfg.resume`` names, up to ``total_steps``.

        Args:
            until: stop after this optimizer step instead (writing a checkpoint there); the
                schedules still span ``total_steps``. A federated round trains a site from step
                ``(r - 1) * local_steps`` to ``until = r * local_steps`` of one long schedule.
        """
        cfg = self.cfg
        end = cfg.total_steps if until is None else min(int(until), cfg.total_steps)
        started = time.perf_counter()
        if self.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            remove_stale_temps(self.out_dir, recursive=False)
            save_config(self.run_config if self.run_config is not None else cfg, self.out_dir)
        self.resume()
        start_step = self.step
        if self.resumed_from is None:
            seed_everything(cfg.seed + self.rank)
        if cfg.eval_every and self.eval_fn is None and self.is_main:
            log.warning(
                "eval_every=%d but neither eval_fn nor task.evaluate exists", cfg.eval_every
            )

        writer = MetricsWriter(self.out_dir, self.is_main, cfg.tensorboard, start_step=start_step)
        bar = ProgressBar(end, start_step, enabled=self.is_main and cfg.progress)
        history: list[dict[str, Any]] = []
        batches = self._batches()
        self.module.train()
        self.optimizer.zero_grad(set_to_none=True)
        window_start = time.perf_counter()
        try:
            while self.step < end:
                self.train_step(batches)
                bar.update()
                last = self.step == end
                if self.step % cfg.log_every == 0 or last:
                    now = time.perf_counter()
                    rec = self._record(now - window_start, now - started)
                    window_start = now
                    if self.is_main:
                        writer.write(rec)
                        history.append(rec)
                        bar.show(rec)
                        if not cfg.progress:
                            log.info(_format_record(rec))
                    if not math.isfinite(rec["loss"]):
                        raise FloatingPointError(
                            f"loss is {rec['loss']} at step {self.step}; lower lr, enable "
                            "clip_grad_norm or use bf16 instead of fp16"
                        )
                if cfg.eval_every and (self.step % cfg.eval_every == 0 or last):
                    rec = self._evaluate()
                    if rec is not None and self.is_main:
                        writer.write(rec)
                        history.append(rec)
                if (cfg.ckpt_every and self.step % cfg.ckpt_every == 0) or last:
                    self.save_checkpoint()
        finally:
            batches.close()  # shuts down DataLoader workers now, not at garbage collection
            writer.close()
            bar.close()
        du.barrier()
        train_recs = [r for r in history if r.get("split") == "train"]
        return TrainResult(
            out_dir=self.out_dir,
            step=self.step,
            start_step=start_step,
            checkpoint=self.last_checkpoint,
            resumed_from=self.resumed_from,
            metrics=train_recs[-1] if train_recs else {},
            history=history,
            seconds=time.perf_counter() - started,
        )


def cfg_global_batch(cfg: TrainConfig, world: int) -> int:
    """Samples per optimizer step across all processes."""
    return cfg.batch_size * cfg.grad_accum_steps * world


def _format_record(rec: Mapping[str, Any]) -> str:
    parts = [f"step {rec['step']}", f"loss {rec['loss']:.4g}", f"lr {rec['lr']:.3g}"]
    if "samples_per_s" in rec:
        parts.append(f"{si(rec['samples_per_s'], 'samples/s')}")
    if "flops_per_s" in rec:
        parts.append(f"{si(rec['flops_per_s'], 'FLOP/s')}")
    return " | ".join(parts)


def train(
    task: Any,
    data: Dataset | LoaderFactory,
    cfg: TrainConfig,
    **kwargs: Any,
) -> TrainResult:
    """Build a :class:`Trainer` and run it; ``kwargs`` go to :class:`Trainer`."""
    return Trainer(task, data, cfg, **kwargs).fit()
