"""Memorization audit (``umit audit privacy``): membership inference and near-duplicates.

**Membership inference.** A model that memorized its training cases fits them better than
cases it never saw. Each audited case gets a membership score (higher: "looks like a member"):

* ``loss`` attack: minus the case's loss under the audited model. Fine-tuned classifiers: the
  cross-entropy of the centred input; segmenters: DiceCE averaged over ``n_crops`` fixed, seeded
  crops; MAE checkpoints: the masked-reconstruction error averaged over ``n_masks`` fixed,
  seeded masks (the same masks for every case and every model).
* ``calibrated`` attack (with ``--reference``): the same case's loss under a reference model
  that was not trained on it (the scratch or pretrained-only model, or one trained on a disjoint
  half) minus its loss under the audited model. This removes the per-case difficulty (a hard case
  has a high loss whether or not it was trained on) -- the offline, one-reference form of LiRA
  (Carlini et al. 2022) as a score difference.

Members are the audited model's own training cases (recorded in ``best.pt``, or recomputed from
an MAE run's config); non-members are held-out cases of the same store (by default the test
split). Reported per attack: ROC AUC, TPR at low FPR (1 %, 0.1 %) and the membership advantage
``max(TPR - FPR)``, with stratified percentile-bootstrap CIs (members and non-members resampled
separately). AUC 0.5 / TPR = FPR is chance: nothing detectable was memorized.

**Near-duplicates** between the two sets: each volume is resampled to ``dup_size``³ (area
average), standardized, and compared by normalized cross-correlation (the cosine of the
standardized vectors); pairs above ``dup_threshold`` are listed -- a test case that duplicates a
training case inflates test metrics and is a trivial "membership".
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field

from umit.config import UmitConfig
from umit.data.cases import case_label, centred_input
from umit.data.dataset import StoreCropDataset
from umit.data.store import Store
from umit.errors import InputError
from umit.eval.report import (
    Figure,
    Section,
    Table,
    fmt,
    fmt_ci,
    new_figure,
    render_png,
    write_report,
)
from umit.eval.subgroup import ci_from_replicates
from umit.metrics import binary_auc
from umit.models import create_model
from umit.ssl.mae import MAE3D
from umit.ssl.pretrain import split_cases
from umit.train.checkpoint import load_artifact, load_model
from umit.train.dp import format_dp
from umit.train.losses import dice_ce_loss
from umit.utils.fileio import atomic_write_json

log = logging.getLogger(__name__)

DEFAULT_FPRS = (0.01, 0.001)


class AuditConfig(UmitConfig):
    """Settings of ``umit audit privacy``."""

    model: Path
    """Audited model: ``best.pt`` of ``umit finetune``, or an MAE run's ``latest.pt`` /
    ``step_*.pt`` (``encoder.pt`` alone has no decoder; its run folder's ``latest.pt`` is used)."""
    data: Path
    """Preprocessed store (PREP folder) holding members and non-members."""
    out: Path = Path("runs/audit")
    """Output folder: ``audit.json``, ``report.md`` / ``report.html`` with the ROC plot."""
    members: str = "train"
    """Member cases: a case list of the checkpoint (train, val, unlabeled, test) or a store split;
    several joined by commas."""
    nonmembers: str = "test"
    """Non-member cases, as ``members``; must be disjoint from the model's training cases."""
    reference: Path | None = None
    """Reference model (same kind, not trained on the audited cases) for the calibrated attack."""
    n_masks: int = Field(default=8, ge=1)
    """MAE: masks averaged per case."""
    n_crops: int = Field(default=4, ge=1)
    """Segmentation: crops averaged per case."""
    max_cases: int | None = Field(default=None, ge=2)
    """Audit at most this many cases per set (seeded choice); None: all."""
    seed: int = 0
    """Seed of masks, crops, case choice and bootstrap."""
    n_boot: int = Field(default=1000, ge=10)
    """Bootstrap replicates for the CIs."""
    ci: float = Field(default=0.95, gt=0, lt=1)
    """Confidence level."""
    fprs: tuple[float, ...] = DEFAULT_FPRS
    """False-positive rates at which the TPR is reported."""
    dup_size: int = Field(default=32, ge=2)
    """Edge of the downsampled volume compared for near-duplicates."""
    dup_threshold: float = Field(default=0.99, gt=0, le=1)
    """NCC above which a member/non-member pair is listed as a near-duplicate."""
    device: str = "cpu"
    """Device for scoring (cpu, cuda)."""


# ---------------------------------------------------------------------------------------------
# ROC, attack metrics, bootstrap
# ---------------------------------------------------------------------------------------------
def roc_points(labels: Sequence[int], scores: Sequence[float]) -> tuple[np.ndarray, ...]:
    """ROC curve (every distinct threshold, like ``sklearn.metrics.roc_curve(...,
    drop_intermediate=False)``): ``fpr, tpr, thresholds``, starting at (0, 0) with threshold inf.
    Label 1 = member; a case is called a member when its score is >= the threshold."""
    y = np.asarray(labels).astype(bool)
    s = np.asarray(scores, dtype=np.float64)
    if y.shape != s.shape or y.ndim != 1:
        raise ValueError(f"labels {y.shape} and scores {s.shape} must be equal-length vectors")
    if not np.all(np.isfinite(s)):
        raise ValueError("membership scores must be finite")
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"a ROC needs members and non-members (got {n_pos} and {n_neg})")
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]  # last index of each distinct score
    tps = np.cumsum(y)[last]
    fps = (last + 1) - tps
    fpr = np.r_[0.0, fps / n_neg]
    tpr = np.r_[0.0, tps / n_pos]
    return fpr, tpr, np.r_[np.inf, s[last]]


