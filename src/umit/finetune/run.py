"""``umit finetune``: segmentation or classification on a preprocessed store.

From a pretrained encoder (``encoder.pt`` of ``umit pretrain``) or from scratch, with optional
freezing (linear probe / last blocks), layer-wise LR decay, and a seeded stratified label subset
(``label_fraction`` / ``label_count``). Validation runs every ``train.eval_every`` steps
(sliding-window Dice for segmentation, AUC for classification) and the best model is kept as
``best.pt`` (plain data: weights, model name and args, plan, label names, metric), the file that
``umit evaluate`` and ``umit predict`` load.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, field_validator, model_validator

from umit.config import UmitConfig
from umit.data.cases import CentredCases, balanced_cases, case_label
from umit.data.dataset import StoreCropDataset
from umit.data.plan import Plan
from umit.data.store import Store
from umit.data.transforms import AugmentConfig, AugmentedDataset
from umit.errors import InputError
from umit.finetune.groups import (
    GroupWeightedTask,
    case_groups,
    group_balanced_cases,
    group_weights,
)
from umit.finetune.recipe import encoder_recipe
from umit.finetune.subsets import select_labeled
from umit.inference.segment import predict_case_classification, predict_case_segmentation
from umit.labels.table import LabelsTableConfig, overlay_index
from umit.metrics import classification_metrics, segmentation_metrics
from umit.models import create_model
from umit.models.heads import freeze_encoder, layer_id_fn, load_encoder_state_dict
from umit.train.checkpoint import (
    InferenceSpec,
    load_artifact,
    load_encoder,
    load_network_weights,
    save_artifact,
)
from umit.train.config import TrainConfig
from umit.train.distributed import is_main, unwrap
from umit.train.dp import DPSGD, DPConfig, stamp_report
from umit.train.loop import Trainer, seed_everything
from umit.train.tasks import ClassificationTask, SegmentationTask

log = logging.getLogger(__name__)

BEST_FILE = "best.pt"


class FinetuneConfig(UmitConfig):
    """Settings of ``umit finetune``."""

    data: Path | str
    """Preprocessed store (PREP folder), or its ``s3://bucket/prefix``."""
    chunk_cache: Path | None = None
    """PREP on an object store: a local folder keeping a copy of the chunks read (each fetched
    once, shared by the loader workers); None reads every crop from the store."""

    @field_validator("data", mode="before")
    @classmethod
    def _url_or_path(cls, value: Any) -> Any:
        """An ``s3://`` store stays a string (a Path would fold ``//``); others are paths."""
        if isinstance(value, str) and "://" in value:
            return value
        return Path(value) if isinstance(value, str) else value

    out: Path = Path("runs/finetune")
    """Run folder: config.yaml, metrics.jsonl, checkpoints, best.pt."""
    task: Literal["segmentation", "classification"] = "segmentation"
    """What to learn: voxel labels of the store, or a per-case label (``label_key``)."""
    model: str = "unetr"
    """Registered model: unetr / swin_unetr / resunet3d (segmentation), classifier / resnet3d_18 / resnet3d_50."""
    model_args: dict[str, Any] = Field(default_factory=lambda: {"encoder": "vit3d_tiny_p16"})
    """Keyword arguments of the model (e.g. encoder name, feature_size, pool)."""
    pretrained: Path | None = None
    """Checkpoint to start from (None: from scratch): an ``encoder.pt`` (into the model's
    encoder) or a ``network.pt`` of ``umit pretrain scope=network`` (the whole encoder-decoder;
    only the output layer starts fresh)."""
    harmonise: Path | None = None
    """A ``network.pt`` of ``umit pretrain method=cross_phase scope=network``, put frozen in front
    of the model: each input becomes every contrast phase as that network predicts them, and the
    model (built with that many input channels) learns from those
    (:mod:`umit.models.harmonised`). None: the model sees the store's channels."""
    freeze: Literal["none", "encoder", "partial"] = "none"
    """``encoder``: frozen encoder (linear probe); ``partial``: only the last ``trainable_blocks`` train."""
    trainable_blocks: int = Field(default=0, ge=0)
    """Encoder blocks left trainable with ``freeze=partial``."""
    crop_size: tuple[int, int, int] = (96, 96, 96)
    """Training crop (classification: the centred input size)."""
    samples_per_case: int = Field(default=4, ge=1)
    """Crops per labeled case per epoch."""
    foreground_prob: float = Field(default=0.33, ge=0, le=1)
    """Segmentation: fraction of crops centred on a labeled structure."""
    label_key: str = "target"
    """Classification: the per-case label in the store index (target, sex, contrast, ...), or
    with ``labels`` set a finding of the catalog's labels table (e.g. pleural_effusion)."""
    labels: LabelsTableConfig | None = None
    """Classification: read ``label_key`` from the catalog's labels table (``umit labels
    from-reports``) instead of the store index: ``labels.catalog=RAW``, present 1, absent 0,
    ``labels.uncertain`` / ``labels.not_mentioned`` say what those count as."""
    label_fraction: float | None = Field(default=None, gt=0, le=1)
    """Use this fraction of the training labels (seeded, stratified); the rest is never used."""
    label_count: int | None = Field(default=None, ge=1)
    """Use this many labeled training cases instead of a fraction."""
    label_seed: int = 0
    """Seed of the label subset (and of the validation hold-out)."""
    val_split: str = "val"
    """Store split used for validation when present."""
    val_fraction: float = Field(default=0.2, ge=0, lt=1)
    """Otherwise, this fraction of the training cases is held out for validation (before subsetting)."""
    exclude_splits: list[str] = Field(default_factory=lambda: ["test"])
    """Splits never used in fine-tuning (the test set)."""
    exclude_cases: list[str] = Field(default_factory=list)
    """Case ids never used in fine-tuning, neither labeled nor for validation (e.g. a fixed
    held-out set that chooses a recipe without touching the test split)."""
    ce_weight: float = Field(default=1.0, ge=0)
    """Segmentation: weight of the cross-entropy term of the Dice + CE loss (Dice has weight 1).
    Cross-entropy is averaged over voxels, so it favours large structures; a small weight lets
    small organs (a few hundred voxels) emerge within a short fine-tuning budget."""
    class_balanced: bool = False
    """Classification: oversample minority classes to equal frequency."""
    sw_overlap: float = Field(default=0.5, ge=0, lt=1)
    """Sliding-window overlap for validation."""
    sw_batch_size: int = Field(default=2, ge=1)
    """Windows per forward pass in validation."""
    augment: AugmentConfig = Field(default_factory=lambda: AugmentConfig(flip_prob=0.0))
    """Augmentation of training crops. No flips by default: mirroring an image and its label map
    together keeps the label values, so a left-right flip turns the left lung/kidney into a
    right-sided "lung_left"/"kidney_left" and flips along y or z break the anatomical position
    prior; on lateralized label sets that is a contradictory target (set ``flip_prob`` only for
    symmetric labels)."""
    train: TrainConfig = Field(
        default_factory=lambda: TrainConfig(
            total_steps=500, batch_size=2, lr=3e-4, warmup_steps=50, eval_every=100
        )
    )
    """Training loop settings; ``out_dir`` is set to ``out``."""
    epochs: float | None = Field(default=None, gt=0)
    """Schedule length in passes over the labeled crops (``len(dataset) / batch_size`` steps
    each) instead of ``train.total_steps``, so the schedule scales with the label budget."""
    min_steps: int = Field(default=50, ge=1)
    """Fewest steps an ``epochs`` schedule runs (tiny label sets)."""
    warmup_fraction: float | None = Field(default=None, ge=0, lt=1)
    """Warmup as a fraction of the schedule (instead of ``train.warmup_steps``)."""
    encoder_lr_scale: float = Field(default=1.0, ge=0)
    """Learning-rate multiplier of the model's encoder parameters (``model.encoder``); the
    decoder / head keep ``train.lr``. Below 1 a pretrained encoder moves less than the fresh
    decoder it feeds."""
    encoder_frozen_steps: int = Field(default=0, ge=0)
    """LP-FT: the encoder is frozen for the first this many steps (only the decoder / head
    learn, on the encoder's features), then everything trains. 0: off."""
    partial_load: bool = False
    """Load a pretrained encoder even when some keys are missing/unexpected (logged by name)."""
    select: Literal["auto", "last", "best_val"] = "auto"
    """What ``best.pt`` holds: the last step of the fixed schedule, the best validation step, or
    ``auto`` (best validation only when the validation set is no larger than the labeled set)."""
    dp: DPConfig = Field(default_factory=DPConfig)
    """Differentially private training (DP-SGD through Opacus); ``dp.enabled`` = ``--dp``."""
    channel_dropout: float = Field(default=0.0, ge=0, lt=1)
    """Robustness to missing MRI sequences: each channel of each training crop is dropped
    (marked absent) with this probability, never all of them, and the model learns an
    "absent" fill value per channel (image space; for a CNN that is all it gets) plus, for
    encoders with a linear input projection (ViT, Swin), an "absent" token embedding per
    channel (:mod:`umit.models.absent`). The saved model then accepts missing channels
    (``umit evaluate drop_channels=[FLAIR]``). 0 = off."""
    balance_by: str | None = None
    """Bias mitigation: a case attribute of the store index (from the catalog: ``site``,
    ``sex``, ``age_band``, ``manufacturer``, ...) whose groups the training balances
    (``umit.finetune.groups``)."""
    balance: Literal["sample", "reweight", "dro"] = "sample"
    """With ``balance_by``: group-balanced sampling, group-reweighted loss, or group DRO."""
    dro_eta: float = Field(default=0.01, gt=0)
    """Group DRO step size of the group distribution."""

    @model_validator(mode="after")
    def _harmonise_alone(self) -> FinetuneConfig:
        """The harmonising front and the absent-channel wrapper both take the input."""
        if self.harmonise is not None and self.channel_dropout > 0:
            raise ValueError("harmonise and channel_dropout cannot be combined")
        return self

    @model_validator(mode="after")
    def _label_augment_needs_segmentation(self) -> FinetuneConfig:
        """A label-driven augmentation needs label maps: segmentation only."""
        if self.augment.label_intensity_shift > 0 and self.task != "segmentation":
            raise ValueError(
                f"augment.label_intensity_shift needs label maps; task={self.task!r} has none "
                "(segmentation only)"
            )
        return self


