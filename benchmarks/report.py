"""Result JSON files -> the Markdown tables of ``docs/benchmarks.md``.

    python -m benchmarks.report [--out benchmarks/results] [--docs docs/benchmarks.md]

The section between ``<!-- results:begin -->`` and ``<!-- results:end -->`` is rewritten from
every ``*.json`` result file (one table per machine, date and size); the rest of the page is left
as written.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from benchmarks.harness import is_noisy

BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"


def load_results(out_dir: Path) -> list[dict[str, Any]]:
    """Every parseable result file in ``out_dir``, oldest first."""
    results = []
    for p in sorted(Path(out_dir).glob("*.json")):
        try:
            r = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(r, dict) and r.get("schema") == 1 and "machine" in r:
            r["_file"] = p.name
            results.append(r)
    return sorted(results, key=lambda r: (r["machine"].get("utc", ""), r["_file"]))


def _s(t: float | None) -> str:
    if t is None:
        return "–"
    return f"{t * 1000:.0f} ms" if t < 1 else f"{t:.2f} s"


def _timing(side: dict) -> str:
    return f"{_s(side['median_s'])} ({_s(side['min_s'])}–{_s(side['max_s'])})"


def _gb(mb: float) -> str:
    return f"{mb / 1024:.2f} GB" if abs(mb) >= 1024 else f"{mb:.0f} MB"


def _mb(side: dict) -> str:
    """Peak RSS, and in parentheses what the step added over the RSS after imports + build."""
    m = side.get("memory") or {}
    if "peak_mb" not in m:
        return "–"
    added = m.get("step_added_mb")
    return _gb(m["peak_mb"]) + (f" (+{_gb(added)})" if added is not None else "")


def _gf(side: dict) -> str:
    return f"{side['gflops_per_s']:.1f}" if "gflops_per_s" in side else "–"


def _frac(side: dict) -> str:
    return f"{side['fraction_of_peak']:.2f}" if "fraction_of_peak" in side else "–"


def _numerics(case: dict, other: str) -> str:
    n = case.get("numerics") or {}
    parts = []
    for k, v in n.items():
        if not k.endswith(f"_vs_{other}"):
            continue
        short = k.removesuffix(f"_ours_vs_{other}").replace("max_abs_diff", "max abs Δ")
        if "diff" in k:
            parts.append(f"{short} {v:.2g}")
        elif isinstance(v, int):
            parts.append(f"{short} {v}")
        else:
            parts.append(f"{short} {v:.6f}")
    return "; ".join(parts) or "–"


def case_rows(case: dict, cpus: int | None = None) -> list[str]:
    """One table row per comparison of ours with another side (MONAI, ablations)."""
    sides = case["sides"]
    names = list(sides)
    ours = sides[names[0]]
    rows = []
    for other in names[1:]:
        ref = sides[other]
        speed = case["speedup"][other]
        mem_ratio = (case.get("memory_ratio") or {}).get(other)
        load = case.get("load") or {}
        la = load.get("loadavg_before") or [float("nan")]
        oc = load.get("other_cores")
        noise = f"{oc:.2f}" if oc is not None else "–"
        noisy = case.get("noisy")
        if "threads" in case and cpus:  # re-judged with the idle cores (older files lack them)
            noisy = is_noisy(oc, case["threads"], cpus)
        noise += f" / {la[0]:.1f}" + (" **noisy**" if noisy else "")
        if case.get("utc"):
            noise += f" ({case['utc'][11:16]} UTC)"
        rows.append(
            "| "
            + " | ".join(
                [
                    f"{case['title']}" + (f" — {case['label']}" if case.get("label") else ""),
                    other,
                    _timing(ours),
                    _timing(ref),
                    f"**{speed:.2f}x**",
                    f"{_mb(ours)} / {_mb(ref)}"
                    + (f" ({mem_ratio:.2f}x)" if mem_ratio is not None else ""),
                    f"{_gf(ours)} / {_gf(ref)}",
                    f"{_frac(ours)} / {_frac(ref)}"
                    + (
                        f" (of {case['matmul_peak_gflops']:.0f})"
                        if case.get("matmul_peak_gflops") and "fraction_of_peak" in ours
                        else ""
                    ),
                    _numerics(case, other),
                    str(case.get("threads", "–")),
                    noise,
                ]
            )
            + " |"
        )
    return rows


HEADER = (
    "| case | vs | ours: median (min–max) | other: median (min–max) | speed-up | "
    "peak RSS (+ step) ours / other (ratio) | GFLOP/s ours / other | fraction of peak ours / other (of peak GFLOP/s) | "
    "numerics (ours vs other) | threads | other procs, cores / load 1 min (case end) |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|"
)


def render(results: list[dict[str, Any]]) -> str:
    """Markdown for all results: a heading with the machine, then the table."""
    out = []
    for r in results:
        m = r["machine"]
        threads = f"{m['threads']} thread" + ("s" if m["threads"] != 1 else "")
        dev = f"GPU {m['gpu']}" if m.get("gpu") else f"CPU, {threads}"
        peak = r.get("matmul_peak", {}).get("gflops")
        after = r.get("matmul_peak_after", {}).get("gflops")
        out.append(f"### {m['hostname']} — {m['date']} — size `{r['size']}` — {dev}\n")
        out.append(
            f"{m['cpu']} ({m.get('cpus')} CPUs{', ' + ' '.join(m['cpu_flags']) if m.get('cpu_flags') else ''}"
            f"{', ' + str(m['mem_total_gb']) + ' GB RAM' if m.get('mem_total_gb') else ''}); "
            f"torch {m['torch']}, MONAI {m['monai']}, Python {m['python']}; run started "
            f"{m['utc']} (each row ends at the UTC time in its last column; rows from earlier runs of the "
            f"day keep the matmul peak of their run). Last measured {r.get('matmul_peak', {}).get('dtype', 'float32')} matmul peak "
            + (f"{peak:.1f} GFLOP/s" if peak else "–")
            + (f" ({after:.1f} after the run)" if after else "")
            + (
                f"; bfloat16 matmul peak {r['matmul_peak_bf16']['gflops']:.1f} GFLOP/s (the "
                "fraction of peak of `[bf16 autocast]` rows is of this one)"
                if r.get("matmul_peak_bf16")
                else ""
            )
            + f". File `{r['_file']}`.\n"
        )
        out.append(HEADER)
        for case in r["cases"]:
            out.extend(case_rows(case, m.get("cpus")))
        out.append("")
    return "\n".join(out) if out else "_No results yet: run `python -m benchmarks.run`._\n"


def write_docs(out_dir: Path, docs: Path) -> None:
    """Rewrites the generated section of ``docs`` from the results in ``out_dir``."""
    table = render(load_results(out_dir))
    block = f"{BEGIN}\n<!-- generated by `python -m benchmarks.report`; do not edit by hand -->\n\n{table}\n{END}"
    text = docs.read_text() if docs.exists() else "# Benchmarks\n\n" + BEGIN + "\n" + END + "\n"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        tail = rest.split(END, 1)[1]
        text = head + block + tail
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    docs.parent.mkdir(parents=True, exist_ok=True)
    docs.write_text(text)


def main(argv: list[str] | None = None) -> None:
    root = Path(__file__).resolve().parents[1]
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=str(root / "benchmarks" / "results"))
    ap.add_argument("--docs", default=str(root / "docs" / "benchmarks.md"))
    args = ap.parse_args(argv)
    write_docs(Path(args.out), Path(args.docs))


if __name__ == "__main__":
    main()