def tpr_at_fpr(fpr: np.ndarray, tpr: np.ndarray, target: float) -> float:
    """Highest TPR among thresholds whose FPR does not exceed ``target``."""
    ok = fpr <= target + 1e-12
    return float(tpr[ok].max())


def _point_metrics(members: np.ndarray, nonmembers: np.ndarray, fprs: Sequence[float]) -> dict:
    y = np.r_[np.ones(members.size, int), np.zeros(nonmembers.size, int)]
    s = np.r_[members, nonmembers]
    fpr, tpr, _ = roc_points(y, s)
    out = {"auc": binary_auc(y, s), "advantage": float(np.max(tpr - fpr))}
    for f in fprs:
        out[_tpr_key(f)] = tpr_at_fpr(fpr, tpr, f)
    return out


def _tpr_key(f: float) -> str:
    return f"tpr@{f * 100:g}%fpr"


def attack_metrics(
    member_scores: Sequence[float],
    nonmember_scores: Sequence[float],
    *,
    fprs: Sequence[float] = DEFAULT_FPRS,
    n_boot: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
) -> dict[str, Any]:
    """AUC, TPR at each FPR and advantage, each ``{value, ci_low, ci_high}`` (stratified
    percentile bootstrap), plus the ROC points and warnings about too few non-members."""

    m = np.asarray(member_scores, dtype=np.float64)
    n = np.asarray(nonmember_scores, dtype=np.float64)
    if m.size < 2 or n.size < 2:
        raise ValueError(f"need at least 2 members and 2 non-members, got {m.size} and {n.size}")
    point = _point_metrics(m, n, fprs)
    rng = np.random.default_rng([seed, 7331])
    reps: dict[str, list[float]] = {k: [] for k in point}
    for _ in range(n_boot):
        r = _point_metrics(rng.choice(m, m.size), rng.choice(n, n.size), fprs)
        for k, v in r.items():
            reps[k].append(v)
    metrics = {}
    for k, v in point.items():
        lo, hi, _ = ci_from_replicates(np.asarray(reps[k]), ci)
        metrics[k] = {"value": float(v), "ci_low": lo, "ci_high": hi}
    y = np.r_[np.ones(m.size, int), np.zeros(n.size, int)]
    fpr, tpr, _ = roc_points(y, np.r_[m, n])
    warnings = [
        f"only {n.size} non-members: the lowest non-zero FPR is {1 / n.size:.3g}, so TPR at "
        f"{f:g} FPR is the TPR at FPR 0"
        for f in fprs
        if n.size * f < 1
    ]
    return {
        "n_members": int(m.size),
        "n_nonmembers": int(n.size),
        "metrics": metrics,
        "roc": {"fpr": fpr.tolist(), "tpr": tpr.tolist()},
        "warnings": warnings,
    }


