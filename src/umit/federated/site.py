"""What one site does in a federated run, without any federated framework.

A :class:`Site` is one hospital's store (a PREP folder, or the cases of one site of a PREP
folder) and a local work folder that never leaves the site. Per round it loads the global
weights into the stage's own model (the MAE / SimCLR / Genesis wrapper, or the fine-tuning
model), trains ``local_steps`` steps with the one training loop and the stage's own task, and
returns the new weights, its number of training examples and its metrics; it can also validate
the global weights on its own validation cases.

Local state across rounds. Each site trains one long run of ``rounds * local_steps`` steps: its
optimizer moments, schedule position, data order and RNG continue from round to round (the
loop's own checkpoint in the work folder, ``step_XXXXXX.pt`` after each round), and only the
weights are replaced by the global ones at the start of a round. So a federation of one site is
exactly centralised training, and a round repeated after the server was killed starts from the
same local state as the first attempt did (round ``r`` resumes the checkpoint of step
``(r - 1) * local_steps``, not the newest one). A site that lost its state (a new disk)
continues with a fresh optimizer at the right schedule step, with a warning. With
``optimizer_state=reset`` the optimizer's moments are dropped at the start of every round (the
schedule position, data order and RNG still continue from the same checkpoint).

FedProx: :class:`ProximalTask` adds ``mu / 2 * ||w - w_global||^2`` over the trainable
parameters to every local loss (the strategy only sends ``mu``).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from umit.data.cases import balanced_cases, case_label
from umit.data.store import Store
from umit.errors import InputError
from umit.federated.config import FederatedConfig, SiteSpec
from umit.finetune import run as ft
from umit.ssl import pretrain as pt
from umit.train.checkpoint import step_name
from umit.train.distributed import unwrap
from umit.train.dp import DPSGD
from umit.train.loop import Trainer, resolve_device, seed_everything

log = logging.getLogger(__name__)

# Keys of a loop record that describe the record, not the round's training.
_NOT_METRICS = {"split", "step", "epoch", "time_s", "samples_seen"}


@dataclass
class TaskSpec:
    """What the server decides once for every site, so that all build the same model."""

    num_outputs: int | None = None
    """Fine-tuning: output channels (segmentation) or classes (classification)."""
    class_names: list[str] = field(default_factory=list)
    """Classification: the class names of every site together, in output order."""

    def to_dict(self) -> dict[str, Any]:
        return {"num_outputs": self.num_outputs, "class_names": list(self.class_names)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> TaskSpec:
        d = dict(d or {})
        return cls(num_outputs=d.get("num_outputs"), class_names=list(d.get("class_names") or []))


@dataclass
class RoundResult:
    """A site's answer to one training round."""

    state_dict: dict[str, torch.Tensor]
    num_examples: int
    metrics: dict[str, float]


class ProximalTask:
    """FedProx: the wrapped task's loss plus ``mu / 2 * sum ||w - w_global||^2``.

    The anchor (the global weights of this round) is set with :meth:`set_anchor` after the
    global weights are loaded and before local training. The term covers the trainable
    parameters; it is logged as ``proximal`` (the squared distance, without ``mu / 2``). Every
    other attribute is the wrapped task's, so the loop sees the same task.
    """

    def __init__(self, task: Any, mu: float):
        if mu < 0:
            raise ValueError(f"proximal mu must be >= 0, got {mu}")
        self.task = task
        self.mu = float(mu)
        self._pairs: list[tuple[nn.Parameter, torch.Tensor]] = []

    def __getattr__(self, name: str) -> Any:
        task = self.__dict__.get("task")
        if task is None:
            raise AttributeError(name)
        return getattr(task, name)

    def set_anchor(self) -> None:
        """Take the trainable module's current weights as ``w_global``."""
        params = [p for p in self.task.trainable_module().parameters() if p.requires_grad]
        self._pairs = [(p, p.detach().clone()) for p in params]

    def proximal(self) -> torch.Tensor:
        """``sum ||w - w_global||^2`` over the trainable parameters (differentiable)."""
        if not self._pairs:
            raise RuntimeError("ProximalTask.set_anchor() must run before training")
        return sum(((p - a) ** 2).sum() for p, a in self._pairs)

    def __call__(self, batch: Any) -> dict[str, torch.Tensor]:
        out = dict(self.task(batch))
        prox = self.proximal()
        out["loss"] = out["loss"] + 0.5 * self.mu * prox
        out["proximal"] = prox.detach()
        return out


