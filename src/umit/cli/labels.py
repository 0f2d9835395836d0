"""``umit labels``: label actions. TEMPORARY on branch trust18 (only ``aggregate``): the report
labels work (#16) owns this module; at merge its parser calls
``umit.cli.labels_aggregate.register_aggregate(actions)``."""

from __future__ import annotations

import argparse

from umit.cli.labels_aggregate import register_aggregate


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("labels", help="label actions: aggregate (consensus of several raters)")
    actions = p.add_subparsers(dest="labels_action", metavar="ACTION")
    register_aggregate(actions)
