"""``umit phantoms``: write synthetic CT and/or MRI phantom collections that ``umit ingest`` reads.

Example::

    umit phantoms --n 50 --out data/phantoms --modality both --seed 0 workers=2

writes ``data/phantoms/ct`` and ``data/phantoms/mr`` (nnU-Net v2-style: dataset.json, imagesTr,
labelsTr, attributes.csv) and the resolved config as ``data/phantoms/config.yaml``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from umit.cli.common import add_config_args
from umit.config import UmitConfig, build_config, save_config
from umit.data.phantoms import check_shape, write_phantom_collection


class PhantomsConfig(UmitConfig):
    """Settings of ``umit phantoms``."""

    out: Path
    """Output folder; with modality "both" the collections go to ``out/ct`` and ``out/mr``."""

    n: int = Field(50, ge=1)
    """Number of labelled training cases per modality."""

    modality: Literal["ct", "mr", "both"] = "ct"
    """Which phantoms to write: CT torsos, MRI heads (T1, T2, FLAIR), or both."""

    seed: int = Field(0, ge=0)
    """Collection seed; each case's phantom seed is derived from it, its split and its index."""

    shape: tuple[int, int, int] | None = None
    """RAS grid (x, y, z) of the field of view at the reference spacing; None: the generator's
    default ((96, 96, 64) for CT, (80, 96, 80) for MR). Stored arrays follow each site's spacing."""

    n_test: int = Field(0, ge=0)
    """Number of unlabelled test cases per modality (written to imagesTs)."""

    workers: int = Field(1, ge=1)
    """Processes generating cases in parallel."""

    @field_validator("shape")
    @classmethod
    def _valid_shape(cls, value: tuple[int, int, int] | None) -> tuple[int, int, int] | None:
        return None if value is None else check_shape(value)


def run(cfg: PhantomsConfig) -> Path:
    """Write the collection(s) described by ``cfg`` and the resolved config; return ``cfg.out``."""
    out = Path(cfg.out)
    modalities = ("ct", "mr") if cfg.modality == "both" else (cfg.modality,)
    for modality in modalities:
        write_phantom_collection(
            out / modality if cfg.modality == "both" else out,
            n=cfg.n,
            modality=modality,
            seed=cfg.seed,
            shape=cfg.shape,
            n_test=cfg.n_test,
            workers=cfg.workers,
        )
    save_config(cfg, out)
    return out


def _main(args: argparse.Namespace) -> int:
    cfg = build_config(
        PhantomsConfig,
        args.config,
        args.overrides,
        out=args.out,
        n=args.n,
        modality=args.modality,
        seed=args.seed,
    )
    start = time.perf_counter()
    out = run(cfg)
    kinds = "CT + MR" if cfg.modality == "both" else cfg.modality.upper()
    print(
        f"umit phantoms: wrote {cfg.n} training + {cfg.n_test} test {kinds} case(s) per modality "
        f"to {out} in {time.perf_counter() - start:.1f} s"
    )
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "phantoms",
        help="write synthetic CT/MRI phantom collections (the demo's and tests' data)",
        description="Write nnU-Net v2-style collections of procedural CT torso and/or MRI head "
        "phantoms with labels and subject attributes, ready for `umit ingest`.",
    )
    parser.add_argument("--out", default=None, help="output folder (required here or in --config)")
    parser.add_argument("--n", type=int, default=None, help="training cases per modality (50)")
    parser.add_argument(
        "--modality", choices=("ct", "mr", "both"), default=None, help="which phantoms (ct)"
    )
    parser.add_argument("--seed", type=int, default=None, help="collection seed (0)")
    add_config_args(parser)
    parser.set_defaults(func=_main)