# ---------------------------------------------------------------------------------------------
# cases and labels
# ---------------------------------------------------------------------------------------------
def labeled_cases(store: Store, task: str, label_key: str = "target") -> list[str]:
    """Case ids the task can learn from: a label map (segmentation) or ``label_key``."""
    if task == "segmentation":
        return [c for c in store.case_ids if store.index[c].get("has_label")]
    return [c for c in store.case_ids if case_label(store.index[c], label_key) is not None]


def split_finetune_cases(store: Store, cfg: FinetuneConfig) -> dict[str, list[str]]:
    """train (labeled subset), val, unlabeled and test case ids."""
    index = store.index
    usable = labeled_cases(store, cfg.task, cfg.label_key)
    test = [c for c in usable if index[c].get("split") in cfg.exclude_splits]
    held_out = set(cfg.exclude_cases)
    unknown = sorted(held_out - set(usable))
    if unknown:
        raise InputError(
            cfg.data,
            f"exclude_cases names {len(unknown)} case(s) that are not labeled cases of this store:"
            f" {unknown[:5]}",
        )
    pool = [c for c in usable if c not in set(test) and c not in held_out]
    val = [c for c in pool if index[c].get("split") == cfg.val_split]
    train_pool = [c for c in pool if c not in set(val)]
    strata = (
        None
        if cfg.task == "segmentation"
        else [str(case_label(index[c], cfg.label_key)) for c in train_pool]
    )
    if not val and cfg.val_fraction > 0 and len(train_pool) > 2:
        val = select_labeled(train_pool, strata, fraction=cfg.val_fraction, seed=cfg.label_seed + 1)
        keep = [i for i, c in enumerate(train_pool) if c not in set(val)]
        train_pool = [train_pool[i] for i in keep]
        strata = None if strata is None else [strata[i] for i in keep]
    if not train_pool:
        raise InputError(cfg.data, f"no labeled training cases for task {cfg.task!r}")
    if cfg.label_fraction is not None or cfg.label_count is not None:
        labeled = select_labeled(
            train_pool,
            strata,
            fraction=cfg.label_fraction,
            count=cfg.label_count,
            seed=cfg.label_seed,
        )
    else:
        labeled = sorted(train_pool)
    unlabeled = sorted(set(train_pool) - set(labeled))
    return {"train": labeled, "val": sorted(val), "unlabeled": unlabeled, "test": sorted(test)}


