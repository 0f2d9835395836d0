"""``umit distill``: a large teacher -> a small student (any registered model).

Two signals, combinable with the ground-truth loss:

- **Logit distillation** on the labeled crops: ``T² · KL(softmax(t/T) ‖ softmax(s/T))`` over the
  class axis, averaged over samples (classification) or over samples and voxels (segmentation).
  The teacher must be a fine-tuned model (``best.pt``) of the same task and output count.
- **Feature distillation** on unlabeled crops (the training cases the label budget leaves
  unlabeled; the labeled crops when there are none): the teacher's and the student's encoder
  maps at matched levels of ``forward_intermediates`` (the feature API; no module internals). A
  learned 1x1x1 projection per level maps the student's channels to the teacher's, the result
  is resampled (trilinear) onto the teacher's grid, and the loss is ``1 - cos`` over channels or
  the MSE. The teacher may be a pretrained encoder (``encoder.pt``) or a ``best.pt``.

The total loss is ``alpha · GT + (1 - alpha) · KD + kd_unlabeled_weight · KD_u + feature_weight ·
FEAT`` (KD_u: the KL on unlabeled crops, with ``kd_unlabeled``). The student is saved
as ``best.pt`` in the fine-tuning format (the projections are not part of it), so ``umit
evaluate`` / ``umit predict`` load it like any fine-tuned model.

Teacher outputs are cached (``teacher_cache``) because here they cannot change: the teacher is
frozen and sees exactly the student's input, and every input is a deterministic function of
(crop seed, draw, index) - the crop from ``default_rng([seed, draw, index])``, the augmentation
parameters from ``default_rng([seed, 7919, draw, index])`` (replayed, never re-drawn), so draw
``d`` of a run is the same tensors every time it is read. A cached draw is valid for another
run exactly when the teacher file (SHA-256), the store (plan + index), the labeled and unlabeled
case lists, crop size, crops per case, foreground probability, crop seed, ``crop_epochs``, the
augmentation settings and the requested outputs are all equal: they are the cache key, so a
change of any of them reads another folder, never a stale one. See :class:`TeacherCache`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from umit.data.cases import case_label
from umit.data.dataset import StoreCropDataset
from umit.data.store import Store
from umit.errors import InputError
from umit.finetune.run import (
    BEST_FILE,
    BestModelWriter,
    FinetuneConfig,
    build_model,
    class_names,
    inference_spec,
    make_eval_fn,
    scheduled_train_config,
    seg_num_outputs,
    selection_rule,
    split_finetune_cases,
    training_data,
)
from umit.train.checkpoint import load_artifact, load_encoder, load_model
from umit.train.distributed import init_from_env
from umit.train.loop import Trainer, resolve_device, seed_everything
from umit.train.tasks import segmentation_loss
from umit.utils.distributed import world_size
from umit.utils.fileio import atomic_path

log = logging.getLogger(__name__)

CACHE_VERSION = 1


class DistillConfig(FinetuneConfig):
    """Settings of ``umit distill``: those of ``umit finetune`` (for the student) plus these."""

    teacher: Path
    """Teacher: a fine-tuned ``best.pt`` (logits and encoder features) or a pretrained
    ``encoder.pt`` (features only: needs ``alpha=1`` and ``feature_weight > 0``)."""
    alpha: float = Field(default=0.5, ge=0, le=1)
    """Weight of the ground-truth loss; the logit-distillation loss has weight ``1 - alpha``."""
    temperature: float = Field(default=2.0, gt=0)
    """Softmax temperature T of the logit distillation (the KL is multiplied by T²)."""
    feature_weight: float = Field(default=0.0, ge=0)
    """Weight of the feature-distillation loss (0: off)."""
    feature_loss: Literal["cosine", "mse"] = "cosine"
    """``cosine``: mean over positions of ``1 - cos`` across channels; ``mse``: mean squared error."""
    feature_levels: list[tuple[int, int]] = Field(default_factory=lambda: [(-1, -1)])
    """Matched levels ``(teacher_index, student_index)`` of ``forward_intermediates`` (negative
    indices count from the deepest)."""
    kd_unlabeled: bool = False
    """Also distill the teacher's logits on the unlabeled crops (pseudo-labels of soft targets)."""
    kd_unlabeled_weight: float = Field(default=1.0, ge=0)
    """Weight of that unlabeled-crop KL. Like cross-entropy, a voxel-wise KL is dominated by
    background and large organs; a small weight (as ``ce_weight``) leaves room for the Dice term."""
    unlabeled_cases: int | None = Field(default=None, ge=1)
    """At most this many unlabeled cases (seeded choice); None: all of them."""
    crop_epochs: int | None = Field(default=None, ge=1)
    """Distinct crop draws: epoch ``e`` reads the crops of draw ``e mod crop_epochs`` (None: new
    crops every epoch). Fewer draws, fewer teacher passes to cache."""
    teacher_cache: bool = True
    """Cache the teacher's outputs when they are fixed (no augmentation); see the module doc."""
    cache_dir: Path | None = None
    """Where the cache lives (None: ``out/teacher_cache``); shareable between runs."""
    model: str = "resunet3d"
    model_args: dict[str, Any] = Field(default_factory=lambda: {"features": [8, 16, 32, 64]})
    """Keyword arguments of the student (e.g. small widths)."""


