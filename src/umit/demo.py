"""``umit demo``: the pipeline end to end on built-in procedural phantoms, no data or network.

Stages so far: phantoms -> ingest -> preprocess, then a catalog and store summary. Later stages
(pretrain, fine-tune, evaluate, report) are appended here as they land.
"""

from __future__ import annotations

import time
from pathlib import Path

from pydantic import Field

from umit.config import UmitConfig, save_config


class DemoConfig(UmitConfig):
    """Settings of ``umit demo``."""

    out: Path = Path("demo_out")
    """Folder for everything the demo writes (phantoms/, raw/, prep/)."""
    n_ct: int = Field(default=24, ge=2)
    """Number of CT torso phantoms."""
    n_mr: int = Field(default=8, ge=0)
    """Number of multi-sequence MRI head phantoms (0 to skip)."""
    seed: int = 0
    """Seed of the phantom generator (the demo is deterministic)."""
    workers: int = Field(default=2, ge=1)
    """Processes for phantom generation, ingest and preprocessing."""


def run(cfg: DemoConfig) -> dict:
    """Run the demo stages; returns a summary dict (also printed by the CLI)."""
    from umit.cli.phantoms import PhantomsConfig
    from umit.cli.phantoms import run as make_phantoms
    from umit.ingest.run import IngestConfig
    from umit.ingest.run import run as ingest
    from umit.preprocess.run import PreprocessConfig
    from umit.preprocess.run import run as preprocess

    t0 = time.perf_counter()
    cfg.out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, cfg.out)
    summary: dict = {"out": str(cfg.out)}
    collections = {"ct": cfg.n_ct, "mr": cfg.n_mr}
    for kind, n in collections.items():
        if n == 0:
            continue
        t = time.perf_counter()
        src = cfg.out / "phantoms" / kind
        make_phantoms(
            PhantomsConfig(out=src, n=n, modality=kind, seed=cfg.seed, workers=cfg.workers)
        )
        raw, prep = cfg.out / "raw" / kind, cfg.out / "prep" / kind
        ing = ingest(IngestConfig(src=src, out=raw, workers=cfg.workers))
        pre = preprocess(PreprocessConfig(raw=raw, out=prep, workers=cfg.workers))
        summary[kind] = {
            "phantoms": n,
            "ingested": ing.ingested + ing.skipped,
            "ingest_failed": ing.failed,
            "preprocessed": pre.done + pre.skipped,
            "preprocess_failed": pre.failed,
            "raw": str(raw),
            "prep": str(prep),
            "seconds": round(time.perf_counter() - t, 1),
        }
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    return summary