# ---------------------------------------------------------------------------------------------
# per-case losses
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def classification_losses(
    model: torch.nn.Module, images: Sequence[torch.Tensor], targets: Sequence[int]
) -> np.ndarray:
    """Cross-entropy of each (C, D, H, W) image against its class index."""
    model.eval()
    device = next(model.parameters()).device
    out = []
    for x, y in zip(images, targets, strict=True):
        logits = model(x[None].to(device)).float()
        out.append(F.cross_entropy(logits, torch.tensor([int(y)], device=device)).item())
    return np.asarray(out)


@torch.no_grad()
def segmentation_losses(
    model: torch.nn.Module, crops: Sequence[Sequence[tuple[torch.Tensor, torch.Tensor]]]
) -> np.ndarray:
    """DiceCE of each case averaged over its (image (C, d, h, w), label (1, d, h, w)) crops."""

    model.eval()
    device = next(model.parameters()).device
    out = []
    for case_crops in crops:
        vals = []
        for x, lab in case_crops:
            o = model(x[None].to(device))
            o = o[0] if isinstance(o, list | tuple) else o
            vals.append(dice_ce_loss(o, lab[None].to(device)).item())
        out.append(float(np.mean(vals)))
    return np.asarray(out)


@torch.no_grad()
def mae_losses(
    mae: torch.nn.Module, images: Sequence[torch.Tensor], n_masks: int = 8, seed: int = 0
) -> np.ndarray:
    """Masked-reconstruction error of each (C, D, H, W) image, averaged over ``n_masks`` masks
    drawn from generators seeded ``(seed, k)``: the same masks for every case and model."""
    mae.eval()
    device = next(mae.parameters()).device
    out = []
    for x in images:
        vals = []
        for k in range(n_masks):
            gen = torch.Generator(device=device)
            gen.manual_seed(int(np.random.SeedSequence([seed, k]).generate_state(1)[0]))
            vals.append(float(mae(x[None].to(device), generator=gen)["loss"]))
        out.append(float(np.mean(vals)))
    return np.asarray(out)


# ---------------------------------------------------------------------------------------------
# near-duplicates
# ---------------------------------------------------------------------------------------------
def volume_signature(volume: np.ndarray | torch.Tensor, size: int = 16) -> np.ndarray:
    """(C, X, Y, Z) -> unit vector of the area-downsampled (C, size³) volume minus its mean."""
    x = torch.as_tensor(np.asarray(volume, np.float32))
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4:
        raise ValueError(f"expected a (C, X, Y, Z) volume, got shape {tuple(x.shape)}")
    v = F.adaptive_avg_pool3d(x[None], size)[0].flatten().double()  # (C·size³,)
    v = v - v.mean()
    norm = v.norm()
    return (v / norm if norm > 0 else v).numpy()


def find_duplicates(
    train: Mapping[str, np.ndarray],
    test: Mapping[str, np.ndarray],
    threshold: float = 0.95,
) -> dict[str, Any]:
    """Pairs (train, test) of signatures with NCC >= ``threshold`` and each test case's nearest
    training case. ``train`` / ``test``: case id -> :func:`volume_signature`."""
    if not train or not test:
        raise ValueError("near-duplicate search needs cases on both sides")
    a_ids, b_ids = list(train), list(test)
    a = np.stack([train[c] for c in a_ids])
    b = np.stack([test[c] for c in b_ids])
    ncc = b @ a.T  # (n_test, n_train)
    pairs = [
        {"train": a_ids[j], "test": b_ids[i], "ncc": float(ncc[i, j])}
        for i, j in zip(*np.nonzero(ncc >= threshold), strict=True)
    ]
    nearest = [
        {"test": b_ids[i], "train": a_ids[int(ncc[i].argmax())], "ncc": float(ncc[i].max())}
        for i in range(len(b_ids))
    ]
    return {
        "threshold": threshold,
        "pairs": sorted(pairs, key=lambda p: -p["ncc"]),
        "nearest": sorted(nearest, key=lambda p: -p["ncc"]),
    }