# ---------------------------------------------------------------------------------------------
# losses
# ---------------------------------------------------------------------------------------------
def kd_kl_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T² · KL(softmax(teacher/T) ‖ softmax(student/T))``.

    Args:
        student, teacher: logits (B, K) or (B, K, D, H, W); the class axis is 1.
        temperature: T > 0.

    Returns:
        scalar: the KL summed over classes and averaged over samples (and voxels), times T²
        (Hinton et al. 2015: keeps the gradient scale independent of T).
    """
    if student.shape != teacher.shape:
        raise ValueError(
            f"student logits {tuple(student.shape)} and teacher logits {tuple(teacher.shape)} differ"
        )
    t = float(temperature)
    log_s = F.log_softmax(student.float() / t, dim=1)
    log_t = F.log_softmax(teacher.float() / t, dim=1)
    kl = (log_t.exp() * (log_t - log_s)).sum(dim=1)  # (B, ...) per sample / voxel
    return kl.mean() * (t * t)


def feature_loss(
    student: torch.Tensor, teacher: torch.Tensor, kind: str = "cosine"
) -> torch.Tensor:
    """Distance between projected student maps and teacher maps, both (B, C, d, h, w).

    The student map is resampled (trilinear) onto the teacher's grid when they differ.
    """
    if student.shape[:2] != teacher.shape[:2]:
        raise ValueError(
            f"projected student features {tuple(student.shape)} do not match the teacher's "
            f"{tuple(teacher.shape)} in batch or channels"
        )
    s = student.float()
    if s.shape[2:] != teacher.shape[2:]:
        s = F.interpolate(s, size=teacher.shape[2:], mode="trilinear", align_corners=False)
    t = teacher.float()
    if kind == "cosine":
        return (1.0 - F.cosine_similarity(s, t, dim=1, eps=1e-6)).mean()
    if kind == "mse":
        return F.mse_loss(s, t)
    raise ValueError(f"feature_loss must be 'cosine' or 'mse', got {kind!r}")


# ---------------------------------------------------------------------------------------------
# teacher
# ---------------------------------------------------------------------------------------------
class Teacher(nn.Module):
    """A frozen teacher in eval mode: ``outputs(x, logits, levels)`` without gradients."""

    def __init__(self, net: nn.Module | None, encoder: nn.Module, kind: str, art: dict[str, Any]):
        super().__init__()
        self.net = net
        self.encoder = encoder
        self.kind = kind
        self.art = art
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> Teacher:
        return super().train(False)  # never leaves eval mode (norm statistics, dropout)

    @torch.no_grad()
    def outputs(
        self, x: torch.Tensor, logits: bool, levels: Sequence[int]
    ) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        if logits:
            assert self.net is not None
            y = self.net(x)
            out["logits"] = (y[0] if isinstance(y, list | tuple) else y).float()
        if levels:
            feats = self.encoder.forward_intermediates(x, indices=list(levels), output_fmt="NCDHW")
            for i, f in enumerate(feats):
                out[f"feat{i}"] = f.float()
        return out


def load_teacher(path: Path, cfg: DistillConfig, in_chans: int, num_outputs: int) -> Teacher:
    """The teacher of ``path``, checked against the student's task, inputs and outputs.

    Raises:
        InputError: naming the teacher file when it is not a ``best.pt`` / ``encoder.pt``, was
            trained for another task, input channels or output count, or (an encoder) when
            logit distillation is asked of it.
    """
    art = load_artifact(path, expect=("model", "encoder"))
    want_logits = cfg.alpha < 1 or cfg.kd_unlabeled
    if art["kind"] == "encoder":
        if want_logits:
            raise InputError(
                path,
                "holds a pretrained encoder, which has no logits to distill: set alpha=1 and "
                "kd_unlabeled=false (feature distillation only), or pass a fine-tuned best.pt",
            )
        if cfg.feature_weight <= 0:
            raise InputError(path, "an encoder teacher needs feature_weight > 0")
        encoder, art = load_encoder(path)
        net = None
        teacher_in = int(dict(art.get("model_args") or {}).get("in_chans", in_chans))
    else:
        net, art = load_model(path)
        if art["spec"]["task"] != cfg.task:
            raise InputError(
                path, f"teacher was trained for {art['spec']['task']}, the student for {cfg.task}"
            )
        encoder = getattr(net, "encoder", None)
        if cfg.feature_weight > 0 and not callable(getattr(encoder, "forward_intermediates", None)):
            raise InputError(path, f"teacher {art['model_name']!r} has no encoder feature API")
        args = dict(art.get("model_args") or {})
        teacher_out = args.get("out_channels", args.get("num_classes", art["spec"]["num_outputs"]))
        if teacher_out is not None and int(teacher_out) != num_outputs:
            raise InputError(
                path,
                f"teacher predicts {int(teacher_out)} outputs (out_channels/num_classes), the "
                f"student {num_outputs} for this store; distill on the store the teacher was "
                "trained for",
            )
        teacher_in = int(args.get("in_chans", in_chans))
    if teacher_in != in_chans:
        raise InputError(
            path, f"teacher takes {teacher_in} input channels, the store has {in_chans}"
        )
    return Teacher(net, encoder, art["kind"], art)


# ---------------------------------------------------------------------------------------------
# the student with its projections
# ---------------------------------------------------------------------------------------------
class DistillModule(nn.Module):
    """The student plus one learned 1x1x1 projection per matched feature level.

    ``forward(image, feat_image)`` -> ``{"logits": student(image), "feats": [projected maps of
    feat_image]}``; only ``student`` goes into ``best.pt``.
    """

    def __init__(
        self, student: nn.Module, levels: Sequence[int], channels: Sequence[tuple[int, int]]
    ):
        super().__init__()
        self.student = student
        self.levels = list(levels)
        self.proj = nn.ModuleList(nn.Conv3d(cs, ct, 1) for cs, ct in channels)

    def student_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        enc = self.student.encoder
        return enc.forward_intermediates(x, indices=self.levels, output_fmt="NCDHW")

    def forward(
        self, image: torch.Tensor | None, feat_image: torch.Tensor | None = None
    ) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if image is not None:
            out["logits"] = self.student(image)
        if feat_image is not None and self.levels:
            feats = self.student_features(feat_image)
            out["feats"] = [p(f) for p, f in zip(self.proj, feats, strict=True)]
        return out


def matched_channels(
    teacher: Teacher, student: nn.Module, cfg: DistillConfig, crop: Sequence[int], in_chans: int
) -> list[tuple[int, int]]:
    """(student channels, teacher channels) per matched level, from one probe pass each."""
    enc = getattr(student, "encoder", None)
    if not callable(getattr(enc, "forward_intermediates", None)):
        raise InputError(
            None, f"student {cfg.model!r} has no encoder with forward_intermediates (feature API)"
        )
    x = torch.zeros(1, in_chans, *crop)
    t_levels = [t for t, _ in cfg.feature_levels]
    s_levels = [s for _, s in cfg.feature_levels]
    try:
        with torch.no_grad():
            tf = teacher.encoder.forward_intermediates(x, indices=t_levels, output_fmt="NCDHW")
            was = student.training
            student.eval()
            sf = enc.forward_intermediates(x, indices=s_levels, output_fmt="NCDHW")
            student.train(was)
    except (IndexError, ValueError) as exc:
        raise InputError(None, f"feature_levels {cfg.feature_levels} do not exist: {exc}") from exc
    return [(int(s.shape[1]), int(t.shape[1])) for s, t in zip(sf, tf, strict=True)]


# ---------------------------------------------------------------------------------------------
# data and the teacher cache
# ---------------------------------------------------------------------------------------------
def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def store_fingerprint(prep: Path) -> str:
    """Hash of the store's plan and index (case list, shapes, splits, label statistics)."""
    h = hashlib.sha256()
    for name in ("plan.json", "index.json"):
        p = Path(prep) / name
        h.update(p.read_bytes() if p.is_file() else b"-")
    return h.hexdigest()


