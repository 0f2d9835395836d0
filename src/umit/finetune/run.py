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
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field

from umit.config import UmitConfig
from umit.data.transforms import AugmentConfig
from umit.errors import InputError
from umit.privacy.dp import DPConfig
from umit.train.config import TrainConfig

log = logging.getLogger(__name__)

BEST_FILE = "best.pt"


class FinetuneConfig(UmitConfig):
    """Settings of ``umit finetune``."""

    data: Path
    """Preprocessed store (PREP folder)."""
    out: Path = Path("runs/finetune")
    """Run folder: config.yaml, metrics.jsonl, checkpoints, best.pt."""
    task: Literal["segmentation", "classification"] = "segmentation"
    """What to learn: voxel labels of the store, or a per-case label (``label_key``)."""
    model: str = "unetr"
    """Registered model: unetr / swin_unetr / resunet3d (segmentation), classifier / resnet3d_18 / resnet3d_50."""
    model_args: dict[str, Any] = Field(default_factory=lambda: {"encoder": "vit3d_tiny_p16"})
    """Keyword arguments of the model (e.g. encoder name, feature_size, pool)."""
    pretrained: Path | None = None
    """Encoder checkpoint to start from (None: from scratch)."""
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
    """Classification: the per-case label in the store index (target, sex, contrast, ...)."""
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
    dp: DPConfig = Field(default_factory=DPConfig)
    """Differentially private training (DP-SGD through Opacus); ``dp.enabled`` = ``--dp``."""


# ---------------------------------------------------------------------------------------------
# cases and labels
# ---------------------------------------------------------------------------------------------
def case_label(entry: dict[str, Any], key: str) -> Any:
    value = entry.get(key)
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    return value


def split_finetune_cases(store: Any, cfg: FinetuneConfig) -> dict[str, list[str]]:
    """train (labeled subset), val, unlabeled and test case ids."""
    from umit.finetune.subsets import select_labeled

    index = store.index
    if cfg.task == "segmentation":
        usable = [c for c in store.case_ids if index[c].get("has_label")]
    else:
        usable = [c for c in store.case_ids if case_label(index[c], cfg.label_key) is not None]
    test = [c for c in usable if index[c].get("split") in cfg.exclude_splits]
    pool = [c for c in usable if c not in set(test)]
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


def class_names(store: Any, cases: list[str], key: str) -> list[str]:
    return sorted({str(case_label(store.index[c], key)) for c in cases})


# ---------------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------------
def build_model(cfg: FinetuneConfig, in_chans: int, num_outputs: int) -> torch.nn.Module:
    """The registered model with input/output sizes filled in, pretrained encoder loaded, frozen as asked."""
    from umit.models import create_model

    args = dict(cfg.model_args)
    args.setdefault("in_chans", in_chans)
    args.setdefault("img_size", tuple(cfg.crop_size))
    key = "out_channels" if cfg.task == "segmentation" else "num_classes"
    args.setdefault(key, num_outputs)
    try:
        model = create_model(cfg.model, **args)
    except TypeError as exc:
        raise InputError(
            None, f"model {cfg.model!r} does not take these arguments {sorted(args)}: {exc}"
        ) from exc
    if cfg.pretrained is not None:
        load_pretrained_encoder(model, cfg.pretrained)
    if cfg.freeze != "none":
        from umit.models.heads import freeze_encoder

        freeze_encoder(
            model, trainable_blocks=cfg.trainable_blocks if cfg.freeze == "partial" else 0
        )
    return model


