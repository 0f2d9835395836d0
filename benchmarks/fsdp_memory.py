"""Per-rank peak memory and step time of ViT3D training with FSDP2 + activation checkpointing +
mixed precision, measured, next to the formula that predicts it (docs/scale.md).

Each configuration runs in ``--nproc`` fresh processes (torchrun-style environment; gloo on CPU,
NCCL on CUDA). The model is built on the meta device, sharded with ``fully_shard`` per block and
at the root (``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)``), then materialized:
no rank ever holds the full fp32 model. Memory: CUDA ``max_memory_allocated``; on CPU the peak
resident set size (``ru_maxrss``) minus the resident size just before the weights were
materialized (so the Python/torch runtime and gloo buffers are not counted).

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/fsdp_memory.py --device cpu --nproc 2 \\
        --models base large huge:8 vit1b:8 --img 32 --batch 2 --out runs/fsdp_memory
    python benchmarks/fsdp_memory.py --device cuda --nproc 1 --search --img 96  # on a GPU

``name:k`` measures the variant at depth ``k`` (full width); the formula is then checked at depth
``k`` and gives the full-depth figure. ``--search`` (GPU) grows the model until it no longer fits.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

# name -> (embed_dim, depth, heads); vit1b: 1536 x 36 (~1.0B parameters, ViT-g-like width)
VARIANTS: dict[str, tuple[int, int, int]] = {
    "test": (48, 2, 3),
    "base": (768, 12, 12),
    "large": (1024, 24, 16),
    "huge": (1280, 32, 16),
    "vit1b": (1536, 36, 16),
}
PATCH = 16


# ---------------------------------------------------------------------------------------------
# the formula
# ---------------------------------------------------------------------------------------------
def param_counts(
    dim: int, depth: int, tokens: int, in_chans: int = 1, out: int = 1
) -> dict[str, int]:
    """Exact parameter counts of vit3d (qkv bias, mlp ratio 4, pre-norm blocks, final norm, a
    linear head), split into one block and the root (patch embedding, class token, position
    table, norm, head)."""
    block = 4 * dim + (3 * dim * dim + 3 * dim) + (dim * dim + dim) + (8 * dim * dim + 5 * dim)
    root = (PATCH**3 * in_chans * dim + dim) + dim + tokens * dim + 2 * dim + (dim * out + out)
    return {"block": block, "root": root, "total": depth * block + root}


def predict_bytes(
    dim: int, depth: int, heads: int, tokens: int, batch: int, world: int
) -> dict[str, float]:
    """Per-rank peak bytes of FSDP2 (per-block units) + checkpointing + bf16 compute, AdamW.

    - sharded state: fp32 parameters, fp32 gradients, AdamW exp_avg and exp_avg_sq:
      ``16 P / N``, plus one fp32 temporary of the shard in the optimizer step (``4 P / N``);
    - gathered bf16 parameters: the running block and the prefetched next one, and the root
      (kept unsharded between forward and backward): ``2 (2 P_blk + P_root)``;
    - a block's gradients in backward: unsharded bf16 (``2 P_blk``) and their fp32 copy for the
      fp32 reduce-scatter (``4 P_blk``);
    - activations: checkpointing keeps each block's bf16 input (``depth · B L D · 2``) and
      recomputes one block at a time in backward: ``B L (34 D + 5 H L) · 2`` (Korthikanti et al.
      2022, 16-bit activations of one transformer layer).
    """
    pc = param_counts(dim, depth, tokens)
    p, blk, root = pc["total"], pc["block"], pc["root"]
    state = 16 * p / world
    opt_tmp = 4 * p / world
    gathered = 2 * (2 * blk + root)
    grads = 6 * blk
    act = depth * batch * tokens * dim * 2 + batch * tokens * (34 * dim + 5 * heads * tokens) * 2
    return {
        "params": p,
        "state": state,
        "opt_tmp": opt_tmp,
        "gathered": gathered,
        "grads": grads,
        "activations": act,
        "total": state + opt_tmp + gathered + grads + act,
    }


# ---------------------------------------------------------------------------------------------
# one rank
# ---------------------------------------------------------------------------------------------
def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    import torch
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from umit.models import create_model
    from umit.train import distributed as du

    du.init_from_env()
    cuda = spec["device"] == "cuda"
    device = du.default_device() if cuda else torch.device("cpu")
    dim, depth, heads = spec["dim"], spec["depth"], spec["heads"]
    img = spec["img"]
    with torch.device("meta"):
        model = create_model(
            "vit3d_base_p16",
            embed_dim=dim,
            depth=depth,
            num_heads=heads,
            img_size=(img, img, img),
            in_chans=1,
            num_classes=1,
            grad_checkpointing=True,
        )
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for block in model.blocks:
        fully_shard(block, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    base_rss = _rss_bytes()
    model.to_empty(device=device)
    with torch.no_grad():  # values do not matter for memory and time; keep them finite
        for p in model.parameters():
            p.to_local().normal_(0, 0.02)
        for b in model.buffers():
            b.zero_()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    g = torch.Generator(device=device).manual_seed(du.rank())
    x = torch.randn(spec["batch"], 1, img, img, img, device=device, generator=g)
    times = []
    for step in range(spec["steps"] + 1):
        t0 = time.perf_counter()
        loss = model(x).float().pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize(device)
        if step:  # the first step allocates the optimizer state
            times.append(time.perf_counter() - t0)
    if cuda:
        peak = torch.cuda.max_memory_allocated(device) - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base_rss
    res = {
        "rank": du.rank(),
        "world": du.world_size(),
        "peak_bytes": int(peak),
        "step_s": statistics.median(times),
        "loss": float(loss),
    }
    du.destroy()
    return res


# ---------------------------------------------------------------------------------------------
# the launcher
# ---------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(spec: dict[str, Any], nproc: int, timeout: float) -> list[dict[str, Any]] | None:
    """Run one configuration in ``nproc`` processes; None when it does not fit (OOM)."""
    port = _free_port()
    procs = []
    for r in range(nproc):
        env = dict(
            os.environ,
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            RANK=str(r),
            LOCAL_RANK=str(r),
            WORLD_SIZE=str(nproc),
            LOCAL_WORLD_SIZE=str(nproc),
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, __file__, "--worker", json.dumps(spec)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outs = []
    for p in procs:
        out, _ = p.communicate(timeout=timeout)
        outs.append((p.returncode, out))
    if any(rc != 0 for rc, _ in outs):
        text = "\n".join(o[-2000:] for _, o in outs)
        if "out of memory" in text.lower() or "OutOfMemoryError" in text:
            return None
        raise RuntimeError(f"worker failed for {spec}:\n{text}")
    return [json.loads(o.strip().splitlines()[-1]) for _, o in outs]


def measure(name: str, args: argparse.Namespace) -> dict[str, Any] | None:
    base, _, cap = name.partition(":")
    dim, full_depth, heads = VARIANTS[base]
    depth = int(cap) if cap else full_depth
    tokens = (args.img // PATCH) ** 3
    spec = {
        "dim": dim,
        "depth": depth,
        "heads": heads,
        "img": args.img,
        "batch": args.batch,
        "steps": args.steps,
        "device": args.device,
    }
    ranks = launch(spec, args.nproc, args.timeout)
    if ranks is None:
        return None
    pred = predict_bytes(dim, depth, heads, tokens, args.batch, args.nproc)
    full = predict_bytes(dim, full_depth, heads, tokens, args.batch, args.nproc)
    peak = max(r["peak_bytes"] for r in ranks)
    return {
        "model": base,
        "dim": dim,
        "heads": heads,
        "depth_measured": depth,
        "depth_full": full_depth,
        "params_measured": pred["params"],
        "params_full": full["params"],
        "tokens": tokens,
        "batch_per_rank": args.batch,
        "world": args.nproc,
        "device": args.device,
        "peak_gb_per_rank": peak / 1e9,
        "predicted_gb_per_rank": pred["total"] / 1e9,
        "ratio_measured_to_predicted": peak / pred["total"],
        "predicted_full_depth_gb_per_rank": full["total"] / 1e9,
        "step_s": statistics.median(r["step_s"] for r in ranks),
        "ranks": ranks,
        "predicted_parts_gb": {k: v / 1e9 for k, v in pred.items() if k != "params"},
    }


LADDERS: dict[str, list[tuple[str, tuple[int, int, int]]]] = {
    # beyond ~1B: wider and deeper until it no longer fits (141 GB holds ~7B at 16 B/param)
    "gpu": [
        ("base", VARIANTS["base"]),
        ("large", VARIANTS["large"]),
        ("huge", VARIANTS["huge"]),
        ("vit1b", VARIANTS["vit1b"]),
        ("vit2.4b", (2048, 48, 16)),
        ("vit3.8b", (2560, 48, 20)),
        ("vit5.4b", (3072, 48, 24)),
        ("vit7b", (3072, 64, 24)),
        ("vit9.7b", (4096, 48, 32)),
        ("vit16b", (4096, 80, 32)),
    ],
    "tiny": [("test", VARIANTS["test"]), ("w96_d4", (96, 4, 3))],
}


def search(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Grow the model along ``args.ladder`` until it no longer fits; returns every row measured
    (the last one that fits is the largest trainable)."""
    rows = []
    for name, dims in LADDERS[args.ladder]:
        VARIANTS.setdefault(name, dims)
        row = measure(name, args)
        if row is None:
            rows.append({"model": name, "fits": False})
            break
        row["fits"] = True
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "ranks"}), flush=True)
        # after every row: a search stopped by a time limit keeps what it measured
        (args.out / "fsdp_memory.json").write_text(json.dumps(rows, indent=1))
    return rows


