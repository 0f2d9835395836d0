"""Benchmarks side by side with MONAI: one entry point.

    python -m benchmarks.run [--cases mae,unetr] [--size small|full] [--reps N]
                             [--out benchmarks/results] [--docs docs/benchmarks.md]

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
DEFAULT_CASES = "mae,unetr,swin_unetr_fs24,swin_unetr_fs48,sliding_window,sliding_window_blend,data"


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
    args = ap.parse_args(argv)

    from benchmarks.cases import CASES, get_case
    from benchmarks.harness import machine_info, matmul_peak, run_case
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
    peak = matmul_peak(args.device, sizes=gemm_sizes)
    log(f"fp32 matmul peak: {peak['gflops']:.1f} GFLOP/s")
    records: list[dict] = []
    failures: list[str] = []
    for name in names:
        t = time.perf_counter()
        log(f"case {name} ({args.size})")
        try:
            case = get_case(name, args.size, args.device)
            rec = run_case(case, args.size, peak["gflops"], args.device, args.reps,
                           measure_memory=not args.no_memory, log=log)  # fmt: skip
        except Exception as exc:  # one broken case must not lose the others' figures
            log(f"  !! {name} failed: {type(exc).__name__}: {exc}")
            failures.append(name)
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
        kept = [c for c in done if c["name"] not in {r["name"] for r in records}]
        result["cases"] = kept + records
        result["matmul_peak"] = peak
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(result, indent=1, default=str) + "\n")
        tmp.replace(path)
    peak_after = matmul_peak(args.device, sizes=gemm_sizes)
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