def class_names(store: Store, cases: list[str], key: str) -> list[str]:
    return sorted({str(case_label(store.index[c], key)) for c in cases})


# ---------------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------------
def build_model(cfg: FinetuneConfig, in_chans: int, num_outputs: int) -> torch.nn.Module:
    """The registered model with input/output sizes filled in, pretrained encoder loaded, frozen as asked."""
    args = dict(cfg.model_args)
    front = harmonising_front(cfg.harmonise, in_chans) if cfg.harmonise is not None else None
    if front is None:
        args.setdefault("in_chans", in_chans)
    args.setdefault("img_size", tuple(cfg.crop_size))
    key = "out_channels" if cfg.task == "segmentation" else "num_classes"
    args.setdefault(key, num_outputs)
    if cfg.channel_dropout > 0 and in_chans < 2:
        raise InputError(
            cfg.data,
            f"channel_dropout={cfg.channel_dropout} needs a multi-channel store; this one has "
            f"{in_chans} channel",
        )
    try:
        if cfg.channel_dropout > 0:  # the task model inside a learned absent-channel wrapper
            model = create_model(
                "absent_channels",
                model=cfg.model,
                model_args=args,
                drop_prob=cfg.channel_dropout,
            )
        elif front is not None:  # a frozen cross-phase network, then the task model
            model = create_model(
                "phase_harmonised",
                model=cfg.model,
                model_args=args,
                front_model=front["model_name"],
                front_args=front["model_args"],
                in_chans=in_chans,
            )
        else:
            model = create_model(cfg.model, **args)
    except TypeError as exc:
        raise InputError(
            None, f"model {cfg.model!r} does not take these arguments {sorted(args)}: {exc}"
        ) from exc
    if front is not None:
        model.front.load_state_dict(front["state_dict"])
    net = model.net if cfg.channel_dropout > 0 else model
    if cfg.pretrained is not None:
        load_pretrained(net, cfg.pretrained, partial=cfg.partial_load)
    if cfg.freeze != "none":
        freeze_encoder(net, trainable_blocks=cfg.trainable_blocks if cfg.freeze == "partial" else 0)
    return model


