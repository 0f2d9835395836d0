"""Benchmarks side by side with MONAI: one entry point.

    python -m benchmarks.run [--cases mae,unetr] [--size small|full] [--reps N]
                             [--precision auto|fp32|bf16|both]
                             [--out benchmarks/results] [--docs docs/benchmarks.md]

Precision: ``auto`` (default) resolves as ``umit`` does (:mod:`umit.train.precision`: bf16 on
CUDA with bf16 and on CPUs with AVX-512 BF16 / AMX where a measured matmul is faster): where bf16
is chosen every case runs twice, an fp32 row and a bf16 row (every side under the same bf16
autocast), else fp32 rows only. ``fp32``, ``bf16`` or ``both`` force it.

Runs each case (ours and MONAI interleaved in this process; peak memory in a fresh subprocess
per side), measures the fp32 matmul peak of this machine before and after, writes
``<out>/<machine>-<date>-<size>.json`` (cases of an earlier run of the same day and size are
kept unless re-run) and regenerates the table in ``docs/benchmarks.md`` from every result file
in ``<out>``. Nothing asserts on time.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CASES = (
    "mae,unetr,swin_unetr_fs24,swin_unetr_fs48,sliding_window,sliding_window_blend,data,"
    "onnx_sliding_window"
)


def precisions(requested: str, device: str) -> tuple[list[str], str]:
    """The precisions to run (fp32 first) and why."""
    if requested == "both":
        return ["fp32", "bf16"], "both as asked"
    if requested in ("fp32", "bf16"):
        return [requested], "as asked"
    from umit.train.precision import resolve_precision

    choice = resolve_precision("auto", device)
    if choice.precision == "bf16":
        return ["fp32", "bf16"], choice.reason
    return ["fp32"], choice.reason


def record_key(rec: dict) -> tuple[str, str]:
    """A case's identity in a result file: its name and precision (fp32 and bf16 rows coexist)."""
    return rec["name"], rec.get("precision", "float32")


def machine_slug(info: dict) -> str:
    """File-name-safe machine name: the hostname, plus the GPU on CUDA runs."""
    name = info["hostname"] + (f"-{info['gpu']}" if info.get("gpu") else "")
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "machine"


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--cases", default=DEFAULT_CASES, help="comma-separated case names")
    ap.add_argument("--size", default="small", choices=("tiny", "small", "full"))
    ap.add_argument("--reps", type=int, default=None, help="timed rounds (default: per case)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all CPUs)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--docs", default=str(ROOT / "docs" / "benchmarks.md"),
                    help="Markdown file whose generated section is rewritten ('' to skip)")  # fmt: skip
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    ap.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "both"),
                    help="auto: fp32 rows, plus bf16 rows where umit's precision=auto picks bf16")  # fmt: skip
    args = ap.parse_args(argv)

    from benchmarks.cases import CASES, get_case
    from benchmarks.harness import PRECISION_DTYPES, machine_info, matmul_peak, run_case
    from benchmarks.report import write_docs

    names = [n.strip() for n in args.cases.split(",") if n.strip()]
    unknown = [n for n in names if n not in CASES]
    if unknown:
        ap.error(f"unknown case(s) {unknown}; known: {', '.join(CASES)}")
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    info = machine_info(args.device)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{machine_slug(info)}-{info['date']}-{args.size}.json"
    result = json.loads(path.read_text()) if path.exists() else {"cases": []}
    result.update(schema=1, machine=info, size=args.size, command=" ".join(sys.argv))

    def log(msg: str) -> None:
        print(msg, flush=True)

    log(f"machine: {info['cpu']} ({info['threads']} threads), gpu {info['gpu']}, "
        f"torch {info['torch']}, monai {info['monai']}")  # fmt: skip
    gemm_sizes = (256, 512) if args.size == "tiny" else (1024, 2048)
    precs, why = precisions(args.precision, args.device)
    log(f"precision: {' and '.join(precs)} ({why})")
    result["precisions"] = {"run": precs, "why": why}
    peaks = {
        p: matmul_peak(args.device, dtype=PRECISION_DTYPES[p], sizes=gemm_sizes) for p in precs
    }
    peak = peaks["fp32"] if "fp32" in peaks else peaks[precs[0]]
    for p, pk in peaks.items():
        log(f"{p} matmul peak: {pk['gflops']:.1f} GFLOP/s")
    records: list[dict] = []
    failures: list[str] = []
    for name, prec in ((n, p) for n in names for p in precs):
        t = time.perf_counter()
        log(f"case {name} ({args.size}, {prec})")
        try:
            case = get_case(name, args.size, args.device)
            rec = run_case(case, args.size, peaks[prec]["gflops"], args.device, args.reps,
                           measure_memory=not args.no_memory, log=log, precision=prec)  # fmt: skip
        except Exception as exc:  # one broken case must not lose the others' figures
            log(f"  !! {name} ({prec}) failed: {type(exc).__name__}: {exc}")
            failures.append(f"{name} ({prec})")
            continue
        rec["wall_s"] = round(time.perf_counter() - t, 1)
        rec["utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        records.append(rec)
        sp = ", ".join(f"{k} {v:.2f}x" for k, v in rec["speedup"].items())
        log(f"  -> speed-up vs {sp}; other processes {rec['load']['other_cores']:.2f} cores"
            f"{' (NOISY)' if rec['noisy'] else ''}; {rec['wall_s']} s")  # fmt: skip
        # write after every case: a long run interrupted keeps what it measured
        # re-read: another run of the same day may have written cases since this one started
        done = json.loads(path.read_text())["cases"] if path.exists() else result["cases"]
        kept = [c for c in done if record_key(c) not in {record_key(r) for r in records}]
        result["cases"] = kept + records
        result["matmul_peak"] = peak
        if "bf16" in peaks:
            result["matmul_peak_bf16"] = peaks["bf16"]
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(result, indent=1, default=str) + "\n")
        tmp.replace(path)
    peak_after = matmul_peak(args.device, dtype=PRECISION_DTYPES[precs[0]], sizes=gemm_sizes)
    result["matmul_peak_after"] = peak_after
    log(f"fp32 matmul peak after: {peak_after['gflops']:.1f} GFLOP/s")
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=1, default=str) + "\n")
    tmp.replace(path)
    log(f"written {path}")
    if args.docs:
        write_docs(out_dir, Path(args.docs))
        log(f"table regenerated in {args.docs}")
    if failures:
        log(f"failed cases: {', '.join(failures)}")
    return path


if __name__ == "__main__":
    main()
