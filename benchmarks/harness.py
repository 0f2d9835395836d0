"""Benchmark harness: ours and a reference (MONAI) side by side, interleaved in one process.

A :class:`Case` builds each of its sides by name (``"ours"``, ``"monai"``, optional ablations such
as ``"ours_stock_conv"``); a :class:`Side` is one ready-to-run unit of work (``step``) plus an
optional deterministic ``output`` on a fixed input for the numerics. :func:`run_case`:

1. builds every side (same weights: the reference's weights are converted into ours);
2. numerics: max abs deviation of each side's ``output()`` from ours, plus the case's own checks;
3. warm-up: the first step of each side runs under ``torch.utils.flop_counter.FlopCounterMode``
   (the FLOPs of one step, forward and backward), then ``warmup - 1`` more plain steps;
4. timing: ``reps`` rounds, the sides interleaved and the order reversed every other round
   (A B, B A, ...) so drift on a shared machine hits all sides alike; median, min, max;
5. peak memory in a fresh subprocess per side (:func:`peak_memory`): the RSS high-water mark
   (VmHWM) is per process, so one side's peak must not pollute the other's; on CUDA
   ``torch.cuda.max_memory_allocated``;
6. machine noise: the load average before and after, and the CPU time other processes used
   while the case ran (``/proc/stat`` busy time minus this process's own), in cores.

Achieved FLOP/s = FLOPs of a step / median time; the fraction of peak divides it by the best
square-GEMM rate measured in the same run (:func:`matmul_peak`), in the precision the case uses.
Nothing here asserts on time.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import resource
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import torch

__all__ = [
    "Case",
    "Side",
    "machine_info",
    "matmul_peak",
    "max_abs_diff",
    "peak_memory",
    "run_case",
]

NOISY_OTHER_CORES = 0.25  # other processes using this much more than the idle cores: flag it


def is_noisy(other_cores: float | None, threads: int, cpus: int | None = None) -> bool:
    """Whether other processes competed for this run's cores: they used more than the cores this
    run left idle (``cpus - threads``) plus ``NOISY_OTHER_CORES``. A process on a core the run
    does not use shares only memory bandwidth and caches."""
    if other_cores is None:
        return False
    idle = max(0, (cpus or os.cpu_count() or 1) - threads)
    return other_cores > idle + NOISY_OTHER_CORES


@dataclass
class Side:
    """One implementation of a case, built and ready.

    Attributes:
        step: one timed unit of work (a training step, one inference, one sample).
        output: deterministic output on a fixed input (eval mode, no grad) for the numerics;
            called once, before timing.
        info: free-form facts about this side (parameter count, window count...).
        warm: warm-up callable instead of ``step`` (when a step is minutes long, e.g. one
            window instead of a whole sliding-window run).
        flops: FLOPs of one step computed another way (e.g. one window counted, times the
            number of windows) instead of counting a whole step.
        compare_last: the numerics compare the outputs of the last timed step (for steps that
            are inference already, so no extra run is needed); ``output`` is then unused.
    """

    step: Callable[[], Any]
    output: Callable[[], Any] | None = None
    info: dict[str, Any] = field(default_factory=dict)
    warm: Callable[[], Any] | None = None
    flops: Callable[[], int] | None = None
    compare_last: bool = False


@dataclass
class Case:
    """A benchmark case.

    Attributes:
        name: registry name (``mae``, ``unetr``...).
        title: one line for the table.
        label: the configuration in a few words for the table (``96³, ViT-B/16, batch 1``).
        config: the configuration both sides share (plain data, written to the JSON).
        build: ``build(side_name, reference_weights=True) -> Side``; must work in a fresh process
            (peak memory). With ``reference_weights=False`` our side is built with its own random
            weights, without building MONAI's model to convert from (so the peak-memory child of
            our side holds our model only).
        sides: side names, ours first, then the reference, then ablations.
        reps: timed rounds.
        warmup: untimed steps per side (the first one counts FLOPs).
        count_flops: count FLOPs with ``FlopCounterMode`` (off for the data-loading case).
        precision: the compute precision (for the fraction of peak), e.g. ``"float32"``.
        numerics: optional ``f(outputs) -> dict`` of extra checks (Dice, bf16 deviation...) on
            the sides' outputs (name -> output of ``output()`` or of the last timed step).
        notes: what is measured and where a difference comes from (written to the JSON).
    """

    name: str
    title: str
    config: dict[str, Any]
    build: Callable[..., Side]
    label: str = ""
    sides: tuple[str, ...] = ("ours", "monai")
    reps: int = 3
    warmup: int = 1
    count_flops: bool = True
    precision: str = "float32"
    numerics: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    notes: str = ""


# ------------------------------------------------------------------------------------ machine
def _cpuinfo(key: str) -> str | None:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith(key):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def _cpu_model() -> str:
    return _cpuinfo("model name") or platform.processor() or platform.machine()


def _cpu_flags() -> list[str]:
    flags = set((_cpuinfo("flags") or "").split())
    return [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]


def machine_info(device: str = "cpu") -> dict[str, Any]:
    """Host, CPU/GPU model, threads, library versions and the UTC date of this run."""
    import monai

    now = datetime.now(UTC)
    info: dict[str, Any] = {
        "hostname": socket.gethostname(),
        "cpu": _cpu_model(),
        "cpu_flags": _cpu_flags(),
        "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "device": device,
        "gpu": torch.cuda.get_device_name(0) if device == "cuda" else None,
        "torch": torch.__version__,
        "monai": monai.__version__,
        "python": platform.python_version(),
        "date": now.date().isoformat(),
        "utc": now.isoformat(timespec="seconds"),
    }
    with contextlib.suppress(ValueError, OSError):
        info["mem_total_gb"] = round(
            os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1
        )
    return info


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def matmul_peak(
    device: str = "cpu", dtype: torch.dtype = torch.float32, sizes=(1024, 2048), reps: int = 3
) -> dict[str, Any]:
    """Best achieved FLOP/s of square ``n x n`` GEMMs (``2 n³`` FLOPs), best of ``reps`` per size."""
    runs = []
    for n in sizes:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        torch.mm(a, b)  # warm-up
        _sync(device)
        best = float("inf")
        for _ in range(reps):
            t = time.perf_counter()
            torch.mm(a, b)
            _sync(device)
            best = min(best, time.perf_counter() - t)
        runs.append({"n": n, "best_s": best, "gflops": 2 * n**3 / best / 1e9})
    return {
        "dtype": str(dtype).removeprefix("torch."),
        "gflops": max(r["gflops"] for r in runs),
        "runs": runs,
    }


class _CpuNoise:
    """CPU time other processes used during a block, in cores (from /proc/stat)."""

    def __enter__(self) -> _CpuNoise:
        self.load_before = list(os.getloadavg())
        self._t = time.perf_counter()
        self._busy = self._busy_s()
        self._own = self._own_s()
        return self

    def __exit__(self, *exc: object) -> None:
        wall = time.perf_counter() - self._t
        busy = self._busy_s() - self._busy
        own = self._own_s() - self._own
        self.load_after = list(os.getloadavg())
        self.other_cores = None if busy != busy else max(0.0, (busy - own) / max(wall, 1e-9))

    @staticmethod
    def _busy_s() -> float:
        try:
            with open("/proc/stat", encoding="utf-8") as f:
                v = [int(x) for x in f.readline().split()[1:]]
        except OSError:
            return float("nan")
        idle = v[3] + (v[4] if len(v) > 4 else 0)  # idle + iowait
        steal = v[7] if len(v) > 7 else 0
        return (sum(v[:8]) - idle - steal) / os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _own_s() -> float:
        s = resource.getrusage(resource.RUSAGE_SELF)
        c = resource.getrusage(resource.RUSAGE_CHILDREN)
        return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


# ------------------------------------------------------------------------------------ helpers
def _tensors(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _tensors(o)]
    if isinstance(out, dict):
        return [t for o in out.values() for t in _tensors(o)]
    return []


def max_abs_diff(a: Any, b: Any) -> float:
    """Max abs difference over matching tensors of two outputs (nested lists/dicts allowed)."""
    ta, tb = _tensors(a), _tensors(b)
    if len(ta) != len(tb) or not ta:
        raise ValueError(f"outputs differ in structure: {len(ta)} vs {len(tb)} tensors")
    return max((x.float() - y.float()).abs().max().item() for x, y in zip(ta, tb, strict=True))


def _count_flops(fn: Callable[[], Any]) -> tuple[int, dict[str, int]]:
    from torch.utils.flop_counter import (
        FlopCounterMode,
        sdpa_backward_flop_count,
        sdpa_flop_count,
    )

    def fwd(q, k, v, *args, out_shape=None, **kwargs):  # shapes, as FlopCounterMode passes them
        return sdpa_flop_count(q, k, v)

    def bwd(grad, q, k, v, *args, out_shape=None, **kwargs):
        return sdpa_backward_flop_count(grad, q, k, v)

    aten = torch.ops.aten
    # torch's table lacks the CPU flash-attention kernels that SDPA dispatches to on CPU
    extra = {
        aten._scaled_dot_product_flash_attention_for_cpu: fwd,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: bwd,
    }
    with FlopCounterMode(display=False, custom_mapping=extra) as counter:
        fn()
    per_op = {str(k): int(v) for k, v in counter.get_flop_counts().get("Global", {}).items()}
    return int(counter.get_total_flops()), per_op


def _compare(outputs: dict[str, Any], ours: str) -> dict[str, float]:
    """Max abs deviation of each side's float output from ours (label maps are left to the
    case's own checks: a difference of class indices means nothing)."""
    if ours not in outputs or not all(t.is_floating_point() for t in _tensors(outputs[ours])):
        return {}
    return {
        f"max_abs_diff_{ours}_vs_{n}": max_abs_diff(outputs[ours], out)
        for n, out in outputs.items()
        if n != ours
    }


