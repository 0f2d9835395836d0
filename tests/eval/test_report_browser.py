"""The HTML report in a real browser: headless Chromium loads it offline with no console errors,
every embedded image decodes, and a screenshot is written for the reviewer.

Chromium is Debian's ``chromium`` (``.ci/run`` installs it when missing); set ``UMIT_CHROMIUM``
to use another binary. The tests skip, saying why, only when no Chromium can be found.
"""

from __future__ import annotations

import html
import io
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from torch import nn

pytest.importorskip("matplotlib")

pytestmark = pytest.mark.browser

_PROBE = """<script>
window.__umitErrors = [];
window.addEventListener("error", function (e) {
  var t = e.target || {};
  window.__umitErrors.push(String(e.message || ("failed to load " + (t.src || t.href || t.tagName))));
}, true);
var __umitConsoleError = console.error;
console.error = function () {
  window.__umitErrors.push(Array.prototype.map.call(arguments, String).join(" "));
  __umitConsoleError.apply(console, arguments);
};
window.addEventListener("load", function () {
  var out = {
    errors: window.__umitErrors,
    images: Array.prototype.map.call(document.images, function (i) {
      return {width: i.naturalWidth, height: i.naturalHeight, complete: i.complete};
    }),
    fetched: performance.getEntriesByType("resource").map(function (r) { return r.name; })
      .filter(function (n) { return n.indexOf("data:") !== 0; }),
    height: document.documentElement.scrollHeight,
    text: document.body.innerText
  };
  var pre = document.createElement("pre");
  pre.id = "umit-probe";
  pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script>"""