def harmonising_front(path: Path, in_chans: int) -> dict[str, Any]:
    """The artifact of a cross-phase ``network.pt`` to put in front of a task model.

    Raises:
        InputError: naming the file when it is not a cross-phase network, or takes another
            number of channels than the store has.
    """
    art = load_artifact(path, expect="network")
    if art.get("method") != "cross_phase":
        raise InputError(
            path,
            f"harmonise needs a network of umit pretrain method=cross_phase; this one is of "
            f"method={art.get('method')!r}",
        )
    args = dict(art.get("model_args") or {})
    if int(args.get("in_chans", 1)) != in_chans:
        raise InputError(
            path,
            f"the cross-phase network takes {args.get('in_chans', 1)} channel(s); the store has "
            f"{in_chans}",
        )
    return {"model_name": art["model_name"], "model_args": args, "state_dict": art["state_dict"]}


def load_pretrained(model: torch.nn.Module, path: Path, partial: bool = False) -> None:
    """Load ``encoder.pt`` into ``model.encoder``, or ``network.pt`` into the whole model."""
    kind = load_artifact(path, expect=("encoder", "network", "train_state"))["kind"]
    if kind == "network":
        load_network_weights(model, path, partial=partial)
    else:
        load_pretrained_encoder(model, path, partial=partial)


