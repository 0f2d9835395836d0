"""The benchmark harness runs a tiny case end to end and writes a well-formed result and table.

No assertion on time: the figures themselves are for docs/benchmarks.md, not for tests.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("monai")
ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # benchmarks/ lives beside src/, not inside the package
    sys.path.insert(0, str(ROOT))

from benchmarks.harness import Case, Side, _peak_main, max_abs_diff, run_case  # noqa: E402

from benchmarks import report, run  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def test_tiny_mae_case_writes_result_and_table(tmp_path):
    docs = tmp_path / "benchmarks.md"
    docs.write_text("# Benchmarks\n\nhand-written intro\n\n<!-- results:begin -->\nold\n"
                    "<!-- results:end -->\n\nhand-written analysis\n")  # fmt: skip
    path = run.main(["--cases", "mae", "--size", "tiny", "--reps", "2", "--threads", "1",
                     "--out", str(tmp_path / "results"), "--docs", str(docs), "--no-memory"])  # fmt: skip
    result = json.loads(Path(path).read_text())
    m = result["machine"]
    for key in ("hostname", "cpu", "threads", "torch", "monai", "date", "device"):
        assert key in m
    assert result["matmul_peak"]["gflops"] > 0 and result["matmul_peak"]["dtype"] == "float32"
    (case,) = result["cases"]
    assert case["name"] == "mae" and set(case["sides"]) == {"ours", "monai"}
    for side in case["sides"].values():
        assert len(side["times_s"]) == 2
        assert side["min_s"] <= side["median_s"] <= side["max_s"]
        assert side["flops"] > 0 and side["gflops_per_s"] > 0 and side["fraction_of_peak"] > 0
    assert case["speedup"]["monai"] > 0
    # same weights, same mask: our MAE and MONAI's predict the same patches
    assert case["numerics"]["max_abs_diff_ours_vs_monai"] < 1e-4
    assert len(case["load"]["loadavg_before"]) == 3 and "other_cores" in case["load"]
    assert isinstance(case["noisy"], bool)
    text = docs.read_text()
    assert "hand-written intro" in text and "hand-written analysis" in text and "old" not in text
    assert "| MAE pretraining step" in text and "float32 matmul peak" in text
    # a second run of another case on the same day keeps the first case
    report.write_docs(tmp_path / "results", docs)
    assert text == docs.read_text()


def test_peak_memory_child_reports_json(capsys):
    _peak_main(["mae", "monai", "tiny", "cpu", "1"])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["side"] == "monai" and out["peak_mb"] >= out["before_step_mb"] > 0


def test_runner_interleaves_and_flags_noise():
    calls = []

    def build(name):
        import torch

        return Side(step=lambda: calls.append(name), output=lambda: torch.ones(2))

    case = Case("toy", "toy", {}, build, sides=("ours", "ref"), reps=4, warmup=1,
                count_flops=False)  # fmt: skip
    rec = run_case(case, "tiny", None, measure_memory=False, log=lambda _: None)
    assert calls[2:] == ["ours", "ref", "ref", "ours", "ours", "ref", "ref", "ours"]
    assert set(rec["sides"]) == {"ours", "ref"} and "noisy" in rec and "load" in rec
    assert rec["numerics"] == {"max_abs_diff_ours_vs_ref": 0.0}


def test_max_abs_diff():
    import torch

    assert max_abs_diff(torch.zeros(3), torch.ones(3)) == 1.0
    assert max_abs_diff({"a": [torch.zeros(2)]}, {"a": [torch.full((2,), -2.0)]}) == 2.0
    with pytest.raises(ValueError, match="structure"):
        max_abs_diff([torch.zeros(1)], [torch.zeros(1), torch.zeros(1)])


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_both_sides_run_at_the_same_precision(precision):
    import torch

    seen: dict[str, list] = {"ours": [], "ref": []}

    def build(name):
        def step():
            seen[name].append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu"))
            return torch.ones(2) @ torch.ones(2, 2)

        return Side(step=step, output=lambda: torch.ones(3, 3) @ torch.ones(3, 3))

    case = Case("toy", "toy", {}, build, sides=("ours", "ref"), reps=2, warmup=1,
                count_flops=False)  # fmt: skip
    rec = run_case(case, "tiny", None, measure_memory=False, log=lambda _: None,
                   precision=precision)  # fmt: skip
    want = torch.bfloat16 if precision == "bf16" else False
    assert seen["ours"] == seen["ref"] == [want] * 3  # warm-up + 2 timed steps, both sides
    assert rec["precision"] == ("bfloat16" if precision == "bf16" else "float32")
    assert rec["title"].endswith("[bf16 autocast]") == (precision == "bf16")
    assert rec["sides"]["ref"]["info"].get("autocast") == ("bfloat16" if want else None)


def test_auto_precision_adds_bf16_rows_only_where_umit_picks_bf16(monkeypatch):
    from umit.train import precision as P

    P._RESOLVED.clear()
    monkeypatch.setenv(P.PIN_ENV, "fp32")
    assert run.precisions("auto", "cpu")[0] == ["fp32"]
    monkeypatch.setenv(P.PIN_ENV, "bf16")
    runs, why = run.precisions("auto", "cpu")
    assert runs == ["fp32", "bf16"] and P.PIN_ENV in why
    assert run.precisions("both", "cpu")[0] == ["fp32", "bf16"]
    assert run.precisions("fp32", "cpu")[0] == ["fp32"]
    P._RESOLVED.clear()
    # fp32 and bf16 records of one case coexist in a result file
    assert run.record_key({"name": "a", "precision": "float32"}) != run.record_key(
        {"name": "a", "precision": "bfloat16"}
    )


@pytest.mark.slow
def test_onnx_case_runs_and_agrees(tmp_path):
    pytest.importorskip("onnxruntime")
    from benchmarks.cases import get_case

    rec = run_case(get_case("onnx_sliding_window", "tiny"), "tiny", None, reps=1,
                   measure_memory=False, log=lambda _: None)  # fmt: skip
    assert set(rec["sides"]) == {"ours", "onnxruntime"} and rec["speedup"]["onnxruntime"] > 0
    assert rec["numerics"]["max_abs_diff_ours_vs_onnxruntime"] < 1e-4
    assert rec["sides"]["onnxruntime"]["info"]["exporter"] == "dynamo"
