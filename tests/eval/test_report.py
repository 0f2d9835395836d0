"""Report writer: Markdown + self-contained HTML with tables, warnings and embedded plots."""

from __future__ import annotations

import base64
import re

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from umit.eval.report import (  # noqa: E402
    Figure,
    Section,
    Table,
    _curve_points,
    display_name,
    display_names,
    fmt_ci,
    plot_curves,
    plot_subgroup_metric,
    subgroup_notes,
    subgroup_section,
    write_report,
)
from umit.eval.subgroup import MetricSpec, analyze_subgroups  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def result():
    rng = np.random.default_rng(0)
    rows = [
        {
            "case_id": i,
            "site": "A" if i % 2 else ("B" if i < 36 else "C"),
            "dice": float(rng.normal(0.8, 0.05)),
            "label": int(i % 3 == 0),
            "score": float(rng.random()),
        }
        for i in range(40)
    ]
    return analyze_subgroups(rows, ["dice", MetricSpec.auc()], ["site"], n_boot=100)


def test_write_report_markdown_and_html(tmp_path, result):
    rng = np.random.default_rng(1)
    curves = plot_curves(
        [0.05, 0.25, 1.0],
        {
            "scratch": rng.random((3, 3)),
            "pretrained": (np.array([0.6, 0.7, 0.8]), np.full(3, 0.05)),
        },
        title="Dice vs labelled fraction",
        log_x=True,
        caption="Mean ± sd over 3 seeds.",
    )
    sections = [
        subgroup_section(result, text="Bootstrap 95% CIs."),
        Section("Label efficiency", "Mean ± std over 3 seeds.", figures=[curves]),
    ]
    out = write_report(tmp_path / "rep", "Evaluation <test>", sections)
    md = out["markdown"].read_text()
    page = out["html"].read_text()

    # Tables: overall, per-site with CIs and sizes for the groups large enough, the gap; the
    # small group (site C, 2 cases) only in one warning line.
    site_a = next(g for g in result["attributes"]["site"]["groups"] if g["group"] == "A")
    site_c = next(g for g in result["attributes"]["site"]["groups"] if g["group"] == "C")
    assert site_c["too_small"] and site_c["n"] == 2 and not site_a["too_small"]
    assert "| metric | value [95% CI] | cases |" in md
    assert "| group | cases | dice | auc |" in md
    dice_a = site_a["metrics"]["dice"]
    cell = fmt_ci(dice_a["value"], dice_a["ci_low"], dice_a["ci_high"])
    assert f"| A | 20 | {cell} |" in md and "| C |" not in md
    warns = [line for line in md.splitlines() if line.startswith("> **Warning:**")]
    assert warns == ["> **Warning:** 1 subgroup with fewer than 10 cases not shown: site=C (2)."]
    assert "Largest gap between site groups" in md
    # Figures: PNG files beside the Markdown, the same images embedded in the HTML.
    links = re.findall(r"!\[[^\]]*\]\((figures/[^)]+\.png)\)", md)
    assert len(links) == len(out["figures"]) == 3  # 2 subgroup plots + curves
    for rel in links:
        assert (out["markdown"].parent / rel).read_bytes().startswith(PNG)
    embedded = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(embedded) == 3
    assert base64.b64decode(embedded[-1]) == (out["markdown"].parent / links[-1]).read_bytes()
    assert "Mean ± sd over 3 seeds." in page
    # HTML: escaped title, tables, no external references; no temporary files left.
    assert "<title>Evaluation &lt;test&gt;</title>" in page and "<table>" in page
    assert cell in page and "site=C (2)" in page
    assert not re.search(r'(src|href)="(?!data:)', page) and "<script" not in page
    assert not list((tmp_path / "rep").rglob(".tmp-*"))


