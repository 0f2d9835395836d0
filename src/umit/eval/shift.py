"""Shift suites of ``umit evaluate``: how a model's metric falls under controlled shifts.

**Perturbations** of the (preprocessed) test images at graded strengths ``s`` in [0, 1], each a
deterministic function of the image, the strength and a per-case seed (the parameters drawn are
returned, so a result can be replayed). Intensities are in the store's normalized units; ``sd``
is the standard deviation of the case's foreground (voxels different from the pad value).

==================  ==============================================================================
``noise``           additive Gaussian noise, sigma = ``s * sd``
``blur``            Gaussian blur, sigma = ``2 s`` voxels
``bias_field``      multiplicative smooth field ``2 ** (s * f)``, ``f`` a random low-frequency
                    field scaled to [-1, 1] (up to x2 / x0.5), about the pad value
``intensity_remap`` monotone gamma remap between the foreground's 1st and 99th percentile,
                    gamma = ``2 ** (1.5 s)`` (up to 2.8)
``resolution``      down-sampling by ``1 + 3 s`` per axis (anti-aliased, linear) and back
``texture``         within every reference structure, a fraction ``s`` of the voxels get the
                    intensity of another random voxel of the same structure: shapes and each
                    structure's intensity histogram stay, spatial texture (noise grain, PSF,
                    inner edges) goes
==================  ==============================================================================

**Leave-one-site-out**: a model fine-tuned with some sites left out (the sites of its training
cases are in ``best.pt``) is scored on the sites it never saw against those it saw: per-site
metric and the unseen - seen difference with a bootstrap CI over cases.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from scipy import ndimage

__all__ = [
    "NEEDS_LABEL_MAP",
    "PERTURBATIONS",
    "auc_under_shift",
    "headline_curves",
    "bootstrap_mean",
    "perturb",
    "site_shift",
    "summarize_shift",
]


def _foreground(image: np.ndarray, pad: float) -> np.ndarray:
    return np.abs(image - pad) > 1e-6


def _noise(x, s, rng, pad, sd, ref):
    return x + rng.normal(0.0, s * sd, x.shape).astype(np.float32), {"sigma": s * sd}


def _blur(x, s, rng, pad, sd, ref):
    sigma = 2.0 * s
    return ndimage.gaussian_filter(x, sigma) if sigma > 0 else x.copy(), {"sigma_vox": sigma}


def _smooth_field(shape, rng) -> np.ndarray:
    grids = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    f = np.zeros(shape, np.float64)
    for _ in range(4):  # a few random low-frequency cosines
        k = rng.uniform(0.5, 1.5, 3)
        ph = rng.uniform(0, 2 * np.pi, 3)
        f += np.prod([np.cos(np.pi * k[i] * grids[i] / 2 + ph[i]) for i in range(3)], axis=0)
    f -= f.min()
    return (2 * f / max(f.max(), 1e-12) - 1).astype(np.float32)


def _bias_field(x, s, rng, pad, sd, ref):
    f = _smooth_field(x.shape, rng)
    return pad + (x - pad) * np.exp2(s * f), {"max_factor": float(2**s)}


def _intensity_remap(x, s, rng, pad, sd, ref):
    fg = _foreground(x, pad)
    lo, hi = np.percentile(x[fg], [1, 99]) if fg.any() else (x.min(), x.max())
    gamma = float(2 ** (1.5 * s))
    u = np.clip((x - lo) / max(hi - lo, 1e-6), 0, 1)
    y = lo + (hi - lo) * u**gamma
    inside = (x >= lo) & (x <= hi)
    return np.where(inside, y, x).astype(np.float32), {"gamma": gamma}


def _resolution(x, s, rng, pad, sd, ref):
    f = 1.0 + 3.0 * s
    if f <= 1.0:
        return x.copy(), {"factor": 1.0}
    small = ndimage.zoom(ndimage.gaussian_filter(x, (f - 1) / 2), 1 / f, order=1)
    back = ndimage.zoom(small, np.array(x.shape) / np.array(small.shape), order=1)
    return back[tuple(slice(0, n) for n in x.shape)].astype(np.float32), {"factor": f}


def _texture(x, s, rng, pad, sd, ref):
    if ref is None:
        raise ValueError("the texture perturbation needs the reference label (segmentation)")
    y = x.copy()
    for lab in np.unique(ref):
        if lab == 0:
            continue
        idx = np.flatnonzero(ref == lab)
        pick = idx[rng.random(idx.size) < s]
        y.flat[pick] = x.flat[rng.choice(idx, size=pick.size)]
    return y, {"fraction": s}


PERTURBATIONS: dict[str, Callable] = {
    "noise": _noise,
    "blur": _blur,
    "bias_field": _bias_field,
    "intensity_remap": _intensity_remap,
    "resolution": _resolution,
    "texture": _texture,
}
NEEDS_LABEL_MAP = ("texture",)  # perturbations that read the case's reference structures


def perturb(
    image: np.ndarray,
    kind: str,
    strength: float,
    seed: int,
    pad_value: float = 0.0,
    reference: np.ndarray | None = None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Apply one perturbation to every channel of a (C, X, Y, Z) image.

    Returns:
        ``(image, params)``: the perturbed float32 image and the parameters applied.
    """
    if kind not in PERTURBATIONS:
        raise ValueError(f"unknown perturbation {kind!r}; one of {sorted(PERTURBATIONS)}")
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"perturbation strength must be in [0, 1], got {strength!r}")
    out = np.empty(image.shape, np.float32)
    params: dict[str, Any] = {}
    for c in range(image.shape[0]):
        rng = np.random.default_rng([seed, c])
        x = np.asarray(image[c], np.float32)
        fg = _foreground(x, pad_value)
        sd = float(x[fg].std()) if fg.any() else float(x.std())
        out[c], params = PERTURBATIONS[kind](x, float(strength), rng, pad_value, sd, reference)
    return out, {"kind": kind, "strength": float(strength), "seed": int(seed), **params}