def _summary(times: list[float]) -> dict[str, Any]:
    return {
        "times_s": [round(t, 6) for t in times],
        "median_s": statistics.median(times),
        "min_s": min(times),
        "max_s": max(times),
    }


PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def with_precision(side: Side, precision: str, device: str) -> Side:
    """``side`` with every callable (step, warm-up, output, FLOP count) run under
    ``torch.autocast(device, bfloat16)`` for ``precision="bf16"``; unchanged for fp32. Applied
    to every side of a case alike, so ours and MONAI's run at the same precision."""
    if precision == "fp32":
        return side
    if precision not in PRECISION_DTYPES:
        raise ValueError(f"precision must be one of {sorted(PRECISION_DTYPES)}, got {precision!r}")
    dtype = PRECISION_DTYPES[precision]

    def wrap(fn: Callable[[], Any] | None) -> Callable[[], Any] | None:
        if fn is None:
            return None

        def run() -> Any:
            with torch.autocast(device, dtype=dtype):
                return fn()

        return run

    return Side(
        step=wrap(side.step),
        output=wrap(side.output),
        info={**side.info, "autocast": str(dtype).removeprefix("torch.")},
        warm=wrap(side.warm),
        flops=wrap(side.flops),
        compare_last=side.compare_last,
    )


# ------------------------------------------------------------------------------------ runner
def run_case(
    case: Case,
    size: str,
    peak_gflops: float | None,
    device: str = "cpu",
    reps: int | None = None,
    measure_memory: bool = True,
    log: Callable[[str], None] = print,
    precision: str = "fp32",
) -> dict[str, Any]:
    """Builds, checks, times and measures one case; returns its JSON record.

    ``precision="bf16"`` runs every side under bf16 autocast (:func:`with_precision`); the
    record's ``precision`` says which, and its title is marked.
    """
    reps = case.reps if reps is None else reps
    bf16 = precision == "bf16"
    record: dict[str, Any] = {
        "name": case.name,
        "title": case.title + (" [bf16 autocast]" if bf16 else ""),
        "label": case.label,
        "size": size,
        "config": case.config,
        "precision": "bfloat16" if bf16 else case.precision,
        "notes": case.notes,
        "reps": reps,
        "warmup": case.warmup,
        "threads": torch.get_num_threads(),
        "matmul_peak_gflops": peak_gflops,
    }
    with _CpuNoise() as noise:
        t0 = time.perf_counter()
        sides = {name: with_precision(case.build(name), precision, device) for name in case.sides}
        record["build_s"] = round(time.perf_counter() - t0, 3)
        ours_name = case.sides[0]
        outputs = {
            n: s.output() for n, s in sides.items() if s.output is not None and not s.compare_last
        }
        numerics = _compare(outputs, ours_name)

        flops: dict[str, Any] = {}
        for name, side in sides.items():  # warm-up; the first step counts FLOPs
            warm = side.warm or side.step
            if case.count_flops and side.flops is not None:
                flops[name] = {"total": int(side.flops()), "per_op": {}}
            for i in range(case.warmup):
                if i == 0 and case.count_flops and name not in flops:
                    total, per_op = _count_flops(warm)
                    flops[name] = {"total": total, "per_op": per_op}
                else:
                    warm()
        _sync(device)

        times: dict[str, list[float]] = {n: [] for n in sides}
        order = list(sides)
        for r in range(reps):
            for name in order if r % 2 == 0 else order[::-1]:
                _sync(device)
                t = time.perf_counter()
                out = sides[name].step()
                _sync(device)
                times[name].append(time.perf_counter() - t)
                if sides[name].compare_last:
                    outputs[name] = out
                del out
            log(
                f"  {case.name} rep {r + 1}/{reps}: "
                + ", ".join(f"{n} {times[n][-1]:.3f}s" for n in order)
            )
        if any(s.compare_last for s in sides.values()):
            numerics.update(_compare(outputs, ours_name))
        if case.numerics is not None:
            numerics.update(case.numerics(outputs))
        record["numerics"] = numerics
        del outputs
        infos = {n: s.info for n, s in sides.items()}
        del sides
    out_sides: dict[str, Any] = {}
    for name in case.sides:
        s = _summary(times[name])
        s["info"] = infos[name]
        if name in flops:
            s["flops"] = flops[name]["total"]
            s["flops_per_op"] = flops[name]["per_op"]
            s["gflops_per_s"] = flops[name]["total"] / s["median_s"] / 1e9
            if peak_gflops:
                s["fraction_of_peak"] = s["gflops_per_s"] / peak_gflops
        out_sides[name] = s
    record["sides"] = out_sides
    ours = out_sides[ours_name]
    record["speedup"] = {
        n: out_sides[n]["median_s"] / ours["median_s"] for n in case.sides[1:]
    }  # > 1: ours is faster
    record["load"] = {
        "loadavg_before": noise.load_before,
        "loadavg_after": noise.load_after,
        "other_cores": noise.other_cores,
    }
    record["noisy"] = is_noisy(noise.other_cores, torch.get_num_threads())
    if measure_memory:
        for name in case.sides:
            out_sides[name]["memory"] = peak_memory(
                case.name, name, size, device, precision=precision
            )
        mem = {n: out_sides[n]["memory"].get("peak_mb") for n in case.sides}
        if mem[ours_name] and all(mem.values()):
            record["memory_ratio"] = {n: mem[ours_name] / mem[n] for n in case.sides[1:]}
    return record


