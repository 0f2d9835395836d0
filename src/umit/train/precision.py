"""``precision=auto``: bf16 autocast where the hardware runs it fast, else fp32.

CPUs differ: with AVX-512 BF16 or AMX a bf16 matmul runs about 2x an fp32 one; on AVX2-only CPUs
oneDNN emulates bf16 and it runs many times slower. So ``auto`` resolves, once per process and
device, to:

* CUDA: ``bf16`` when the GPU supports it (``torch.cuda.is_bf16_supported()``), else ``fp32``;
* CPU: ``bf16`` only when ``/proc/cpuinfo`` lists ``avx512_bf16`` or ``amx_bf16`` **and** a
  small matmul measured once on this machine runs at least :data:`MIN_SPEEDUP` times faster in
  bf16 than in fp32; else ``fp32``. The measurement is cached in a small JSON file under the
  user cache dir (``$UMIT_CACHE_DIR``, else ``$XDG_CACHE_HOME/umit``, else ``~/.cache/umit``),
  keyed by CPU model and torch version, so later runs reuse it;
* anything else (MPS, ...): ``fp32``.

``$UMIT_AUTO_PRECISION`` (``fp32`` or ``bf16``) pins what ``auto`` resolves to on a machine
(a CI runner, a reproduction); the test suite pins ``fp32`` so its reference numbers do not depend
on the CPU it runs on. An explicit ``fp32`` / ``bf16`` / ``fp16`` is always used as given.
Every resolution is logged with its reason.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import torch

from umit.utils.fileio import atomic_write_json

log = logging.getLogger(__name__)

Precision = Literal["auto", "fp32", "bf16", "fp16"]
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
BF16_FLAGS = ("avx512_bf16", "amx_bf16")
MIN_SPEEDUP = 1.1
"""bf16 is chosen on a CPU when its matmul time is at most 1/1.1 of fp32's (a margin over noise)."""
CACHE_NAME = "precision.json"
PIN_ENV = "UMIT_AUTO_PRECISION"
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class PrecisionChoice:
    """What a requested precision resolved to, and why."""

    precision: str
    """``fp32``, ``bf16`` or ``fp16``."""
    reason: str
    """One line: what decided it (flags, measured speed-up, the cache file, a pin)."""

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """The autocast dtype, None for fp32."""
        return AUTOCAST_DTYPES.get(self.precision)


def cache_dir() -> Path:
    """Where umit keeps per-machine measurements."""
    if os.environ.get("UMIT_CACHE_DIR"):
        return Path(os.environ["UMIT_CACHE_DIR"])
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "umit"


def cpu_info(path: str | Path = "/proc/cpuinfo") -> tuple[str, set[str]]:
    """``(model name, flags)`` of the first CPU in ``path`` (empty flags where it is unreadable,
    e.g. not Linux: then ``auto`` never picks bf16 on the CPU)."""
    model, flags = "", set()
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key == "model name" and not model:
            model = value.strip()
        elif key in ("flags", "features") and not flags:
            flags = set(value.split())
    model = model or platform.processor() or platform.machine() or "unknown CPU"
    return model, flags


def measure_matmul(n: int = 256, reps: int = 15) -> dict[str, float]:
    """Median seconds of one ``n x n`` matmul in fp32 and in bf16 on the CPU (a few warm-ups
    first), in the current thread setting: ~10 ms on a CPU with bf16 instructions."""
    gen = torch.Generator().manual_seed(0)
    out: dict[str, float] = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a = torch.randn(n, n, generator=gen).to(dtype)
        b = torch.randn(n, n, generator=gen).to(dtype)
        for _ in range(3):
            a @ b
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - t)
        out[f"{name}_s"] = statistics.median(times)
    return out


def _cache_key(cpu_model: str) -> str:
    return f"{cpu_model} | torch {torch.__version__}"


