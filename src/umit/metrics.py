"""Evaluation metrics: segmentation overlap and surface distances, classification and calibration.

Segmentation metrics take binary masks (or integer label maps for :func:`segmentation_metrics`)
indexed ``(i, j, k)`` and the voxel spacing in mm along those axes. Surface metrics follow MONAI
exactly (``compute_hausdorff_distance``, ``compute_surface_dice`` without sub-voxels):

* the surface of a mask is its voxels with at least one face neighbour outside the mask
  (``mask ^ binary_erosion(mask)`` with a face-connected cross, and nothing outside the image);
* the distance of a surface voxel of A to B is the Euclidean distance in mm to the nearest
  *surface* voxel of B. It is read off one anisotropic exact distance transform
  (``scipy.ndimage.distance_transform_edt(~surface_B, sampling=spacing)``), computed on the
  bounding box of the union of both masks plus one voxel (nearest surface voxels lie inside it);
* HD95 is ``max(P95(d(A->B)), P95(d(B->A)))`` with linearly interpolated percentiles (as
  ``torch.quantile``), not the percentile of the pooled distances;
* NSD at tolerance ``tau`` mm is ``(#{d(A->B) <= tau} + #{d(B->A) <= tau}) / (|dA| + |dB|)``.

Empty masks (documented choices, the same for every segmentation metric):

* both empty -> ``empty_value`` (default NaN: the structure is absent and correctly predicted
  absent, there is nothing to score; aggregate with ``nanmean``). Pass ``empty_value=1.0`` to
  reward correct absence (MONAI ``DiceMetric(ignore_empty=False)``).
* exactly one empty -> Dice 0 and NSD 0 (as MONAI, except that MONAI's Dice returns NaN for an
  empty reference with a non-empty prediction, which hides false positives); HD95 is the
  diagonal of the image in mm (the largest possible distance, finite so means stay usable) with
  ``missing="diagonal"``, or ``inf`` as MONAI with ``missing="inf"``.

Classification metrics take integer labels ``y_true`` (N,) and scores: (N,) probabilities of the
positive class for binary tasks, or (N, K) class probabilities. AUC is the rank (Mann-Whitney)
statistic with tie-averaged ranks, equal to scikit-learn's ``roc_auc_score`` (one-vs-rest macro
average for K > 2). The expected calibration error is the top-label ECE of Guo et al. (2017):
confidence = the largest class probability (``max(p, 1 - p)`` for binary), correct = the
predicted class (argmax; ``p >= 0.5`` for binary) equals the label, 15 equal-width bins
``(m/M, (m+1)/M]`` over ``[0, 1]`` (a confidence of exactly 0 goes into the first bin), and

    ECE = sum_m |B_m| / N * |accuracy(B_m) - mean confidence(B_m)|.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Literal

import numpy as np
from scipy import ndimage
from scipy.stats import rankdata

Missing = Literal["diagonal", "inf"]
SEG_METRICS = ("dice", "hd95", "nsd")

# -- helpers -------------------------------------------------------------------------------------


def _to_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _binary_pair(pred, ref) -> tuple[np.ndarray, np.ndarray]:
    pred, ref = _to_numpy(pred), _to_numpy(ref)
    if pred.shape != ref.shape:
        raise ValueError(f"shape mismatch: prediction {pred.shape} vs reference {ref.shape}")
    if pred.ndim < 1:
        raise ValueError("masks must have at least one axis")
    return pred.astype(bool, copy=False), ref.astype(bool, copy=False)


def _spacing(spacing, ndim: int) -> tuple[float, ...]:
    if spacing is None:
        raise ValueError("spacing (voxel size in mm per axis) is required for surface metrics")
    sp = (float(spacing),) * ndim if np.isscalar(spacing) else tuple(float(s) for s in spacing)
    if len(sp) != ndim:
        raise ValueError(f"spacing {tuple(sp)} has {len(sp)} values for a {ndim}-D mask")
    if not all(math.isfinite(s) and s > 0 for s in sp):
        raise ValueError(f"spacing must be positive and finite, got {sp}")
    return sp


def _diagonal(shape: Sequence[int], spacing: Sequence[float]) -> float:
    """Largest distance between two voxel centres of the image, in mm."""
    return float(math.sqrt(sum(((n - 1) * s) ** 2 for n, s in zip(shape, spacing, strict=True))))


def surface(mask: np.ndarray) -> np.ndarray:
    """Surface voxels: in ``mask`` with a face neighbour outside it (the image border counts as
    outside), i.e. ``mask ^ scipy.ndimage.binary_erosion(mask)``."""
    mask = np.asarray(mask, dtype=bool)
    padded = np.pad(mask, 1)  # False border, as binary_erosion(border_value=0)
    interior = mask.copy()
    core = tuple(slice(1, -1) for _ in range(mask.ndim))
    for axis in range(mask.ndim):
        for lo, hi in ((0, -2), (2, None)):
            sl = list(core)
            sl[axis] = slice(lo, hi)
            interior &= padded[tuple(sl)]
    return mask & ~interior


def _union_box(pred: np.ndarray, ref: np.ndarray) -> tuple[slice, ...] | None:
    """Bounding box of ``pred | ref`` grown by one voxel (clipped to the image); None if empty."""
    union = pred | ref
    box = []
    for axis in range(union.ndim):
        other = tuple(a for a in range(union.ndim) if a != axis)
        hit = np.flatnonzero(union.any(axis=other)) if union.ndim > 1 else np.flatnonzero(union)
        if hit.size == 0:
            return None
        box.append(slice(max(int(hit[0]) - 1, 0), min(int(hit[-1]) + 2, union.shape[axis])))
    return tuple(box)


def surface_distances(pred, ref, spacing: float | Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Distances in mm from each surface voxel of ``pred`` to the surface of ``ref`` and back.

    Returns ``(d_pred_to_ref, d_ref_to_pred)`` (float64); a direction whose target surface is
    empty gives ``inf`` for every source voxel (as MONAI), and an empty source gives an empty array.
    """
    pred, ref = _binary_pair(pred, ref)
    sp = _spacing(spacing, pred.ndim)
    box = _union_box(pred, ref)
    if box is None:
        return np.zeros(0), np.zeros(0)
    sp_pred, sp_ref = surface(pred[box]), surface(ref[box])

    def directed(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
        if not src.any():
            return np.zeros(0)
        if not dst.any():
            return np.full(int(src.sum()), np.inf)
        return ndimage.distance_transform_edt(~dst, sampling=sp)[src]

    return directed(sp_pred, sp_ref), directed(sp_ref, sp_pred)


# -- segmentation --------------------------------------------------------------------------------


def dice(pred, ref, *, empty_value: float = math.nan) -> float:
    """Dice ``2|P&R| / (|P| + |R|)`` of two binary masks (``empty_value`` when both are empty)."""
    pred, ref = _binary_pair(pred, ref)
    n_pred, n_ref = int(pred.sum()), int(ref.sum())
    if n_pred + n_ref == 0:
        return float(empty_value)
    return 2.0 * int(np.count_nonzero(pred & ref)) / (n_pred + n_ref)


def hausdorff_distance(
    pred,
    ref,
    spacing: float | Sequence[float],
    *,
    percentile: float | None = 95.0,
    empty_value: float = math.nan,
    missing: Missing = "diagonal",
) -> float:
    """Symmetric (percentile) Hausdorff distance in mm between the surfaces of two masks.

    Args:
        pred, ref: Binary masks of the same shape.
        spacing: Voxel size in mm per axis (or one number).
        percentile: 95 for HD95; None for the maximum (classic Hausdorff).
        empty_value: Returned when both masks are empty.
        missing: When exactly one mask is empty: ``"diagonal"`` (image diagonal in mm) or
            ``"inf"`` (as MONAI).
    """
    if missing not in ("diagonal", "inf"):
        raise ValueError(f"missing must be 'diagonal' or 'inf', got {missing!r}")
    if percentile is not None and not 0 <= percentile <= 100:
        raise ValueError(f"percentile must be in [0, 100], got {percentile}")
    pred, ref = _binary_pair(pred, ref)
    sp = _spacing(spacing, pred.ndim)
    has_pred, has_ref = bool(pred.any()), bool(ref.any())
    if not has_pred and not has_ref:
        return float(empty_value)
    if has_pred != has_ref:
        return _diagonal(pred.shape, sp) if missing == "diagonal" else math.inf
    d_pr, d_rp = surface_distances(pred, ref, sp)
    if percentile is None:
        return float(max(d_pr.max(), d_rp.max()))
    return float(max(np.percentile(d_pr, percentile), np.percentile(d_rp, percentile)))


def hd95(pred, ref, spacing, **kwargs) -> float:
    """95th-percentile symmetric Hausdorff distance in mm (see :func:`hausdorff_distance`)."""
    return hausdorff_distance(pred, ref, spacing, percentile=95.0, **kwargs)


def surface_dice(
    pred,
    ref,
    spacing: float | Sequence[float],
    tolerance_mm: float,
    *,
    empty_value: float = math.nan,
) -> float:
    """Normalised surface Dice: the fraction of both surfaces within ``tolerance_mm`` of the other."""
    if not math.isfinite(tolerance_mm) or tolerance_mm < 0:
        raise ValueError(f"tolerance_mm must be finite and >= 0, got {tolerance_mm}")
    pred, ref = _binary_pair(pred, ref)
    d_pr, d_rp = surface_distances(pred, ref, spacing)
    total = d_pr.size + d_rp.size
    if total == 0:
        return float(empty_value)
    return float(
        (np.count_nonzero(d_pr <= tolerance_mm) + np.count_nonzero(d_rp <= tolerance_mm)) / total
    )


def segmentation_metrics(
    pred,
    ref,
    spacing: float | Sequence[float],
    labels: Iterable[int] | None = None,
    *,
    metrics: Sequence[str] = SEG_METRICS,
    nsd_tolerance_mm: float | dict[int, float] = 1.0,
    percentile: float = 95.0,
    empty_value: float = math.nan,
    missing: Missing = "diagonal",
) -> dict[int, dict[str, float]]:
    """Per-label Dice / HD95 / NSD of two integer label maps.

    Args:
        pred, ref: Integer label maps of the same shape (0 = background).
        spacing: Voxel size in mm per axis.
        labels: Labels to score (default: every non-zero label in either map).
        metrics: Any of ``"dice"``, ``"hd95"``, ``"nsd"``.
        nsd_tolerance_mm: NSD tolerance, one value or one per label.
        percentile, empty_value, missing: As in :func:`hausdorff_distance`.

    Returns:
        ``{label: {"dice": ..., "hd95": ..., "nsd": ...}}``.
    """
    pred, ref = _to_numpy(pred), _to_numpy(ref)
    if pred.shape != ref.shape:
        raise ValueError(f"shape mismatch: prediction {pred.shape} vs reference {ref.shape}")
    for name, arr in (("prediction", pred), ("reference", ref)):
        if arr.dtype.kind not in "iub":
            raise ValueError(f"{name} must be an integer label map, got dtype {arr.dtype}")
        if arr.size and arr.min() < 0:
            raise ValueError(f"{name} has negative labels")
    unknown = set(metrics) - set(SEG_METRICS)
    if unknown:
        raise ValueError(f"unknown segmentation metrics {sorted(unknown)}; known: {SEG_METRICS}")
    sp = _spacing(spacing, pred.ndim)
    pred, ref = (x.view(np.uint8) if x.dtype == bool else x for x in (pred, ref))
    if labels is None:
        labels = sorted((set(np.unique(pred).tolist()) | set(np.unique(ref).tolist())) - {0})
    labels = [int(lab) for lab in labels]
    # Bounding boxes of every label in one pass per map; each label is then scored inside the
    # union of its two boxes (plus one voxel), never on a full-volume temporary.
    boxes_p = ndimage.find_objects(pred) if pred.size else []
    boxes_r = ndimage.find_objects(ref) if ref.size else []
    out: dict[int, dict[str, float]] = {}
    for lab in labels:
        box = _label_box(boxes_p, boxes_r, lab, pred.shape)
        if box is None:
            sub_p = sub_r = np.zeros((1,) * pred.ndim, dtype=bool)
        else:
            sub_p, sub_r = pred[box] == lab, ref[box] == lab
        n_p, n_r = int(np.count_nonzero(sub_p)), int(np.count_nonzero(sub_r))
        res: dict[str, float] = {}
        if "dice" in metrics:
            tp = int(np.count_nonzero(sub_p & sub_r))
            res["dice"] = float(empty_value) if n_p + n_r == 0 else 2.0 * tp / (n_p + n_r)
        if "hd95" in metrics:
            if (n_p > 0) != (n_r > 0):  # one empty: the diagonal of the whole image
                res["hd95"] = _diagonal(pred.shape, sp) if missing == "diagonal" else math.inf
            else:
                res["hd95"] = hausdorff_distance(
                    sub_p, sub_r, sp, percentile=percentile, empty_value=empty_value
                )
        if "nsd" in metrics:
            tol = (
                nsd_tolerance_mm.get(lab)
                if isinstance(nsd_tolerance_mm, dict)
                else nsd_tolerance_mm
            )
            if tol is None:
                raise ValueError(f"nsd_tolerance_mm has no tolerance for label {lab}")
            res["nsd"] = surface_dice(sub_p, sub_r, sp, float(tol), empty_value=empty_value)
        out[lab] = res
    return out


def _label_box(boxes_p, boxes_r, lab: int, shape) -> tuple[slice, ...] | None:
    """Union of the label's boxes in both maps, grown by one voxel (clipped)."""
    found = [b[lab - 1] for b in (boxes_p, boxes_r) if lab - 1 < len(b) and b[lab - 1] is not None]
    if not found:
        return None
    return tuple(
        slice(max(min(b[d].start for b in found) - 1, 0), min(max(b[d].stop for b in found) + 1, n))
        for d, n in enumerate(shape)
    )


def flatten_label_metrics(per_label: dict[int, dict[str, float]]) -> dict[str, float]:
    """``{1: {"dice": .9}, 2: {...}}`` -> ``{"dice_1": .9, ..., "dice_mean": ...}`` (nan-mean over
    labels) for a per-case table row."""
    flat: dict[str, float] = {}
    names: dict[str, list[float]] = {}
    for lab, vals in per_label.items():
        for name, v in vals.items():
            flat[f"{name}_{lab}"] = float(v)
            names.setdefault(name, []).append(float(v))
    for name, vs in names.items():
        finite = [v for v in vs if not math.isnan(v)]
        flat[f"{name}_mean"] = float(np.mean(finite)) if finite else math.nan
    return flat


# -- classification ------------------------------------------------------------------------------


def _labels(y_true, n: int | None = None) -> np.ndarray:
    y = _to_numpy(y_true)
    if y.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {y.shape}")
    if y.size == 0:
        raise ValueError("no cases: labels are empty")
    if y.dtype.kind == "f":
        if not np.all(np.isfinite(y)) or not np.all(y == np.round(y)):
            raise ValueError("labels must be integers")
    elif y.dtype.kind not in "iub":
        raise ValueError(f"labels must be integers, got dtype {y.dtype}")
    y = y.astype(np.int64)
    if y.min() < 0:
        raise ValueError("labels must be >= 0")
    if n is not None and y.size != n:
        raise ValueError(f"length mismatch: {y.size} labels vs {n} scores")
    return y


def _scores(scores) -> np.ndarray:
    s = _to_numpy(scores).astype(np.float64)
    if s.ndim not in (1, 2):
        raise ValueError(f"scores must be (N,) or (N, K), got shape {s.shape}")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores must be finite")
    return s


def binary_auc(y_true, score) -> float:
    """Area under the ROC curve of binary labels (0/1) vs scores; NaN if one class is absent."""
    y = _labels(y_true)
    s = _scores(score)
    if s.ndim != 1 or s.size != y.size:
        raise ValueError(f"binary AUC needs (N,) scores for N={y.size} labels, got {s.shape}")
    pos = y == 1
    if np.any(y > 1):
        raise ValueError("binary AUC needs labels in {0, 1}")
    n_pos = int(pos.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = rankdata(s)  # average ranks for ties == trapezoidal ROC area
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def roc_auc(y_true, scores) -> float:
    """ROC AUC: binary for (N,) scores or (N, 2); one-vs-rest macro average for (N, K > 2).

    Classes absent from ``y_true`` (or present in all cases) have no AUC and are left out of the
    macro average (scikit-learn raises instead); NaN if no class has one.
    """
    s = _scores(scores)
    y = _labels(y_true, s.shape[0])
    if s.ndim == 1:
        return binary_auc(y, s)
    k = s.shape[1]
    if y.max() >= k:
        raise ValueError(f"label {int(y.max())} out of range for {k} score columns")
    if k == 2:
        return binary_auc(y, s[:, 1])
    per_class = [binary_auc((y == c).astype(np.int64), s[:, c]) for c in range(k)]
    finite = [a for a in per_class if not math.isnan(a)]
    return float(np.mean(finite)) if finite else math.nan


def predicted_labels(scores, threshold: float = 0.5) -> np.ndarray:
    """Hard predictions: ``p >= threshold`` for (N,) binary scores, argmax for (N, K)."""
    s = _scores(scores)
    return (s >= threshold).astype(np.int64) if s.ndim == 1 else np.argmax(s, axis=1)


def accuracy(y_true, y_pred) -> float:
    """Fraction of cases whose predicted label equals the true label."""
    p = _labels(y_pred)
    y = _labels(y_true, p.size)
    return float(np.mean(y == p))


def balanced_accuracy(y_true, y_pred) -> float:
    """Mean recall over the classes present in ``y_true`` (scikit-learn's definition)."""
    p = _labels(y_pred)
    y = _labels(y_true, p.size)
    recalls = [float(np.mean(p[y == c] == c)) for c in np.unique(y)]
    return float(np.mean(recalls))


def expected_calibration_error(y_true, probs, n_bins: int = 15) -> float:
    """Top-label expected calibration error with ``n_bins`` equal-width bins (see module doc)."""
    if int(n_bins) < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    p = _scores(probs)
    y = _labels(y_true, p.shape[0])
    if p.min() < 0 or p.max() > 1:
        raise ValueError("probabilities must lie in [0, 1]")
    if p.ndim == 1:
        pred = (p >= 0.5).astype(np.int64)
        conf = np.maximum(p, 1.0 - p)
    else:
        pred = np.argmax(p, axis=1)
        conf = p.max(axis=1)
    correct = (pred == y).astype(np.float64)
    edges = np.linspace(0.0, 1.0, int(n_bins) + 1)
    # Bin m holds (edges[m], edges[m+1]]; right=True puts a value equal to an edge in the lower bin.
    bins = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, int(n_bins) - 1)
    counts = np.bincount(bins, minlength=n_bins).astype(np.float64)
    acc_sum = np.bincount(bins, weights=correct, minlength=n_bins)
    conf_sum = np.bincount(bins, weights=conf, minlength=n_bins)
    filled = counts > 0
    gaps = np.abs(acc_sum[filled] - conf_sum[filled])  # = n_m * |acc_m - conf_m|
    return float(gaps.sum() / y.size)


def classification_metrics(y_true, scores, *, n_bins: int = 15, threshold: float = 0.5) -> dict:
    """AUC, accuracy, balanced accuracy and ECE of one set of predictions."""
    s = _scores(scores)
    y = _labels(y_true, s.shape[0])
    pred = predicted_labels(s, threshold)
    return {
        "auc": roc_auc(y, s),
        "accuracy": accuracy(y, pred),
        "balanced_accuracy": balanced_accuracy(y, pred),
        "ece": expected_calibration_error(y, s, n_bins)
        if s.min() >= 0 and s.max() <= 1
        else math.nan,
    }
