"""``umit pretrain``: self-supervised pretraining (MAE-3D, SimCLR-3D, Models Genesis, cross-phase
prediction) on a store.

Random 3D crops (optionally foreground-biased) with light augmentation feed the chosen method
(``method=mae|simclr|genesis|cross_phase``, or ``report_labels``: weak multi-label supervision from report-derived
labels) around any registered encoder (MAE needs a ViT); the training loop (:mod:`umit.train`) does schedules, precision,
accumulation, distribution, checkpoints and resume. A fixed validation set of crops and masks
gives a pretext loss that is comparable across steps, logged next to its trivial baseline
(``flat_loss`` / ``chance_loss`` / ``baseline_loss``); with ``monitor_label`` a kNN and a
linear-probe score of the frozen encoder on a fixed labeled subset are logged too. At the end the encoder alone is
written as ``encoder.pt`` (plain data: weights, model name and args, the preprocessing plan), the
file that ``umit probe`` and fine-tuning load.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, field_validator

from umit.config import UmitConfig
from umit.data.augment3d import ViewConfig
from umit.data.dataset import StoreCropDataset
from umit.data.store import Store
from umit.data.transforms import AugmentConfig, AugmentedDataset
from umit.errors import InputError
from umit.labels.table import LabelsTableConfig, catalog_path, read_labels, table_targets
from umit.models import create_model
from umit.ssl.cross_phase import CrossPhase3D, PhaseGroupCrops, phase_groups
from umit.ssl.cross_sequence import CrossSequence3D, synthesis_scores
from umit.ssl.genesis import Genesis3D
from umit.ssl.mae import MAE3D, mae_flops_per_sample
from umit.ssl.monitor import build_monitor
from umit.ssl.report_labels import LabeledCrops, ReportLabels3D, label_matrix, validation_batches
from umit.ssl.simclr import SimCLR3D
from umit.train.checkpoint import checkpoint_candidates, save_artifact
from umit.train.config import TrainConfig
from umit.train.distributed import is_main
from umit.train.loop import Trainer, seed_everything
from umit.train.metrics import METRICS_NAME, read_metrics
from umit.utils.fileio import atomic_write_json

log = logging.getLogger(__name__)

ENCODER_FILE = "encoder.pt"
NETWORK_FILE = "network.pt"
INITIAL_EVAL_FILE = "initial_eval.json"
SYNTHESIS_FILE = "synthesis.json"


class MAEConfig(UmitConfig):
    """Settings of the MAE-3D wrapper."""

    mask_ratio: float = Field(default=0.75, ge=0, lt=1)
    """Fraction of patches hidden from the encoder."""
    masking: str = "random"
    """``random`` (scattered patches) or ``block`` (cubes of ``mask_block`` patches per axis)."""
    mask_block: int = Field(default=2, ge=1)
    """Edge of a masked cube in patches, for block masking."""
    decoder_dim: int = Field(default=256, ge=8)
    """Decoder width."""
    decoder_depth: int = Field(default=4, ge=1)
    """Decoder blocks."""
    decoder_heads: int = Field(default=8, ge=1)
    """Decoder attention heads (must divide decoder_dim)."""
    norm_pix_loss: bool = True
    """Predict per-patch normalized intensities (MAE's better default)."""


class SimCLRConfig(UmitConfig):
    """Settings of the SimCLR-3D wrapper."""

    proj_dim: int = Field(default=128, ge=8)
    """Projection output width."""
    hidden: int | None = None
    """Projection hidden width (default: the encoder's feature width)."""
    temperature: float = Field(default=0.1, gt=0)
    """NT-Xent temperature."""
    views: ViewConfig = Field(default_factory=ViewConfig)
    """Random view settings (``views.scale`` is the first view's crop volume fraction)."""
    scale2: tuple[float, float] = (0.15, 0.5)
    """Crop volume fraction of the second view (the smaller scale)."""
    view_size: tuple[int, int, int] | None = None
    """Spatial size of the views (default: ``crop_size``)."""


class GenesisConfig(UmitConfig):
    """Settings of the Models Genesis restoration wrapper."""

    decoder_dim: int = Field(default=64, ge=8)
    """Width of the first decoder stage (halved per upsampling)."""
    shuffle_prob: float = Field(default=0.5, ge=0, le=1)
    """Probability of local pixel shuffling."""
    shuffle_blocks: int = Field(default=50, ge=0)
    """Small boxes shuffled per volume."""
    nonlinear_prob: float = Field(default=0.9, ge=0, le=1)
    """Probability of the Bezier intensity map."""
    paint_prob: float = Field(default=0.9, ge=0, le=1)
    """Probability of in- or out-painting."""
    inpaint_rate: float = Field(default=0.2, ge=0, le=1)
    """Share of in-painting among paintings (the rest is out-painting)."""


class ReportLabelsConfig(UmitConfig):
    """``method=report_labels``: weak multi-label supervision from the catalog's labels table."""

    labels: LabelsTableConfig | None = None
    """The labels table (``labels.catalog=RAW``; uncertain / not_mentioned policies)."""
    findings: list[str] | None = None
    """Findings to learn, one output each (None: every finding of the table with both present
    and absent cases among the training cases)."""


class CrossSequenceConfig(UmitConfig):
    """Settings of cross-sequence MRI pretraining (``method=cross_sequence``)."""

    target: str | None = None
    """Sequence always hidden (a channel name of the store, e.g. ``FLAIR``); None draws the
    hidden sequence at random per sample."""
    mask_ratio: float = Field(default=1.0, gt=0, le=1)
    """Fraction of the hidden sequence's ``mask_patch`` cubes hidden (1: the whole sequence;
    below 1: predict masked patches of the missing sequence, the rest of it visible)."""
    mask_patch: int = Field(default=8, ge=1)
    """Edge of a hidden cube in voxels."""
    decoder_dim: int = Field(default=64, ge=8)
    """Width of the first decoder stage (halved per upsampling)."""
    loss: Literal["l1", "mse"] = "l1"
    """Loss on the hidden voxels, in the store's normalised intensity space."""
    input_skip: bool = True
    """Add a 1x1x1 convolution of the (filled) input to the prediction (voxelwise mixing)."""
    synthesis_eval: bool = True
    """At the end, PSNR / SSIM of the predicted sequence on the validation cases (whole
    volumes) against the intensity-matched baseline, into ``synthesis.json``."""
    synthesis_split: str | None = None
    """Score the synthesis on the cases of this store split instead of the validation
    hold-out (e.g. ``test``: subjects excluded from pretraining)."""


class CrossPhaseConfig(UmitConfig):
    """Settings of cross-phase CT pretraining (``method=cross_phase``, :mod:`umit.ssl.cross_phase`)."""

    group_key: str = "subject_id"
    """Store index key shared by the series of one exam."""
    phase_key: str = "contrast"
    """Store index key naming each series' contrast phase."""
    phases: list[str] | None = None
    """Phases to predict, in output order (None: every value of ``phase_key`` found, sorted)."""
    loss: Literal["l1", "mse"] = "mse"
    """Loss on the store's normalised intensities, over the phases the exam has. MSE: the
    change between phases is zero at most voxels, and L1 then settles on predicting none."""
    decoder_dim: int = Field(default=64, ge=8)
    """Width of the light decoder (``scope=encoder``)."""
    contrast: float = Field(default=0.0, ge=0)
    """Weight of the dense cross-phase contrast (0: off): the deepest encoder feature at one
    position in one phase must pick out the same position in another phase of the exam,
    among every position of the batch (InfoNCE). Asks the encoder for phase-invariant features,
    which prediction alone does not."""
    temperature: float = Field(default=0.2, gt=0)
    """Softmax temperature of the contrast."""
    proj_dim: int = Field(default=64, ge=8)
    """Width of the contrast's projection (pretraining only; not saved)."""


METHODS = ("mae", "simclr", "genesis", "report_labels", "cross_sequence", "cross_phase")


class PretrainConfig(UmitConfig):
    """Settings of ``umit pretrain``."""

    data: Path | str
    """Preprocessed store (the PREP folder written by ``umit preprocess``), or its
    ``s3://bucket/prefix``."""
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

    out: Path = Path("runs/pretrain")
    """Run folder: config.yaml, metrics.jsonl, checkpoints, encoder.pt."""
    model: str = "vit3d_base_p16"
    """Registered encoder name (``umit.models.list_models()``)."""
    model_args: dict[str, Any] = Field(default_factory=dict)
    """Extra keyword arguments of the encoder (e.g. drop_path_rate)."""
    crop_size: tuple[int, int, int] = (96, 96, 96)
    """Training crop in voxels (must be divisible by the patch size)."""
    samples_per_case: int = Field(default=4, ge=1)
    """Crops drawn from each case per epoch."""
    foreground_prob: float = Field(default=0.0, ge=0, le=1)
    """Probability of centring a crop on a labeled structure (labels are not used otherwise)."""
    exclude_splits: list[str] = Field(default_factory=lambda: ["test"])
    """Catalog splits never used for pretraining (keeps test cases unseen)."""
    val_cases: int = Field(default=4, ge=0)
    """Cases held out for the validation reconstruction loss (0 = none)."""
    val_crops: int = Field(default=8, ge=1)
    """Fixed validation crops (with fixed masks) over the held-out cases."""
    method: Literal[
        "mae", "simclr", "genesis", "report_labels", "cross_sequence", "cross_phase"
    ] = "mae"
    """Pretraining method: masked autoencoding (ViT only), contrastive views, restoration, weak
    multi-label supervision from report-derived labels (``report_labels.labels``), prediction
    of a held-out MRI sequence from the others (multi-channel stores), or prediction of every
    contrast phase of a multiphase CT exam from one of them (``cross_phase``)."""
    scope: Literal["encoder", "network"] = "encoder"
    """``encoder``: pretrain ``model``, an encoder, and write ``encoder.pt``. ``network``
    (``method=genesis`` or ``cross_phase``): ``model`` is a whole segmentation network (unetr,
    swin_unetr, resunet3d) trained to restore its input (or to predict every phase), written to
    ``network.pt`` (and its encoder to
    ``encoder.pt``); ``umit finetune pretrained=network.pt`` then starts decoder and skip
    paths from pretrained weights too, which matters most with few labels."""
    mae: MAEConfig = Field(default_factory=MAEConfig)
    """MAE-3D wrapper settings."""
    simclr: SimCLRConfig = Field(default_factory=SimCLRConfig)
    """SimCLR-3D wrapper settings."""
    genesis: GenesisConfig = Field(default_factory=GenesisConfig)
    """Models Genesis wrapper settings."""
    report_labels: ReportLabelsConfig = Field(default_factory=ReportLabelsConfig)
    """Report-label wrapper settings (``method=report_labels``)."""
    cross_sequence: CrossSequenceConfig = Field(default_factory=CrossSequenceConfig)
    """Cross-sequence wrapper settings."""
    cross_phase: CrossPhaseConfig = Field(default_factory=CrossPhaseConfig)
    """Cross-phase wrapper settings."""
    monitor_label: str | None = None
    """Per-case label of the store index (e.g. ``target``) for the online kNN / probe scores
    every ``train.eval_every`` steps; None = off."""
    monitor_cases: int = Field(default=64, ge=4)
    """Labeled non-test cases (at most) embedded by the monitor."""
    monitor_k: int = Field(default=10, ge=1)
    """Neighbours of the monitor's kNN classifier."""
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    """Augmentation of the training crops."""

    @field_validator("augment")
    @classmethod
    def _no_label_augment(cls, value: AugmentConfig) -> AugmentConfig:
        """Pretraining reads no labels, so a label-driven augmentation cannot apply."""
        if value.label_intensity_shift > 0:
            raise ValueError(
                "augment.label_intensity_shift needs label maps; pretraining reads none (set 0)"
            )
        return value

    train: TrainConfig = Field(
        default_factory=lambda: TrainConfig(
            total_steps=1000,
            batch_size=2,
            lr=1.5e-4,
            warmup_steps=100,
            weight_decay=0.05,
            betas=(0.9, 0.95),
        )
    )
    """The training loop (steps, batch, schedule, precision, checkpoints); ``out_dir`` is set to ``out``."""


def split_cases(
    store: Any, exclude_splits: list[str], val_cases: int, seed: int
) -> tuple[list[str], list[str]]:
    """Training and validation case ids: excluded splits removed, a seeded validation hold-out."""

    usable = [
        c for c in store.case_ids if (store.index[c].get("split") or "train") not in exclude_splits
    ]
    if not usable:
        raise InputError(store.prep_dir, f"no cases left after excluding splits {exclude_splits}")
    order = np.random.default_rng(seed).permutation(len(usable))
    n_val = min(val_cases, max(0, len(usable) - 1))
    val = sorted(usable[i] for i in order[:n_val])
    train = sorted(usable[i] for i in order[n_val:])
    return train, val


def data_hash(store: Any, cases: list[str]) -> str:
    """Hash of the training manifest: case ids and their stored shapes and plan."""
    manifest = {c: store.index[c].get("shape") for c in cases}
    manifest["__plan__"] = (
        store.plan.processing_hash() if hasattr(store.plan, "processing_hash") else None
    )
    return hashlib.sha256(json.dumps(manifest, sort_keys=True, default=str).encode()).hexdigest()[
        :16
    ]


class PretrainTask:
    """Training-loop task around a method wrapper: the loss and its scalar parts.

    MAE also reports FLOPs and tokens per sample.
    """

    def __init__(self, module: torch.nn.Module, crop_size: tuple[int, int, int]):
        self.module = module
        self._call: torch.nn.Module = module
        self._flops = self._tokens = None
        if getattr(module, "model_name", None) == "mae3d":
            self._flops = mae_flops_per_sample(module, crop_size)
            grid = module.encoder.grid_size(crop_size)
            self._tokens = float(grid[0] * grid[1] * grid[2])

    def trainable_module(self) -> torch.nn.Module:
        return self.module

    def set_trainable_module(self, module: torch.nn.Module) -> None:
        self._call = module

    def __call__(self, batch: Any) -> dict[str, torch.Tensor]:
        out = self._call(batch)
        return {k: v for k, v in out.items() if isinstance(v, torch.Tensor) and v.numel() == 1}

    def flops_per_sample(self, batch: Any) -> float | None:
        return self._flops

    def tokens_per_sample(self, batch: Any) -> float | None:
        return self._tokens


MAETask = PretrainTask  # the former name


def training_data(cfg: PretrainConfig, cases: list[str]) -> AugmentedDataset:
    """Augmented random crops of ``cases`` (labels unused), seeded by ``cfg.train.seed``."""
    crops = StoreCropDataset(
        cfg.data,
        cfg.crop_size,
        cases=cases,
        samples_per_case=cfg.samples_per_case,
        foreground_prob=cfg.foreground_prob,
        seed=cfg.train.seed,
        with_label=False,
        chunk_cache=cfg.chunk_cache,
    )
    return AugmentedDataset(crops, cfg.augment, seed=cfg.train.seed)


def build_validation(
    store_dir: Path | str, cases: list[str], cfg: PretrainConfig
) -> list[torch.Tensor]:
    """Fixed validation crops (no augmentation), batched one crop per tensor."""

    if not cases:
        return []
    ds = StoreCropDataset(
        store_dir,
        cfg.crop_size,
        cases=cases,
        samples_per_case=max(1, -(-cfg.val_crops // len(cases))),
        foreground_prob=0.0,
        seed=cfg.train.seed + 1,
        with_label=False,
        chunk_cache=cfg.chunk_cache,
    )
    return [ds[i]["image"].unsqueeze(0) for i in range(min(cfg.val_crops, len(ds)))]


def make_eval_fn(
    module: torch.nn.Module, val: list[torch.Tensor], device_of: Any, monitor: Any = None
):
    """Validation pretext loss (same masks / views / corruptions at every evaluation), its
    trivial baseline, and the monitor's kNN / probe scores."""

    def mae_losses(x: torch.Tensor, i: int) -> tuple[float, float]:
        g = torch.Generator(device="cpu").manual_seed(10_000 + i)
        grid = tuple(module.encoder.grid_size(x.shape[2:]))
        m = module.draw_mask(1, grid, "cpu", g)
        m = type(m)(
            keep=m.keep.to(x.device), mask=m.mask.to(x.device), restore=m.restore.to(x.device)
        )
        pred = module.forward_decoder(
            module.encoder.forward_features(x, keep_indices=m.keep), m, grid
        )
        return float(module.loss(x, pred, m.mask)), float(module.flat_loss(x, m.mask))

    def evaluate(step: int) -> dict[str, float]:
        out: dict[str, float] = {}
        was_training = module.training
        module.eval()
        losses, baselines = [], []
        contrasts: list[float] = []
        chances: list[float] = []
        with torch.no_grad():
            if isinstance(module, MAE3D):
                for i, x in enumerate(val):
                    loss, flat = mae_losses(x.to(device_of()), i)
                    losses.append(loss)
                    baselines.append(flat)
            elif getattr(module, "model_name", None) == "simclr3d":
                if len(val) >= 2:  # one batch of all crops: the negatives are the other crops
                    g = torch.Generator(device="cpu").manual_seed(10_000)
                    res = module(torch.cat(val).to(device_of()), generator=g)
                    losses.append(float(res["loss"]))
                    baselines.append(float(res["chance_loss"]))
            else:
                for i, x in enumerate(val):
                    g = torch.Generator(device="cpu").manual_seed(10_000 + i)
                    if isinstance(x, dict):  # report_labels: crops with their labels
                        x = {k: v.to(device_of()) for k, v in x.items()}
                    else:
                        x = x.to(device_of())
                    res = module(x, generator=g)
                    # the pretext's own loss, comparable with its baseline; an added term
                    # (cross-phase contrast) is logged beside it
                    losses.append(float(res.get("prediction_loss", res["loss"])))
                    baselines.append(float(res["baseline_loss"]))
                    if "contrast_loss" in res:
                        contrasts.append(float(res["contrast_loss"]))
                        chances.append(float(res["contrast_chance"]))
        module.train(was_training)
        if losses:
            out["val_loss"] = sum(losses) / len(losses)
            out["val_baseline_loss"] = sum(baselines) / len(baselines)
        if contrasts:
            out["val_contrast_loss"] = sum(contrasts) / len(contrasts)
            out["val_contrast_chance"] = sum(chances) / len(chances)
        if monitor is not None:
            out.update(monitor(step))
        return out

    return evaluate


def exam_groups(
    cfg: PretrainConfig, store: Any, cases: list[str]
) -> tuple[list[str], dict[str, list[str | None]]]:
    """``method=cross_phase``: the phases and each exam's series per phase."""
    xp = cfg.cross_phase
    return phase_groups(store, cases, xp.group_key, xp.phase_key, xp.phases)


def split_groups(
    groups: dict[str, list[str | None]], val_groups: int, seed: int
) -> tuple[dict[str, list[str | None]], dict[str, list[str | None]]]:
    """Training and validation exams: a seeded hold-out of ``val_groups`` whole exams (drawn
    in the order given, :func:`umit.ssl.cross_phase.phase_groups`'s)."""
    names = list(groups)
    order = np.random.default_rng(seed).permutation(len(names))
    n_val = min(val_groups, max(0, len(names) - 1))
    val = {names[i] for i in order[:n_val]}
    return (
        {g: groups[g] for g in names if g not in val},
        {g: groups[g] for g in names if g in val},
    )


def cross_phase_data(
    cfg: PretrainConfig,
    train_groups: dict[str, list[str | None]],
    val_groups: dict[str, list[str | None]],
) -> tuple[PhaseGroupCrops, list[dict[str, Any]]]:
    """Training crops of multiphase exams and fixed validation items (one per batch)."""
    dataset = PhaseGroupCrops(
        cfg.data,
        cfg.crop_size,
        train_groups,
        samples_per_group=cfg.samples_per_case,
        seed=cfg.train.seed,
        augment=cfg.augment,
        chunk_cache=cfg.chunk_cache,
    )
    if not val_groups:
        return dataset, []
    held = PhaseGroupCrops(
        cfg.data,
        cfg.crop_size,
        val_groups,
        samples_per_group=max(1, -(-cfg.val_crops // len(val_groups))),
        seed=cfg.train.seed + 1,
        chunk_cache=cfg.chunk_cache,
    )
    items = [held[i] for i in range(min(cfg.val_crops, len(held)))]
    val = [
        {k: (v.unsqueeze(0) if torch.is_tensor(v) else torch.tensor([v])) for k, v in it.items()}
        for it in items
    ]
    return dataset, val


def build_mae(cfg: PretrainConfig, in_chans: int) -> torch.nn.Module:
    encoder = create_model(cfg.model, img_size=cfg.crop_size, in_chans=in_chans, **cfg.model_args)
    m = cfg.mae
    return MAE3D(
        encoder,
        in_chans=in_chans,
        decoder_dim=m.decoder_dim,
        decoder_depth=m.decoder_depth,
        decoder_heads=m.decoder_heads,
        mask_ratio=m.mask_ratio,
        masking=m.masking,
        mask_block=m.mask_block,
        norm_pix_loss=m.norm_pix_loss,
    )


def build_network(
    cfg: PretrainConfig, in_chans: int, out_channels: int | None = None
) -> torch.nn.Module:
    """``cfg.model`` as a whole dense network with ``out_channels`` outputs (default: the
    input's channels)."""
    args = {"img_size": cfg.crop_size, **cfg.model_args, "in_chans": in_chans}
    args["out_channels"] = in_chans if out_channels is None else out_channels
    try:
        return create_model(cfg.model, **args)
    except TypeError:  # a network without an img_size argument (the CNNs)
        if "img_size" in cfg.model_args:
            raise
        del args["img_size"]
        return create_model(cfg.model, **args)


def check_sequences(cfg: PretrainConfig, channel_names: list[str]) -> None:
    """Cross-sequence pretraining needs a multi-channel store holding the target sequence."""
    if len(channel_names) < 2:
        raise InputError(
            cfg.data,
            f"method=cross_sequence needs a multi-sequence store (at least two channels); this "
            f"store has {len(channel_names)} channel(s) {channel_names}",
        )
    target = cfg.cross_sequence.target
    if target is not None and target not in channel_names:
        raise InputError(
            cfg.data,
            f"cross_sequence.target={target!r} is not a sequence of this store; its channels are "
            f"{channel_names}",
        )


def cross_phase_args(cfg: PretrainConfig) -> dict[str, Any]:
    """The :class:`CrossPhase3D` settings of ``cfg.cross_phase`` shared by both scopes."""
    return cfg.cross_phase.model_dump(include={"loss", "contrast", "temperature", "proj_dim"})


def build_method(
    cfg: PretrainConfig,
    in_chans: int,
    channel_names: list[str] | None = None,
    report: ReportLabelData | None = None,
    phases: list[str] | None = None,
) -> torch.nn.Module:
    """The wrapper of ``cfg.method`` around a freshly built ``cfg.model`` encoder (or, with
    ``scope=network``, a whole network); ``report``: the labels of ``method=report_labels``;
    ``phases``: the phase names of ``method=cross_phase``."""
    if cfg.method == "cross_phase":
        if in_chans != 1 or not phases:
            raise InputError(
                cfg.data, "method=cross_phase needs a one-channel CT store of multiphase exams"
            )
        if cfg.scope == "network":
            net = build_network(cfg, 1, len(phases))
            return CrossPhase3D(net, phases, network=True, **cross_phase_args(cfg))
    if cfg.scope == "network":
        if cfg.method != "genesis":
            raise InputError(
                None,
                f"scope=network pretrains a whole encoder-decoder: it needs method=genesis or "
                f"cross_phase, got method={cfg.method}",
            )
        return Genesis3D(
            build_network(cfg, in_chans),
            in_chans=in_chans,
            network=True,
            **{k: v for k, v in cfg.genesis.model_dump().items() if k != "decoder_dim"},
        )
    if cfg.method == "mae":
        return build_mae(cfg, in_chans)

    args = {"img_size": cfg.crop_size, "in_chans": in_chans, "num_classes": 0, **cfg.model_args}
    try:  # pooled features only: no classifier weights to train or save
        encoder = create_model(cfg.model, **args)
    except TypeError:  # an encoder without a classifier argument
        del args["num_classes"]
        encoder = create_model(cfg.model, **args)
    if cfg.method == "simclr":
        s = cfg.simclr
        return SimCLR3D(
            encoder,
            proj_dim=s.proj_dim,
            hidden=s.hidden,
            temperature=s.temperature,
            views=s.views,
            scale2=s.scale2,
            view_size=s.view_size,
        )
    if cfg.method == "genesis":
        return Genesis3D(encoder, in_chans=in_chans, **cfg.genesis.model_dump())
    if cfg.method == "cross_phase":
        return CrossPhase3D(
            encoder, phases or [], decoder_dim=cfg.cross_phase.decoder_dim, **cross_phase_args(cfg)
        )
    if cfg.method == "report_labels":
        if report is None:
            raise ValueError("method=report_labels needs the report labels (report_label_data)")
        return ReportLabels3D(encoder, report.findings, report.prevalence)
    if cfg.method == "cross_sequence":
        names = list(channel_names or [f"channel{i}" for i in range(in_chans)])
        check_sequences(cfg, names)
        return CrossSequence3D(
            encoder,
            names,
            **cfg.cross_sequence.model_dump(exclude={"synthesis_eval", "synthesis_split"}),
        )
    raise ValueError(f"method must be one of {METHODS}, got {cfg.method!r}")


@dataclass
class ReportLabelData:
    """The labels ``method=report_labels`` trains on: findings (K), the cases with at least one
    known label, (N, K) values and mask, and each finding's training prevalence."""

    findings: list[str]
    cases: list[str]
    values: np.ndarray
    mask: np.ndarray
    prevalence: np.ndarray


def report_label_data(
    cfg: PretrainConfig, cases: list[str], train_cases: list[str]
) -> ReportLabelData:
    """Read ``cfg.report_labels`` from the catalog's labels table for ``cases``."""
    rl = cfg.report_labels
    if rl.labels is None:
        raise InputError(
            None, "method=report_labels needs report_labels.labels.catalog=RAW (the labels table)"
        )
    if rl.findings is not None:
        findings = list(rl.findings)
        targets = {f: table_targets(rl.labels, f) for f in findings}
    else:
        rows = read_labels(rl.labels.catalog, source=rl.labels.source)
        names = list(dict.fromkeys(r["finding"] for r in rows))
        targets = {f: table_targets(rl.labels, f) for f in names}
        train = set(train_cases)
        findings = [f for f in names if len({v for c, v in targets[f].items() if c in train}) == 2]
    if not findings:
        raise InputError(
            catalog_path(rl.labels.catalog),
            "no finding of the labels table has both present and absent training cases",
        )
    keep = [c for c in cases if any(c in targets[f] for f in findings)]
    values, mask = label_matrix(keep, targets, findings)
    rows_train = [i for i, c in enumerate(keep) if c in set(train_cases)]
    if not rows_train:
        raise InputError(
            catalog_path(rl.labels.catalog), "no training case of this store has a report label"
        )
    m, v = mask[rows_train], values[rows_train]
    prevalence = (v * m).sum(0) / np.maximum(m.sum(0), 1.0)
    return ReportLabelData(findings, keep, values, mask, prevalence)


def save_encoder(
    module: torch.nn.Module, path: Path, plan: Any, cfg: PretrainConfig, extra: dict | None = None
) -> Path:
    """Write the encoder of any method wrapper alone as an ``encoder`` artifact, with the
    method's name (plain data, atomic)."""
    return save_artifact(
        path,
        "encoder",
        module.encoder,
        plan=plan,
        run_config=cfg,
        extra={"method": getattr(cfg, "method", "mae"), **(extra or {})},
    )


def initial_eval(cfg: PretrainConfig, evaluate: Any) -> dict[str, float]:
    """Scores of the untrained model: measured on a fresh run and kept in ``initial_eval.json``,
    read back when the run resumes (the model in memory is then no longer the initial one)."""
    path = cfg.out / INITIAL_EVAL_FILE
    if path.is_file():
        return json.loads(path.read_text())
    if cfg.train.resume not in (None, "auto") or checkpoint_candidates(cfg.out):
        return {}  # resumed from a checkpoint whose initial scores were not kept
    initial = evaluate(0)
    if is_main():
        atomic_write_json(path, initial)
    return initial


def run(cfg: PretrainConfig) -> dict[str, Any]:
    """Pretrain; returns a summary (first/last train and validation losses, paths)."""

    store = Store(cfg.data, chunk_cache=cfg.chunk_cache)
    plan = store.plan
    in_chans = len(plan.channels)
    train_cases, val_cases = split_cases(store, cfg.exclude_splits, cfg.val_cases, cfg.train.seed)
    phases: list[str] | None = None
    if cfg.method == "cross_phase":  # the hold-out is whole exams, not single series
        phases, groups = exam_groups(cfg, store, train_cases + val_cases)
        train_groups, val_groups = split_groups(groups, cfg.val_cases, cfg.train.seed)
        train_cases = [c for g in train_groups.values() for c in g if c is not None]
        val_cases = [c for g in val_groups.values() for c in g if c is not None]
    report = None
    if cfg.method == "report_labels":
        report = report_label_data(cfg, train_cases + val_cases, train_cases)
        train_cases = [c for c in train_cases if c in set(report.cases)]
    train_cfg = cfg.train.model_copy(update={"out_dir": cfg.out})
    seed_everything(cfg.train.seed)  # same config + seed -> same initial weights
    if cfg.method == "cross_sequence":
        check_sequences(cfg, list(plan.channel_names))
    module = build_method(cfg, in_chans, list(plan.channel_names), report, phases)
    if phases is not None:
        dataset, val = cross_phase_data(cfg, train_groups, val_groups)
    else:
        dataset = training_data(cfg, train_cases)
        val = build_validation(cfg.data, val_cases, cfg)
    if report is not None:
        dataset = LabeledCrops(dataset, report.cases, report.values, report.mask)
        val = validation_batches(
            cfg.data, cfg.crop_size, val_cases, cfg.val_crops, cfg.train.seed + 1, dataset
        )
    monitor = None
    if cfg.monitor_label:
        usable = [
            c
            for c in store.case_ids
            if (store.index[c].get("split") or "train") not in cfg.exclude_splits
        ]
        monitor = build_monitor(
            module.encoder,
            store,
            usable,
            cfg.monitor_label,
            cfg.monitor_cases,
            cfg.crop_size,
            cfg.train.seed,
            cfg.monitor_k,
        )
    task = PretrainTask(module, cfg.crop_size)
    evaluate = make_eval_fn(module, val, lambda: next(module.parameters()).device, monitor)
    initial = initial_eval(cfg, evaluate)
    initial_val = initial.get("val_loss")
    trainer = Trainer(
        task,
        dataset,
        train_cfg,
        eval_fn=evaluate,
        plan=plan,
        data_hash=data_hash(store, train_cases),
        run_config=cfg,
    )
    result = trainer.fit()
    records = result.history
    if not any(h.get("split") == "eval" for h in records):  # a finished run, resumed: its log
        records = read_metrics(cfg.out / METRICS_NAME)
    history = [h for h in records if h.get("split", "train") == "train"]
    evals = [h for h in records if h.get("split") == "eval"]
    summary = {
        "out": str(cfg.out),
        "train_cases": len(train_cases),
        "val_cases": len(val_cases),
        "steps": result.step,
        "first_loss": history[0]["loss"] if history else None,
        "last_loss": history[-1]["loss"] if history else None,
        "method": cfg.method,
        "initial_val_loss": initial_val,
        "initial_eval": initial,
        "last_eval": evals[-1] if evals else None,
        "first_val_loss": evals[0].get("val_loss") if evals else None,
        "last_val_loss": evals[-1].get("val_loss") if evals else None,
        "seconds": result.seconds,
    }

    xs = cfg.cross_sequence
    held_out = (
        [c for c in store.case_ids if store.index[c].get("split") == xs.synthesis_split]
        if xs.synthesis_split
        else val_cases
    )
    if cfg.method == "cross_sequence" and xs.synthesis_eval and held_out:
        summary["synthesis"] = synthesis_scores(
            module, store, held_out, cfg.crop_size, fit_cases=train_cases
        )
        if is_main():
            atomic_write_json(cfg.out / SYNTHESIS_FILE, summary["synthesis"])
    if is_main():
        if cfg.scope == "network":
            save_artifact(
                cfg.out / NETWORK_FILE,
                "network",
                module.network,
                plan=plan,
                run_config=cfg,
                extra={"method": cfg.method, "summary": summary},
            )
        save_encoder(module, cfg.out / ENCODER_FILE, plan, cfg, {"summary": summary})
    summary["encoder"] = str(cfg.out / ENCODER_FILE)
    if cfg.scope == "network":
        summary["network"] = str(cfg.out / NETWORK_FILE)
    return summary