def chromium() -> str:
    for name in (os.environ.get("UMIT_CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if name and shutil.which(name):
            return shutil.which(name)
    pytest.skip(
        "Chromium not found: install Debian's `chromium` (.ci/run does so as root) or set "
        "UMIT_CHROMIUM to a Chrome/Chromium binary"
    )


def _run(args: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    base = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run"]
    base += ["--disable-extensions", "--enable-logging=stderr", "--v=0", "--hide-scrollbars"]
    return subprocess.run(base + args, capture_output=True, text=True, timeout=timeout)


def check_in_browser(page: Path, shot: Path) -> dict:
    """Load ``page`` (a copy with a probe script) in Chromium, return what the probe saw, and
    screenshot the unmodified page at its full height into ``shot``."""
    text = page.read_text()
    probe = shot.with_name("probe.html")
    probe.write_text(text.replace("<head>", "<head>" + _PROBE, 1))
    done = _run(["--virtual-time-budget=10000", "--dump-dom", probe.as_uri()])
    found = re.search(r'<pre id="umit-probe">(.*?)</pre>', done.stdout, re.S)
    assert found, f"no probe output; chromium exit {done.returncode}: {done.stderr[-2000:]}"
    seen = json.loads(html.unescape(found.group(1)))
    # Console messages of the page as Chromium logs them (catches what the probe cannot).
    seen["console"] = [
        line for line in done.stderr.splitlines() if "CONSOLE" in line and "file://" in line
    ]
    height = min(max(int(seen["height"]), 600), 16000)
    shot.unlink(missing_ok=True)
    done = _run([f"--screenshot={shot}", f"--window-size=1280,{height}", page.as_uri()])
    assert shot.is_file(), f"no screenshot; chromium exit {done.returncode}: {done.stderr[-2000:]}"
    print(f"\nscreenshot of {page}: {shot}")
    return seen


def _assert_clean(seen: dict, n_images: int) -> None:
    assert seen["errors"] == [] and seen["console"] == [], (seen["errors"], seen["console"])
    assert seen["fetched"] == []  # nothing loaded from outside the file: it reads offline
    assert len(seen["images"]) == n_images
    assert all(i["complete"] and i["width"] > 0 and i["height"] > 0 for i in seen["images"])


def _colour_pixels(png: Path) -> dict[str, int]:
    from PIL import Image

    from umit.eval.case_views import PREDICTION_COLOR, REFERENCE_COLOR

    rgb = np.asarray(Image.open(png).convert("RGB")).astype(int)
    out = {}
    for name, c in (("reference", REFERENCE_COLOR), ("prediction", PREDICTION_COLOR)):
        target = np.array([int(c[i : i + 2], 16) for i in (1, 3, 5)])
        out[name] = int((np.abs(rgb - target).sum(-1) < 40).sum())
    return out


def test_report_loads_in_chromium_with_every_image(tmp_path):
    """A report with every kind of content: structure names, subgroup tables with the
    small-group line, a label-efficiency curve, best/median/worst case figures of phantoms."""
    from umit.data.phantoms import make_ct_phantom
    from umit.eval.case_views import case_figure, select_cases
    from umit.eval.report import (
        Section,
        display_names,
        plot_curves,
        subgroup_section,
        write_report,
    )
    from umit.eval.subgroup import analyze_subgroups

    rng = np.random.default_rng(0)
    rows = [
        {
            "case_id": f"case_{i:02d}",
            "site": "A" if i % 2 else ("B" if i < 36 else "C"),
            "dice_mean": float(rng.normal(0.8, 0.05)),
            "dice_4": float(rng.normal(0.85, 0.05)),
            "dice_5": float(rng.normal(0.7, 0.1)),
        }
        for i in range(40)
    ]
    structures = {4: "liver", 5: "spleen"}
    result = analyze_subgroups(rows, ["dice_mean", "dice_4", "dice_5"], ["site"], n_boot=50)
    names = display_names(list(result["overall"]), structures)
    figures = []
    picks = select_cases({r["case_id"]: r["dice_mean"] for r in rows})
    for k, pick in enumerate(picks):
        ph = make_ct_phantom(k, shape=(48, 48, 32))  # stored RAS or LAS: reoriented for display
        pred = np.roll(ph.label, k + 1, axis=0)
        figures.append(
            case_figure(
                pick,
                ph.images["CT"],
                pred,
                ph.label,
                dice={4: 0.9, 5: 0.4 + 0.1 * k},
                structures=ph.label_names,
                affine=ph.meta.affine,
                n_cases=len(rows),
            )
        )
    curve = plot_curves(
        [2, 8, 32],
        {"pretrained": rng.normal(0.7, 0.05, (3, 3)), "scratch": rng.normal(0.5, 0.05, (3, 3))},
        xlabel="labeled cases",
        title="Label efficiency",
        log_x=True,
        caption="Error bars: mean ± sd over 3 seeds.",
    )
    sections = [
        subgroup_section(result, names=names),
        Section("Label efficiency", figures=[curve]),
        Section("Best, median and worst case", figures=figures),
    ]
    out = write_report(tmp_path / "report", "UMIT evaluation <browser test>", sections)
    shot = tmp_path / "report.png"
    seen = check_in_browser(out["html"], shot)

    _assert_clean(seen, n_images=len(out["figures"]))
    assert len(out["figures"]) == 3 + 1 + 3  # dice, liver and spleen by site; curve; 3 cases
    text = seen["text"]
    assert "Dice: liver" in text and "Dice: spleen" in text and "dice_4" not in text
    assert "1 subgroup with fewer than 10 cases not shown: site=C (2)." in text
    assert "patient's right on the image left" in text
    colours = _colour_pixels(shot)  # the outlines made it onto the screen
    assert colours["reference"] > 500 and colours["prediction"] > 500, colours


class _TinySeg(nn.Module):
    def __init__(self, in_chans=1, out_channels=2, img_size=None):
        super().__init__()
        self.net = nn.Conv3d(in_chans, out_channels, 3, padding=1)

    def forward(self, x):
        return self.net(x)


def tiny_seg_for_browser(**kw):
    return _TinySeg(**kw)


@pytest.mark.usefixtures("one_thread")
def test_evaluate_report_loads_in_chromium(tiny_ct_store, tmp_path, register_models):
    """The page ``umit evaluate`` writes, from a 2-step model on the phantom store."""
    from umit.eval.evaluate import EvaluateConfig
    from umit.eval.evaluate import run as evaluate
    from umit.finetune.run import FinetuneConfig
    from umit.finetune.run import run as finetune

    register_models(tiny_seg_for_browser)
    cfg = FinetuneConfig.model_validate(
        {
            "data": tiny_ct_store,
            "out": tmp_path / "run",
            "model": "tiny_seg_for_browser",
            "model_args": {},
            "crop_size": [16, 16, 16],
            "train": {"total_steps": 2, "batch_size": 2, "warmup_steps": 1, "progress": False},
        }
    )
    finetune(cfg)
    ev = evaluate(EvaluateConfig(model=tmp_path / "run" / "best.pt", data=tiny_ct_store, n_boot=20))
    page = Path(ev["report"])
    seen = check_in_browser(page, tmp_path / "evaluate.png")
    _assert_clean(seen, n_images=len(list((page.parent / "figures").glob("*.png"))))
    assert len(seen["images"]) >= 2  # the test split's two phantoms
    assert "liver" in seen["text"] and "kidney_left" in seen["text"]
    assert not re.search(r"\bdice_\d", seen["text"])


def test_screenshot_is_a_real_png(tmp_path):
    """The screenshot helper writes a decodable PNG of the page's full height."""
    from PIL import Image

    page = tmp_path / "p.html"
    page.write_text(
        "<!DOCTYPE html><html><head><meta charset='utf-8'></head><body>"
        + "<p>line</p>" * 200
        + "</body></html>"
    )
    shot = tmp_path / "p.png"
    seen = check_in_browser(page, shot)
    img = Image.open(io.BytesIO(shot.read_bytes()))
    assert img.format == "PNG" and img.size[0] == 1280 and img.size[1] >= seen["height"] - 20
