"""``umit explain``: attention maps (ViT-based models; window attention for Swin) or Grad-CAM
(CNNs) of a fine-tuned model on raw images, written as NIfTI maps on each input's own grid (they overlay the input voxel
for voxel, as predict masks do) and PNG overlays through the query.

  umit explain IMAGE --model RUN/best.pt --out EXPLAIN                 # class-token attention
  umit explain IMAGE --model RUN/best.pt query=[12.5,-30,40] layer=-1  # from a voxel (RAS mm)
  umit explain IMAGE --model CNN/best.pt method=gradcam target_class=liver
"""

from __future__ import annotations

import argparse

from umit.cli.common import add_config_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "explain",
        help="attention (ViT, Swin) or Grad-CAM (CNN) maps of a model on the input's grid",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("inputs", nargs="?", default=None, help="image file, DICOM folder, or a folder")
    p.add_argument("--model", default=None, help="best.pt from umit finetune")
    p.add_argument("--out", default=None, help="output folder (default: explain)")
    p.add_argument("--method", choices=["auto", "attention", "gradcam"], default=None)
    add_config_args(p)
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from umit.config import build_config
    from umit.explain.run import ExplainConfig, run

    cfg = build_config(
        ExplainConfig,
        args.config,
        args.overrides,
        inputs=args.inputs,
        model=args.model,
        out=args.out,
        method=args.method,
    )
    s = run(cfg)
    print(
        f"explain ({s['method']}): {len(s['outputs'])} done, {len(s['failures'])} failed "
        f"in {s['seconds']:.1f} s -> {s['out']}"
    )
    for row in s["outputs"]:
        print(f"  {row['input']}: peak at {row['peak_mm']} mm -> {', '.join(row['maps'])}")
    for path, why in s["failures"].items():
        print(f"  FAILED {path}: {why}")
    return 1 if s["failures"] else 0