def bootstrap_mean(values: Sequence[float], n_boot: int, seed: int) -> dict[str, Any]:
    """Mean with a percentile 95% bootstrap CI over cases (NaNs dropped)."""
    v = np.asarray([x for x in values if x == x], np.float64)
    if v.size == 0:
        return {"mean": None, "ci_low": None, "ci_high": None, "n": 0}
    rng = np.random.default_rng(seed)
    reps = v[rng.integers(0, v.size, (n_boot, v.size))].mean(1)
    lo, hi = np.percentile(reps, [2.5, 97.5])
    return {"mean": float(v.mean()), "ci_low": float(lo), "ci_high": float(hi), "n": int(v.size)}


def summarize_shift(
    rows: list[dict[str, Any]], metric: str, n_boot: int, seed: int
) -> dict[str, dict[str, Any]]:
    """``{kind: {strength: mean and CI of metric, and of its drop from strength 0 (paired)}}``,
    and at strength > 0 the fraction of images the perturbation ``changed`` (0: it does not
    apply to these images, e.g. noise scaled by the foreground's SD on binary masks).

    Rows with a binary ``score`` and ``label`` (a binary classifier) also get ``auc``: the AUC
    at that strength and its change from strength 0, each with a bootstrap CI over cases (the
    same resampled cases at both strengths: paired).
    """
    clean = {r["case_id"]: r for r in rows if r["strength"] == 0.0}
    out: dict[str, dict[str, Any]] = {}
    for kind in sorted({r["kind"] for r in rows}):
        out[kind] = {}
        for s in sorted({r["strength"] for r in rows if r["kind"] == kind}):
            sub = [r for r in rows if r["kind"] == kind and r["strength"] == s]
            entry = bootstrap_mean([r[metric] for r in sub], n_boot, seed)
            drops = [r[metric] - clean[r["case_id"]][metric] for r in sub if r["case_id"] in clean]
            entry["change"] = bootstrap_mean(drops, n_boot, seed + 1)
            if s > 0:  # the fraction of images the perturbation changed at all
                entry["changed"] = float(np.mean([bool(r.get("changed", True)) for r in sub]))
            if sub and all("score" in r and "label" in r for r in sub):
                entry["auc"] = auc_under_shift(
                    sub, [clean[r["case_id"]] for r in sub], n_boot, seed
                )
            out[kind][f"{s:g}"] = entry
    return out


