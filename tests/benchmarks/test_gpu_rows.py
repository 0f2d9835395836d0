"""benchmarks/gpu.sh on CPU at tiny size (the GPU run is the same script), and the FSDP memory
formula's parameter count against the real models."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks.fsdp_memory import param_counts, predict_bytes  # noqa: E402
from benchmarks.gpu_rows import datasheet_peak, write_docs  # noqa: E402


@pytest.mark.parametrize("dim,depth,heads,img", [(48, 2, 3, 32), (96, 3, 4, 48), (768, 1, 12, 32)])
def test_formula_counts_the_parameters_of_vit3d(dim, depth, heads, img):
    from umit.models import create_model

    m = create_model("vit3d_base_p16", embed_dim=dim, depth=depth, num_heads=heads,
                     img_size=(img,) * 3, in_chans=1, num_classes=1)  # fmt: skip
    tokens = (img // 16) ** 3
    assert param_counts(dim, depth, tokens)["total"] == sum(p.numel() for p in m.parameters())


def test_formula_shards_the_state_and_not_the_working_set():
    one = predict_bytes(1024, 24, 16, tokens=216, batch=2, world=1)
    eight = predict_bytes(1024, 24, 16, tokens=216, batch=2, world=8)
    assert one["state"] == pytest.approx(16 * one["params"])  # fp32 param + grad + 2 Adam moments
    assert eight["state"] == pytest.approx(one["state"] / 8)
    assert eight["activations"] == one["activations"] and eight["gathered"] == one["gathered"]


def test_known_cards_and_docs_section(tmp_path):
    assert datasheet_peak("NVIDIA H200") == pytest.approx(989e12)
    assert datasheet_peak("NVIDIA H100 PCIe") == pytest.approx(756e12)  # the longest match wins
    assert datasheet_peak("Some CPU") is None
    docs = tmp_path / "benchmarks.md"
    docs.write_text("# Benchmarks\n\nkept\n")
    write_docs("first\n", docs)
    write_docs("second\n", docs)  # replaces the section, keeps the rest
    text = docs.read_text()
    assert "kept" in text and "second" in text and "first" not in text
    assert text.count("<!-- gpu-rows:start -->") == 1


@pytest.mark.slow
def test_gpu_script_runs_tiny_on_cpu(tmp_path):
    docs = tmp_path / "benchmarks.md"
    docs.write_text("# Benchmarks\n")
    env = dict(os.environ, DEVICE="cpu", SIZE="tiny", OUT=str(tmp_path / "out"), DOCS=str(docs),
               PY=sys.executable, OMP_NUM_THREADS="1")  # fmt: skip
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "src"), env.get("PYTHONPATH")) if p)
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh")], env=env,
                          capture_output=True, text=True, timeout=1200)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((tmp_path / "out" / "gpu_rows.json").read_text())
    for part in ("monai", "mae", "fsdp"):
        assert "error" not in res[part], res[part]
    cases = {c["case"]: c for c in res["monai"]["cases"]}
    assert set(cases) == {"mae", "unetr"} and cases["mae"]["speedup_vs"]["monai"] > 0
    rows = res["mae"]["rows"]
    assert [r["compile"] for r in rows] == [False, "aot_eager"]
    assert all(r["samples_per_s"] > 0 and 0 < r["fraction_of_measured_bf16_gemm"] < 1 for r in rows)
    assert res["fsdp"]["largest"] == "w96_d4" and all(r["fits"] for r in res["fsdp"]["rows"])
    md = (tmp_path / "out" / "gpu_rows.md").read_text()
    assert "MAE pretraining step" in md and "Largest ViT" in md and "| mae |" in md
    assert md in docs.read_text()