def test_small_groups_collapse_into_one_line():
    rows = [
        {"case_id": i, "site": "ABCDE"[min(i // 12, 4)] if i < 50 else "F", "dice": 0.5 + i / 200}
        for i in range(56)
    ]  # A-D: 12 cases each, E: 2, F: 6
    rows += [{"case_id": 100, "dice": 0.7}]  # no site: the "(missing)" group, 1 case
    res = analyze_subgroups(rows, ["dice"], ["site"], n_boot=20)
    assert subgroup_notes(res) == [
        "3 subgroups with fewer than 10 cases not shown: site=(missing) (1), site=E (2), "
        "site=F (6)."
    ]
    sec = subgroup_section(res, plots=False)
    assert sec.warnings == subgroup_notes(res)
    by_site = next(t for t in sec.tables if t.caption.startswith("By site"))
    assert [r[0] for r in by_site.rows] == ["A", "B", "C", "D"]


def test_label_names_replace_metric_keys(tmp_path):
    structures = {1: "liver", 2: "kidney_left"}
    assert display_name("dice_1", structures) == "Dice: liver"
    assert display_name("hd95_2", structures) == "HD95 (mm): kidney_left"
    assert display_name("dice_7", structures) == "Dice: label 7"  # no name: the value
    assert display_name("dice", structures) == "Dice, mean over structures"
    assert display_name("hd95_mean") == "HD95 (mm), mean over structures"
    assert display_name("balanced_accuracy") == "balanced accuracy"
    assert display_name("my_metric") == "my_metric"
    rng = np.random.default_rng(2)
    rows = [
        {
            "case_id": i,
            "sex": "FM"[i % 2],
            "dice_mean": float(rng.random()),
            "dice_1": float(rng.random()),
            "dice_2": float(rng.random()),
        }
        for i in range(30)
    ]
    res = analyze_subgroups(rows, ["dice_mean", "dice_1", "dice_2"], ["sex"], n_boot=20)
    names = display_names(list(res["overall"]), structures)
    out = write_report(tmp_path, "names", [subgroup_section(res, names=names)])
    page, md = out["html"].read_text(), out["markdown"].read_text()
    for text in (page, md):
        assert "Dice: liver" in text and "Dice: kidney_left" in text
        assert "dice_1" not in text and "dice_2" not in text


def test_curve_error_bars():
    runs = np.array([[0.5, 0.6, np.nan], [0.7, 0.8, 0.9]])
    mean, lo, hi = _curve_points("a", runs, 3)
    sd = np.std([0.5, 0.7], ddof=1)
    assert mean == pytest.approx([0.6, 0.7, 0.9])
    assert lo[:2] == pytest.approx([0.6 - sd, 0.7 - sd]) and np.isnan(lo[2])  # one run: no bar
    assert _curve_points("a", np.array([[0.5, 0.6]]), 2)[1] is None  # one seed: no bars at all
    m, lo, hi = _curve_points("ci", ([0.5, 0.6], [0.4, 0.5], [0.55, 0.7]), 2)
    assert lo.tolist() == [0.4, 0.5] and hi.tolist() == [0.55, 0.7]
    with pytest.raises(ValueError, match="log_x needs positive"):
        plot_curves([0, 1], {"a": [0.1, 0.2]}, log_x=True)


def test_plots_return_png(result):
    fig = plot_subgroup_metric(result, "site", "auc")
    assert isinstance(fig, Figure) and fig.png.startswith(PNG)
    assert plot_curves([1, 2], {"a": [0.1, 0.2]}).png.startswith(PNG)


def test_bad_inputs(tmp_path, result):
    with pytest.raises(ValueError, match="at least one section"):
        write_report(tmp_path, "t", [])
    with pytest.raises(ValueError, match="row 0 has 1 cells"):
        Table(["a", "b"], [[1]])
    with pytest.raises(ValueError, match="unknown attribute 'sex'"):
        plot_subgroup_metric(result, "sex", "dice")
    with pytest.raises(ValueError, match="unknown metric"):
        plot_subgroup_metric(result, "site", "hd95")
    with pytest.raises(ValueError, match="series 'a'"):
        plot_curves([1, 2, 3], {"a": [0.1, 0.2]})


def test_label_efficiency_figure_error_bars_over_seeds_or_test_cases(tmp_path):
    import json

    from umit.eval.data_efficiency import Budget, cell_dir, label_efficiency_figure

    budgets = [Budget("n2", "n2", count=2, size=2), Budget("all", "all", size=8)]
    results = [
        {"arm": a, "budget": b.key, "seed": s, "n_test": 6, "test": {"dice": 0.5 + 0.1 * s}}
        for a in ("pretrained", "scratch")
        for b in budgets
        for s in (0, 1, 2)
    ]
    fig = label_efficiency_figure(tmp_path, results, budgets, "dice")
    assert fig is not None and fig.png.startswith(PNG)
    assert "Error bars: mean ± sd over seeds (3 seeds)" in fig.caption
    assert "Dice, mean over structures" in fig.caption
    # one seed: the cell's bootstrap CI over test cases, read from its evaluation summary
    one = [r for r in results if r["seed"] == 0]
    for r in one:
        path = cell_dir(tmp_path, r["arm"], next(b for b in budgets if b.key == r["budget"]), 0)
        overall = {"dice": {"value": 0.5, "ci_low": 0.4, "ci_high": 0.6}}
        (path / "eval").mkdir(parents=True)
        (path / "eval" / "summary.json").write_text(json.dumps({"result": {"overall": overall}}))
    fig = label_efficiency_figure(tmp_path, one, budgets, "dice")
    assert "one seed: its 95% bootstrap CI over the 6 test cases" in fig.caption
    nothing = [{**r, "test": {"dice": None}} for r in one]
    assert label_efficiency_figure(tmp_path, nothing, budgets, "dice") is None
