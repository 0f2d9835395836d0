"""The ``umit phantoms`` stage: its settings (``PhantomsConfig``) and ``run``.

Lives with the generators rather than in the CLI so that the demo and the benchmarks can write
phantom collections without importing :mod:`umit.cli`; ``umit.cli.phantoms`` only parses the
command line and calls ``run``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from umit.config import UmitConfig, save_config
from umit.data.phantoms.collection import write_phantom_collection
from umit.data.phantoms.scanner import check_shape


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

    findings: bool = False
    """CT: draw findings per subject (liver lesion, pleural effusion, splenomegaly, kidney cyst)
    into image and labels, and write a free-text report per study (``reports.csv``) and the
    truth (``findings.csv``); see :mod:`umit.data.phantoms.findings`."""

    phases: list[str] | None = None
    """CT: write each subject as a multiphase exam, one series per listed contrast phase (e.g.
    ``[none, arterial, portal]``), linked by a ``subject_id`` column: the unlabeled pool of
    ``umit pretrain method=cross_phase``. None: one series per subject, its phase drawn."""

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
            findings=cfg.findings and modality == "ct",
            phases=cfg.phases if modality == "ct" else None,
        )
    save_config(cfg, out)
    return out
