"""Case figures a radiologist can read: the best, median and worst test case in three views.

For each chosen case, one figure with an axial, a coronal and a sagittal slice through the centre
of mass of the case's *worst* structure (lowest Dice, in the reference; in the prediction when the
reference lacks it), so the figure shows where the model fails rather than where it is easy. The
image is drawn in grey; the reference and the prediction as outlines along the voxel edges where
the label changes: reference in a wide green line, prediction in a narrower magenta line on top
(where they agree, the magenta line runs inside the green one).

Orientation: volumes are shown in radiological convention from RAS-ordered voxel axes (the store's
orientation; other affines are reoriented first). Axial slices are seen from the feet with
anterior up and the patient's right on the image left; coronal slices are seen from the front
with superior up and the patient's right on the image left; sagittal slices have superior up and
anterior on the left. Each panel has the direction letters at its edges.

Plots use matplotlib's object API (no ``pyplot``), like :mod:`umit.eval.report`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from umit.data.io import reorient
from umit.data.meta import ImageMeta
from umit.eval.report import Figure, new_figure, render_png

VIEWS = ("axial", "coronal", "sagittal")
REFERENCE_COLOR = "#00dd00"  # green
PREDICTION_COLOR = "#ff00ff"  # magenta (the colour-blind-safe partner of green)
ORIENTATION_NOTE = (
    "Radiological convention: axial (seen from the feet, anterior up) and coronal (seen from the "
    "front, superior up) views show the patient's right on the image left; sagittal views show "
    "anterior on the left, superior up."
)
_REF_WIDTH, _PRED_WIDTH = 3.0, 1.3  # points: the prediction's line runs inside the reference's
VIEW_AXIS = {"axial": 2, "coronal": 1, "sagittal": 0}  # the RAS axis a view cuts across
VIEW_EDGES = {  # letters at the (left, right, top, bottom) edges of a displayed slice
    "axial": ("R", "L", "A", "P"),
    "coronal": ("R", "L", "S", "I"),
    "sagittal": ("A", "P", "S", "I"),
}


# -- choosing cases ---------------------------------------------------------------------------------


def _number(v: Any) -> float:
    """A float from a number or a CSV cell (NaN when empty or not a number)."""
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def select_cases(mean_dice: Mapping[str, float | None]) -> list[dict[str, Any]]:
    """The best, median and worst case by mean Dice.

    Cases without a finite value are left out (values may be CSV strings). Ties go to the smaller case id; the median of an
    even count is the lower one. A case that fills several roles (one or two cases) appears once,
    with the roles joined ("median and worst").

    Returns:
        ``[{"role", "case_id", "dice", "rank"}]`` in the order best, median, worst; ``rank`` is
        1 for the best of ``n`` cases.
    """
    ok = {str(c): _number(v) for c, v in mean_dice.items()}
    ok = {c: v for c, v in ok.items() if math.isfinite(v)}
    if not ok:
        return []
    order = sorted(ok, key=lambda c: (-ok[c], c))  # best first
    n = len(order)
    picks = {"best": 0, "median": n - 1 - (n - 1) // 2, "worst": n - 1}
    out: list[dict[str, Any]] = []
    for role, i in picks.items():
        if out and out[-1]["rank"] == i + 1:
            out[-1]["role"] = out[-1]["role"].replace(" and ", ", ") + f" and {role}"
            continue
        out.append({"role": role, "case_id": order[i], "dice": ok[order[i]], "rank": i + 1})
    return out


# -- geometry of a displayed slice ------------------------------------------------------------------


def to_ras(volume: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, tuple[float, ...]]:
    """``volume`` (i, j, k) with its voxel axes permuted/flipped to RAS, and its spacing then."""
    out, meta = reorient(np.asarray(volume), ImageMeta(affine=affine), "RAS")
    return out, meta.spacing


def display_slice(volume: np.ndarray, view: str, index: int) -> np.ndarray:
    """Slice ``index`` of a RAS volume (i, j, k) as shown on screen: row 0 at the top, column 0
    at the left, in radiological convention (see the module docstring)."""
    if view not in VIEW_AXIS:
        raise ValueError(f"view must be one of {VIEWS}, got {view!r}")
    s = np.take(
        volume, index, axis=VIEW_AXIS[view]
    )  # axial (i, j), coronal (i, k), sagittal (j, k)
    # (a, b) -> (b, a): rows along the second axis; then high j / k at the top (A, S) and high
    # i (R) or high j (A) at the left.
    return s.T[::-1, ::-1]


def pixel_aspect(spacing: Sequence[float], view: str) -> float:
    """Height / width of one displayed pixel (spacing of the row axis / the column axis)."""
    rows, cols = {"axial": (1, 0), "coronal": (2, 0), "sagittal": (2, 1)}[view]
    return float(spacing[rows]) / float(spacing[cols])


def outline_segments(labels: np.ndarray) -> np.ndarray:
    """Unit segments along the pixel edges where a 2-D label map changes value.

    Includes the edges between two different structures and between a structure and the image
    border. Coordinates are matplotlib ``imshow`` data coordinates ``(x, y)`` (pixel centres at
    integers, so edges at half-integers).

    Returns:
        ``(n, 2, 2)`` float array: ``n`` segments of two ``(x, y)`` end points.
    """
    lab = np.asarray(labels)
    if lab.ndim != 2:
        raise ValueError(f"labels must be 2-D, got shape {lab.shape}")
    p = np.pad(lab, 1)  # the border counts as background
    r, c = np.nonzero(p[1:-1, 1:] != p[1:-1, :-1])  # (H, W+1): between columns c-1 and c
    vertical = np.stack(
        [np.stack([c - 0.5, r - 0.5], 1), np.stack([c - 0.5, r + 0.5], 1)], axis=1
    )  # (n, 2 ends, (x, y))
    r, c = np.nonzero(p[1:, 1:-1] != p[:-1, 1:-1])  # (H+1, W): between rows r-1 and r
    horizontal = np.stack(
        [np.stack([c - 0.5, r - 0.5], 1), np.stack([c + 0.5, r - 0.5], 1)], axis=1
    )
    return np.concatenate([vertical, horizontal]).astype(float)


def structure_centre(ref: np.ndarray, pred: np.ndarray, label: int | None) -> tuple[int, int, int]:
    """Voxel index of the centre of mass of ``label`` in the reference (in the prediction when the
    reference lacks it); of the whole reference foreground when ``label`` is None; else the
    volume's centre."""
    masks = [ref == label, pred == label] if label is not None else [ref > 0, pred > 0]
    for m in masks:
        if m.any():
            return tuple(int(round(float(x.mean()))) for x in np.nonzero(m))
    return tuple(s // 2 for s in ref.shape)


# -- drawing ----------------------------------------------------------------------------------------


def draw_view(
    ax,
    image: np.ndarray,
    ref: np.ndarray,
    pred: np.ndarray,
    *,
    aspect: float = 1.0,
    window: tuple[float, float] | None = None,
    letters: tuple[str, str, str, str] | None = None,
) -> None:
    """One displayed slice on ``ax``: the image in grey, reference and prediction outlines.

    Args:
        image, ref, pred: 2-D arrays in screen orientation (row 0 at the top).
        aspect: Height / width of a pixel.
        window: Grey-level range (default: the slice's 1st-99th percentile).
        letters: Direction letters at the (left, right, top, bottom) edges.
    """
    from matplotlib.collections import LineCollection  # optional heavy: only when drawing

    lo, hi = window if window is not None else np.percentile(image, [1, 99])
    ax.imshow(
        image,
        cmap="gray",
        vmin=lo,
        vmax=hi if hi > lo else lo + 1,
        interpolation="nearest",
        aspect=aspect,
    )
    for labels, color, width in (
        (ref, REFERENCE_COLOR, _REF_WIDTH),
        (pred, PREDICTION_COLOR, _PRED_WIDTH),
    ):
        segs = outline_segments(labels)
        if len(segs):  # axis-parallel lines: no antialiasing, so colours stay pure where they meet
            ax.add_collection(
                LineCollection(
                    segs, colors=color, linewidths=width, capstyle="projecting", antialiaseds=False
                )
            )
    ax.set_xlim(-0.5, image.shape[1] - 0.5)
    ax.set_ylim(image.shape[0] - 0.5, -0.5)
    ax.set_axis_off()
    if letters:
        from matplotlib.patheffects import withStroke

        style = {
            "transform": ax.transAxes,
            "color": "white",
            "fontsize": 8,
            "fontweight": "bold",
            "path_effects": [withStroke(linewidth=2, foreground="black")],
        }
        for (x, y, ha, va), text in zip(
            [(0.02, 0.5, "left", "center"), (0.98, 0.5, "right", "center"),
             (0.5, 0.98, "center", "top"), (0.5, 0.02, "center", "bottom")],
            letters,
            strict=True,
        ):  # fmt: skip
            ax.text(x, y, text, ha=ha, va=va, **style)


def grey_window(image: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    """Grey-level range of a case: the 1st-99th percentile inside the labelled structures (the
    whole volume when fewer than 100 voxels are labelled), so that air outside the body does not
    take up the grey range, whatever the intensity scale (HU or normalized)."""
    inside = image[ref > 0] if (ref > 0).sum() >= 100 else image.ravel()
    lo, hi = (float(v) for v in np.percentile(inside, [1, 99]))
    return (lo, hi) if hi > lo else (lo, lo + 1.0)


def plot_case_views(
    image: np.ndarray,
    pred: np.ndarray,
    ref: np.ndarray,
    *,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    centre: Sequence[int] | None = None,
    title: str = "",
    caption: str = "",
    name: str = "case",
) -> Figure:
    """Axial, coronal and sagittal slices of a RAS volume through ``centre`` with the reference
    (green) and predicted (magenta) outlines and a legend.

    Args:
        image, pred, ref: ``(i, j, k)`` arrays in RAS voxel order (see :func:`to_ras`); ``pred``
            and ``ref`` integer label maps.
        spacing: Voxel size in mm along i, j, k (for the aspect ratio).
        centre: Voxel index the three slices pass through (default: the centre of mass of the
            reference foreground).
    """
    image, pred, ref = (np.asarray(a) for a in (image, pred, ref))
    if image.ndim != 3 or image.shape != pred.shape or pred.shape != ref.shape:
        raise ValueError(
            f"image {image.shape}, pred {pred.shape} and ref {ref.shape} must be the same 3-D shape"
        )
    centre = tuple(centre) if centre is not None else structure_centre(ref, pred, None)
    if len(centre) != 3 or not all(0 <= c < s for c, s in zip(centre, image.shape, strict=True)):
        raise ValueError(f"centre {centre} is outside the volume {image.shape}")
    window = grey_window(image, ref)
    from matplotlib.lines import Line2D

    fig = new_figure(9.6, 3.9)
    for n, view in enumerate(VIEWS):
        axis = VIEW_AXIS[view]
        k = int(centre[axis])
        ax = fig.add_subplot(1, 3, n + 1)
        draw_view(
            ax,
            display_slice(image, view, k),
            display_slice(ref, view, k),
            display_slice(pred, view, k),
            aspect=pixel_aspect(spacing, view),
            window=window,
            letters=VIEW_EDGES[view],
        )
        ax.set_title(f"{view} {k + 1}/{image.shape[axis]}", fontsize=9)
    fig.legend(
        handles=[
            Line2D([], [], color=REFERENCE_COLOR, lw=_REF_WIDTH, label="reference"),
            Line2D([], [], color=PREDICTION_COLOR, lw=_PRED_WIDTH, label="prediction"),
        ],
        loc="lower center",
        ncol=2,
        fontsize=9,
        frameon=False,
    )
    if title:
        fig.suptitle(title, fontsize=10)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.09, top=0.86, wspace=0.04)
    return Figure(render_png(fig), caption or title, name)


def structure_name(label: int, structures: Mapping[int, str] | None) -> str:
    """The structure's name (``label 3`` when it has none)."""
    return (structures or {}).get(int(label)) or f"label {int(label)}"


def structure_dice(row: Mapping[str, Any]) -> dict[int, Any]:
    """``{label value: Dice}`` from a per-case row's ``dice_<label>`` columns (``dice_mean`` and
    other non-numeric suffixes left out)."""
    return {
        int(k.split("_", 1)[1]): v
        for k, v in row.items()
        if k.startswith("dice_") and k.split("_", 1)[1].isdigit()
    }


def worst_structure(dice: Mapping[int, Any]) -> tuple[int, float] | None:
    """``(label, dice)`` of the structure with the lowest finite Dice (ties: the smaller label);
    None when no structure has one. Values may be CSV strings."""
    finite = {int(k): _number(v) for k, v in dice.items()}
    finite = {k: v for k, v in finite.items() if math.isfinite(v)}
    if not finite:
        return None
    k = min(finite, key=lambda k: (finite[k], k))
    return k, finite[k]


def case_figure(
    pick: Mapping[str, Any],
    image: np.ndarray,
    pred: np.ndarray,
    ref: np.ndarray,
    *,
    dice: Mapping[int, float],
    structures: Mapping[int, str] | None = None,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    affine: np.ndarray | None = None,
    n_cases: int | None = None,
) -> Figure:
    """The figure of one case chosen by :func:`select_cases`, centred on its worst structure.

    Args:
        pick: One entry of :func:`select_cases` (role, case_id, dice, rank).
        image, pred, ref: ``(i, j, k)`` arrays; reoriented to RAS when ``affine`` is given.
        dice: Per-structure Dice of the case, ``{label value: dice}``.
        structures: Label value -> structure name.
        spacing: Voxel size in mm along i, j, k (ignored when ``affine`` is given).
        affine: Voxel-to-world affine of the arrays (None: already in RAS voxel order).
        n_cases: Cases the pick was chosen from (for the caption).
    """
    spacing = tuple(float(s) for s in spacing)
    if affine is not None:
        (image, spacing), (pred, _), (ref, _) = (to_ras(a, affine) for a in (image, pred, ref))
    finite = {int(k): _number(v) for k, v in dice.items()}
    finite = {k: v for k, v in finite.items() if math.isfinite(v)}
    worst = worst_structure(finite)
    centre = structure_centre(
        np.asarray(ref), np.asarray(pred), None if worst is None else worst[0]
    )
    role, case_id = str(pick["role"]), str(pick["case_id"])
    of = f" of {n_cases}" if n_cases else ""
    where = (
        f"Slices through the centre of mass of its worst structure, "
        f"{structure_name(worst[0], structures)} (Dice {worst[1]:.3f})."
        if worst is not None
        else "Slices through the centre of mass of the reference foreground."
    )
    caption = (
        f"{role.capitalize()} case{of} by mean Dice: {case_id}, mean Dice {pick['dice']:.3f} "
        f"over {len(finite)} structures. {where} Reference outlined in green, prediction in "
        f"magenta. {ORIENTATION_NOTE}"
    )
    title = f"{role.capitalize()} case: {case_id} (mean Dice {pick['dice']:.3f})"
    return plot_case_views(
        image,
        pred,
        ref,
        spacing=spacing,
        centre=centre,
        title=title,
        caption=caption,
        name=f"{role.split()[0]}-case",
    )
