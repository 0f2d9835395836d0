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
    fmt_ci,
    plot_curves,
    plot_slice_overlays,
    plot_subgroup_metric,
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
    )
    ref = np.zeros((24, 24, 10), np.uint8)
    ref[6:16, 8:18, 2:7] = 1
    image = rng.normal(size=ref.shape)
    overlay = plot_slice_overlays(
        [{"image": image, "pred": np.roll(ref, 2, 0), "ref": ref, "title": "case a"},
         {"image": image, "pred": ref, "ref": ref, "spacing": (0.8, 0.8, 3.0), "slice": 3}]
    )  # fmt: skip
    sections = [
        subgroup_section(result, text="Bootstrap 95% CIs."),
        Section("Label efficiency", "Mean ± std over 3 seeds.", figures=[curves, overlay]),
    ]
    out = write_report(tmp_path / "rep", "Evaluation <test>", sections)
    md = out["markdown"].read_text()
    page = out["html"].read_text()

    # Tables: overall, per-site with CIs and sizes, the gap; the small-group warning.
    site_c = next(g for g in result["attributes"]["site"]["groups"] if g["group"] == "C")
    assert site_c["too_small"] and site_c["n"] == 2
    assert "| metric | value [95% CI] | cases |" in md
    assert "| group | n | dice | auc | note |" in md
    dice_c = site_c["metrics"]["dice"]
    cell = fmt_ci(dice_c["value"], dice_c["ci_low"], dice_c["ci_high"])
    assert f"| C | 2 | {cell} |" in md and "too small to judge" in md
    assert "> **Warning:** site='C': 2 cases < min_group_size 10" in md
    assert "Largest gap between site groups" in md
    # Figures: PNG files beside the Markdown, the same images embedded in the HTML.
    links = re.findall(r"!\[[^\]]*\]\((figures/[^)]+\.png)\)", md)
    assert len(links) == len(out["figures"]) == 4  # 2 subgroup plots + curves + overlays
    for rel in links:
        assert (out["markdown"].parent / rel).read_bytes().startswith(PNG)
    embedded = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(embedded) == 4
    assert base64.b64decode(embedded[-1]) == (out["markdown"].parent / links[-1]).read_bytes()
    # HTML: escaped title, tables, no external references; no temporary files left.
    assert "<title>Evaluation &lt;test&gt;</title>" in page and "<table>" in page
    assert cell in page and "too small to judge" in page
    assert not re.search(r'src="(?!data:)', page)
    assert not list((tmp_path / "rep").rglob(".tmp-*"))


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
    with pytest.raises(ValueError, match="same 3-D shape"):
        plot_slice_overlays([{"image": np.zeros((4, 4, 4)), "pred": np.zeros((4, 4, 3)), "ref": 0}])
    with pytest.raises(ValueError, match="series 'a'"):
        plot_curves([1, 2, 3], {"a": [0.1, 0.2]})