# ---------------------------------------------------------------------------------------------
# models and case sets
# ---------------------------------------------------------------------------------------------
def load_audit_model(path: str | Path) -> tuple[str, torch.nn.Module, dict[str, Any]]:
    """``(kind, model, checkpoint)`` with kind ``classification`` / ``segmentation`` / ``mae``."""
    path = Path(path)
    ckpt = load_artifact(path, expect=("model", "encoder", "train_state"))
    if ckpt["kind"] == "encoder":
        run_ckpt = path.parent / "latest.pt"
        if not run_ckpt.is_file():
            raise InputError(
                path,
                "encoder.pt holds no MAE decoder, so reconstruction error cannot be scored; pass "
                "the pretraining run's latest.pt (or a step_*.pt)",
            )
        log.info("%s has no decoder: auditing the run checkpoint %s", path, run_ckpt)
        return load_audit_model(run_ckpt)
    if ckpt.get("model_name") == "mae3d":
        args = dict(ckpt["model_args"])
        encoder = create_model(args.pop("encoder"), **dict(args.pop("encoder_args")))
        mae = MAE3D(encoder, **args)
        mae.load_state_dict(ckpt["model"], strict=True)
        return "mae", mae.eval(), ckpt
    model, ckpt = load_model(path)
    return str(ckpt["task"]), model, ckpt


def training_case_sets(kind: str, ckpt: Mapping[str, Any], store: Any) -> dict[str, list[str]]:
    """The case lists a checkpoint was trained and validated with (``train`` = members)."""
    if kind != "mae":
        sets = {k: list(v) for k, v in (ckpt.get("cases") or {}).items()}
        if not sets.get("train"):
            raise InputError(
                None, "the checkpoint records no training cases (not a umit finetune best.pt?)"
            )
        return sets

    rc = ckpt.get("run_config") or {}
    exclude = list(rc.get("exclude_splits", ["test"]))
    train, val = split_cases(
        store, exclude, int(rc.get("val_cases", 0)), int((rc.get("train") or {}).get("seed", 0))
    )
    test = [c for c in store.case_ids if (store.index[c].get("split") or "train") in exclude]
    return {"train": train, "val": val, "test": sorted(test)}


def resolve_cases(spec: str, sets: Mapping[str, list[str]], store: Any) -> list[str]:
    """Comma-separated names: checkpoint case lists first, else store splits."""
    out: list[str] = []
    for name in (s.strip() for s in spec.split(",") if s.strip()):
        if name in sets:
            out += sets[name]
        else:
            found = [c for c in store.case_ids if store.index[c].get("split") == name]
            if not found:
                raise InputError(
                    store.prep_dir,
                    f"no cases for {name!r}: not a checkpoint case list {sorted(sets)} nor a store split",
                )
            out += found
    return sorted(dict.fromkeys(out))


def _subsample(cases: list[str], k: int | None, seed: int) -> list[str]:
    if k is None or len(cases) <= k:
        return cases
    idx = np.random.default_rng(seed).choice(len(cases), k, replace=False)
    return sorted(cases[i] for i in idx)


def case_losses(
    kind: str,
    model: torch.nn.Module,
    ckpt: Mapping[str, Any],
    store: Any,
    cases: list[str],
    cfg: AuditConfig,
) -> np.ndarray:
    """Per-case loss of ``model`` on store cases, in the checkpoint's input geometry."""

    rc = ckpt.get("run_config") or {}
    crop = tuple(rc.get("crop_size", (96, 96, 96)))
    if kind == "classification":
        names = list(ckpt.get("class_names") or [])
        key = ckpt.get("label_key", "target")
        lookup = {n: i for i, n in enumerate(names)}
        labels = [str(case_label(store.index[c], key)) for c in cases]
        unknown = sorted({v for v in labels if v not in lookup})
        if unknown:
            raise InputError(
                store.prep_dir, f"label {key!r} values {unknown} unknown to the model {names}"
            )
        images = [centred_input(store, c, crop) for c in cases]
        return classification_losses(model, images, [lookup[v] for v in labels])
    if kind == "segmentation":
        missing = [c for c in cases if not store.index[c].get("has_label")]
        if missing:
            raise InputError(
                store.prep_dir, f"cases without labels cannot be scored: {missing[:5]}"
            )
        ds = StoreCropDataset(
            store.prep_dir,
            crop,
            cases=cases,
            samples_per_case=cfg.n_crops,
            foreground_prob=float(rc.get("foreground_prob", 0.33)),
            seed=cfg.seed,
            with_label=True,
        )
        crops = [
            [
                (ds[i * cfg.n_crops + k]["image"], ds[i * cfg.n_crops + k]["label"])
                for k in range(cfg.n_crops)
            ]
            for i in range(len(cases))
        ]
        return segmentation_losses(model, crops)
    if kind == "mae":
        images = [centred_input(store, c, crop) for c in cases]
        return mae_losses(model, images, cfg.n_masks, cfg.seed)
    raise InputError(cfg.model, f"cannot audit a model of kind {kind!r}")


