"""``precision=auto``: the decision from CPU flags and a cached matmul timing (both faked here:
no wall-time asserts), the cache file, explicit settings and the pin, and the loop and predict
using the decision."""

from __future__ import annotations

import json

import pytest
import torch
from train_helpers import RegressionData, TinyNet, run_config

from umit.inference.predict import PredictConfig
from umit.train import RegressionTask, Trainer
from umit.train import precision as P
from umit.train.config import TrainConfig

AVX2_ONLY = "processor\t: 0\nmodel name\t: Old CPU\nflags\t\t: fpu sse2 avx avx2 fma\n"
AVX512_BF16 = (
    "processor\t: 0\nmodel name\t: New CPU 9000\nflags\t\t: fpu avx2 avx512f avx512_bf16\n"
    "processor\t: 1\nmodel name\t: New CPU 9000\nflags\t\t: fpu avx2 avx512f avx512_bf16\n"
)
AMX = "processor\t: 0\nmodel name\t: Xeon AMX\nflags\t\t: avx512f amx_tile amx_bf16\n"


@pytest.fixture(autouse=True)
def _unpinned(monkeypatch, tmp_path):
    """The suite pins auto to fp32 (tests/conftest.py); these tests decide for real, with a
    private cache dir."""
    monkeypatch.delenv(P.PIN_ENV, raising=False)
    monkeypatch.setenv("UMIT_CACHE_DIR", str(tmp_path / "cache"))
    P._RESOLVED.clear()
    yield
    P._RESOLVED.clear()


def cpuinfo(tmp_path, text):
    path = tmp_path / "cpuinfo"
    path.write_text(text)
    return path


def timing(fp32_s, bf16_s):
    calls = []

    def measure():
        calls.append(1)
        return {"fp32_s": fp32_s, "bf16_s": bf16_s}

    return measure, calls


def never():
    raise AssertionError("the matmul must not be measured here")


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    assert P.cpu_info(cpuinfo(tmp_path, AVX512_BF16)) == (
        "New CPU 9000",
        {"fpu", "avx2", "avx512f", "avx512_bf16"},
    )
    model, flags = P.cpu_info(tmp_path / "missing")
    assert flags == set() and model  # unreadable: no flags, so never bf16 on the CPU


def test_cpu_without_bf16_instructions_is_fp32_without_measuring(tmp_path):
    c = P.choose_precision("auto", "cpu", cpuinfo=cpuinfo(tmp_path, AVX2_ONLY), measure=never)
    assert c.precision == "fp32" and c.autocast_dtype is None
    assert "Old CPU" in c.reason and "avx512_bf16" in c.reason
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("text", [AVX512_BF16, AMX], ids=["avx512_bf16", "amx"])
def test_bf16_flags_and_a_faster_matmul_choose_bf16_and_cache_it(tmp_path, text):
    cache = tmp_path / "cache" / "precision.json"
    measure, calls = timing(fp32_s=0.002, bf16_s=0.001)
    c = P.choose_precision("auto", "cpu", cpuinfo=cpuinfo(tmp_path, text), measure=measure)
    assert c.precision == "bf16" and c.autocast_dtype == torch.bfloat16
    assert "2.00x" in c.reason and "measured now" in c.reason
    entry = json.loads(cache.read_text())
    model = P.cpu_info(cpuinfo(tmp_path, text))[0]
    key = f"{model} | torch {torch.__version__}"
    assert list(entry) == [key]
    assert entry[key]["fp32_s"] == 0.002 and entry[key]["bf16_s"] == 0.001
    assert entry[key]["speedup"] == pytest.approx(2.0)
    # second time: read from the cache, not measured again
    again = P.choose_precision("auto", "cpu", cpuinfo=cpuinfo(tmp_path, text), measure=never)
    assert again.precision == "bf16" and "cached" in again.reason
    assert len(calls) == 1


def test_bf16_flags_but_a_slow_matmul_stay_fp32(tmp_path):
    measure, _ = timing(fp32_s=0.001, bf16_s=0.05)  # emulated bf16: 50x slower
    c = P.choose_precision("auto", "cpu", cpuinfo=cpuinfo(tmp_path, AVX512_BF16), measure=measure)
    assert c.precision == "fp32" and "0.02x" in c.reason and "1.1x needed" in c.reason
    # a 1.05x gain is under the margin (noise), 1.2x is over it
    measure, _ = timing(fp32_s=0.00105, bf16_s=0.001)
    c = P.choose_precision("auto", "cpu", cpuinfo=cpuinfo(tmp_path, AMX), measure=measure)
    assert c.precision == "fp32" and "1.05x" in c.reason
    other = AMX.replace("Xeon AMX", "Xeon AMX v2")
    measure, _ = timing(fp32_s=0.0012, bf16_s=0.001)
    assert (
        P.choose_precision(
            "auto", "cpu", cpuinfo=cpuinfo(tmp_path, other), measure=measure
        ).precision
        == "bf16"
    )