def headline_curves(summary: Mapping[str, Any], metric: str) -> tuple[dict[str, Any], str]:
    """``(curves, name)`` to plot or tabulate from a :func:`summarize_shift` result: a binary
    classifier's AUC entries (accuracy at 0.5 says little on imbalanced data), else ``metric``'s."""
    if summary and all("auc" in e for by_s in summary.values() for e in by_s.values()):
        return {k: {s: e["auc"] for s, e in by_s.items()} for k, by_s in summary.items()}, "auc"
    return dict(summary), metric


def auc_under_shift(
    rows: list[dict[str, Any]], clean: list[dict[str, Any]], n_boot: int, seed: int
) -> dict[str, Any]:
    """AUC of ``rows`` (binary ``label`` / ``score``) and its change from the same cases
    ``clean`` (strength 0), with percentile 95% bootstrap CIs over cases (NaN-free replicates)."""
    from umit.eval.paired import auc_rows

    y = np.array([int(r["label"]) for r in rows])
    s = np.array([float(r["score"]) for r in rows])
    s0 = np.array([float(r["score"]) for r in clean])
    full = np.arange(y.size)[None, :]
    auc, auc0 = float(auc_rows(y[full], s[full])[0]), float(auc_rows(y[full], s0[full])[0])
    idx = np.random.default_rng([seed, 2]).integers(0, y.size, (n_boot, y.size))
    reps, reps0 = auc_rows(y[idx], s[idx]), auc_rows(y[idx], s0[idx])
    ok = np.isfinite(reps) & np.isfinite(reps0)

    def ci(v: np.ndarray) -> tuple[float | None, float | None]:
        if v.size < 2:
            return None, None
        lo, hi = np.percentile(v, [2.5, 97.5])
        return float(lo), float(hi)

    lo, hi = ci(reps[ok])
    dlo, dhi = ci(reps[ok] - reps0[ok])
    return {
        "mean": auc,
        "ci_low": lo,
        "ci_high": hi,
        "n": int(y.size),
        "change": {"mean": auc - auc0, "ci_low": dlo, "ci_high": dhi, "n": int(y.size)},
    }