def load_pretrained_encoder(model: torch.nn.Module, path: Path, partial: bool = False) -> None:
    """Load ``encoder.pt`` weights into ``model.encoder``.

    Strict by default: every key of the model's encoder must be in the file and every key of
    the file must have a place, with equal shapes. ``partial=True`` loads what fits and logs
    the missing and unexpected keys by name.
    """
    if not hasattr(model, "encoder"):
        raise InputError(
            path, f"model {type(model).__name__} has no encoder to load pretrained weights into"
        )
    encoder, _ = load_encoder(path)
    try:  # a learned position table of another grid is resampled to the model's
        missing, unexpected = load_encoder_state_dict(
            model.encoder, encoder.state_dict(), strict=not partial
        )
    except (RuntimeError, ValueError) as exc:
        raise InputError(
            path,
            f"encoder weights do not fit {type(model.encoder).__name__} "
            f"(partial_load=true loads what fits): {exc}",
        ) from exc
    if missing or unexpected:
        log.warning("partial load of %s: missing %s, unexpected %s", path, missing, unexpected)


def layer_id_fn_for(model: torch.nn.Module) -> Callable[[str], int]:
    """Parameter name -> layer id for layer-wise LR decay (the model's own, else by encoder blocks).

    Raises:
        InputError: when the model has no block structure to decay over, rather than silently
            training without the decay the config asked for.
    """
    fn = getattr(model, "layer_id_fn", None)
    if callable(fn):
        return fn()
    try:
        return layer_id_fn(model)
    except (AttributeError, ValueError) as exc:
        raise InputError(
            None,
            f"train.layer_decay < 1 needs a model with encoder blocks; {type(model).__name__} "
            f"has none ({exc}); set train.layer_decay=1.0",
        ) from exc


# ---------------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------------
def mean_foreground_dice(pred: np.ndarray, ref: np.ndarray, classes: list[int]) -> float:
    """Mean Dice over ``classes`` present in prediction or reference (absent in both: skipped)."""
    scores = segmentation_metrics(pred, ref.astype(np.uint8), 1.0, classes, metrics=("dice",))
    vals = [m["dice"] for m in scores.values() if m["dice"] == m["dice"]]  # NaN: absent in both
    return float(np.mean(vals)) if vals else float("nan")


def inference_spec(cfg: FinetuneConfig, plan: Plan, extra: dict[str, Any]) -> InferenceSpec:
    """What ``best.pt`` tells inference: task, ROI, overlap, names, channels."""
    return InferenceSpec(
        task=cfg.task,
        roi_size=tuple(cfg.crop_size),
        overlap=cfg.sw_overlap,
        sw_batch_size=cfg.sw_batch_size,
        class_names=list(extra.get("class_names") or []),
        label_names=dict(extra.get("label_names") or {}),
        label_key=cfg.label_key,
        channels=list(plan.channel_names),
        num_outputs=extra.get("num_outputs"),
    )