# ---------------------------------------------------------------------------------------------
# the command
# ---------------------------------------------------------------------------------------------
def run(cfg: AuditConfig) -> dict[str, Any]:
    """Score members and non-members, compute the attacks, find near-duplicates, write the report."""

    store = Store(cfg.data)
    kind, model, ckpt = load_audit_model(cfg.model)
    device = torch.device(cfg.device)
    model.to(device)
    sets = training_case_sets(kind, ckpt, store)
    members = _subsample(resolve_cases(cfg.members, sets, store), cfg.max_cases, cfg.seed)
    nonmembers = _subsample(resolve_cases(cfg.nonmembers, sets, store), cfg.max_cases, cfg.seed + 1)
    leaked = sorted(set(nonmembers) & set(sets.get("train", [])))
    if leaked:
        raise InputError(cfg.model, f"'non-members' the model was trained on: {leaked[:5]}")
    if len(members) < 2 or len(nonmembers) < 2:
        raise InputError(
            cfg.data,
            f"need >= 2 members and 2 non-members, got {len(members)} and {len(nonmembers)}",
        )
    warnings: list[str] = []
    not_members = sorted(set(members) - set(sets.get("train", [])))
    if not_members:
        warnings.append(f"{len(not_members)} 'members' are not training cases of the model")
    loss_m = case_losses(kind, model, ckpt, store, members, cfg)
    loss_n = case_losses(kind, model, ckpt, store, nonmembers, cfg)
    boot = {"fprs": cfg.fprs, "n_boot": cfg.n_boot, "ci": cfg.ci, "seed": cfg.seed}
    attacks = {"loss": attack_metrics(-loss_m, -loss_n, **boot)}
    per_case = {c: {"member": True, "loss": float(v)} for c, v in zip(members, loss_m, strict=True)}
    per_case |= {
        c: {"member": False, "loss": float(v)} for c, v in zip(nonmembers, loss_n, strict=True)
    }
    if cfg.reference is not None:
        rkind, ref, rckpt = load_audit_model(cfg.reference)
        if rkind != kind:
            raise InputError(cfg.reference, f"reference is a {rkind} model, the audited one {kind}")
        ref.to(device)
        try:
            rtrain = set(training_case_sets(rkind, rckpt, store)["train"])
        except InputError:  # a reference that records no training cases (e.g. not fine-tuned)
            rtrain = set()
        overlap = rtrain & (set(members) | set(nonmembers))
        if overlap:
            warnings.append(
                f"the reference model was trained on {len(overlap)} audited cases; the calibrated "
                "attack assumes it saw none of them"
            )
        ref_m = case_losses(kind, ref, rckpt, store, members, cfg)
        ref_n = case_losses(kind, ref, rckpt, store, nonmembers, cfg)
        attacks["calibrated"] = attack_metrics(ref_m - loss_m, ref_n - loss_n, **boot)
        for c, v in zip(members + nonmembers, np.r_[ref_m, ref_n], strict=True):
            per_case[c]["reference_loss"] = float(v)
    sigs = {c: volume_signature(store.case(c).read(), cfg.dup_size) for c in members + nonmembers}
    dups = find_duplicates(
        {c: sigs[c] for c in members}, {c: sigs[c] for c in nonmembers}, cfg.dup_threshold
    )
    for a in attacks.values():
        warnings += a["warnings"]
    result = {
        "model": str(cfg.model),
        "data": str(cfg.data),
        "kind": kind,
        "reference": None if cfg.reference is None else str(cfg.reference),
        "members": cfg.members,
        "nonmembers": cfg.nonmembers,
        "attacks": attacks,
        "duplicates": dups,
        "per_case": per_case,
        "dp": ckpt.get("dp"),
        "warnings": sorted(set(warnings)),
    }
    cfg.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(cfg.out / "audit.json", result)
    paths = write_audit_report(result, cfg.out)
    result["report"] = str(paths["markdown"])
    return result


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------
def plot_roc(attacks: Mapping[str, Mapping[str, Any]]):
    """ROC of each attack, linear and log-log (low-FPR regime), with the chance line."""

    fig = new_figure(9.0, 4.0)
    axes = fig.subplots(1, 2)
    for name, a in attacks.items():
        fpr, tpr = np.asarray(a["roc"]["fpr"]), np.asarray(a["roc"]["tpr"])
        auc = a["metrics"]["auc"]["value"]
        for ax in axes:
            ax.step(fpr, tpr, where="post", label=f"{name} (AUC {auc:.3f})")
    lo = 1.0 / max(max(a["n_nonmembers"] for a in attacks.values()), 1000)
    grid = np.linspace(lo, 1, 200)
    for ax in axes:
        ax.plot(grid, grid, color="#9a9a9a", linestyle="--", label="chance")
        ax.set_xlabel("false-positive rate (non-members called members)")
        ax.set_ylabel("true-positive rate (members found)")
    axes[1].set_xscale("log")
    axes[1].set_yscale("log")
    axes[1].set_xlim(lo, 1)
    axes[1].set_ylim(lo, 1.05)
    axes[0].legend(loc="lower right", fontsize=8)
    axes[0].set_title("ROC")
    axes[1].set_title("ROC, log scale (low FPR)")
    return Figure(png=render_png(fig), caption="Membership-inference ROC", name="roc")