def load_pretrained_encoder(model: torch.nn.Module, path: Path) -> None:
    """Load ``encoder.pt`` weights into ``model.encoder`` (strict: every key must match)."""
    from umit.ssl.pretrain import load_encoder

    if not hasattr(model, "encoder"):
        raise InputError(
            path, f"model {type(model).__name__} has no encoder to load pretrained weights into"
        )
    encoder, _ = load_encoder(path)
    missing, unexpected = model.encoder.load_state_dict(encoder.state_dict(), strict=False)
    # position tables of another grid size are resampled by the encoder itself at run time
    if unexpected or [k for k in missing if "pos_embed" not in k]:
        raise InputError(
            path, f"encoder weights do not fit: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )


def layer_id_fn_for(model: torch.nn.Module):
    fn = getattr(model, "layer_id_fn", None)
    if callable(fn):
        return fn()
    try:
        from umit.models.heads import layer_id_fn

        return layer_id_fn(model)
    except (ImportError, AttributeError, ValueError):
        return None


# ---------------------------------------------------------------------------------------------
# tasks
# ---------------------------------------------------------------------------------------------
class SegmentationTask:
    """DiceCE on crops; deep supervision (a list of outputs) weighted like nnU-Net."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self._call: torch.nn.Module = model

    def trainable_module(self) -> torch.nn.Module:
        return self.model

    def set_trainable_module(self, module: torch.nn.Module) -> None:
        self._call = module

    def __call__(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        from umit.finetune.losses import dice_ce_loss

        out = self._call(batch["image"])
        label = batch["label"]
        if isinstance(out, list | tuple):  # deep supervision: full resolution first
            weights = [0.5**i for i in range(len(out))]
            total = sum(weights)
            loss = 0.0
            for w, o in zip(weights, out, strict=True):
                lab = (
                    label
                    if o.shape[2:] == label.shape[2:]
                    else F.interpolate(label.float(), size=o.shape[2:], mode="nearest").long()
                )
                loss = loss + (w / total) * dice_ce_loss(o, lab)
        else:
            loss = dice_ce_loss(out, label)
        return {"loss": loss}


class ClassificationTask:
    """Cross-entropy on a per-case label mapped to class indices."""

    def __init__(self, model: torch.nn.Module, targets: dict[str, int]):
        self.model = model
        self._call: torch.nn.Module = model
        self.targets = targets

    def trainable_module(self) -> torch.nn.Module:
        return self.model

    def set_trainable_module(self, module: torch.nn.Module) -> None:
        self._call = module

    def __call__(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        y = torch.tensor([self.targets[c] for c in batch["case_id"]], device=batch["image"].device)
        logits = self._call(batch["image"])
        loss = F.cross_entropy(logits.float(), y)
        acc = (logits.argmax(1) == y).float().mean().detach()
        return {"loss": loss, "acc": acc}


# ---------------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------------
def centred_input(store: Any, case_id: str, size: tuple[int, int, int]) -> torch.Tensor:
    from umit.eval.probes import centre_crop_or_pad

    case = store.case(case_id)
    return torch.from_numpy(
        centre_crop_or_pad(np.asarray(case.read(), np.float32), size, case.pad_values)
    )


def predict_case_segmentation(
    model: torch.nn.Module, store: Any, case_id: str, cfg: FinetuneConfig
) -> np.ndarray:
    """Label map (X, Y, Z) of a store case by sliding-window inference."""
    from umit.inference.predict import segment_volume

    case = store.case(case_id)
    return segment_volume(
        model,
        np.asarray(case.read(), np.float32),
        cfg.crop_size,
        overlap=cfg.sw_overlap,
        sw_batch_size=cfg.sw_batch_size,
        padding_value=float(case.pad_values[0]) if case.pad_values else 0.0,
        device=next(model.parameters()).device,
    )


@torch.no_grad()
def predict_case_classification(
    model: torch.nn.Module, store: Any, case_id: str, size
) -> np.ndarray:
    x = centred_input(store, case_id, size)[None].to(next(model.parameters()).device)
    return model(x).float().softmax(1)[0].cpu().numpy()


def mean_foreground_dice(pred: np.ndarray, ref: np.ndarray, classes: list[int]) -> float:
    from umit.eval.metrics import segmentation_metrics

    scores = segmentation_metrics(pred, ref.astype(np.uint8), 1.0, classes, metrics=("dice",))
    vals = [m["dice"] for m in scores.values() if m["dice"] == m["dice"]]  # NaN: absent in both
    return float(np.mean(vals)) if vals else float("nan")


def make_eval_fn(
    model: torch.nn.Module,
    store: Any,
    cases: list[str],
    cfg: FinetuneConfig,
    targets: dict[str, int],
    saver,
):
    """Validation metric every eval_every steps; keeps the best model through ``saver``."""
    state = {"best": -np.inf}

    def evaluate(step: int) -> dict[str, float]:
        if not cases:
            return {}
        was = model.training
        model.eval()
        if cfg.task == "segmentation":
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
                    predict_case_segmentation(model, store, c, cfg),
                    np.asarray(store.case(c).read_label()),
                    classes,
                )
                for c in cases
            ]
            metric = {"val_dice": float(np.nanmean(scores))}
            value = metric["val_dice"]
        else:
            from umit.eval.metrics import classification_metrics

            probs = np.stack(
                [predict_case_classification(model, store, c, cfg.crop_size) for c in cases]
            )
            y = np.array([targets[c] for c in cases])
            m = classification_metrics(y, probs)
            metric = {"val_auc": float(m["auc"]), "val_acc": float(m["accuracy"])}
            value = metric["val_auc"] if m["auc"] == m["auc"] else metric["val_acc"]
        model.train(was)
        if value > state["best"]:
            state["best"] = value
            saver(step, metric)
        return metric

    return evaluate


def save_model(
    model: torch.nn.Module, path: Path, *, plan: Any, cfg: FinetuneConfig, extra: dict[str, Any]
) -> Path:
    """Plain-data model file (``weights_only``-loadable), written atomically."""
    from umit.train.checkpoint import model_identity, to_plain, versions
    from umit.train.distributed import unwrap
    from umit.utils.fileio import atomic_path

    module = unwrap(model)
    name, args = model_identity(module)
    payload = {
        "kind": "model",
        "task": cfg.task,
        "model_name": name,
        "model_args": to_plain(args or {}, "model_args"),
        "state_dict": {k: v.detach().cpu() for k, v in module.state_dict().items()},
        "plan": to_plain(plan, "plan"),
        "run_config": to_plain(cfg, "run_config"),
        "versions": versions(),
        **to_plain(extra, "extra"),
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


def load_model(path: str | Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild a fine-tuned model from ``best.pt`` (or a training checkpoint of ``umit finetune``)."""
    from umit.models import create_model

    path = Path(path)
    if not path.is_file():
        raise InputError(path, "model file not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise InputError(path, f"not a readable UMIT checkpoint ({exc})") from exc
    sd = ckpt.get("state_dict") if ckpt.get("kind") == "model" else ckpt.get("model")
    if sd is None or not ckpt.get("model_name"):
        raise InputError(path, "holds no fine-tuned model (expected best.pt from umit finetune)")
    model = create_model(ckpt["model_name"], **dict(ckpt["model_args"]))
    model.load_state_dict(sd, strict=True)
    model.eval()
    if "task" not in ckpt:
        ckpt["task"] = (ckpt.get("run_config") or {}).get("task", "segmentation")
    return model, ckpt


# ---------------------------------------------------------------------------------------------
# the command
# ---------------------------------------------------------------------------------------------
def run(cfg: FinetuneConfig) -> dict[str, Any]:
    """Fine-tune; returns a summary with the best validation metric and the model path."""
    from umit.data.dataset import StoreCropDataset
    from umit.data.transforms import AugmentedDataset
    from umit.preprocess.store import Store
    from umit.train.distributed import is_main
    from umit.train.loop import Trainer

    store = Store(cfg.data)
    plan = store.plan
    in_chans = len(plan.channels)
    cases = split_finetune_cases(store, cfg)
    targets: dict[str, int] = {}
    names: list[str] = []
    if cfg.task == "segmentation":
        classes = sorted(
            {
                int(k)
                for c in cases["train"] + cases["val"]
                for k in store.index[c].get("label_classes", [])
            }
        )
        num_outputs = max(classes + [max((plan.labels or {"_": 0}).values(), default=0)]) + 1
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
    model = build_model(cfg, in_chans, num_outputs)
    crops = StoreCropDataset(
        cfg.data,
        cfg.crop_size,
        cases=train_cases,
        samples_per_case=cfg.samples_per_case,
        foreground_prob=cfg.foreground_prob if cfg.task == "segmentation" else 0.0,
        seed=cfg.train.seed,
        with_label=cfg.task == "segmentation",
    )
    if cfg.task == "classification":
        crops = CentredCases(store, train_cases, cfg.crop_size, cfg.samples_per_case)
    dataset = AugmentedDataset(crops, cfg.augment, seed=cfg.train.seed)
    task = (
        SegmentationTask(model)
        if cfg.task == "segmentation"
        else ClassificationTask(model, targets)
    )
    cfg.out.mkdir(parents=True, exist_ok=True)
    extra = {
        "cases": cases,
        "class_names": names,
        "label_names": plan.labels,
        "label_key": cfg.label_key,
        "num_outputs": num_outputs,
    }
    best: dict[str, Any] = {}
    layer_ids = layer_id_fn_for(model) if cfg.train.layer_decay < 1 else None
    dp = None
    if cfg.dp.enabled:  # DP-SGD: Poisson batches, per-sample clipping + noise, an accountant
        from umit.privacy.dp import DPSGD

        dp = DPSGD(
            cfg.dp, task, dataset, cfg.train, num_units=len(set(train_cases)), layer_id_fn=layer_ids
        )
        extra["dp"] = dp.report()

    def saver(step: int, metric: dict[str, float]) -> None:
        best.update(step=step, **metric)
        if dp is not None:
            extra["dp"] = dp.report()
        if is_main():
            save_model(
                model, cfg.out / BEST_FILE, plan=plan, cfg=cfg, extra={**extra, "best": dict(best)}
            )

    evaluate = make_eval_fn(model, store, cases["val"], cfg, targets, saver)
    trainer = Trainer(
        dp.task if dp else task,
        dp.loader if dp else dataset,
        cfg.train.model_copy(update={"out_dir": cfg.out}),
        eval_fn=evaluate if cases["val"] else None,
        plan=plan,
        layer_id_fn=layer_ids,
        optimizer_factory=dp.optimizer_factory if dp else None,
        run_config=cfg,
    )
    result = trainer.fit()
    if dp is not None:
        extra["dp"] = dp.report()
        if best and is_main():  # chosen by validating every step's model: the whole run's epsilon
            from umit.privacy.dp import stamp_report

            stamp_report(cfg.out / BEST_FILE, extra["dp"])
    if not best and is_main():  # no validation cases: keep the last model
        save_model(
            model,
            cfg.out / BEST_FILE,
            plan=plan,
            cfg=cfg,
            extra={**extra, "best": {"step": result.step}},
        )
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
        "best": best,
        "dp": extra.get("dp"),
        "seconds": result.seconds,
    }


def balanced_cases(cases: list[str], targets: dict[str, int]) -> list[str]:
    """Repeat minority-class cases so every class appears equally often (deterministic)."""
    by_class: dict[int, list[str]] = {}
    for c in cases:
        by_class.setdefault(targets[c], []).append(c)
    most = max(len(v) for v in by_class.values())
    out: list[str] = []
    for k in sorted(by_class):
        group = by_class[k]
        out.extend(group[i % len(group)] for i in range(most))
    return out


class CentredCases(torch.utils.data.Dataset):
    """Whole cases, centre-cropped/padded to ``size`` (classification inputs)."""

    def __init__(self, store: Any, cases: list[str], size: tuple[int, int, int], repeats: int = 1):
        self.store = store
        self.cases = list(cases)
        self.size = tuple(size)
        self.repeats = repeats

    def __len__(self) -> int:
        return len(self.cases) * self.repeats

    def __getitem__(self, i: int) -> dict[str, Any]:
        c = self.cases[i // self.repeats]
        return {"image": centred_input(self.store, c, self.size), "case_id": c}