def make_eval_fn(
    model: torch.nn.Module,
    store: Store,
    cases: list[str],
    spec: InferenceSpec,
    targets: dict[str, int],
    saver: Callable[[int, dict[str, float]], None] | None,
) -> Callable[[int], dict[str, float]]:
    """Validation metric every eval_every steps; with a ``saver``, keeps the best model."""
    state = {"best": -np.inf}

    def evaluate(step: int) -> dict[str, float]:
        if not cases:
            return {}
        was = model.training
        model.eval()
        if spec.task == "segmentation":
            classes = sorted(
                {
                    int(k)
                    for c in cases
                    for k in store.index[c].get("label_classes", [])
                    if int(k) > 0
                }
            )
            scores = [
                mean_foreground_dice(
                    predict_case_segmentation(model, store, c, spec),
                    np.asarray(store.case(c).read_label()),
                    classes,
                )
                for c in cases
            ]
            metric = {"val_dice": float(np.nanmean(scores))}
            value = metric["val_dice"]
        else:
            probs = np.stack(
                [predict_case_classification(model, store, c, spec.roi_size) for c in cases]
            )
            y = np.array([targets[c] for c in cases])
            m = classification_metrics(y, probs)
            metric = {"val_auc": float(m["auc"]), "val_acc": float(m["accuracy"])}
            value = metric["val_auc"] if m["auc"] == m["auc"] else metric["val_acc"]
        model.train(was)
        if saver is not None and value > state["best"]:
            state["best"] = value
            saver(step, metric)
        return metric

    return evaluate


def selection_rule(cfg: FinetuneConfig, n_train: int, n_val: int) -> str:
    """``best_val`` or ``last``: what ``best.pt`` holds.

    ``auto`` picks the best validation step only when the validation set is no larger than the
    labeled set (a larger one would be labels the label budget does not count) and there is one;
    otherwise the last step of the fixed schedule.
    """
    if cfg.select != "auto":
        return cfg.select if n_val else "last"
    return "best_val" if 0 < n_val <= n_train else "last"


def save_model(
    model: torch.nn.Module,
    path: Path,
    *,
    plan: Any,
    cfg: FinetuneConfig,
    extra: dict[str, Any],
    spec: InferenceSpec | None = None,
) -> Path:
    """``best.pt``: plain data with the inference spec (:func:`umit.train.checkpoint.save_artifact`)."""
    plan_obj = plan if isinstance(plan, Plan) or plan is None else Plan.model_validate(plan)
    if spec is None:
        spec = (
            inference_spec(cfg, plan_obj, extra)
            if plan_obj is not None
            else InferenceSpec(task=cfg.task, roi_size=tuple(cfg.crop_size))
        )
    return save_artifact(
        path, "model", unwrap(model), plan=plan, run_config=cfg, spec=spec, extra=extra
    )


class BestModelWriter:
    """Writes ``best.pt`` for a run: at every new best validation (call it as the ``saver`` of
    :func:`make_eval_fn`), or, when none was chosen that way, the model at the end of the fixed
    schedule (:meth:`finish`). ``record`` holds the chosen step and its metrics; ``before_save``
    refreshes ``extra`` first (e.g. the DP-SGD report). Only the main rank writes."""

    def __init__(
        self,
        model: torch.nn.Module,
        cfg: FinetuneConfig,
        plan: Any,
        spec: InferenceSpec,
        extra: dict[str, Any],
        before_save: Callable[[], None] | None = None,
    ):
        self.model, self.cfg, self.plan, self.spec, self.extra = model, cfg, plan, spec, extra
        self.before_save = before_save
        self.record: dict[str, Any] = {}

    @property
    def path(self) -> Path:
        return self.cfg.out / BEST_FILE

    def _save(self) -> None:
        if is_main():
            save_model(self.model, self.path, plan=self.plan, cfg=self.cfg, spec=self.spec,
                       extra={**self.extra, "best": dict(self.record)})  # fmt: skip

    def __call__(self, step: int, metric: dict[str, float]) -> None:
        self.record.update(step=step, **metric)
        if self.before_save is not None:
            self.before_save()
        self._save()

    def finish(self, result: Any) -> None:
        """After training: the last model, with the last validation metrics, unless a best
        validation step was saved already."""
        if self.record:
            return
        evals = [h for h in result.history if h.get("split") == "eval"]
        last = {k: v for k, v in (evals[-1] if evals else {}).items() if k.startswith("val_")}
        self.record.update(step=result.step, **last)
        self._save()


