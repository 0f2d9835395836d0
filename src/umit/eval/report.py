"""Evaluation reports: ``report.md`` (with PNG files beside it) and a self-contained ``report.html``.

A report is a title and a list of :class:`Section` objects, each with text, warnings, tables and
figures. Helpers turn a subgroup analysis (:func:`umit.eval.subgroup.analyze_subgroups`) into
tables and error-bar plots, draw metric-vs-label-fraction curves with mean ± std bands, and show
image slices with predicted and reference contours. Every file is written atomically.

Plots use matplotlib's object API (``matplotlib.figure.Figure`` rendered by the Agg canvas), never
``pyplot``, so no global backend is changed and no display is needed.
"""

from __future__ import annotations

import base64
import html
import io
import math
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from umit.utils.fileio import atomic_write_bytes, atomic_write_text

_GREEN, _RED, _BLUE, _GREY = "#1b9e77", "#d95f02", "#1f5fa8", "#9a9a9a"


@dataclass
class Table:
    """A table: header cells, rows of cells (anything ``str()``-able; None prints as "-")."""

    header: Sequence[str]
    rows: Sequence[Sequence[Any]]
    caption: str = ""

    def __post_init__(self) -> None:
        for i, row in enumerate(self.rows):
            if len(row) != len(self.header):
                raise ValueError(
                    f"table {self.caption!r}: row {i} has {len(row)} cells, header {len(self.header)}"
                )


@dataclass
class Figure:
    """A rendered plot: PNG bytes, a caption and a short file-name stem."""

    png: bytes
    caption: str = ""
    name: str = "figure"


@dataclass
class Section:
    """One report section."""

    title: str
    text: str = ""
    tables: list[Table] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


# -- formatting ------------------------------------------------------------------------------------


def fmt(value: Any, digits: int = 3) -> str:
    """A cell: floats with ``digits`` decimals, None/NaN as "-"."""
    if value is None:
        return "-"
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (float, np.floating)):
        if math.isnan(value):
            return "-"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return f"{value:.{digits}f}"
    return str(value)


def fmt_ci(value: float | None, low: float | None, high: float | None, digits: int = 3) -> str:
    """``0.812 [0.790, 0.833]`` (or just the value when the CI is undefined)."""
    if value is None:
        return "-"
    if low is None or high is None:
        return fmt(value, digits)
    return f"{fmt(value, digits)} [{fmt(low, digits)}, {fmt(high, digits)}]"


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40] or "figure"


def _md_cell(value: Any) -> str:
    return fmt(value).replace("|", "\\|").replace("\n", " ")


# -- writing ---------------------------------------------------------------------------------------