def _read_cache(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def cpu_bf16_timing(
    cpu_model: str,
    *,
    cache: Path | None = None,
    measure: Callable[[], dict[str, float]] = measure_matmul,
) -> tuple[dict[str, Any], bool]:
    """The cached matmul timing of this CPU model and torch version, measured and cached when
    absent. Returns ``(entry, from_cache)``; an unreadable or damaged cache is measured again."""
    path = cache if cache is not None else cache_dir() / CACHE_NAME
    data = _read_cache(path)
    key = _cache_key(cpu_model)
    entry = data.get(key)
    if (
        isinstance(entry, dict)
        and isinstance(entry.get("fp32_s"), int | float)
        and isinstance(entry.get("bf16_s"), int | float)
        and entry["fp32_s"] > 0
        and entry["bf16_s"] > 0
    ):
        return entry, True
    timing = measure()
    entry = {
        "fp32_s": float(timing["fp32_s"]),
        "bf16_s": float(timing["bf16_s"]),
        "speedup": float(timing["fp32_s"]) / float(timing["bf16_s"]),
        "threads": torch.get_num_threads(),
        "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    data[key] = entry
    try:
        atomic_write_json(path, data)
    except OSError as exc:  # a read-only home still runs; it measures again next time
        log.warning("precision: cannot write the cache %s (%s)", path, exc)
    return entry, False


def choose_precision(
    requested: str,
    device: str | torch.device = "cpu",
    *,
    cpuinfo: str | Path = "/proc/cpuinfo",
    cache: Path | None = None,
    measure: Callable[[], dict[str, float]] = measure_matmul,
    cuda_bf16: Callable[[], bool] | None = None,
) -> PrecisionChoice:
    """Resolve ``requested`` (``auto`` or an explicit precision) for ``device``; see the module
    docstring. ``cpuinfo``, ``cache``, ``measure`` and ``cuda_bf16`` are injectable for tests.

    Raises:
        ValueError: an unknown precision, or an unknown ``$UMIT_AUTO_PRECISION``.
    """
    if requested not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {requested!r}")
    if requested != "auto":
        return PrecisionChoice(requested, f"{requested} as configured")
    pin = os.environ.get(PIN_ENV)
    if pin:
        if pin not in ("fp32", "bf16"):
            raise ValueError(f"${PIN_ENV} must be 'fp32' or 'bf16', got {pin!r}")
        return PrecisionChoice(pin, f"auto pinned by ${PIN_ENV}={pin}")
    dev = torch.device(device)
    if dev.type == "cuda":
        supported = cuda_bf16() if cuda_bf16 is not None else torch.cuda.is_bf16_supported()
        if supported:
            return PrecisionChoice("bf16", "auto: the CUDA device supports bf16")
        return PrecisionChoice("fp32", "auto: the CUDA device does not support bf16")
    if dev.type != "cpu":
        return PrecisionChoice("fp32", f"auto: no bf16 policy for {dev.type} devices")
    model, flags = cpu_info(cpuinfo)
    found = [f for f in BF16_FLAGS if f in flags]
    if not found:
        return PrecisionChoice(
            "fp32", f"auto: the CPU ({model}) has no {' / '.join(BF16_FLAGS)} instructions"
        )
    entry, cached = cpu_bf16_timing(model, cache=cache, measure=measure)
    speedup = entry["fp32_s"] / entry["bf16_s"]
    where = f"cached {entry.get('measured_at', '?')}" if cached else "measured now"
    detail = (
        f"the CPU ({model}) has {', '.join(found)}; a {entry['bf16_s'] * 1e3:.2f} ms bf16 vs "
        f"{entry['fp32_s'] * 1e3:.2f} ms fp32 matmul ({speedup:.2f}x, {where})"
    )
    if speedup >= MIN_SPEEDUP:
        return PrecisionChoice("bf16", f"auto: {detail}")
    return PrecisionChoice("fp32", f"auto: {detail}, under the {MIN_SPEEDUP}x needed for bf16")


_RESOLVED: dict[str, PrecisionChoice] = {}


def resolve_precision(requested: str, device: str | torch.device = "cpu") -> PrecisionChoice:
    """:func:`choose_precision` with the real machine, logged, once per process and device."""
    if requested != "auto":
        return choose_precision(requested, device)
    key = f"{torch.device(device).type}|{os.environ.get(PIN_ENV, '')}"
    if key not in _RESOLVED:
        _RESOLVED[key] = choose_precision("auto", device)
        log.info("precision: %s (%s)", _RESOLVED[key].precision, _RESOLVED[key].reason)
    return _RESOLVED[key]