def scheduled_train_config(cfg: FinetuneConfig, n_samples: int) -> TrainConfig:
    """``cfg.train`` with ``total_steps`` / ``warmup_steps`` from ``epochs`` /
    ``warmup_fraction`` when set (one epoch = ``n_samples`` crops in batches of ``batch_size``)."""
    update: dict[str, int] = {}
    total = cfg.train.total_steps
    if cfg.epochs is not None:
        per_epoch = max(1, math.ceil(n_samples / cfg.train.batch_size))
        total = max(cfg.min_steps, math.ceil(cfg.epochs * per_epoch))
        update["total_steps"] = total
    if cfg.warmup_fraction is not None:
        update["warmup_steps"] = int(cfg.warmup_fraction * total)
    elif cfg.train.warmup_steps > total:
        update["warmup_steps"] = total // 10
    return cfg.train.model_copy(update=update) if update else cfg.train


def training_data(
    cfg: FinetuneConfig, store: Store, train_cases: list[str]
) -> torch.utils.data.Dataset:
    """Augmented training inputs: labeled random crops (segmentation) or centred cases
    (classification), seeded by ``cfg.train.seed``."""
    if cfg.task == "classification":
        crops: torch.utils.data.Dataset = CentredCases(
            store, train_cases, cfg.crop_size, cfg.samples_per_case
        )
    else:
        crops = StoreCropDataset(
            cfg.data,
            cfg.crop_size,
            cases=train_cases,
            samples_per_case=cfg.samples_per_case,
            foreground_prob=cfg.foreground_prob,
            seed=cfg.train.seed,
            with_label=True,
            chunk_cache=cfg.chunk_cache,
        )
    return AugmentedDataset(crops, cfg.augment, seed=cfg.train.seed)


def make_task(
    cfg: FinetuneConfig, model: torch.nn.Module, targets: dict[str, int]
) -> SegmentationTask | ClassificationTask:
    """The training-loop task of ``cfg.task`` around ``model``."""
    if cfg.task == "segmentation":
        return SegmentationTask(model, ce_weight=cfg.ce_weight)
    return ClassificationTask(model, targets)


def seg_num_outputs(store: Store, cases: list[str], plan: Plan) -> int:
    """Output channels of a segmentation model: the largest label value seen or planned + 1."""
    classes = sorted({int(k) for c in cases for k in store.index[c].get("label_classes", [])})
    return max(classes + [max((plan.labels or {"_": 0}).values(), default=0)]) + 1