class DistillData(torch.utils.data.Dataset):
    """Labeled crops (``image``, ``label`` / ``case_id``) with, optionally, an unlabeled crop
    (``u_image``) and cached teacher outputs (``t.image.logits``, ``t.u_image.feat0``, ...).

    Item ``i`` of epoch ``e`` is labeled crop ``i`` and unlabeled crop ``(d·N + i) mod U`` of
    draw ``d = e mod crop_epochs`` (``N`` labeled, ``U`` unlabeled crops per draw): both fixed
    by (seed, d, i), so the teacher's outputs for them can be computed once.
    """

    def __init__(
        self,
        labeled: torch.utils.data.Dataset,
        unlabeled: StoreCropDataset | None,
        crop_epochs: int | None,
    ):
        self.labeled = labeled
        self.unlabeled = unlabeled
        self.crop_epochs = crop_epochs
        self.draw = 0
        self.cache: TeacherCache | None = None

    def __len__(self) -> int:
        return len(self.labeled)  # type: ignore[arg-type]

    def draw_of(self, epoch: int) -> int:
        return epoch if self.crop_epochs is None else epoch % self.crop_epochs

    def set_epoch(self, epoch: int) -> None:
        self.set_draw(self.draw_of(epoch))

    def set_draw(self, draw: int) -> None:
        self.draw = int(draw)
        if hasattr(self.labeled, "set_epoch"):
            self.labeled.set_epoch(self.draw)
        if self.unlabeled is not None:
            self.unlabeled.set_epoch(self.draw)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = dict(self.labeled[i])
        if self.unlabeled is not None:
            j = (self.draw * len(self) + i) % len(self.unlabeled)
            item["u_image"] = self.unlabeled[j]["image"]
        if self.cache is not None:
            item.update(self.cache.item(self.draw, i))
        return item


