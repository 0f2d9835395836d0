"""Evaluation reports: ``report.md`` (with PNG files beside it) and a self-contained ``report.html``.

A report is a title and a list of :class:`Section` objects, each with text, warnings, tables and
figures. Helpers name metrics the way a reader does ("Dice: liver", not ``dice_4``), turn a
subgroup analysis (:func:`umit.eval.subgroup.analyze_subgroups`) into tables and error-bar plots
(groups too small to judge collapse into one warning line), and draw metric-vs-label-budget curves
with error bars. Case figures (best, median and worst case in three views) are in
:mod:`umit.eval.case_views`. The HTML page is one self-contained file (figures embedded as base64
PNG, no external CSS or script) that reads offline; every file is written atomically.

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

_RED, _BLUE = "#d95f02", "#1f5fa8"


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
figure{display:inline-table;vertical-align:top;margin:1em 1.5em 1.5em 0}
figcaption{display:table-caption;caption-side:bottom;color:#444;font-size:.92em;padding-top:.3em}
img{max-width:100%;height:auto}.scroll{overflow-x:auto}
"""


def _html(title: str, sections: Sequence[Section]) -> str:
    e = html.escape
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{e(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{e(title)}</h1>",
    ]
    for sec in sections:
        out.append(f"<h2>{e(sec.title)}</h2>")
        if sec.text:
            out += [f"<p>{e(p.strip())}</p>" for p in sec.text.strip().split("\n\n")]
        out += [f'<div class="warn"><b>Warning:</b> {e(w)}</div>' for w in sec.warnings]
        for tab in sec.tables:
            out.append('<div class="scroll"><table>')
            if tab.caption:
                out.append(f"<caption>{e(tab.caption)}</caption>")
            out.append("<tr>" + "".join(f"<th>{e(str(h))}</th>" for h in tab.header) + "</tr>")
            for row in tab.rows:
                out.append("<tr>" + "".join(f"<td>{e(fmt(c))}</td>" for c in row) + "</tr>")
            out.append("</table></div>")
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


# -- names a reader understands -----------------------------------------------------------------

_METRIC_NAMES = {
    "dice": "Dice",
    "hd95": "HD95 (mm)",
    "nsd": "NSD",
    "auc": "AUC",
    "accuracy": "accuracy",
    "balanced_accuracy": "balanced accuracy",
    "ece": "ECE (calibration error)",
}


def display_name(key: str, structures: Mapping[int, str] | None = None) -> str:
    """A metric key as a reader sees it: ``dice`` or ``dice_mean`` -> "Dice, mean over
    structures", ``dice_4`` -> "Dice: liver" (with ``structures={4: "liver"}``; "Dice: label 4"
    without a name), ``hd95_4`` -> "HD95 (mm): liver", ``auc`` -> "AUC"; other keys unchanged."""
    base, _, suffix = key.partition("_")
    if key in ("dice", "hd95", "nsd") or (base in ("dice", "hd95", "nsd") and suffix == "mean"):
        return f"{_METRIC_NAMES[base]}, mean over structures"
    if key in _METRIC_NAMES:
        return _METRIC_NAMES[key]
    if base in ("dice", "hd95", "nsd") and suffix.isdigit():
        name = (structures or {}).get(int(suffix)) or f"label {int(suffix)}"
        return f"{_METRIC_NAMES[base]}: {name}"
    return key


def display_names(
    keys: Sequence[str], structures: Mapping[int, str] | None = None
) -> dict[str, str]:
    """``{key: display_name(key, structures)}`` for every key."""
    return {k: display_name(k, structures) for k in keys}


# -- subgroup tables and plots ----------------------------------------------------------------------


def _shown_groups(result: Mapping[str, Any], attribute: str) -> list[Mapping[str, Any]]:
    return [g for g in result["attributes"][attribute]["groups"] if not g["too_small"]]


def subgroup_notes(result: Mapping[str, Any], names: Mapping[str, str] | None = None) -> list[str]:
    """The analysis' warnings, one line per kind instead of one per group: the groups too small
    to show, and the metrics undefined in a shown group."""
    names = names or {}
    small = [
        f"{attr}={g['group']} ({g['n']})"
        for attr, entry in result["attributes"].items()
        for g in entry["groups"]
        if g["too_small"]
    ]
    lines = []
    if small:
        k = len(small)
        lines.append(
            f"{k} subgroup{'s' if k > 1 else ''} with fewer than {result['min_group_size']} "
            f"cases not shown: {', '.join(small)}."
        )
    undefined: dict[str, list[str]] = {}
    for attr, entry in result["attributes"].items():
        for g in entry["groups"]:
            if g["too_small"]:
                continue
            for m, v in g["metrics"].items():
                if v["value"] is None:
                    undefined.setdefault(m, []).append(f"{attr}={g['group']}")
    for m, where in undefined.items():
        lines.append(f"{names.get(m, m)} is undefined in {', '.join(where)}.")
    return lines


def subgroup_tables(
    result: Mapping[str, Any],
    digits: int = 3,
    *,
    names: Mapping[str, str] | None = None,
    metrics: Sequence[str] | None = None,
    overall: bool = True,
) -> list[Table]:
    """Tables of an :func:`~umit.eval.subgroup.analyze_subgroups` result: overall, one per
    attribute (value [CI] per metric and group size, for the groups with at least
    ``min_group_size`` cases; the others are in :func:`subgroup_notes`) and the gaps.

    Args:
        names: Metric key -> name shown (default: the key).
        metrics: The metric keys to show (default: every one).
        overall: Start with the table of all cases.
    """
    names = names or {}
    keys = [m["name"] for m in result["metrics"]]
    if metrics is not None:
        unknown = sorted(set(metrics) - set(keys))
        if unknown:
            raise ValueError(f"unknown metrics {unknown}; have {keys}")
        keys = [k for k in keys if k in metrics]
    label = [names.get(k, k) for k in keys]
    pct = int(round(100 * result["ci"]))
    tables = []
    if overall:
        tables.append(
            Table(
                ["metric", f"value [{pct}% CI]", "cases"],
                [
                    [
                        names.get(k, k),
                        fmt_ci(
                            *(result["overall"][k][f] for f in ("value", "ci_low", "ci_high")),
                            digits,
                        ),
                        result["overall"][k].get("n_with_value", result["n_cases"]),
                    ]
                    for k in keys
                ],
                caption=f"Overall ({result['n_cases']} cases, {result['n_boot']} bootstrap replicates)",
            )
        )
    for attr, entry in result["attributes"].items():
        groups = _shown_groups(result, attr)
        if not groups:
            continue
        rows = [
            [
                g["group"],
                g["n"],
                *(
                    fmt_ci(*(g["metrics"][k][f] for f in ("value", "ci_low", "ci_high")), digits)
                    for k in keys
                ),
            ]
            for g in groups
        ]
        tables.append(
            Table(
                ["group", "cases", *label],
                rows,
                caption=f"By {attr} (value [{pct}% CI]; groups with >= {result['min_group_size']} "
                "cases)",
            )
        )
        gap_rows = []
        for k in keys:
            gap = entry["gaps"][k]
            if gap.get("value") is None:
                continue
            gap_rows.append(
                [
                    names.get(k, k),
                    fmt_ci(gap["value"], gap["ci_low"], gap["ci_high"], digits),
                    gap["best_group"],
                    gap["worst_group"],
                    "CI excludes 0" if gap["ci_excludes_zero"] else "CI includes 0",
                ]
            )
        if gap_rows:
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


def plot_subgroup_metric(
    result: Mapping[str, Any],
    attribute: str,
    metric: str,
    *,
    name: str | None = None,
) -> Figure | None:
    """The metric per group of ``attribute`` (groups with at least ``min_group_size`` cases)
    with CI error bars, the overall value and its CI as a band; None when no group is shown.

    Args:
        name: The metric's name on the plot (default: its key).
    """
    if attribute not in result["attributes"]:
        raise ValueError(f"unknown attribute {attribute!r}; have {sorted(result['attributes'])}")
    if metric not in result["overall"]:
        raise ValueError(f"unknown metric {metric!r}; have {sorted(result['overall'])}")
    groups = [
        g for g in _shown_groups(result, attribute) if g["metrics"][metric]["value"] is not None
    ]
    if not groups:
        return None
    name = name or metric
    fig = new_figure(max(3.5, 0.9 * len(groups) + 1.5), 3.2)
    ax = fig.add_subplot()
    ov = result["overall"][metric]
    if ov["value"] is not None:
        ax.axhline(ov["value"], color=_BLUE, lw=1, label="all cases")
        if ov["ci_low"] is not None:
            ax.axhspan(ov["ci_low"], ov["ci_high"], color=_BLUE, alpha=0.12, lw=0)
    for i, g in enumerate(groups):
        m = g["metrics"][metric]
        lo = m["value"] - m["ci_low"] if m["ci_low"] is not None else 0.0
        hi = m["ci_high"] - m["value"] if m["ci_high"] is not None else 0.0
        ax.errorbar([i], [m["value"]], yerr=[[lo], [hi]], fmt="o", color=_RED, capsize=4)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([f"{g['group']}\n(n={g['n']})" for g in groups], fontsize=8)
    ax.set_xlim(-0.6, len(groups) - 0.4)
    ax.set_ylabel(name)
    pct = int(round(100 * result["ci"]))
    ax.set_title(f"{name} by {attribute} ({pct}% CI)", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return Figure(
        render_png(fig),
        f"{name} by {attribute}: groups with >= {result['min_group_size']} cases, "
        f"{pct}% bootstrap CI; the band is all cases.",
        f"{metric}-by-{attribute}",
    )


def subgroup_section(
    result: Mapping[str, Any],
    title: str = "Subgroup analysis",
    *,
    plots: bool = True,
    text: str = "",
    names: Mapping[str, str] | None = None,
    metrics: Sequence[str] | None = None,
    plot_metrics: Sequence[str] | None = None,
    overall: bool = True,
) -> Section:
    """A report section with the subgroup tables, one plot per attribute and metric of
    ``plot_metrics`` (default: ``metrics``, or every metric) and the analysis' warnings, collapsed
    to a line each (:func:`subgroup_notes`).

    Args:
        names: Metric key -> name shown (default: the key).
        metrics: The metric keys in the tables (default: every one).
        overall: Start with the table of all cases (off when the report shows it already).
    """
    figures = []
    if plots:
        keys = plot_metrics or metrics or [m["name"] for m in result["metrics"]]
        for attr in result["attributes"]:
            for k in keys:
                fig = plot_subgroup_metric(result, attr, k, name=(names or {}).get(k))
                if fig is not None:
                    figures.append(fig)
    return Section(
        title,
        text=text,
        tables=subgroup_tables(result, names=names, metrics=metrics, overall=overall),
        figures=figures,
        warnings=subgroup_notes(result, names),
    )


# -- curves -----------------------------------------------------------------------------------------


def plot_curves(
    x: Sequence[float],
    series: Mapping[str, Any],
    *,
    xlabel: str = "labelled fraction",
    ylabel: str = "Dice",
    title: str = "",
    log_x: bool = False,
    caption: str = "",
) -> Figure:
    """Metric-vs-budget curves with error bars (e.g. test Dice vs labelled fraction per model).

    Args:
        x: The x positions (n_x,).
        series: ``{name: values}`` with values ``(n_runs, n_x)`` (mean ± sd over the runs; no bar
            where fewer than two runs have a value), ``(n_x,)`` (points without bars), a
            ``(mean, sd)`` pair or a ``(mean, low, high)`` triple of ``(n_x,)`` arrays (e.g. a CI).
            Series are drawn slightly apart along x so their bars do not hide each other.
        caption: Figure caption (say what the bars are); default: the title.
    """
    x = np.asarray(x, dtype=float)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"x must be a non-empty 1-D sequence, got shape {x.shape}")
    if not series:
        raise ValueError("no series to plot")
    if log_x and not (x > 0).all():
        raise ValueError(f"log_x needs positive x values, got {x.tolist()}")
    fig = new_figure(5.4, 3.6)
    ax = fig.add_subplot()
    n = len(series)
    for i, (name, vals) in enumerate(series.items()):
        mean, lo, hi = _curve_points(name, vals, x.size)
        shift = (i - (n - 1) / 2) * 0.015  # of a decade (log x) or of the x range
        xs = x * 10**shift if log_x else x + shift * (np.ptp(x) or 1.0)
        yerr = None
        if lo is not None:
            yerr = np.nan_to_num(np.stack([mean - lo, hi - mean]), nan=0.0)
        ax.errorbar(xs, mean, yerr=yerr, marker="o", ms=4, capsize=3, lw=1.4, label=name)
    if log_x:
        ax.set_xscale("log")
        ax.set_xticks(x)
        ax.set_xticklabels([f"{v:g}" for v in x])
        ax.minorticks_off()
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return Figure(
        render_png(fig),
        caption or title or f"{ylabel} vs {xlabel}",
        title or f"{ylabel}-vs-{xlabel}",
    )


def _curve_points(name: str, vals: Any, n_x: int):
    """``(mean, low, high)`` of one curve; low/high None without error bars."""
    if isinstance(vals, tuple) and len(vals) in (2, 3):
        arrs = [np.asarray(v, dtype=float) for v in vals]
        if len(arrs) == 2:
            mean, lo, hi = arrs[0], arrs[0] - arrs[1], arrs[0] + arrs[1]
        else:
            mean, lo, hi = arrs
    else:
        arr = np.asarray(vals, dtype=float)
        if arr.ndim == 1:
            mean, lo, hi = arr, None, None
        elif arr.ndim == 2:
            with warnings.catch_warnings():  # all-NaN columns (missing runs) stay NaN
                warnings.simplefilter("ignore", RuntimeWarning)
                mean = np.nanmean(arr, axis=0)
                count = np.isfinite(arr).sum(axis=0)
                sd = np.where(count > 1, np.nanstd(arr, axis=0, ddof=1), np.nan)
            lo, hi = (mean - sd, mean + sd) if (count > 1).any() else (None, None)
        else:
            raise ValueError(f"series {name!r}: expected (n_runs, n_x) or (n_x,) values")
    for a in (mean, lo, hi):
        if a is not None and a.shape != (n_x,):
            raise ValueError(f"series {name!r}: {a.shape} values for {n_x} x positions")
    return mean, lo, hi