# ---------------------------------------------------------------------------------------------
# the command
# ---------------------------------------------------------------------------------------------
def run(cfg: FinetuneConfig) -> dict[str, Any]:
    """Fine-tune; returns a summary with the chosen model's metric and path."""
    store = Store(cfg.data, chunk_cache=cfg.chunk_cache)
    if (
        cfg.labels is not None
        and cfg.task == "classification"
        and not overlay_index(store.index, cfg.labels, cfg.label_key)
    ):
        raise InputError(
            cfg.data, f"no case of this store has a {cfg.label_key!r} label in {cfg.labels.catalog}"
        )
    plan = store.plan
    in_chans = len(plan.channels)
    cases = split_finetune_cases(store, cfg)
    targets: dict[str, int] = {}
    names: list[str] = []
    if cfg.task == "segmentation":
        num_outputs = seg_num_outputs(store, cases["train"] + cases["val"], plan)
        train_cases = cases["train"]
    else:
        names = class_names(store, cases["train"] + cases["val"], cfg.label_key)
        if len(names) < 2:
            raise InputError(
                cfg.data, f"label {cfg.label_key!r} has fewer than 2 classes in the training cases"
            )
        lookup = {n: i for i, n in enumerate(names)}
        targets = {
            c: lookup[str(case_label(store.index[c], cfg.label_key))]
            for c in cases["train"] + cases["val"] + cases["test"]
            if str(case_label(store.index[c], cfg.label_key)) in lookup
        }
        num_outputs = len(names)
        train_cases = (
            balanced_cases(cases["train"], targets) if cfg.class_balanced else cases["train"]
        )
    groups = None
    if cfg.balance_by is not None:  # bias mitigation (umit.finetune.groups)
        if cfg.dp.enabled and cfg.balance != "sample":
            raise InputError(None, f"balance={cfg.balance!r} cannot run with DP-SGD; use sample")
        groups = case_groups(store.index, cases["train"], cfg.balance_by)
        if cfg.balance == "sample":
            train_cases = group_balanced_cases(train_cases, groups)
    seed_everything(cfg.train.seed)  # before anything random is built: the same seed, the same run
    model = build_model(cfg, in_chans, num_outputs)
    dataset = training_data(cfg, store, train_cases)
    train_cfg = scheduled_train_config(cfg, len(dataset))
    task = make_task(cfg, model, targets)
    if groups is not None and cfg.balance != "sample":
        weights = group_weights(cases["train"], groups)
        task = GroupWeightedTask(task, groups, weights, cfg.balance, cfg.dro_eta)
    cfg.out.mkdir(parents=True, exist_ok=True)
    extra: dict[str, Any] = {
        "cases": cases,
        "class_names": names,
        "label_names": plan.labels,
        "label_key": cfg.label_key,
        "num_outputs": num_outputs,
    }
    if groups is not None:
        extra["balance"] = {
            "by": cfg.balance_by,
            "mode": cfg.balance,
            "train_groups": {
                g: list(groups.values()).count(g) for g in sorted(set(groups.values()))
            },
        }
    spec = inference_spec(cfg, plan, extra)
    selection = selection_rule(cfg, len(cases["train"]), len(cases["val"]))
    extra["selection"] = selection
    layer_ids = layer_id_fn_for(model) if cfg.train.layer_decay < 1 else None
    task, optimizer_factory = encoder_recipe(
        model,
        task,
        train_cfg,
        lr_scale=cfg.encoder_lr_scale,
        frozen_steps=cfg.encoder_frozen_steps,
        layer_id_fn=layer_ids,
    )
    if cfg.dp.enabled and (cfg.encoder_lr_scale != 1 or cfg.encoder_frozen_steps):
        raise InputError(
            None, "encoder_lr_scale and encoder_frozen_steps are not supported with DP-SGD"
        )
    dp = None
    if cfg.dp.enabled:  # DP-SGD: Poisson batches, per-sample clipping + noise, an accountant
        dp = DPSGD(
            cfg.dp, task, dataset, train_cfg, num_units=len(set(train_cases)), layer_id_fn=layer_ids
        )
        extra["dp"] = dp.report()

    def refresh_dp() -> None:
        if dp is not None:
            extra["dp"] = dp.report()

    saver = BestModelWriter(model, cfg, plan, spec, extra, before_save=refresh_dp)
    evaluate = make_eval_fn(
        model, store, cases["val"], spec, targets, saver if selection == "best_val" else None
    )
    trainer = Trainer(
        dp.task if dp else task,
        dp.loader if dp else dataset,
        train_cfg.model_copy(update={"out_dir": cfg.out}),
        eval_fn=evaluate if cases["val"] else None,
        plan=plan,
        layer_id_fn=layer_ids,
        optimizer_factory=dp.optimizer_factory if dp else optimizer_factory,
        run_config=cfg,
    )
    result = trainer.fit()
    if dp is not None:
        extra["dp"] = dp.report()
        if (
            saver.record and is_main()
        ):  # chosen by validating every step's model: the whole run's epsilon
            stamp_report(cfg.out / BEST_FILE, extra["dp"])
    saver.finish(result)  # the last model of the fixed schedule, if no best step was saved
    best = saver.record
    history = [h for h in result.history if h.get("split", "train") == "train"]
    return {
        "out": str(cfg.out),
        "model": str(cfg.out / BEST_FILE),
        "n_train": len(cases["train"]),
        "n_val": len(cases["val"]),
        "n_unlabeled": len(cases["unlabeled"]),
        "n_test": len(cases["test"]),
        "steps": result.step,
        "first_loss": history[0]["loss"] if history else None,
        "last_loss": history[-1]["loss"] if history else None,
        "selection": selection,
        "best": best,
        "dp": extra.get("dp"),
        "seconds": result.seconds,
    }
