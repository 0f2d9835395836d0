"""``umit``: the command-line front door. Each stage lives in its own module under ``umit.cli``.

A stage module defines ``register(subparsers)``, which adds its parser and sets ``func`` to a
function taking the parsed namespace and returning the process exit status.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from umit import __version__
from umit.errors import UmitError

# Order is the pipeline order shown by ``umit --help``.
STAGES: tuple[str, ...] = (
    "phantoms",
    "ingest",
    "labels",
    "deid",
    "preprocess",
    "deface",
    "pretrain",
    "probe",
    "finetune",
    "distill",
    "federated",
    "evaluate",
    "audit",
    "predict",
    "export",
    "explain",
    "data-efficiency",
    "demo",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="umit",
        description="UMIT: ingest, preprocess, pretrain, fine-tune, evaluate and audit 3D "
        "transformers for CT and MRI.",
    )
    parser.add_argument("--version", action="version", version=f"umit {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="STAGE")
    for name in STAGES:
        importlib.import_module(f"umit.cli.{name.replace('-', '_')}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Overrides may stand anywhere after the stage's positionals (argparse alone would only take
    # them before the first option), so unknown words of the form key=value are collected here.
    args, unknown = parser.parse_known_args(argv)
    stray = [
        u for u in unknown if u.startswith("-") or "=" not in u or not hasattr(args, "overrides")
    ]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if unknown:
        args.overrides = [*args.overrides, *unknown]
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except UmitError as exc:
        print(f"umit {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
