"""The GPU rows of docs/benchmarks.md in one run (``benchmarks/gpu.sh`` calls this).

Three parts, each written to ``OUT/gpu_rows.json`` as soon as it finishes, then one Markdown
table ``OUT/gpu_rows.md`` (and, with ``--docs``, the section between ``<!-- gpu-rows:start -->``
and ``<!-- gpu-rows:end -->`` of docs/benchmarks.md):

1. ``monai``: the MONAI comparison cases of ``benchmarks.run`` at ``--size``, both sides under
   the same ``torch.autocast(bf16)`` (on CUDA; ``--precision fp32`` turns it off), interleaved,
   without the peak-memory subprocesses (they would run outside the autocast);
2. ``mae``: MAE pretraining throughput of our ``MAE3D`` (ViT-B/16 at 96³, mask 0.75 at
   ``full``): a whole training step (forward, backward, AdamW) in samples/s and as a fraction of
   the card's bf16 peak (datasheet dense peak when the card is known, and the bf16 GEMM rate
   measured in this run), eager and with ``torch.compile``;
3. ``fsdp``: the largest ViT that trains on the device with FSDP2 + activation checkpointing +
   bf16 (``benchmarks/fsdp_memory.py --search``), with its memory and step time.

    python benchmarks/gpu_rows.py --device cuda --size full --out runs/gpu_rows --docs docs/benchmarks.md
    python benchmarks/gpu_rows.py --device cpu --size tiny --out /tmp/rows      # the CPU check
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# dense bf16 tensor-core peaks from the vendors' datasheets (TFLOP/s, without sparsity)
DATASHEET_BF16_TFLOPS = {
    "H200": 989.0,
    "H100 SXM": 989.0,
    "H100 80GB HBM3": 989.0,
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "A100": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
    "A10": 125.0,
}
MAE_SIZES = {
    "tiny": {"img": 32, "width": 48, "depth": 2, "heads": 3, "dec": 48, "dec_depth": 1, "batch": 2},
    "small": {
        "img": 64,
        "width": 384,
        "depth": 12,
        "heads": 6,
        "dec": 192,
        "dec_depth": 4,
        "batch": 4,
    },
    "full": {
        "img": 96,
        "width": 768,
        "depth": 12,
        "heads": 12,
        "dec": 384,
        "dec_depth": 4,
        "batch": 32,
    },
}
MONAI_CASES = {
    "tiny": "mae,unetr",
    "small": "mae,unetr,swin_unetr_fs48,sliding_window",
    "full": "mae,unetr,swin_unetr_fs24,swin_unetr_fs48,sliding_window,sliding_window_blend",
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return platform.processor() or "cpu"


def datasheet_peak(name: str) -> float | None:
    """Dense bf16 peak in FLOP/s of a known card (longest matching name), else None."""
    hits = [k for k in DATASHEET_BF16_TFLOPS if k.lower() in name.lower()]
    return DATASHEET_BF16_TFLOPS[max(hits, key=len)] * 1e12 if hits else None


def bf16_gemm_peak(device: torch.device, n: int, reps: int = 5) -> float:
    """Best measured FLOP/s of an n x n x n bf16 matmul on ``device``."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    a @ b
    _sync(device)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


# ---------------------------------------------------------------------------------------------
def part_monai(args: argparse.Namespace) -> dict[str, Any]:
    from benchmarks import run

    cm = (
        torch.autocast(device_type=args.device, dtype=torch.bfloat16)
        if args.precision == "bf16"
        else contextlib.nullcontext()
    )
    argv = ["--cases", MONAI_CASES[args.size], "--size", args.size, "--device", args.device,
            "--out", str(args.out / "harness"), "--docs", "", "--no-memory"]  # fmt: skip
    if args.size == "tiny":
        argv += ["--reps", "2", "--threads", "1"]
    with cm:  # thread-local: every forward of both sides runs under it
        path = run.main(argv)
    res = json.loads(Path(path).read_text())
    rows = []
    for c in res["cases"]:
        rows.append(
            {
                "case": c["name"],
                "speedup_vs": c.get("speedup", {}),
                "sides": {
                    k: v.get("median_s")
                    for k, v in (c.get("sides") or {}).items()
                    if isinstance(v, dict)
                },
            }
        )
    return {"precision": args.precision, "file": str(path), "cases": rows}


