"""Where the model looked, for the evaluate and demo reports.

For a few evaluated cases, the map of :class:`umit.explain.run.Explainer` (attention rollout for
ViT-based models, window attention for Swin, Grad-CAM for CNNs) computed on the store image and
drawn over it in the three views of :mod:`umit.eval.case_views`:

* segmentation: the median and the worst case by mean Dice, queried at the centre of mass of the
  case's worst structure in the reference (the voxel the model got most wrong; Grad-CAM explains
  that structure's logit), so the figure shows what the model used where it fails;
* classification: per true class, the case the model was most confident about, queried from the
  class token (Grad-CAM: the predicted class; ViTs without a class token fall back to Grad-CAM).

A failure here (a model the explainer cannot handle) never fails the evaluation: the section says
why instead.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from umit.errors import InputError, UmitError
from umit.eval.case_views import (
    ORIENTATION_NOTE,
    VIEW_AXIS,
    VIEW_EDGES,
    VIEWS,
    display_slice,
    grey_window,
    pixel_aspect,
    select_cases,
    structure_centre,
    structure_dice,
    structure_name,
    to_ras,
    worst_structure,
)
from umit.eval.report import Figure, Section, new_figure, render_png
from umit.explain.run import ExplainConfig, Explainer, main_map_name, paste_window

log = logging.getLogger(__name__)

METHOD_TEXT = {
    "attention": "attention rollout over all layers from the query token",
    "window_attention": "Swin window attention, mean over blocks and heads",
    "gradcam": "Grad-CAM at the encoder's deepest level",
}


def plot_heat_views(
    image: np.ndarray,
    heat: np.ndarray,
    *,
    centre: Sequence[int],
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    title: str = "",
    caption: str = "",
    name: str = "explain",
) -> Figure:
    """Axial, coronal and sagittal slices of a RAS volume through ``centre`` with ``heat`` on top
    (jet, transparent where zero) and the query marked with a white cross.

    Args:
        image, heat: ``(i, j, k)`` arrays in RAS voxel order, the same shape.
        centre: Voxel index the slices pass through (the query).
    """
    image, heat = np.asarray(image, np.float32), np.asarray(heat, np.float32)
    if image.ndim != 3 or image.shape != heat.shape:
        raise ValueError(f"image {image.shape} and heat {heat.shape} must be the same 3-D shape")
    if len(centre) != 3 or not all(0 <= c < s for c, s in zip(centre, image.shape, strict=True)):
        raise ValueError(f"centre {tuple(centre)} is outside the volume {image.shape}")
    window = grey_window(image, np.zeros(image.shape, np.uint8))
    vmax = float(heat.max()) if float(heat.max()) > 0 else 1.0
    cross = np.zeros(image.shape, np.uint8)
    cross[tuple(int(c) for c in centre)] = 1
    fig = new_figure(9.6, 3.7)
    for n, view in enumerate(VIEWS):
        k = int(centre[VIEW_AXIS[view]])
        ax = fig.add_subplot(1, 3, n + 1)
        aspect = pixel_aspect(spacing, view)
        ax.imshow(display_slice(image, view, k), cmap="gray", vmin=window[0], vmax=window[1],
                  interpolation="nearest", aspect=aspect)  # fmt: skip
        hm = display_slice(heat, view, k)
        ax.imshow(np.ma.masked_less_equal(hm, 0), cmap="jet", alpha=0.45, vmin=0, vmax=vmax,
                  interpolation="nearest", aspect=aspect)  # fmt: skip
        r, c = np.argwhere(display_slice(cross, view, k))[0]
        ax.plot(c, r, "w+", ms=12, mew=1.5)
        ax.set_axis_off()
        left, right, top, bottom = VIEW_EDGES[view]
        ax.set_title(f"{view} {k + 1}/{image.shape[VIEW_AXIS[view]]} ({left}-{right}, {top} up)",
                     fontsize=9)  # fmt: skip
    if title:
        fig.suptitle(title, fontsize=10)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.02, top=0.84, wspace=0.04)
    return Figure(render_png(fig), caption or title, name)


def ras_index(point: Sequence[int], shape: Sequence[int], affine: np.ndarray) -> tuple[int, ...]:
    """A voxel index of an ``affine`` volume -> the same voxel's index after :func:`to_ras`."""
    marker = np.zeros(tuple(shape), np.uint8)
    marker[tuple(int(p) for p in point)] = 1
    ras, _ = to_ras(marker, affine)
    return tuple(int(v) for v in np.argwhere(ras)[0])


def _queries(
    task: str, rows: list[dict[str, Any]], store: Any, class_names: Sequence[str]
) -> list[dict[str, Any]]:
    """The cases to explain and their queries (see the module docstring)."""
    if task == "segmentation":
        picks = select_cases({r["case_id"]: r.get("dice_mean") for r in rows})
        picks = [p for p in picks if not p["role"].startswith("best")] or picks
        by_id = {r["case_id"]: r for r in rows}
        out = []
        for p in picks:
            worst = worst_structure(structure_dice(by_id[p["case_id"]]))
            label = None if worst is None else worst[0]
            ref = np.asarray(store.case(p["case_id"]).read_label())
            out.append({**p, "label": label, "voxel": structure_centre(ref, ref, label)})
        return out
    out = []
    for cls in range(len(class_names)):
        mine = [r for r in rows if r.get("label") == cls and r.get("score") is not None]
        if not mine:
            continue
        r = max(mine, key=lambda r, cls=cls: _confidence(r["score"], cls))
        role = f"most confident {class_names[cls]}"
        out.append({"role": role, "case_id": r["case_id"], "label": None, "voxel": None,
                    "confidence": _confidence(r["score"], cls)})  # fmt: skip
    return out


