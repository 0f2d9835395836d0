"""``umit export``: a fine-tuned best.pt -> one ONNX file that ``umit predict`` runs alone.

The graph is exported with torch.onnx.export(dynamo=True) (the TorchScript exporter only if that
fails; which one is stored in the file), with a dynamic batch axis and, for convolutional models,
dynamic spatial axes; the preprocessing plan and inference spec of best.pt go into the ONNX
metadata_props. The export is verified against torch (|diff| <= atol, default 1e-4) before it is
written. Then: umit predict IN --model M.onnx --out OUT (docs/export.md).
"""

from __future__ import annotations

import argparse

from umit.cli.common import add_config_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="export a fine-tuned model to ONNX (plan and inference spec in its metadata)",
        description=__doc__,
    )
    p.add_argument("--model", default=None, help="best.pt from umit finetune")
    p.add_argument("--format", default=None, choices=["onnx"], help="export format (onnx)")
    p.add_argument("--out", default=None, help="the .onnx file to write")
    p.add_argument(
        "--exporter",
        default=None,
        choices=["auto", "dynamo", "torchscript"],
        help="auto (default): dynamo, TorchScript only if dynamo fails",
    )
    add_config_args(p)
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    import json

    from umit.config import build_config
    from umit.inference.export import ExportConfig, run

    cfg = build_config(
        ExportConfig,
        args.config,
        args.overrides,
        model=args.model,
        format=args.format,
        out=args.out,
        exporter=args.exporter,
    )
    meta = run(cfg)
    dyn = meta["umit.dynamic"]
    worst = max(meta["umit.verified"]["max_abs_diff"].values())
    print(
        f"export: {cfg.model} -> {cfg.out} in {meta['seconds']:.1f} s ({meta['umit.exporter']} "
        f"exporter; input {json.dumps(dyn['input_shape'])}; max |onnxruntime - torch| {worst:.2g})"
    )
    if not dyn["spatial"]:
        print(f"  spatial axes static: {dyn['why']}")
    if meta["umit.exporter_note"]:
        print(f"  note: {meta['umit.exporter_note']}")
    return 0