def test_cache_is_keyed_by_cpu_model_and_torch_version(tmp_path):
    cache = tmp_path / "p.json"
    other = {"Another CPU | torch 2.0": {"fp32_s": 1.0, "bf16_s": 100.0}}
    stale = {"New CPU 9000 | torch 0.0.1": {"fp32_s": 1.0, "bf16_s": 100.0}}
    cache.write_text(json.dumps({**other, **stale}))
    measure, calls = timing(0.003, 0.001)
    c = P.choose_precision(
        "auto", "cpu", cpuinfo=cpuinfo(tmp_path, AVX512_BF16), cache=cache, measure=measure
    )
    assert c.precision == "bf16" and len(calls) == 1  # neither entry is this machine's
    data = json.loads(cache.read_text())
    assert set(data) == {*other, *stale, f"New CPU 9000 | torch {torch.__version__}"}


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"New CPU 9000 | torch X": 5}'])
def test_damaged_cache_is_measured_again_and_rewritten(tmp_path, content):
    cache = tmp_path / "p.json"
    cache.write_text(content.replace("X", torch.__version__))
    measure, calls = timing(0.002, 0.001)
    c = P.choose_precision(
        "auto", "cpu", cpuinfo=cpuinfo(tmp_path, AVX512_BF16), cache=cache, measure=measure
    )
    assert c.precision == "bf16" and len(calls) == 1
    assert json.loads(cache.read_text())[f"New CPU 9000 | torch {torch.__version__}"]["bf16_s"]


def test_unwritable_cache_still_decides(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    measure, _ = timing(0.002, 0.001)
    c = P.choose_precision(
        "auto",
        "cpu",
        cpuinfo=cpuinfo(tmp_path, AVX512_BF16),
        cache=blocker / "sub" / "p.json",  # its parent is a file
        measure=measure,
    )
    assert c.precision == "bf16"


@pytest.mark.parametrize("explicit", ["fp32", "bf16", "fp16"])
def test_explicit_precision_overrides_auto(tmp_path, explicit, monkeypatch):
    monkeypatch.setenv(P.PIN_ENV, "bf16")
    c = P.choose_precision(explicit, "cpu", cpuinfo=cpuinfo(tmp_path, AVX2_ONLY), measure=never)
    assert c.precision == explicit and "as configured" in c.reason


def test_cuda_follows_the_device_bf16_support():
    yes = P.choose_precision("auto", "cuda", measure=never, cuda_bf16=lambda: True)
    no = P.choose_precision("auto", "cuda", measure=never, cuda_bf16=lambda: False)
    assert (yes.precision, no.precision) == ("bf16", "fp32")
    assert P.choose_precision("auto", "meta", measure=never).precision == "fp32"


def test_pin_and_bad_values(tmp_path, monkeypatch):
    monkeypatch.setenv(P.PIN_ENV, "fp32")
    c = P.choose_precision("auto", "cpu", cpuinfo=cpuinfo(tmp_path, AVX512_BF16), measure=never)
    assert c.precision == "fp32" and P.PIN_ENV in c.reason
    monkeypatch.setenv(P.PIN_ENV, "int8")
    with pytest.raises(ValueError, match="UMIT_AUTO_PRECISION"):
        P.choose_precision("auto", "cpu")
    with pytest.raises(ValueError, match="'fp64'"):
        P.choose_precision("fp64", "cpu")


def test_auto_is_the_default_of_train_and_predict():
    assert TrainConfig().precision == "auto"
    assert PredictConfig(inputs="x.nii.gz", model="m.pt").precision == "auto"


@pytest.mark.parametrize("pin,dtype", [("bf16", torch.bfloat16), ("fp32", None)])
def test_the_loop_trains_in_the_resolved_precision(tmp_path, monkeypatch, pin, dtype, caplog):
    monkeypatch.setenv(P.PIN_ENV, pin)
    cfg = run_config(tmp_path / "run")
    assert cfg.precision == "auto"
    with caplog.at_level("INFO", logger="umit.train.precision"):
        trainer = Trainer(RegressionTask(TinyNet()), RegressionData(n=8), cfg)
    assert trainer.precision == pin and trainer.autocast_dtype == dtype
    assert f"precision: {pin} (auto pinned" in caplog.text
    with trainer._autocast():
        y = trainer.module(torch.randn(2, 8))
    assert y.dtype == (dtype or torch.float32)
    # explicit beats auto (and the pin)
    explicit = Trainer(
        RegressionTask(TinyNet()), RegressionData(n=8), cfg.model_copy(update={"precision": "fp32"})
    )
    assert explicit.precision == "fp32" and explicit.autocast_dtype is None


def test_the_real_machine_decision_is_consistent():
    """On whatever CPU runs this: with no bf16 flag auto is fp32; with one, the decision follows
    the cached timing (measured once, here, into the private cache)."""
    c = P.resolve_precision("auto", "cpu")
    _, flags = P.cpu_info()
    if not any(f in flags for f in P.BF16_FLAGS):
        assert c.precision == "fp32"
        return
    entry = json.loads((P.cache_dir() / P.CACHE_NAME).read_text())
    (timing_,) = entry.values()
    want = "bf16" if timing_["fp32_s"] / timing_["bf16_s"] >= P.MIN_SPEEDUP else "fp32"
    assert c.precision == want
    assert P.resolve_precision("auto", "cpu") is c  # once per process
