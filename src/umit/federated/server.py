"""The server's side of a federated run, without any federated framework.

:class:`GlobalRun` owns what the server keeps on disk in ``out``:

- ``config.yaml``: the resolved :class:`FederatedConfig`;
- ``step_XXXXXX.pt`` / ``latest.pt``: the global model after every round, a self-describing
  training checkpoint (``kind="train_state"``, written atomically by
  :func:`umit.train.checkpoint.save_checkpoint`) whose ``step`` is ``round * local_steps`` and
  whose ``federated`` entry holds the round, the sites, the plan and what every site built. The
  stage's own loaders read it: ``load_encoder`` (pretraining) and ``load_model`` (fine-tuning).
  A server killed at any point restarts at the round after the newest readable checkpoint;
- ``metrics.jsonl``: one record per round and site (``"site": name``) and one aggregate
  (``"site": "global"``) for training (``"split": "train"``) and validation (``"eval"``); a
  site that failed has ``"error"``. Records of rounds without a checkpoint are dropped on resume;
- at the end, ``encoder.pt`` (pretraining; ``network.pt`` too with ``scope=network``) or
  ``best.pt`` (fine-tuning: the last global model with its :class:`InferenceSpec`), the files
  ``umit finetune``, ``umit evaluate`` and ``umit predict`` take.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from umit.config import config_to_dict, save_config
from umit.data.plan import Plan
from umit.errors import InputError
from umit.federated.config import STAGE_PLACEHOLDER, FederatedConfig
from umit.federated.site import TaskSpec
from umit.finetune import run as ft
from umit.ssl import pretrain as pt
from umit.train import checkpoint as ckpt_io
from umit.train.loop import seed_everything
from umit.train.metrics import MetricsWriter
from umit.utils.fileio import remove_stale_temps

log = logging.getLogger(__name__)

KEEP_ROUNDS = 3
"""Global checkpoints kept besides ``latest.pt``."""


def merge_descriptions(
    cfg: FederatedConfig, descriptions: Mapping[str, Mapping[str, Any]]
) -> tuple[Plan, TaskSpec]:
    """One plan and one output layout for every site, from what the sites described.

    Raises:
        InputError: no site answered; the sites' preprocessing plans differ (they must share one
            plan, ``umit preprocess plan_file=...``); a classification label without 2 classes.
    """
    if not descriptions:
        raise InputError(None, "no site could describe its data; see the errors above")
    names = sorted(descriptions)
    plans = {n: Plan.model_validate(descriptions[n]["plan"]) for n in names}
    first = plans[names[0]]
    for n in names[1:]:
        diff = first.differences(plans[n])
        if diff:
            raise InputError(
                None,
                f"sites {names[0]!r} and {n!r} were preprocessed with different plans "
                f"(fields {diff}); preprocess every site with one plan: umit preprocess RAW "
                f"--out PREP plan_file=<the shared plan.json>",
            )
    spec = TaskSpec()
    if cfg.task == "finetune":
        stage = cfg.stage_config(STAGE_PLACEHOLDER)
        if stage.task == "segmentation":
            spec.num_outputs = max(int(descriptions[n]["num_outputs"]) for n in names)
        else:
            spec.class_names = sorted({c for n in names for c in descriptions[n]["class_names"]})
            if len(spec.class_names) < 2:
                raise InputError(
                    None,
                    f"label {stage.label_key!r} has fewer than 2 classes over all sites "
                    f"({spec.class_names})",
                )
            spec.num_outputs = len(spec.class_names)
    return first, spec


class GlobalRun:
    """The global model of a run, its checkpoints, its metrics log and its final artifact."""

    def __init__(self, cfg: FederatedConfig):
        self.cfg = cfg
        self.out = Path(cfg.out)
        self.stage = cfg.stage_config(STAGE_PLACEHOLDER, out=self.out)
        self.round = 0
        self.plan: Plan | None = None
        self.spec = TaskSpec()
        self.sites: dict[str, dict[str, Any]] = {}
        self.state: dict[str, torch.Tensor] | None = None
        self.writer: MetricsWriter | None = None
        self._identity: tuple[str | None, dict[str, Any] | None] = (None, None)
        self._dtypes: dict[str, torch.dtype] = {}

    # -- start / resume --------------------------------------------------------------------
    def open(self) -> int:
        """Create ``out``, resume from its newest global checkpoint (``cfg.resume``) and open the
        metrics log; returns the rounds already done."""
        self.out.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(self.out, recursive=False)
        found = ckpt_io.load_latest(self.out) if self.cfg.resume else None
        if found is not None:
            path, ckpt = found
            fed = ckpt.get("federated") or {}
            if fed.get("run_key") != self.cfg.run_key():
                raise InputError(
                    path,
                    "holds a federated run with other settings (task, rounds, local_steps, "
                    "strategy, mu or the stage section changed); use another out or resume=false",
                )
            self.round = int(fed["round"])
            self.plan = Plan.model_validate(ckpt["plan"])
            self.spec = TaskSpec.from_dict(fed.get("spec"))
            self.sites = dict(fed.get("sites") or {})
            self.state = dict(ckpt["model"])
            self._identity = (ckpt.get("model_name"), ckpt.get("model_args"))
            log.info("resuming the federated run from %s (round %d done)", path, self.round)
        else:
            for _, old in ckpt_io.list_step_checkpoints(self.out):
                old.unlink()
            (self.out / ckpt_io.LATEST_NAME).unlink(missing_ok=True)
        save_config(self.cfg, self.out)
        self.writer = MetricsWriter(
            self.out, tensorboard=False, start_step=self.round * self.cfg.local_steps
        )
        return self.round

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def set_layout(self, plan: Plan, spec: TaskSpec) -> None:
        """The plan and outputs every site shares (from :func:`merge_descriptions`)."""
        if self.plan is not None and self.plan.differences(plan):
            raise InputError(
                None,
                f"the sites' plan differs from the one this run started with (fields "
                f"{self.plan.differences(plan)})",
            )
        if self.round and self.spec.to_dict() != spec.to_dict():
            log.warning(
                "the sites now need outputs %s; this run started with %s and keeps it",
                spec.to_dict(),
                self.spec.to_dict(),
            )
            spec = self.spec
        self.plan, self.spec = plan, spec

    # -- the model -------------------------------------------------------------------------
    def build(self, pretrained: bool = True) -> torch.nn.Module:
        """The stage's model (pretraining wrapper or fine-tuning model), seeded like a site's."""
        if self.plan is None:
            raise RuntimeError("set_layout() first")
        seed_everything(self.stage.train.seed)
        in_chans = len(self.plan.channels)
        if self.cfg.task == "pretrain":
            return pt.build_method(self.stage, in_chans, list(self.plan.channel_names))
        stage = self.stage if pretrained else self.stage.model_copy(update={"pretrained": None})
        return ft.build_model(stage, in_chans, int(self.spec.num_outputs or 0))

    def initial_state(self) -> dict[str, torch.Tensor]:
        """The global weights to start from: the resumed ones, or a freshly built model (with
        ``finetune.pretrained`` loaded)."""
        if self.state is None:
            module = self.build(pretrained=True)
            self._identity = ckpt_io.model_identity(module)
            self.state = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
        self._dtypes = {k: v.dtype for k, v in self.state.items()}
        return self.state

    # -- per round ---------------------------------------------------------------------------
    def log(self, records: list[dict[str, Any]]) -> None:
        """Append records to ``metrics.jsonl`` (each gets ``step = round * local_steps``)."""
        assert self.writer is not None, "open() first"
        for rec in records:
            rnd = int(rec["round"])
            self.writer.write({"round": rnd, "step": rnd * self.cfg.local_steps, **rec})

    def save_round(
        self,
        server_round: int,
        state: Mapping[str, torch.Tensor] | None,
        sites: Mapping[str, Mapping[str, Any]],
    ) -> Path:
        """The global model after ``server_round`` (unchanged when no site delivered)."""
        if state is not None:
            self.state = self._as_model_dtypes(state)
        for name, info in sites.items():
            self.sites.setdefault(name, {}).update(dict(info))
        self.round = int(server_round)
        name, args = self._identity
        ckpt = {
            "format": ckpt_io.FORMAT,
            "format_version": ckpt_io.FORMAT_VERSION,
            "kind": "train_state",
            "model": self.state,
            "optimizer": None,
            "scaler": None,
            "task": None,
            "step": self.round * self.cfg.local_steps,
            "data": None,
            "world_size": 1,
            "rank_state": [],
            "model_name": name,
            "model_args": args,
            "config": config_to_dict(self.stage),
            "run_config": config_to_dict(self.cfg),
            "plan": self.plan.model_dump(mode="json") if self.plan else None,
            "versions": ckpt_io.versions(),
            "data_hash": None,
            "federated": self.info(),
        }
        return ckpt_io.save_checkpoint(ckpt, self.out, keep_last=KEEP_ROUNDS)

    def _as_model_dtypes(self, state: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """CPU tensors in the model's dtypes: averaging turns integer buffers (BatchNorm's
        counters) into floats, and a plain float into float64."""
        out = {}
        for k, v in state.items():
            t = torch.as_tensor(v).detach().cpu()
            out[k] = t.to(self._dtypes.get(k, t.dtype)).contiguous()
        return out

    def info(self) -> dict[str, Any]:
        """The ``federated`` entry of checkpoints and artifacts."""
        return {
            "round": self.round,
            "rounds": self.cfg.rounds,
            "local_steps": self.cfg.local_steps,
            "strategy": self.cfg.strategy,
            "proximal_mu": self.cfg.proximal_mu,
            "run_key": self.cfg.run_key(),
            "spec": self.spec.to_dict(),
            "sites": self.sites,
        }

    # -- the end -----------------------------------------------------------------------------
    def finish(self, extra: Mapping[str, Any] | None = None) -> Path:
        """Write ``encoder.pt`` (pretraining) or ``best.pt`` (fine-tuning) from the global model."""
        if self.state is None or self.plan is None:
            raise RuntimeError("no global model to write")
        module = self.build(pretrained=False)
        module.load_state_dict(self.state, strict=True)
        info = {**self.info(), **dict(extra or {})}
        if self.cfg.task == "pretrain":
            if self.stage.scope == "network":
                ckpt_io.save_artifact(
                    self.out / pt.NETWORK_FILE,
                    "network",
                    module.network,
                    plan=self.plan,
                    run_config=self.stage,
                    extra={"method": self.stage.method, "federated": info},
                )
            return pt.save_encoder(
                module, self.out / pt.ENCODER_FILE, self.plan, self.stage, {"federated": info}
            )
        extra_model: dict[str, Any] = {
            "class_names": self.spec.class_names,
            "label_names": self.plan.labels,
            "label_key": self.stage.label_key,
            "num_outputs": self.spec.num_outputs,
            "selection": "last",
            "best": {"round": self.round, "step": self.round * self.cfg.local_steps},
            "federated": info,
        }
        dp = _worst_dp(self.sites, self.stage)
        if dp is not None:
            extra_model["dp"] = dp
        spec = ft.inference_spec(self.stage, self.plan, extra_model)
        return ft.save_model(
            module,
            self.out / ft.BEST_FILE,
            plan=self.plan,
            cfg=self.stage,
            spec=spec,
            extra=extra_model,
        )


def _worst_dp(sites: Mapping[str, Mapping[str, Any]], stage: Any) -> dict[str, Any] | None:
    """The DP report of the site that spent the most epsilon: every patient is at one site, so
    the model is (max epsilon, its delta)-DP for every patient (each site's own delta is in
    ``federated.sites``)."""
    reports = [dict(s["dp"]) for s in sites.values() if s.get("dp")]
    if not reports:
        return None
    worst = max(reports, key=lambda r: r.get("epsilon", -math.inf))
    worst["steps"] = int(worst.get("steps", 0))
    worst.update(
        target_epsilon=stage.dp.target_epsilon,
        accountant=stage.dp.accountant,
        grad_sample_mode=stage.dp.grad_sample_mode,
        unit="case",
        scope="federated: the site that spent the most epsilon",
    )
    return worst