def write_audit_report(result: Mapping[str, Any], out: Path) -> dict[str, Any]:
    attacks = result["attacks"]
    keys = list(next(iter(attacks.values()))["metrics"])
    rows = []
    for name, a in attacks.items():
        ms = a["metrics"]
        rows.append(
            [name, a["n_members"], a["n_nonmembers"]]
            + [fmt_ci(ms[k]["value"], ms[k]["ci_low"], ms[k]["ci_high"]) for k in keys]
        )
    summary = Table(
        header=["attack", "members", "non-members", *keys],
        rows=rows,
        caption="95% stratified bootstrap CIs; AUC 0.5 and TPR = FPR are chance",
    )
    text = (
        f"Model `{result['model']}` ({result['kind']}), members = `{result['members']}`, "
        f"non-members = `{result['nonmembers']}`. Score: minus the per-case loss (`loss`)"
        + (
            ", and reference loss minus audited loss (`calibrated`)"
            if "calibrated" in attacks
            else ""
        )
        + "."
    )
    if result.get("dp"):
        text += f" The model was trained with DP-SGD: {format_dp(result['dp'])}."
    dups = result["duplicates"]
    dup_rows = [[p["train"], p["test"], fmt(p["ncc"])] for p in dups["pairs"][:50]]
    near = [[p["test"], p["train"], fmt(p["ncc"])] for p in dups["nearest"][:10]]
    sections = [
        Section(
            title="Membership inference",
            text=text,
            tables=[summary],
            figures=[plot_roc(attacks)],
            warnings=list(result.get("warnings", [])),
        ),
        Section(
            title="Near-duplicates",
            text=f"{len(dups['pairs'])} member/non-member pairs with NCC >= {dups['threshold']:g} "
            "(downsampled, standardized volumes).",
            tables=[
                Table(
                    ["member", "non-member", "NCC"], dup_rows, caption="pairs above the threshold"
                ),
                Table(["non-member", "nearest member", "NCC"], near, caption="closest pairs"),
            ],
        ),
    ]
    return write_report(out, "UMIT memorization audit", sections)
