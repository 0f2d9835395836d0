"""Where a case's time goes: torch.profiler over one step of each side, top ops by self CPU time.

    python -m benchmarks.profile_ops --case unetr --size full [--sides ours,monai] [--top 15]

One warm-up step, then one profiled step per side; prints the profiler's table per side. Used for
the "targets missed" notes in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os

import torch


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--case", required=True)
    ap.add_argument("--size", default="small", choices=("tiny", "small", "full"))
    ap.add_argument("--sides", default=None, help="comma-separated (default: all of the case)")
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    from torch.profiler import ProfilerActivity, profile

    from benchmarks.cases import get_case

    case = get_case(args.case, args.size)
    for name in args.sides.split(",") if args.sides else case.sides:
        side = case.build(name)
        (side.warm or side.step)()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            side.step()
        print(f"===== {args.case} ({args.size}) / {name}")
        print(
            prof.key_averages().table(
                sort_by="self_cpu_time_total", row_limit=args.top, max_name_column_width=48
            )
        )
        del side, prof


if __name__ == "__main__":
    main()