def _confidence(score: float | list[float], cls: int) -> float:
    """Probability of class ``cls`` from a per-case ``score`` (binary: P(class 1))."""
    if isinstance(score, list):
        return float(score[cls])
    return float(score) if cls == 1 else 1.0 - float(score)


def explain_section(
    model: Any,
    ckpt: dict[str, Any],
    model_path: Path,
    store: Any,
    rows: list[dict[str, Any]],
    structures: Mapping[int, str] | None = None,
) -> Section | None:
    """The report section "Where the model looked" (None when there is no case to show)."""
    task = ckpt["task"]
    class_names = list(ckpt.get("class_names") or (ckpt.get("spec") or {}).get("class_names") or [])
    queries = _queries(task, rows, store, class_names)
    if not queries:
        return None
    figures, notes = [], []
    method = None
    for q in queries:
        case = store.case(q["case_id"])
        image = np.asarray(case.read(), np.float32)  # (C, X, Y, Z), for the map and the figure
        target = q["label"] if task == "segmentation" else None
        try:
            heat, info = case_map(model, ckpt, model_path, case, q["voxel"], target, image)
        except (UmitError, ValueError, RuntimeError, AttributeError, KeyError, TypeError) as exc:
            log.warning("explain section: %s failed: %s", q["case_id"], exc)
            notes.append(f"{q['case_id']}: not explained ({exc}).")
            continue
        method = info["method"]
        voxel = q["voxel"]
        if voxel is None:
            voxel = tuple(int(v) for v in np.unravel_index(int(np.argmax(heat)), heat.shape))
        img_ras, spacing = to_ras(image[0], case.affine)
        heat_ras, _ = to_ras(heat, case.affine)
        centre = ras_index(voxel, heat.shape, case.affine)
        if task == "segmentation":
            what = (
                f"queried at the centre of {structure_name(q['label'], structures)}, its worst "
                "structure (white cross)"
                if q["label"] is not None
                else "queried at the foreground's centre (white cross)"
            )
            title = f"{q['role'].capitalize()} case {q['case_id']} (mean Dice {q['dice']:.3f})"
        else:
            what = "from the class token" if method == "attention" else "of the predicted class"
            what += "; white cross: the map's peak"
            title = f"{q['role'].capitalize()}: {q['case_id']} (p = {q['confidence']:.3f})"
        caption = (
            f"{title}: {METHOD_TEXT.get(method, method)}, {what}; the model's "
            f"input window only. {ORIENTATION_NOTE}"
        )
        figures.append(
            plot_heat_views(
                img_ras,
                heat_ras,
                centre=centre,
                spacing=spacing,
                title=title,
                caption=caption,
                name=f"explain-{q['case_id']}",
            )  # fmt: skip
        )
    if not figures and not notes:
        return None
    text = (
        "Where the model looked (umit explain on the store image; "
        f"{METHOD_TEXT.get(method or '', 'no map')}). Maps are relative: each figure is scaled to "
        "its own maximum. They show what the model attended to, not why it was right or wrong."
    )
    if notes:
        text += " " + " ".join(notes)
    return Section(title="Where the model looked", text=text, figures=figures)


def case_map(
    model: Any,
    ckpt: dict[str, Any],
    model_path: Path,
    case: Any,
    voxel: Sequence[int] | None,
    target_class: int | None = None,
    image: np.ndarray | None = None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """The main map of one store case on the store grid ``(X, Y, Z)`` (zero outside the model's
    window) and the explainer's info.

    Args:
        case: A :class:`umit.data.store.StoreCase` (``read``, ``affine``, ``pad_values``).
        voxel: Query voxel (store index); None: the class token (classifiers).
        target_class: Grad-CAM's class (None: the explainer's default).
        image: The case's ``(C, X, Y, Z)`` voxels when the caller has read them (else read here).
    """
    if image is None:
        image = np.asarray(case.read(), np.float32)  # (C, X, Y, Z)
    point: Any = "cls"
    if voxel is not None:
        point = tuple(float(v) for v in (np.asarray(case.affine) @ np.array([*voxel, 1.0]))[:3])
    cfg = ExplainConfig(
        inputs=model_path.parent, model=model_path, query=point, target_class=target_class,
        png=False,
    )  # fmt: skip
    try:
        explainer = Explainer(cfg, model=model, ckpt=ckpt)
    except InputError as exc:  # a ViT without a class token: Grad-CAM explains it
        if "class token" not in str(exc):
            raise
        explainer = Explainer(cfg.model_copy(update={"method": "gradcam"}), model=model, ckpt=ckpt)
    pads = list(case.pad_values) if case.pad_values else [0.0] * image.shape[0]
    q_store = None if voxel is None else np.asarray(voxel, int)
    maps, info, offset = explainer.explain_store(image, pads, q_store, source=case.case_id)
    main = maps[main_map_name(maps)]
    return paste_window(main, image.shape[1:], offset), info