def _mae_step_rate(
    c: dict[str, Any], device: torch.device, compile_: bool, steps: int, backend: str = "inductor"
) -> dict:
    from umit.models import create_model
    from umit.ssl.mae import MAE3D, mae_flops_per_sample

    torch.manual_seed(0)
    enc = create_model("vit3d_base_p16", embed_dim=c["width"], depth=c["depth"],
                       num_heads=c["heads"], img_size=(c["img"],) * 3, in_chans=1)  # fmt: skip
    mae = MAE3D(enc, 1, decoder_dim=c["dec"], decoder_depth=c["dec_depth"],
                decoder_heads=c["heads"] if c["dec"] % c["heads"] == 0 else 1).to(device)  # fmt: skip
    flops = mae_flops_per_sample(mae, (c["img"],) * 3)
    opt = torch.optim.AdamW(mae.parameters(), lr=1e-4, fused=device.type == "cuda")
    step_fn = torch.compile(mae, backend=backend) if compile_ else mae
    x = torch.randn(c["batch"], 1, c["img"], c["img"], c["img"], device=device)
    ac = (
        torch.autocast(device_type=device.type, dtype=torch.bfloat16)
        if device.type == "cuda"
        else contextlib.nullcontext()
    )
    t_first = time.perf_counter()
    times = []
    for i in range(steps + 2):  # 2 warm-up steps (compilation happens there)
        _sync(device)
        t0 = time.perf_counter()
        with ac:
            loss = step_fn(x)["loss"]
        loss.float().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        if i >= 2:
            times.append(time.perf_counter() - t0)
        if i == 1:
            warm = time.perf_counter() - t_first
    times.sort()
    med = times[len(times) // 2]
    return {
        "compile": compile_ and backend,
        "batch": c["batch"],
        "step_s": med,
        "samples_per_s": c["batch"] / med,
        "flops_per_sample": flops,
        "flops_per_s": flops * c["batch"] / med,
        "warmup_s": warm,
        "loss": float(loss),
    }


def part_mae(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    c = MAE_SIZES[args.size]
    name = device_name(device)
    sheet = datasheet_peak(name) if device.type == "cuda" else None
    gemm = bf16_gemm_peak(device, 8192 if device.type == "cuda" and args.size == "full" else 512)
    rows = []
    for compile_ in (False, True):
        try:
            r = _mae_step_rate(c, device, compile_, args.mae_steps, args.compile_backend)
        except Exception as exc:  # compile may be unavailable (no compiler on the machine)
            r = {"compile": compile_, "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
        if "flops_per_s" in r:
            r["fraction_of_datasheet_bf16_peak"] = r["flops_per_s"] / sheet if sheet else None
            r["fraction_of_measured_bf16_gemm"] = r["flops_per_s"] / gemm
        rows.append(r)
    return {"device": name, "config": c, "datasheet_bf16_flops": sheet,
            "measured_bf16_gemm_flops": gemm, "rows": rows}  # fmt: skip


def part_fsdp(args: argparse.Namespace) -> dict[str, Any]:
    out = args.out / "fsdp"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "fsdp_memory.py"), "--search",
           "--device", args.device, "--nproc", "1", "--out", str(out), "--steps", "2",
           "--img", "96" if args.size == "full" else "32", "--batch", "2",
           "--ladder", "gpu" if args.size == "full" else "tiny"]  # fmt: skip
    stopped = False
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.fsdp_timeout)
        if proc.returncode != 0:
            raise RuntimeError(proc.stdout[-2000:] + proc.stderr[-2000:])
    except subprocess.TimeoutExpired:  # keep the rows measured so far (written after each)
        stopped = True
    rows = json.loads((out / "fsdp_memory.json").read_text())
    if stopped:
        rows.append({"model": f"(search stopped after {args.fsdp_timeout:.0f} s)", "fits": False})
    fits = [r for r in rows if r.get("fits")]
    return {"rows": [{k: v for k, v in r.items() if k != "ranks"} for r in rows],
            "largest": fits[-1]["model"] if fits else None,
            "largest_params": fits[-1]["params_full"] if fits else None}  # fmt: skip