# ------------------------------------------------------------------------------------ peak memory
def peak_memory(
    case: str, side: str, size: str, device: str = "cpu", steps: int = 1, precision: str = "fp32"
) -> dict:
    """Peak memory of ``steps`` steps of one side, measured in a fresh Python process.

    CPU: the process's RSS high-water mark (VmHWM), and the RSS after imports and the
    build (before the first step), so ``peak_mb - before_step_mb`` is what the steps added.
    CUDA: ``torch.cuda.max_memory_allocated`` over the steps.
    """
    cmd = [sys.executable, "-m", "benchmarks.harness", case, side, size, device, str(steps)]
    env = {
        **os.environ,
        "UMIT_BENCH_THREADS": str(torch.get_num_threads()),
        "UMIT_BENCH_PRECISION": precision,
    }
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=root, env=env, check=False)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    return {"error": (proc.stderr or proc.stdout)[-2000:]}


def _rss_mb() -> float:
    with open("/proc/self/statm", encoding="utf-8") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _hwm_mb() -> float:
    """This process's RSS high-water mark. ``/proc/self/status`` VmHWM, not ``ru_maxrss``: Linux
    carries the parent's RSS at fork into the child's ``ru_maxrss`` across ``exec``."""
    try:
        with open("/proc/self/status", encoding="utf-8") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _peak_main(argv: list[str]) -> None:
    case_name, side, size, device, steps = argv[0], argv[1], argv[2], argv[3], int(argv[4])
    torch.set_num_threads(int(os.environ.get("UMIT_BENCH_THREADS", torch.get_num_threads())))
    from benchmarks.cases import get_case

    case = get_case(case_name, size, device)
    built = with_precision(
        case.build(side, reference_weights=False),
        os.environ.get("UMIT_BENCH_PRECISION", "fp32"),
        device,
    )
    out: dict[str, Any] = {"side": side, "steps": steps}
    if device == "cuda":
        torch.cuda.synchronize()
        out["before_step_mb"] = torch.cuda.memory_allocated() / 2**20
        torch.cuda.reset_peak_memory_stats()
    else:
        out["before_step_mb"] = _rss_mb()
    for _ in range(steps):
        built.step()
    if device == "cuda":
        torch.cuda.synchronize()
        out["peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    else:
        out["peak_mb"] = _hwm_mb()
    out["step_added_mb"] = out["peak_mb"] - out["before_step_mb"]
    print(json.dumps(out))


if __name__ == "__main__":
    _peak_main(sys.argv[1:])
