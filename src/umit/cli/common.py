"""Helpers shared by the subcommand modules."""

from __future__ import annotations

import argparse


def add_config_args(parser: argparse.ArgumentParser) -> None:
    """``--config FILE`` and trailing ``key.sub=value`` overrides, the same on every subcommand."""
    parser.add_argument("--config", default=None, help="YAML file of settings (a diff on defaults)")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="dotted overrides applied last, e.g. workers=2 target_spacing=[1.5,1.5,2]",
    )