def _markdown(title: str, sections: Sequence[Section], fig_paths: dict[int, str]) -> str:
    lines = [f"# {title}", ""]
    for sec in sections:
        lines += [f"## {sec.title}", ""]
        if sec.text:
            lines += [sec.text.strip(), ""]
        for w in sec.warnings:
            lines += [f"> **Warning:** {w}", ""]
        for tab in sec.tables:
            if tab.caption:
                lines += [f"**{tab.caption}**", ""]
            lines.append("| " + " | ".join(_md_cell(h) for h in tab.header) + " |")
            lines.append("|" + "|".join("---" for _ in tab.header) + "|")
            lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in tab.rows]
            lines.append("")
        for fig in sec.figures:
            lines += [f"![{fig.caption}]({fig_paths[id(fig)]})", ""]
            if fig.caption:
                lines += [f"*{fig.caption}*", ""]
    return "\n".join(lines).rstrip() + "\n"


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1100px;
margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}
th,td{border:1px solid #ccc;padding:.25em .6em;text-align:right}
th{background:#f2f2f2}td:first-child,th:first-child{text-align:left}
caption{font-weight:600;text-align:left;padding-bottom:.3em}
.warn{background:#fff4e5;border-left:4px solid #f0a030;padding:.4em .8em;margin:.4em 0}
figure{margin:1em 0}figcaption{font-style:italic;color:#555}img{max-width:100%}
"""


def _html(title: str, sections: Sequence[Section]) -> str:
    e = html.escape
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{e(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{e(title)}</h1>",
    ]
    for sec in sections:
        out.append(f"<h2>{e(sec.title)}</h2>")
        if sec.text:
            out += [f"<p>{e(p.strip())}</p>" for p in sec.text.strip().split("\n\n")]
        out += [f'<div class="warn"><b>Warning:</b> {e(w)}</div>' for w in sec.warnings]
        for tab in sec.tables:
            out.append("<table>")
            if tab.caption:
                out.append(f"<caption>{e(tab.caption)}</caption>")
            out.append("<tr>" + "".join(f"<th>{e(str(h))}</th>" for h in tab.header) + "</tr>")
            for row in tab.rows:
                out.append("<tr>" + "".join(f"<td>{e(fmt(c))}</td>" for c in row) + "</tr>")
            out.append("</table>")
        for fig in sec.figures:
            b64 = base64.b64encode(fig.png).decode("ascii")
            out.append(
                f'<figure><img alt="{e(fig.caption)}" src="data:image/png;base64,{b64}">'
                f"<figcaption>{e(fig.caption)}</figcaption></figure>"
            )
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def write_report(
    out_dir: str | Path, title: str, sections: Sequence[Section], *, stem: str = "report"
) -> dict[str, Path]:
    """Write ``<stem>.md`` (figures as PNG files under ``figures/``) and a self-contained
    ``<stem>.html`` (figures embedded as base64 PNG) into ``out_dir``.

    Returns:
        ``{"markdown": path, "html": path, "figures": [paths]}``.
    """
    if not sections:
        raise ValueError("a report needs at least one section")
    if not all(isinstance(s, Section) for s in sections):
        raise ValueError("sections must be Section objects")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fig_paths: dict[int, str] = {}
    written = []
    n = 0
    for sec in sections:
        for fig in sec.figures:
            n += 1
            rel = f"figures/{stem}-{n:02d}-{_slug(fig.name)}.png"
            atomic_write_bytes(out_dir / rel, fig.png)
            fig_paths[id(fig)] = rel
            written.append(out_dir / rel)
    md, page = out_dir / f"{stem}.md", out_dir / f"{stem}.html"
    atomic_write_text(md, _markdown(title, sections, fig_paths))
    atomic_write_text(page, _html(title, sections))
    return {"markdown": md, "html": page, "figures": written}


# -- subgroup tables and plots ----------------------------------------------------------------------


def subgroup_tables(result: Mapping[str, Any], digits: int = 3) -> list[Table]:
    """Tables of an :func:`~umit.eval.subgroup.analyze_subgroups` result: overall, one per
    attribute (value [CI] per metric, group size, "too small" flag) and the gaps."""
    names = [m["name"] for m in result["metrics"]]
    pct = int(round(100 * result["ci"]))
    tables = [
        Table(
            ["metric", f"value [{pct}% CI]", "cases"],
            [
                [
                    n,
                    fmt_ci(
                        *(result["overall"][n][k] for k in ("value", "ci_low", "ci_high")), digits
                    ),
                    result["overall"][n].get("n_with_value", result["n_cases"]),
                ]
                for n in names
            ],
            caption=f"Overall ({result['n_cases']} cases, {result['n_boot']} bootstrap replicates)",
        )
    ]
    for attr, entry in result["attributes"].items():
        rows = []
        for g in entry["groups"]:
            cells = [
                fmt_ci(*(g["metrics"][n][k] for k in ("value", "ci_low", "ci_high")), digits)
                for n in names
            ]
            rows.append(
                [g["group"], g["n"], *cells, "too small to judge" if g["too_small"] else ""]
            )
        tables.append(Table(["group", "n", *names, "note"], rows, caption=f"By {attr}"))
        gap_rows = []
        for n in names:
            gap = entry["gaps"][n]
            if gap.get("value") is None:
                gap_rows.append([n, "-", "-", "-", gap.get("reason", "")])
                continue
            gap_rows.append(
                [
                    n,
                    fmt_ci(gap["value"], gap["ci_low"], gap["ci_high"], digits),
                    gap["best_group"],
                    gap["worst_group"],
                    "CI excludes 0" if gap["ci_excludes_zero"] else "CI includes 0",
                ]
            )
        tables.append(
            Table(
                ["metric", f"gap [{pct}% CI]", "best group", "worst group", "note"],
                gap_rows,
                caption=f"Largest gap between {attr} groups (groups with >= "
                f"{result['min_group_size']} cases)",
            )
        )
    return tables


def render_png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def new_figure(width: float, height: float):
    try:
        from matplotlib.figure import (
            Figure as MplFigure,  # optional heavy: matplotlib only when a figure is drawn
        )
    except ImportError as exc:  # pragma: no cover - matplotlib is a dependency of reports
        raise ImportError("plots need matplotlib: pip install matplotlib") from exc
    return MplFigure(figsize=(width, height))


def plot_subgroup_metric(result: Mapping[str, Any], attribute: str, metric: str) -> Figure:
    """The metric per group of ``attribute`` with CI error bars, the overall value and its CI as
    a band; groups too small to judge are drawn hollow and grey."""
    if attribute not in result["attributes"]:
        raise ValueError(f"unknown attribute {attribute!r}; have {sorted(result['attributes'])}")
    if metric not in result["overall"]:
        raise ValueError(f"unknown metric {metric!r}; have {sorted(result['overall'])}")
    groups = result["attributes"][attribute]["groups"]
    fig = new_figure(max(3.5, 0.9 * len(groups) + 1.5), 3.2)
    ax = fig.add_subplot()
    ov = result["overall"][metric]
    if ov["value"] is not None:
        ax.axhline(ov["value"], color=_BLUE, lw=1, label="overall")
        if ov["ci_low"] is not None:
            ax.axhspan(ov["ci_low"], ov["ci_high"], color=_BLUE, alpha=0.12, lw=0)
    for i, g in enumerate(groups):
        m = g["metrics"][metric]
        if m["value"] is None:
            continue
        color = _GREY if g["too_small"] else _RED
        lo = m["value"] - m["ci_low"] if m["ci_low"] is not None else 0.0
        hi = m["ci_high"] - m["value"] if m["ci_high"] is not None else 0.0
        ax.errorbar(
            [i],
            [m["value"]],
            yerr=[[lo], [hi]],
            fmt="o",
            color=color,
            capsize=4,
            mfc="white" if g["too_small"] else color,
        )
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(
        [f"{g['group']}\n(n={g['n']}{', small' if g['too_small'] else ''})" for g in groups],
        fontsize=8,
    )
    ax.set_xlim(-0.6, len(groups) - 0.4)
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} by {attribute} ({int(round(100 * result['ci']))}% CI)", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return Figure(render_png(fig), f"{metric} by {attribute}", f"{metric}-by-{attribute}")


def subgroup_section(
    result: Mapping[str, Any],
    title: str = "Subgroup analysis",
    *,
    plots: bool = True,
    text: str = "",
) -> Section:
    """A report section with every subgroup table, one plot per (attribute, metric) and the
    warnings of the analysis."""
    figures = []
    if plots:
        for attr in result["attributes"]:
            for m in result["metrics"]:
                figures.append(plot_subgroup_metric(result, attr, m["name"]))
    return Section(
        title,
        text=text,
        tables=subgroup_tables(result),
        figures=figures,
        warnings=list(result.get("warnings", [])),
    )


# -- curves and overlays ----------------------------------------------------------------------------


def plot_curves(
    x: Sequence[float],
    series: Mapping[str, Any],
    *,
    xlabel: str = "labelled fraction",
    ylabel: str = "Dice",
    title: str = "",
    log_x: bool = False,
) -> Figure:
    """Line plot of several curves with mean ± std bands (e.g. metric vs label fraction).

    Args:
        x: The x positions (n_x,).
        series: ``{name: values}`` with values ``(n_runs, n_x)`` (mean and std over runs are
            drawn), ``(n_x,)`` (a plain line), or a ``(mean, std)`` pair of ``(n_x,)`` arrays.
    """
    x = np.asarray(x, dtype=float)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"x must be a non-empty 1-D sequence, got shape {x.shape}")
    if not series:
        raise ValueError("no series to plot")
    fig = new_figure(5.0, 3.4)
    ax = fig.add_subplot()
    for name, vals in series.items():
        if isinstance(vals, tuple) and len(vals) == 2:
            mean, std = (np.asarray(v, dtype=float) for v in vals)
        else:
            arr = np.asarray(vals, dtype=float)
            if arr.ndim == 1:
                mean, std = arr, None
            elif arr.ndim == 2:
                with warnings.catch_warnings():  # all-NaN columns (missing runs) stay NaN
                    warnings.simplefilter("ignore", RuntimeWarning)
                    mean = np.nanmean(arr, axis=0)
                    std = np.nanstd(arr, axis=0, ddof=1) if arr.shape[0] > 1 else None
            else:
                raise ValueError(f"series {name!r}: expected (n_runs, n_x) or (n_x,) values")
        if mean.shape != x.shape or (std is not None and std.shape != x.shape):
            raise ValueError(f"series {name!r}: {mean.shape} values for {x.size} x positions")
        (line,) = ax.plot(x, mean, marker="o", ms=3, label=name)
        if std is not None:
            ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.2, lw=0)
    if log_x:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return Figure(
        render_png(fig), title or f"{ylabel} vs {xlabel}", title or f"{ylabel}-vs-{xlabel}"
    )


def _best_slice(ref: np.ndarray, pred: np.ndarray, axis: int) -> int:
    other = tuple(a for a in range(3) if a != axis)
    area = (ref > 0).sum(axis=other)
    if not area.any():
        area = (pred > 0).sum(axis=other)
    return int(np.argmax(area)) if area.any() else ref.shape[axis] // 2


def plot_slice_overlays(
    cases: Sequence[Mapping[str, Any]],
    *,
    axis: int = 2,
    title: str = "Predicted (red) and reference (green) contours",
    window: tuple[float, float] | None = None,
) -> Figure:
    """One panel per case: an image slice with the reference and predicted label contours.

    Args:
        cases: Mappings with ``image`` (X, Y, Z), ``pred`` and ``ref`` (integer label maps of the
            same shape), optional ``title``, ``slice`` (index along ``axis``; default: the
            slice with the largest reference area) and ``spacing`` (voxel size in mm, for the
            aspect ratio of anisotropic volumes).
        axis: The axis the slices are taken across (2 = axial for RAS volumes).
        window: Display intensity range (default: the 1st-99th percentile of the slice).
    """
    if not cases:
        raise ValueError("no cases to show")
    if axis not in (0, 1, 2):
        raise ValueError(f"axis must be 0, 1 or 2, got {axis}")
    fig = new_figure(3.0 * len(cases), 3.3)
    for i, case in enumerate(cases):
        image, pred, ref = (np.asarray(case[k]) for k in ("image", "pred", "ref"))
        if image.ndim != 3 or image.shape != pred.shape or pred.shape != ref.shape:
            raise ValueError(
                f"case {i}: image {image.shape}, pred {pred.shape} and ref {ref.shape} must be the "
                "same 3-D shape"
            )
        k = int(case.get("slice", _best_slice(ref, pred, axis)))
        if not 0 <= k < image.shape[axis]:
            raise ValueError(f"case {i}: slice {k} outside 0..{image.shape[axis] - 1}")
        img, p, r = (np.take(a, k, axis=axis).T for a in (image, pred, ref))  # rows = 2nd axis
        lo, hi = window if window is not None else np.percentile(img, [1, 99])
        ax = fig.add_subplot(1, len(cases), i + 1)
        rows_ax, cols_ax = [d for d in range(3) if d != axis][::-1]
        sp = case.get("spacing")
        aspect = float(sp[rows_ax]) / float(sp[cols_ax]) if sp is not None else 1.0
        ax.imshow(
            img, cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1, origin="lower", aspect=aspect
        )
        for labels, color in ((r, _GREEN), (p, _RED)):
            for lab in np.unique(labels):
                if lab == 0:
                    continue
                mask = (labels == lab).astype(float)
                if mask.any() and not mask.all():
                    ax.contour(mask, levels=[0.5], colors=color, linewidths=1.0)
        ax.set_title(str(case.get("title", f"case {i}")) + f" [{k}]", fontsize=9)
        ax.set_axis_off()
    fig.suptitle(title, fontsize=10)
    return Figure(render_png(fig), title, "slice-overlays")
