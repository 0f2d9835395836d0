"""``umit pretrain``: masked volume modeling (MAE-3D) on a preprocessed store.

Random 3D crops (optionally foreground-biased) with light augmentation feed MAE-3D around any
registered ViT encoder; the training loop (:mod:`umit.train`) does schedules, precision,
accumulation, distribution, checkpoints and resume. A fixed validation set of crops and masks
gives a reconstruction loss that is comparable across steps. At the end the encoder alone is
written as ``encoder.pt`` (plain data: weights, model name and args, the preprocessing plan), the
file that ``umit probe`` and fine-tuning load.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch
from pydantic import Field

from umit.config import UmitConfig
from umit.data.dataset import StoreCropDataset
from umit.data.store import Store
from umit.data.transforms import AugmentConfig, AugmentedDataset
from umit.errors import InputError
from umit.models import create_model
from umit.ssl.mae import MAE3D, mae_flops_per_sample
from umit.train.checkpoint import save_artifact
from umit.train.config import TrainConfig
from umit.train.distributed import is_main
from umit.train.loop import Trainer, seed_everything

log = logging.getLogger(__name__)

ENCODER_FILE = "encoder.pt"


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


class PretrainConfig(UmitConfig):
    """Settings of ``umit pretrain``."""

    data: Path
    """Preprocessed store (the PREP folder written by ``umit preprocess``)."""
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
    mae: MAEConfig = Field(default_factory=MAEConfig)
    """MAE-3D wrapper settings."""
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    """Augmentation of the training crops."""
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
    import numpy as np

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


class MAETask:
    """Training-loop task around :class:`~umit.ssl.mae.MAE3D` (reports FLOPs and tokens)."""

    def __init__(self, mae: torch.nn.Module, crop_size: tuple[int, int, int]):

        self.mae = mae
        self._call: torch.nn.Module = mae
        self._flops = mae_flops_per_sample(mae, crop_size)
        grid = mae.encoder.grid_size(crop_size)
        self._tokens = float(grid[0] * grid[1] * grid[2])

    def trainable_module(self) -> torch.nn.Module:
        return self.mae

    def set_trainable_module(self, module: torch.nn.Module) -> None:
        self._call = module

    def __call__(self, batch: Any) -> dict[str, torch.Tensor]:
        out = self._call(batch)
        return {"loss": out["loss"]}

    def flops_per_sample(self, batch: Any) -> float:
        return self._flops

    def tokens_per_sample(self, batch: Any) -> float:
        return self._tokens


def build_validation(store_dir: Path, cases: list[str], cfg: PretrainConfig) -> list[torch.Tensor]:
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
    )
    return [ds[i]["image"].unsqueeze(0) for i in range(min(cfg.val_crops, len(ds)))]


def make_eval_fn(mae: torch.nn.Module, val: list[torch.Tensor], device_of: Any):
    """Validation reconstruction loss with the same masks at every evaluation."""

    def evaluate(step: int) -> dict[str, float]:
        if not val:
            return {}
        was_training = mae.training
        mae.eval()
        losses = []
        with torch.no_grad():
            for i, x in enumerate(val):
                g = torch.Generator(device="cpu").manual_seed(10_000 + i)
                x = x.to(device_of())
                m = mae.draw_mask(1, tuple(mae.encoder.grid_size(x.shape[2:])), "cpu", g)
                m = type(m)(
                    keep=m.keep.to(x.device),
                    mask=m.mask.to(x.device),
                    restore=m.restore.to(x.device),
                )
                grid = tuple(mae.encoder.grid_size(x.shape[2:]))
                pred = mae.forward_decoder(
                    mae.encoder.forward_features(x, keep_indices=m.keep), m, grid
                )
                losses.append(float(mae.loss(x, pred, m.mask)))
        mae.train(was_training)
        return {"val_loss": sum(losses) / len(losses)}

    return evaluate


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


def save_encoder(
    mae: torch.nn.Module, path: Path, plan: Any, cfg: PretrainConfig, extra: dict | None = None
) -> Path:
    """Write the encoder alone as an ``encoder`` artifact (plain data, atomic)."""
    return save_artifact(path, "encoder", mae.encoder, plan=plan, run_config=cfg, extra=extra)


def run(cfg: PretrainConfig) -> dict[str, Any]:
    """Pretrain; returns a summary (first/last train and validation losses, paths)."""

    store = Store(cfg.data)
    plan = store.plan
    in_chans = len(plan.channels)
    train_cases, val_cases = split_cases(store, cfg.exclude_splits, cfg.val_cases, cfg.train.seed)
    train_cfg = cfg.train.model_copy(update={"out_dir": cfg.out})
    seed_everything(cfg.train.seed)  # before anything random is built: the same seed, the same run
    mae = build_mae(cfg, in_chans)
    crops = StoreCropDataset(
        cfg.data,
        cfg.crop_size,
        cases=train_cases,
        samples_per_case=cfg.samples_per_case,
        foreground_prob=cfg.foreground_prob,
        seed=cfg.train.seed,
        with_label=False,
    )
    dataset = AugmentedDataset(crops, cfg.augment, seed=cfg.train.seed)
    val = build_validation(cfg.data, val_cases, cfg)
    task = MAETask(mae, cfg.crop_size)
    evaluate = make_eval_fn(mae, val, lambda: next(mae.parameters()).device)
    initial_val = evaluate(0).get("val_loss") if cfg.train.resume in (None, "auto") else None
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
    history = [h for h in result.history if h.get("split", "train") == "train"]
    evals = [h for h in result.history if h.get("split") == "eval"]
    summary = {
        "out": str(cfg.out),
        "train_cases": len(train_cases),
        "val_cases": len(val_cases),
        "steps": result.step,
        "first_loss": history[0]["loss"] if history else None,
        "last_loss": history[-1]["loss"] if history else None,
        "initial_val_loss": initial_val,
        "first_val_loss": evals[0].get("val_loss") if evals else None,
        "last_val_loss": evals[-1].get("val_loss") if evals else None,
        "seconds": result.seconds,
    }

    if is_main():
        save_encoder(mae, cfg.out / ENCODER_FILE, plan, cfg, {"summary": summary})
    summary["encoder"] = str(cfg.out / ENCODER_FILE)
    return summary