def reset_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Drop the per-parameter state (AdamW's moments and step count): the next step is the
    optimizer's first. The parameter groups (learning rate, weight decay) stay; the loop sets
    them from the schedule every step. Opacus' DP optimizer keeps the state in the optimizer it
    wraps."""
    getattr(optimizer, "original_optimizer", optimizer).state.clear()


def site_store(spec: SiteSpec) -> Store:
    """The site's store: the whole PREP folder, or only the cases of this site."""
    store = Store(spec.prep)
    if spec.key is not None:
        store.index = {
            c: v for c, v in store.index.items() if str(v.get(spec.key)) == str(spec.value)
        }
        if not store.index:
            raise InputError(
                spec.prep, f"no case with {spec.key}={spec.value!r} (site {spec.name})"
            )
    return store


@dataclass
class _Built:
    """The training pieces of one round."""

    module: nn.Module
    task: Any
    dataset: Any
    train_cases: list[str]
    targets: dict[str, int] = field(default_factory=dict)
    layer_ids: Any = None


class Site:
    """One site of a federated run.

    Args:
        spec: where the site's data is.
        cfg: the run's settings (the server sends them every round).
        work: the site's local folder; its state for this run lives in ``work/<run key>``.
    """

    def __init__(self, spec: SiteSpec, cfg: FederatedConfig, work: Path):
        self.spec = spec
        self.name = spec.name
        self.cfg = cfg
        self.dir = Path(work) / cfg.run_key()
        stage = cfg.stage_config(Path(spec.prep), out=self.dir)
        if cfg.task == "finetune":  # the global weights carry the pretrained encoder
            stage = stage.model_copy(update={"pretrained": None})
        self.stage = stage
        self.store = site_store(spec)
        self.plan = self.store.plan
        self.in_chans = len(self.plan.channels)
        if cfg.task == "pretrain":
            train, val = pt.split_cases(
                self.store, stage.exclude_splits, stage.val_cases, stage.train.seed
            )
            self.cases = {"train": train, "val": val}
        else:
            self.cases = ft.split_finetune_cases(self.store, stage)

    # -- what the server needs to know -----------------------------------------------------
    def describe(self) -> dict[str, Any]:
        """Plan, case counts and (fine-tuning) the outputs this site's labels need."""
        out: dict[str, Any] = {
            "site": self.name,
            "plan": self.plan.model_dump(mode="json"),
            "plan_hash": self.plan.processing_hash(),
            "n_train": len(self.cases["train"]),
            "n_val": len(self.cases["val"]),
        }
        if self.cfg.task == "finetune":
            labeled = self.cases["train"] + self.cases["val"]
            if self.stage.task == "segmentation":
                out["num_outputs"] = ft.seg_num_outputs(self.store, labeled, self.plan)
            else:
                out["class_names"] = ft.class_names(self.store, labeled, self.stage.label_key)
        return out

    # -- building ---------------------------------------------------------------------------
    def _targets(self, spec: TaskSpec) -> dict[str, int]:
        lookup = {n: i for i, n in enumerate(spec.class_names)}
        key = self.stage.label_key
        cases = self.cases["train"] + self.cases["val"]
        return {
            c: lookup[str(case_label(self.store.index[c], key))]
            for c in cases
            if str(case_label(self.store.index[c], key)) in lookup
        }

    def build(self, spec: TaskSpec) -> _Built:
        """The stage's model, task and training data, seeded as the stage's own ``run`` does."""
        stage = self.stage
        seed_everything(stage.train.seed)
        if self.cfg.task == "pretrain":
            module = pt.build_method(stage, self.in_chans, list(self.plan.channel_names))
            train_cases = self.cases["train"]
            return _Built(
                module=module,
                task=pt.PretrainTask(module, stage.crop_size),
                dataset=pt.training_data(stage, train_cases),
                train_cases=train_cases,
            )
        if spec.num_outputs is None:
            raise InputError(None, "the server sent no output size for fine-tuning")
        model = ft.build_model(stage, self.in_chans, spec.num_outputs)
        targets = self._targets(spec) if stage.task == "classification" else {}
        train_cases = self.cases["train"]
        if stage.task == "classification" and stage.class_balanced:
            train_cases = balanced_cases(train_cases, targets)
        return _Built(
            module=model,
            task=ft.make_task(stage, model, targets),
            dataset=ft.training_data(stage, self.store, train_cases),
            train_cases=train_cases,
            targets=targets,
            layer_ids=ft.layer_id_fn_for(model) if stage.train.layer_decay < 1 else None,
        )

    # -- one round --------------------------------------------------------------------------
    def train_round(
        self,
        global_state: Mapping[str, torch.Tensor],
        server_round: int,
        spec: TaskSpec | None = None,
        proximal_mu: float | None = None,
    ) -> RoundResult:
        """Train steps ``(r - 1) * L`` to ``r * L`` of this site's run from the global weights.

        Args:
            global_state: the global model's state dict.
            server_round: the round, from 1.
            spec: the server's :class:`TaskSpec` (fine-tuning).
            proximal_mu: FedProx's mu (None: plain FedAvg, no proximal term).
        """
        started = time.perf_counter()
        spec = spec or TaskSpec()
        local = self.cfg.local_steps
        end = server_round * local
        start = end - local
        built = self.build(spec)
        task = built.task if proximal_mu is None else ProximalTask(built.task, proximal_mu)
        resume_file = self.dir / step_name(start)
        fresh = start > 0 and not resume_file.is_file()
        train_cfg = self.stage.train.model_copy(
            update={
                "out_dir": self.dir,
                "resume": str(resume_file) if start > 0 and not fresh else None,
                # a site without its state: another data order than round 1's
                "seed": self.stage.train.seed + (server_round if fresh else 0),
                "ckpt_every": None,
                "keep_last": 2,
                "log_every": local,
                "eval_every": None,
                "progress": False,
                "tensorboard": False,
            }
        )
        dp = None
        if self.cfg.task == "finetune" and self.stage.dp.enabled:
            dp = DPSGD(
                self.stage.dp,
                task,
                built.dataset,
                train_cfg,
                num_units=len(set(built.train_cases)),
                layer_id_fn=built.layer_ids,
            )
        trainer = Trainer(
            dp.task if dp else task,
            dp.loader if dp else built.dataset,
            train_cfg,
            plan=self.plan,
            layer_id_fn=built.layer_ids,
            optimizer_factory=dp.optimizer_factory if dp else None,
            run_config=self.stage,
        )
        trainer.resume()
        if fresh:
            log.warning(
                "site %s: no local state at step %d (%s); round %d starts a fresh optimizer",
                self.name,
                start,
                resume_file,
                server_round,
            )
            trainer.step = start
        elif start > 0 and self.cfg.optimizer_state == "reset":
            reset_optimizer_state(trainer.optimizer)
        unwrap(trainer.module).load_state_dict(dict(global_state), strict=True)
        if isinstance(task, ProximalTask):
            task.set_anchor()
        result = trainer.fit(until=end)
        metrics = {
            k: float(v)
            for k, v in result.metrics.items()
            if k not in _NOT_METRICS and isinstance(v, int | float) and not isinstance(v, bool)
        }
        metrics["steps"] = float(result.step - result.start_step)
        metrics["seconds"] = time.perf_counter() - started
        if dp is not None:  # the site's guarantee so far, for its patients
            report = dp.report()
            metrics["epsilon"] = float(report["epsilon"])
            for key in ("delta", "noise_multiplier", "max_grad_norm", "sample_rate", "steps"):
                metrics[f"dp_{key}"] = float(report[key])
        state = {k: v.detach().cpu() for k, v in unwrap(trainer.module).state_dict().items()}
        return RoundResult(state_dict=state, num_examples=len(built.dataset), metrics=metrics)

    def evaluate(
        self, global_state: Mapping[str, torch.Tensor], spec: TaskSpec | None = None
    ) -> tuple[int, dict[str, float]]:
        """Validation of the global weights on this site's validation cases.

        Returns:
            ``(number of validation cases, metrics)``; the metric keys are the same at every
            site (NaN where a site cannot compute one, e.g. without validation cases).
        """
        spec = spec or TaskSpec()
        built = self.build(spec)
        device = resolve_device(self.stage.train.device)
        module = built.module.to(device)
        module.load_state_dict(dict(global_state), strict=True)
        module.eval()
        val = self.cases["val"]
        if self.cfg.task == "pretrain":
            keys = ("val_loss", "val_baseline_loss")
            crops = pt.build_validation(Path(self.spec.prep), val, self.stage)
            fn = pt.make_eval_fn(module, crops, lambda: device)
        else:
            keys = ("val_dice",) if self.stage.task == "segmentation" else ("val_auc", "val_acc")
            extra = {
                "class_names": spec.class_names,
                "label_names": self.plan.labels,
                "num_outputs": spec.num_outputs,
            }
            inf = ft.inference_spec(self.stage, self.plan, extra)
            fn = ft.make_eval_fn(module, self.store, val, inf, built.targets, None)
        with torch.no_grad():
            got = dict(fn(0)) if val else {}
        metrics = {k: float(got.get(k, math.nan)) for k in keys}
        return len(val), metrics
