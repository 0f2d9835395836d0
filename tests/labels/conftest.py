"""Shared fixtures of the labels tests: a tiny CT phantom collection with findings and reports,
ingested once per session (tests that write labels work on a copy)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def findings_raw(tmp_path_factory) -> Path:
    """RAW folder of 12 CT phantoms with findings (10 train, 2 test); ``RAW/../src`` holds the
    collection with reports.csv and findings.csv."""
    from umit.data.phantoms import write_phantom_collection
    from umit.ingest.run import IngestConfig
    from umit.ingest.run import run as ingest

    root = tmp_path_factory.mktemp("findings")
    write_phantom_collection(
        root / "src", n=10, n_test=2, modality="ct", seed=4, shape=(32, 32, 24), findings=True
    )
    ingest(IngestConfig(src=root / "src", out=root / "raw"), progress=False)
    return root / "raw"


@pytest.fixture
def raw_copy(findings_raw, tmp_path) -> Path:
    """A private copy of the RAW folder (with its secret) and of the source collection."""
    shutil.copytree(findings_raw.parent / "src", tmp_path / "src")
    shutil.copytree(findings_raw, tmp_path / "raw")
    return tmp_path / "raw"