def render(rows: list[dict[str, Any]], tokens: int = 216, batch: int = 2) -> str:
    """Markdown: measured vs predicted per rank, then the predicted largest ViT per budget."""
    ok = [r for r in rows if r.get("fits")]
    c0 = next(
        (r["peak_gb_per_rank"] - r["predicted_gb_per_rank"] for r in ok if r["model"] == "test"),
        0.0,
    )
    lines = [
        f"Runtime constant C0 (the smallest model's measured minus predicted peak): {c0:.3f} GB",
        "",
        "| model | D x depth (measured) | params | tokens x batch/rank | ranks | peak GB/rank measured | "
        "predicted (+C0) | measured / predicted | step s | full depth: params, predicted GB/rank |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in ok:
        if r["model"] == "test":
            continue
        full = predict_bytes(
            r["dim"], r["depth_full"], r["heads"], r["tokens"], r["batch_per_rank"], r["world"]
        )
        pred = r["predicted_gb_per_rank"] + c0
        lines.append(
            f"| {r['model']} | {r['dim']} x {r['depth_measured']} | {r['params_measured'] / 1e6:.0f} M | "
            f"{r['tokens']} x {r['batch_per_rank']} | {r['world']} | {r['peak_gb_per_rank']:.2f} | "
            f"{pred:.2f} | {r['peak_gb_per_rank'] / pred:.2f} | {r['step_s']:.2f} | "
            f"{full['params'] / 1e9:.2f} B, {full['total'] / 1e9 + c0:.2f} |"
        )
    budgets = (24, 40, 80, 141)
    worlds = (1, 8, 64)
    names = ["base", "large", "huge", "vit1b"] + [n for n, _ in LADDERS["gpu"][4:]]
    dims = dict(LADDERS["gpu"])
    lines += [
        "",
        f"Predicted GB per rank at {tokens} tokens (96³, patch 16) x batch {batch} per rank, "
        "FSDP2 + checkpointing + bf16, AdamW:",
        "",
        "| model | params | " + " | ".join(f"N={w}" for w in worlds) + " |",
        "|---|---|" + "---|" * len(worlds),
    ]
    for n in names:
        d, depth, h = dims[n]
        cells = [predict_bytes(d, depth, h, tokens, batch, w)["total"] / 1e9 for w in worlds]
        p = param_counts(d, depth, tokens)["total"]
        lines.append(f"| {n} | {p / 1e9:.2f} B | " + " | ".join(f"{c:.1f}" for c in cells) + " |")
    lines += [
        "",
        "| memory per GPU | " + " | ".join(f"N={w}" for w in worlds) + " |",
        "|---|" + "---|" * len(worlds),
    ]
    for b in budgets:
        best = []
        for w in worlds:
            fit = [
                n
                for n in names
                if predict_bytes(*dims[n][:2], dims[n][2], tokens, batch, w)["total"] / 1e9
                <= 0.9 * b
            ]
            best.append(fit[-1] if fit else "-")
        lines.append(f"| {b} GB (90% usable) | " + " | ".join(best) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--models", nargs="+", default=["base", "large", "huge:8", "vit1b:8"])
    p.add_argument("--img", type=int, default=32, help="cube edge; tokens = (img/16)^3")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--search", action="store_true", help="grow until it no longer fits")
    p.add_argument("--ladder", default="gpu", choices=sorted(LADDERS))
    p.add_argument("--out", type=Path, default=Path("runs/fsdp_memory"))
    p.add_argument("--table", type=Path, default=None, help="render a fsdp_memory.json as Markdown")
    args = p.parse_args()
    if args.table is not None:
        print(render(json.loads(args.table.read_text())))
        return
    if args.worker is not None:
        print(json.dumps(worker(json.loads(args.worker))), flush=True)
        return
    args.out.mkdir(parents=True, exist_ok=True)
    if args.search:
        rows = search(args)
    else:
        rows = []
        for name in args.models:
            row = measure(name, args)
            if row is not None:
                row["fits"] = True
            rows.append(row if row is not None else {"model": name, "fits": False})
            print(json.dumps({k: v for k, v in (row or {}).items() if k != "ranks"}), flush=True)
    (args.out / "fsdp_memory.json").write_text(json.dumps(rows, indent=1))
    print(f"wrote {args.out / 'fsdp_memory.json'}")


if __name__ == "__main__":
    main()