def site_shift(
    rows: list[dict[str, Any]],
    metric: str,
    train_sites: Mapping[str, int],
    attribute: str = "site",
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Leave-one-site-out: the metric on sites absent from training vs present.

    Args:
        rows: per-case rows with ``metric`` and ``attribute``.
        train_sites: site -> number of training cases (from the model file).
    """
    sites = sorted({str(r.get(attribute)) for r in rows})
    per_site = {
        s: {
            **bootstrap_mean([r[metric] for r in rows if str(r.get(attribute)) == s], n_boot, seed),
            "train_cases": int(train_sites.get(s, 0)),
        }
        for s in sites
    }
    seen = np.array([r[metric] for r in rows if train_sites.get(str(r.get(attribute)), 0) > 0])
    unseen = np.array([r[metric] for r in rows if train_sites.get(str(r.get(attribute)), 0) == 0])
    result: dict[str, Any] = {"attribute": attribute, "per_site": per_site}
    if seen.size and unseen.size:
        rng = np.random.default_rng(seed)
        reps = [
            unseen[rng.integers(0, unseen.size, unseen.size)].mean()
            - seen[rng.integers(0, seen.size, seen.size)].mean()
            for _ in range(n_boot)
        ]
        lo, hi = np.percentile(reps, [2.5, 97.5])
        result["unseen_minus_seen"] = {
            "value": float(unseen.mean() - seen.mean()),
            "ci_low": float(lo),
            "ci_high": float(hi),
            "n_seen": int(seen.size),
            "n_unseen": int(unseen.size),
        }
    return result


# ---------------------------------------------------------------------------------------------
# the suite inside ``umit evaluate``
# ---------------------------------------------------------------------------------------------
def case_metric(model, spec, store, case_id: str, image: np.ndarray, labels) -> Any:
    """Mean foreground Dice (segmentation) or the class probabilities (K,) (classification) of
    one image."""
    import torch

    from umit.data.cases import centre_crop_or_pad
    from umit.inference.segment import segment_volume
    from umit.metrics import segmentation_metrics

    case = store.case(case_id)
    device = next(model.parameters()).device
    pad = float(case.pad_values[0]) if case.pad_values else 0.0
    if spec.task == "segmentation":
        pred = segment_volume(
            model, image, tuple(spec.roi_size), overlap=spec.overlap,
            sw_batch_size=spec.sw_batch_size, padding_value=pad, device=device,
        )  # fmt: skip
        ref = np.asarray(case.read_label())
        per = segmentation_metrics(pred, ref, case.spacing, labels, metrics=("dice",))
        vals = [m["dice"] for m in per.values() if m["dice"] == m["dice"]]
        return float(np.mean(vals)) if vals else float("nan")
    x = centre_crop_or_pad(image, tuple(spec.roi_size), list(case.pad_values))
    with torch.no_grad():
        probs = model(torch.from_numpy(x)[None].to(device)).float().softmax(1)[0]
    return probs.cpu().numpy()


def run_perturbations(
    model,
    ckpt: Mapping[str, Any],
    store,
    cases: list[str],
    kinds: list[str],
    strengths: list[float],
    seed: int = 0,
    targets: Mapping[str, int] | None = None,
) -> list[dict[str, Any]]:
    """Per (case, kind, strength) rows of the metric; strength 0 once per case (no kind).

    Classification rows also carry the case's class index ``label`` (from ``targets``) and, for
    a binary model, the positive-class probability ``score``, so :func:`summarize_shift` can
    give the AUC under shift as well as the accuracy."""
    from umit.train.checkpoint import InferenceSpec

    spec = InferenceSpec.model_validate(ckpt["spec"])
    labels = sorted(int(k) for k in (ckpt.get("label_names") or {}).values() if int(k) > 0) or None
    metric = "dice" if spec.task == "segmentation" else "correct"
    rows = []
    for i, c in enumerate(cases):
        case = store.case(c)
        image = np.asarray(case.read(), np.float32)
        pad = float(case.pad_values[0]) if case.pad_values else 0.0
        ref = np.asarray(case.read_label()) if "texture" in kinds and case.has_label else None

        def score(img: np.ndarray, c: str = c) -> dict[str, float]:
            m = case_metric(model, spec, store, c, img, labels)
            if metric == "dice":
                return {"dice": m}
            if targets is None or c not in targets:
                return {"correct": 0.0}
            out = {"correct": float(int(np.argmax(m)) == targets[c]), "label": targets[c]}
            return out | ({"score": float(m[1])} if m.shape[0] == 2 else {})

        base = score(image)
        for kind in kinds:
            rows.append({"case_id": c, "kind": kind, "strength": 0.0, **base})
            for s in strengths:
                img, params = perturb(image, kind, s, seed * 100003 + i, pad, ref)
                changed = not np.array_equal(img, image)  # e.g. noise of a binary mask: sd 0
                row = {"case_id": c, "kind": kind, "strength": float(s), "changed": changed}
                rows.append(row | score(img))
    return rows


def shift_figure(summary: Mapping[str, Any], metric: str, path, title: str):
    """Metric vs strength per perturbation, with the 95% CIs as bands."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from umit.utils.fileio import atomic_path

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for kind, by_s in summary.items():
        s = [float(k) for k in by_s]
        m = [by_s[k]["mean"] for k in by_s]
        lo = [by_s[k]["ci_low"] for k in by_s]
        hi = [by_s[k]["ci_high"] for k in by_s]
        ax.plot(s, m, marker="o", label=kind)
        ax.fill_between(s, lo, hi, alpha=0.15)
    ax.set_xlabel("perturbation strength")
    ax.set_ylabel(metric)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)
    return path