# ---------------------------------------------------------------------------------------------
def table(res: dict[str, Any]) -> str:
    lines = [
        f"GPU rows: {res['device']}, torch {res['torch']}, {res['utc']}, size {res['size']}",
        "",
    ]
    m = res.get("monai")
    if m and "cases" in m:
        lines += [f"MONAI comparison ({m['precision']}, interleaved medians)", "",
                  "| case | speed-up vs MONAI |", "|---|---|"]  # fmt: skip
        for c in m["cases"]:
            sp = ", ".join(f"{k} {v:.2f}x" for k, v in c["speedup_vs"].items())
            lines.append(f"| {c['case']} | {sp} |")
        lines.append("")
    a = res.get("mae")
    if a and "rows" in a:
        lines += ["MAE pretraining step (forward + backward + AdamW, bf16 autocast on CUDA)", "",
                  "| torch.compile | batch | samples/s | TFLOP/s | of datasheet bf16 peak | of measured bf16 GEMM |",
                  "|---|---|---|---|---|---|"]  # fmt: skip
        for r in a["rows"]:
            if "error" in r:
                lines.append(f"| {r['compile']} | - | failed: {r['error'][:60]} | | | |")
                continue
            ds = r["fraction_of_datasheet_bf16_peak"]
            lines.append(
                f"| {r['compile']} | {r['batch']} | {r['samples_per_s']:.2f} | "
                f"{r['flops_per_s'] / 1e12:.3g} | {'-' if ds is None else f'{ds:.1%}'} | "
                f"{r['fraction_of_measured_bf16_gemm']:.1%} |"
            )
        lines.append("")
    f = res.get("fsdp")
    if f and "rows" in f:
        lines += ["Largest ViT with FSDP2 + activation checkpointing + bf16 (1 process)", "",
                  "| model | params | tokens | batch | peak GB | predicted GB | step s | fits |",
                  "|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in f["rows"]:
            if not r.get("fits"):
                lines.append(f"| {r['model']} | | | | | | | no |")
                continue
            lines.append(
                f"| {r['model']} | {r['params_full'] / 1e9:.2f} B | {r['tokens']} | "
                f"{r['batch_per_rank']} | {r['peak_gb_per_rank']:.2f} | "
                f"{r['predicted_gb_per_rank']:.2f} | {r['step_s']:.3f} | yes |"
            )
    for part in ("monai", "mae", "fsdp"):
        if res.get(part, {}).get("error"):
            lines.append(f"\n{part} failed: {res[part]['error'][:300]}")
    return "\n".join(lines) + "\n"


def write_docs(md: str, docs: Path) -> None:
    start, end = "<!-- gpu-rows:start -->", "<!-- gpu-rows:end -->"
    text = docs.read_text() if docs.exists() else ""
    block = f"{start}\n{md}{end}"
    if start in text and end in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip() + "\n\n## GPU rows\n\n" + block + "\n"
    docs.write_text(text)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--size", default="full", choices=("tiny", "small", "full"))
    ap.add_argument("--precision", default=None, choices=("bf16", "fp32"),
                    help="MONAI cases: default bf16 on CUDA, fp32 on CPU")  # fmt: skip
    ap.add_argument("--parts", default="monai,mae,fsdp")
    ap.add_argument("--mae-steps", type=int, default=None)
    ap.add_argument("--compile-backend", default=None,
                    help="torch.compile backend (default inductor; aot_eager at --size tiny, "
                    "where a C++ inductor build on a busy CPU takes minutes)")  # fmt: skip
    ap.add_argument("--fsdp-timeout", type=float, default=240)
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "gpu_rows")
    ap.add_argument("--docs", default="", help="docs/benchmarks.md to update ('' to skip)")
    args = ap.parse_args(argv)
    if args.precision is None:
        args.precision = "bf16" if args.device == "cuda" else "fp32"
    if args.compile_backend is None:
        args.compile_backend = "aot_eager" if args.size == "tiny" else "inductor"
    if args.mae_steps is None:
        args.mae_steps = 10 if args.size == "full" else 3
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but CUDA is not available (use --device cpu --size tiny)")
    args.out.mkdir(parents=True, exist_ok=True)
    res: dict[str, Any] = {
        "device": device_name(torch.device(args.device)),
        "torch": torch.__version__,
        "size": args.size,
        "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seconds": {},
    }
    parts = {"monai": part_monai, "mae": part_mae, "fsdp": part_fsdp}
    for name in [p.strip() for p in args.parts.split(",") if p.strip()]:
        t0 = time.perf_counter()
        try:
            res[name] = parts[name](args)
        except Exception as exc:  # one part failing keeps the others' rows
            res[name] = {"error": f"{type(exc).__name__}: {exc}"}
        res["seconds"][name] = round(time.perf_counter() - t0, 1)
        print(f"{name}: {res['seconds'][name]} s", flush=True)
        (args.out / "gpu_rows.json").write_text(json.dumps(res, indent=1, default=str))
    md = table(res)
    (args.out / "gpu_rows.md").write_text(md)
    if args.docs:
        write_docs(md, Path(args.docs))
    print(md)
    return res


if __name__ == "__main__":
    main()