class TeacherCache:
    """The teacher's outputs for every crop of the draws a run reads, in ``dir/<key>/``.

    Valid only for runs whose teacher inputs are the same tensors: the same teacher file
    (SHA-256), store (plan + index hash), crops (cases, crop size, crops per case, foreground
    probability, crop seed, draws), augmentation settings (replayed per crop) and requested
    outputs (logits on which inputs, feature levels). ``key`` hashes all of them, so changing
    any gives a new folder and the old one is never read. Outputs are stored in float16 (the
    KL and the feature losses are computed in float32 from them).
    """

    def __init__(self, root: Path, key_fields: Mapping[str, Any]):
        blob = json.dumps(dict(key_fields), sort_keys=True, default=str).encode()
        self.key = hashlib.sha256(blob).hexdigest()[:16]
        self.dir = Path(root) / self.key
        self.fields = dict(key_fields)
        self._loaded: dict[int, dict[str, torch.Tensor]] = {}
        self.hits = 0
        self.computed = 0

    def __getstate__(self) -> dict[str, Any]:  # DataLoader workers map the files themselves
        return {**self.__dict__, "_loaded": {}}

    def path(self, draw: int) -> Path:
        return self.dir / f"draw_{draw:04d}.pt"

    def ensure(
        self,
        data: DistillData,
        draws: Sequence[int],
        teacher: Teacher,
        needs: Mapping[str, tuple[bool, list[int]]],
        batch_size: int,
        device: torch.device,
    ) -> None:
        """Compute and write every missing draw (the existing ones are reused)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        meta = self.dir / "key.json"
        if not meta.is_file():
            with atomic_path(meta) as tmp:
                tmp.write_text(json.dumps(self.fields, sort_keys=True, indent=1, default=str))
        saved_cache, data.cache = data.cache, None
        teacher.to(device)
        try:
            for d in draws:
                if self.path(d).is_file():
                    self.hits += 1
                    continue
                data.set_draw(d)
                parts: dict[str, list[torch.Tensor]] = {}
                for lo in range(0, len(data), batch_size):
                    items = [data[i] for i in range(lo, min(lo + batch_size, len(data)))]
                    for src, (logits, levels) in needs.items():
                        x = torch.stack([it[src] for it in items]).to(device)
                        for name, v in teacher.outputs(x, logits, levels).items():
                            parts.setdefault(f"t.{src}.{name}", []).append(v.half().cpu())
                with atomic_path(self.path(d)) as tmp:
                    torch.save({k: torch.cat(v) for k, v in parts.items()}, tmp)
                self.computed += 1
        finally:
            data.cache = saved_cache
        data.cache = self

    def item(self, draw: int, i: int) -> dict[str, torch.Tensor]:
        if draw not in self._loaded:
            path = self.path(draw)
            if not path.is_file():
                raise InputError(path, "teacher cache file missing (was the cache folder removed?)")
            self._loaded = {draw: torch.load(path, weights_only=True, mmap=True)}
        return {k: v[i] for k, v in self._loaded[draw].items()}


# ---------------------------------------------------------------------------------------------
# the task
# ---------------------------------------------------------------------------------------------
class DistillTask:
    """Loss ``alpha·GT + (1-alpha)·KD + feature_weight·FEAT`` of the student against the teacher.

    Teacher outputs come from the batch (``t.<input>.<output>`` from the cache) or are computed
    here, without gradients, on the very inputs the student sees.
    """

    def __init__(
        self,
        module: DistillModule,
        teacher: Teacher,
        cfg: DistillConfig,
        targets: Mapping[str, int],
        needs: Mapping[str, tuple[bool, list[int]]],
    ):
        self.module = module
        self._call: nn.Module = module
        self.teacher = teacher
        self.cfg = cfg
        self.targets = dict(targets)
        self.needs = dict(needs)
        self.feat_src = next((k for k, (_, lv) in self.needs.items() if lv), None)

    def trainable_module(self) -> nn.Module:
        return self.module

    def set_trainable_module(self, module: nn.Module) -> None:
        self._call = module

    def to(self, device: torch.device) -> DistillTask:
        self.module.to(device)
        self.teacher.to(device)
        return self

    def _teacher(self, batch: Mapping[str, Any], src: str) -> dict[str, torch.Tensor]:
        logits, levels = self.needs[src]
        cached = {k.split(".", 2)[2]: v for k, v in batch.items() if k.startswith(f"t.{src}.")}
        if cached:
            return cached
        return self.teacher.outputs(batch[src], logits, levels)

    def _gt_loss(self, out: Any, batch: Mapping[str, Any]) -> torch.Tensor:
        if self.cfg.task == "segmentation":
            return segmentation_loss(out, batch["label"], self.cfg.ce_weight)
        y = torch.tensor([self.targets[c] for c in batch["case_id"]], device=out.device)
        return F.cross_entropy(out.float(), y)

    def __call__(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        feat_image = batch[self.feat_src] if self.feat_src is not None else None
        u_logits = cfg.kd_unlabeled and "u_image" in batch
        if u_logits:  # one call (DDP: one forward per backward) over labeled + unlabeled crops
            n = batch["image"].shape[0]
            res = self._call(torch.cat([batch["image"], batch["u_image"]]), feat_image)
            full = res["logits"]
            lab_out = [o[:n] for o in full] if isinstance(full, list | tuple) else full[:n]
            u_out = full[0][n:] if isinstance(full, list | tuple) else full[n:]
        else:
            res = self._call(batch["image"], feat_image)
            lab_out, u_out = res["logits"], None
        parts: dict[str, torch.Tensor] = {}
        loss = torch.zeros((), device=batch["image"].device)
        if cfg.alpha > 0:
            parts["gt"] = self._gt_loss(lab_out, batch)
            loss = loss + cfg.alpha * parts["gt"]
        if cfg.alpha < 1:
            t = self._teacher(batch, "image")["logits"]
            s = lab_out[0] if isinstance(lab_out, list | tuple) else lab_out
            parts["kd"] = kd_kl_loss(s, t, cfg.temperature)
            loss = loss + (1 - cfg.alpha) * parts["kd"]
        if u_out is not None:
            t = self._teacher(batch, "u_image")["logits"]
            parts["kd_u"] = kd_kl_loss(u_out, t, cfg.temperature)
            loss = loss + cfg.kd_unlabeled_weight * parts["kd_u"]
        if cfg.feature_weight > 0 and self.feat_src is not None:
            tfeats = self._teacher(batch, self.feat_src)
            fl = [
                feature_loss(s, tfeats[f"feat{i}"], cfg.feature_loss)
                for i, s in enumerate(res["feats"])
            ]
            parts["feat"] = torch.stack(fl).mean()
            loss = loss + cfg.feature_weight * parts["feat"]
        return {"loss": loss, **{k: v.detach() for k, v in parts.items()}}


# ---------------------------------------------------------------------------------------------
# the command
# ---------------------------------------------------------------------------------------------
def teacher_needs(cfg: DistillConfig, has_unlabeled: bool) -> dict[str, tuple[bool, list[int]]]:
    """Which teacher outputs each input needs: ``{input: (logits?, feature levels)}``."""
    levels = [t for t, _ in cfg.feature_levels] if cfg.feature_weight > 0 else []
    needs: dict[str, tuple[bool, list[int]]] = {"image": (cfg.alpha < 1, [])}
    if has_unlabeled:
        needs["u_image"] = (cfg.kd_unlabeled, levels)
    else:
        needs["image"] = (cfg.alpha < 1, levels)
    return {k: v for k, v in needs.items() if v[0] or v[1]}


def run(cfg: DistillConfig) -> dict[str, Any]:
    """Distill; returns a summary like ``umit finetune``'s, with the teacher and cache use."""
    if cfg.dp.enabled:
        raise InputError(None, "umit distill does not train with DP-SGD (dp.enabled=false)")
    if cfg.alpha >= 1 and cfg.feature_weight <= 0 and not cfg.kd_unlabeled:
        raise InputError(
            None, "nothing to distill: alpha=1 and feature_weight=0 is plain fine-tuning"
        )
    init_from_env()  # under torchrun: the world size sizes the cached draws
    store = Store(cfg.data)
    plan = store.plan
    in_chans = len(plan.channels)
    cases = split_finetune_cases(store, cfg)
    targets: dict[str, int] = {}
    names: list[str] = []
    if cfg.task == "segmentation":
        num_outputs = seg_num_outputs(store, cases["train"] + cases["val"], plan)
    else:
        names = class_names(store, cases["train"] + cases["val"], cfg.label_key)
        lookup = {n: i for i, n in enumerate(names)}
        targets = {
            c: lookup[str(case_label(store.index[c], cfg.label_key))]
            for c in cases["train"] + cases["val"]
            if str(case_label(store.index[c], cfg.label_key)) in lookup
        }
        num_outputs = len(names)
    teacher = load_teacher(cfg.teacher, cfg, in_chans, num_outputs)
    seed_everything(cfg.train.seed)
    student = build_model(cfg, in_chans, num_outputs)
    levels = [s for _, s in cfg.feature_levels] if cfg.feature_weight > 0 else []
    channels = matched_channels(teacher, student, cfg, cfg.crop_size, in_chans) if levels else []
    module = DistillModule(student, levels, channels)

    labeled = training_data(cfg, store, cases["train"])
    unl_cases = list(cases["unlabeled"])
    if cfg.unlabeled_cases is not None and len(unl_cases) > cfg.unlabeled_cases:
        pick = np.random.default_rng(cfg.label_seed + 2).choice(
            len(unl_cases), cfg.unlabeled_cases, replace=False
        )
        unl_cases = sorted(unl_cases[int(i)] for i in pick)
    use_unl = bool(unl_cases) and (cfg.feature_weight > 0 or cfg.kd_unlabeled)
    if cfg.task == "classification" and use_unl:
        raise InputError(
            cfg.data, "unlabeled-crop distillation is for segmentation stores; set feature_weight=0"
        )
    unlabeled = (
        StoreCropDataset(
            cfg.data,
            cfg.crop_size,
            cases=unl_cases,
            samples_per_case=cfg.samples_per_case,
            foreground_prob=cfg.foreground_prob,
            seed=cfg.train.seed + 1,
            with_label=False,
        )
        if use_unl
        else None
    )
    data = DistillData(labeled, unlabeled, cfg.crop_epochs)
    train_cfg = scheduled_train_config(cfg, len(data))
    needs = teacher_needs(cfg, unlabeled is not None)
    cfg.out.mkdir(parents=True, exist_ok=True)

    cache_info: dict[str, Any] = {"used": False, "reason": "teacher_cache=false"}
    if cfg.teacher_cache:
        glob = train_cfg.batch_size * world_size()  # the sampler's global micro-batch
        per_epoch = max(1, len(data) // glob) * glob
        epochs = math.ceil(train_cfg.total_steps * train_cfg.grad_accum_steps * glob / per_epoch)
        draws = sorted({data.draw_of(e) for e in range(epochs)})
        cache = TeacherCache(
            cfg.cache_dir or cfg.out / "teacher_cache",
            {
                "version": CACHE_VERSION,
                "teacher_sha256": _sha256_file(cfg.teacher),
                "store": store_fingerprint(cfg.data),
                "task": cfg.task,
                "labeled": cases["train"],
                "unlabeled": unl_cases if unlabeled is not None else [],
                "crop_size": list(cfg.crop_size),
                "samples_per_case": cfg.samples_per_case,
                "foreground_prob": cfg.foreground_prob,
                "crop_seed": cfg.train.seed,
                "augment": cfg.augment.model_dump(mode="json"),
                "crop_epochs": cfg.crop_epochs,
                "needs": {k: [v[0], v[1]] for k, v in needs.items()},
            },
        )
        device = resolve_device(cfg.train.device)
        cache.ensure(data, draws, teacher, needs, cfg.sw_batch_size, device)
        cache_info = {
            "used": True,
            "key": cache.key,
            "dir": str(cache.dir),
            "draws": len(draws),
            "computed": cache.computed,
            "reused": cache.hits,
        }
    task = DistillTask(module, teacher, cfg, targets, needs)

    extra: dict[str, Any] = {
        "cases": {**cases, "unlabeled_used": unl_cases if unlabeled is not None else []},
        "class_names": names,
        "label_names": plan.labels,
        "label_key": cfg.label_key,
        "num_outputs": num_outputs,
        "distill": {
            "teacher": str(cfg.teacher),
            "teacher_model": teacher.art.get("model_name"),
            "alpha": cfg.alpha,
            "temperature": cfg.temperature,
            "feature_weight": cfg.feature_weight,
            "feature_levels": [list(x) for x in cfg.feature_levels],
            "cache": cache_info,
        },
    }
    spec = inference_spec(cfg, plan, extra)
    selection = selection_rule(cfg, len(cases["train"]), len(cases["val"]))
    extra["selection"] = selection
    saver = BestModelWriter(student, cfg, plan, spec, extra)

    evaluate = make_eval_fn(
        student, store, cases["val"], spec, targets, saver if selection == "best_val" else None
    )
    trainer = Trainer(
        task,
        data,
        train_cfg.model_copy(update={"out_dir": cfg.out}),
        eval_fn=evaluate if cases["val"] else None,
        plan=plan,
        run_config=cfg,
    )
    result = trainer.fit()
    saver.finish(result)  # the last model of the fixed schedule, if no best step was saved
    best = saver.record
    history = [h for h in result.history if h.get("split", "train") == "train"]
    n_student = sum(p.numel() for p in student.parameters())
    n_teacher = sum(p.numel() for p in teacher.parameters())
    return {
        "out": str(cfg.out),
        "model": str(cfg.out / BEST_FILE),
        "n_train": len(cases["train"]),
        "n_val": len(cases["val"]),
        "n_unlabeled": len(unl_cases) if unlabeled is not None else 0,
        "steps": result.step,
        "history": history,
        "first_loss": history[0]["loss"] if history else None,
        "last_loss": history[-1]["loss"] if history else None,
        "selection": selection,
        "best": best,
        "cache": cache_info,
        "params_student": n_student,
        "params_teacher": n_teacher,
        "seconds": result.seconds,
    }
