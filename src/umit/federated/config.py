"""``FederatedConfig``: the settings of ``umit federated``, and how the sites are named.

The local training of every site is the stage's own config (``pretrain`` or ``finetune``
section, the keys of ``umit pretrain`` / ``umit finetune`` without ``data`` and ``out``), so a
federated run trains with exactly the settings a centralised run would. The schedule spans the
whole run: ``rounds * local_steps`` optimizer steps per site.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator

from umit.config import UmitConfig
from umit.data.store import Store
from umit.errors import InputError
from umit.finetune.run import FinetuneConfig
from umit.ssl.pretrain import PretrainConfig

STAGE_PLACEHOLDER = Path("<site>")
"""``data`` of the stage config the server holds: each site fills in its own PREP folder."""


class FederatedConfig(UmitConfig):
    """Settings of ``umit federated``."""

    task: Literal["pretrain", "finetune"] = "pretrain"
    """What every site trains: self-supervised pretraining (``pretrain`` section: MAE, SimCLR,
    Genesis as in ``umit pretrain``) or fine-tuning (``finetune`` section)."""
    sites: list[Path] = Field(default_factory=list)
    """In-process mode: one PREP folder per site (hospital)."""
    data: Path | None = None
    """In-process mode, instead of ``sites``: one PREP folder split into sites by the catalog
    attribute ``site_key`` (a simulation of several hospitals)."""
    site_key: str = "site"
    """Catalog attribute that names a case's site when ``data`` is split."""
    site_values: list[str] | None = None
    """With ``data``: the values of ``site_key`` to use as sites (default: every value found)."""
    out: Path = Path("runs/federated")
    """Server run folder: config.yaml, metrics.jsonl, global checkpoints, encoder.pt / best.pt;
    in-process mode also keeps each site's local state under ``sites/<name>``."""
    rounds: int = Field(default=5, ge=1)
    """Federated rounds: each site trains ``local_steps`` steps from the global weights, the
    server averages."""
    local_steps: int = Field(default=10, ge=1)
    """Optimizer steps per site per round."""
    strategy: Literal["fedavg", "fedprox"] = "fedavg"
    """Flower strategy: ``fedavg`` (weighted by each site's training examples) or ``fedprox``
    (the same average; each site adds ``proximal_mu / 2 * ||w - w_global||^2`` to its loss)."""
    proximal_mu: float = Field(default=0.0, ge=0)
    """FedProx's proximal weight mu (``strategy=fedprox`` only)."""
    optimizer_state: Literal["keep", "reset"] = "keep"
    """Each site's optimizer state between rounds. ``keep``: the site's AdamW moments continue
    from its own previous round (its loop state in its work folder, which never leaves the
    site), as in one long local run. ``reset``: every round starts with fresh moments (Adam's
    first update from the new global weights is then about ``lr`` per weight). The schedule
    position, data order and RNG continue in both."""
    min_sites: int | None = Field(default=None, ge=1)
    """Sites that must be connected before a round starts (Flower's ``min_available_nodes``);
    default: every configured site (in-process), 1 in deployment mode."""
    evaluate: bool = True
    """After every round, each site validates the new global model on its own validation cases
    (pretext loss for pretraining, Dice / AUC for fine-tuning)."""
    round_timeout: float = Field(default=3600.0, gt=0)
    """Seconds the server waits for the sites' replies in one round; a site that has not
    answered by then is reported and left out of that round's average."""
    resume: bool = True
    """Continue from the newest global checkpoint in ``out`` (a run killed at round r restarts
    at round r); ``false`` starts over (earlier checkpoints and metrics are replaced)."""
    pretrain: dict[str, Any] = Field(default_factory=dict)
    """``task=pretrain``: settings of ``umit pretrain`` (any key except ``data`` and ``out``;
    ``train.total_steps`` is ``rounds * local_steps``)."""
    finetune: dict[str, Any] = Field(default_factory=dict)
    """``task=finetune``: settings of ``umit finetune`` (any key except ``data`` and ``out``;
    ``train.total_steps`` is ``rounds * local_steps``; ``dp.enabled=true`` trains every site with
    DP-SGD and reports each site's epsilon per round)."""

    @model_validator(mode="after")
    def _check(self) -> FederatedConfig:
        if self.strategy == "fedavg" and self.proximal_mu > 0:
            raise ValueError(
                f"proximal_mu={self.proximal_mu} is only used by strategy=fedprox "
                "(set strategy=fedprox, or proximal_mu=0)"
            )
        if self.sites and self.data is not None:
            raise ValueError("give either sites=[PREP, ...] or data=PREP (split by site_key)")
        section = self.pretrain if self.task == "pretrain" else self.finetune
        other = "finetune" if self.task == "pretrain" else "pretrain"
        if getattr(self, other):
            raise ValueError(f"task={self.task} but a {other!r} section is set")
        for key in ("data", "out"):
            if key in section:
                raise ValueError(
                    f"{self.task}.{key}: each site's data and output folder come from the "
                    f"site list and out, not from the {self.task} section"
                )
        stage = self.stage_config(STAGE_PLACEHOLDER)  # validates the section
        if stage.train.warmup_steps > self.total_steps:
            raise ValueError(
                f"{self.task}.train.warmup_steps ({stage.train.warmup_steps}) exceeds the run's "
                f"rounds * local_steps = {self.total_steps} steps"
            )
        if self.task == "finetune" and stage.epochs is not None:
            raise ValueError(
                "finetune.epochs is not used in federated runs: the schedule is rounds * "
                "local_steps steps"
            )
        if self.task == "finetune" and stage.dp.enabled and stage.train.grad_accum_steps != 1:
            raise ValueError("finetune.dp: train.grad_accum_steps must be 1")
        if self.task == "pretrain" and stage.monitor_label:
            raise ValueError("pretrain.monitor_label is not supported in federated runs")
        return self

    @property
    def total_steps(self) -> int:
        """Optimizer steps per site over the whole run (the length of every schedule)."""
        return self.rounds * self.local_steps

    def stage_config(self, data: Path, out: Path | None = None) -> PretrainConfig | FinetuneConfig:
        """The stage config of one site: its PREP folder, its local run folder, the section, and
        a schedule of ``rounds * local_steps`` steps."""
        cls = PretrainConfig if self.task == "pretrain" else FinetuneConfig
        section = dict(self.pretrain if self.task == "pretrain" else self.finetune)
        train = dict(section.get("train") or {})
        train["total_steps"] = self.total_steps
        values = {**section, "train": train, "data": data}
        if out is not None:
            values["out"] = out
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            problems = "; ".join(
                f"{self.task}.{'.'.join(str(p) for p in err['loc'])}: {err['msg']}"
                for err in exc.errors()
            )
            raise ValueError(problems) from None

    def run_key(self) -> str:
        """Hash of what determines the training (not where it is written): sites keep their
        local state per run key, so a changed config never resumes another run's state."""
        keep = self.model_dump(
            mode="json", include={"task", "rounds", "local_steps", "strategy", "proximal_mu"}
        )
        keep["stage"] = self.pretrain if self.task == "pretrain" else self.finetune
        if self.optimizer_state != "keep":  # keep: the keys of earlier runs stay as they were
            keep["optimizer_state"] = self.optimizer_state
        text = json.dumps(keep, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class SiteSpec:
    """Where one site's data is: a PREP folder, optionally only the cases whose catalog
    attribute ``key`` equals ``value``."""

    name: str
    prep: Path
    key: str | None = None
    value: str | None = None

    def node_config(self, work: Path) -> dict[str, str]:
        """The Flower node config of this site (what ``flower-supernode --node-config`` sets)."""
        cfg = {"site": self.name, "prep": str(self.prep), "work": str(work)}
        if self.key is not None and self.value is not None:
            cfg.update({"site-key": self.key, "site-value": self.value})
        return cfg


def check_prep(path: Path) -> Store:
    """Open a site's PREP folder; a folder that is not one is an error naming it."""
    if not Path(path).is_dir():
        raise InputError(path, "site folder not found")
    return Store(path)  # names what is missing (store.zarr, index.json)


def resolve_sites(cfg: FederatedConfig) -> list[SiteSpec]:
    """The sites of an in-process run, checked up front.

    Raises:
        InputError: no sites; a site folder that is not a PREP folder; ``site_key`` absent from
            the catalog of ``data``; an unknown value in ``site_values``.
    """
    if not cfg.sites and cfg.data is None:
        raise InputError(
            None,
            "no sites: give sites=[PREP_A,PREP_B,...] (one PREP folder per site) or data=PREP "
            "split by site_key",
        )
    if cfg.sites:
        specs = []
        names = _site_names(cfg.sites)
        for name, path in zip(names, cfg.sites, strict=True):
            check_prep(path)
            specs.append(SiteSpec(name=name, prep=Path(path)))
        return specs
    store = check_prep(cfg.data)
    found = sorted({str(v[cfg.site_key]) for v in store.index.values() if v.get(cfg.site_key)})
    if not found:
        raise InputError(
            cfg.data,
            f"no case has the catalog attribute {cfg.site_key!r} to split sites by "
            f"(set site_key to one of {_catalog_keys(store)})",
        )
    values = cfg.site_values or found
    unknown = [v for v in values if v not in found]
    if unknown:
        raise InputError(
            cfg.data, f"site_values {unknown} not found in {cfg.site_key!r} (values: {found})"
        )
    return [SiteSpec(name=v, prep=Path(cfg.data), key=cfg.site_key, value=v) for v in values]


def _catalog_keys(store: Store) -> list[str]:
    keys = {k for v in store.index.values() for k, x in v.items() if isinstance(x, str)}
    return sorted(keys)


def _site_names(paths: list[Path]) -> list[str]:
    """Folder names, made unique with the parent's name (``/h1/prep`` -> ``h1-prep``)."""
    names = [Path(p).resolve().name for p in paths]
    if len(set(names)) < len(names):
        names = [f"{Path(p).resolve().parent.name}-{Path(p).resolve().name}" for p in paths]
    if len(set(names)) < len(names):
        names = [f"site{i}-{n}" for i, n in enumerate(names)]
    return names
