"""Ingest and preprocess with the catalog in PostgreSQL: many writers, one catalog, no duplicates
or lost rows; credentials never in config.yaml; one preprocess per PREP at a time."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from umit.deid.secret import SECRET_NAME, load_or_create_secret
from umit.errors import InputError
from umit.ingest.catalog import Catalog
from umit.ingest.run import IngestConfig
from umit.ingest.run import run as ingest
from umit.preprocess.run import PreprocessConfig, lock_name
from umit.preprocess.run import run as preprocess

SRC = Path(__file__).resolve().parents[2] / "src"
N_FILES = 12


def _pool(folder: Path) -> list[Path]:
    """12 small CT-like NIfTI volumes (one unreadable) of different sizes."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    files = []
    for i in range(N_FILES):
        path = folder / f"case{i:02d}.nii.gz"
        if i == 7:
            path.write_bytes(b"not a nifti file")
        else:
            data = rng.normal(0, 300, size=(10 + i, 9, 8)).astype(np.int16)
            nib.save(nib.Nifti1Image(data, np.diag([1.0, 1.2, 2.5, 1.0])), path)
        files.append(path)
    return files


def _overlapping(files: list[Path], root: Path, k: int = 4) -> list[Path]:
    """``k`` folders of symlinks, folder i holding files 3i..3i+5 (mod 12): each file in two."""
    folders = []
    for i in range(k):
        f = root / f"part{i}"
        f.mkdir(parents=True)
        for j in range(3 * i, 3 * i + 6):
            p = files[j % len(files)]
            (f / p.name).symlink_to(p)
        folders.append(f)
    return folders


def _rows(cat: Catalog) -> dict:
    series = [{k: v for k, v in vars(r).items() if k != "ingested_at"} for r in cat.series()]
    # a reason names the file by the folder it was read through (parts/part1/... or pool/...)
    failures = [
        {**{k: v for k, v in r.items() if k != "failed_at"}, "reason": r["reason"].split("/")[-1]}
        for r in cat.failures()
    ]
    return {"series": series, "failures": failures}


@pytest.mark.postgres
@pytest.mark.multiproc
def test_four_processes_ingest_overlapping_folders_into_one_catalog(tmp_path, pg_url):
    files = _pool(tmp_path / "pool")
    parts = _overlapping(files, tmp_path / "parts")
    raw = tmp_path / "raw"
    load_or_create_secret(tmp_path / "secret-holder")  # the same pseudonyms in both RAWs
    code = (
        "import sys; from umit.cli.main import main; "
        "sys.exit(main(['ingest', sys.argv[1], '--out', sys.argv[2], 'catalog=' + sys.argv[3]]))"
    )
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    raw.mkdir()
    shutil.copy(tmp_path / "secret-holder" / SECRET_NAME, raw / SECRET_NAME)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(p), str(raw), pg_url],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for p in parts
    ]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    codes = [p.returncode for p in procs]
    # parts 1 and 2 hold the unreadable file; 0 and 3 report the shared catalog's failure row
    # if it was there when they finished (status 1), else 0
    assert codes[1] == codes[2] == 1 and set(codes) <= {0, 1}, outputs
    # the reference: one process, the whole pool, an embedded SQLite catalog
    single = tmp_path / "single"
    single.mkdir()
    shutil.copy(tmp_path / "secret-holder" / SECRET_NAME, single / SECRET_NAME)
    ingest(IngestConfig(src=tmp_path / "pool", out=single), progress=False)
    with Catalog(pg_url) as shared, Catalog(single / "catalog.db") as ref:
        got, want = _rows(shared), _rows(ref)
    assert len(want["series"]) == N_FILES - 1 and len(want["failures"]) == 1
    assert got == want
    assert sorted(os.listdir(raw / "images")) == sorted(os.listdir(single / "images"))
    for name in os.listdir(single / "images"):
        a = np.asanyarray(nib.load(raw / "images" / name).dataobj)
        b = np.asanyarray(nib.load(single / "images" / name).dataobj)
        assert np.array_equal(a, b)
    assert "password" not in "".join(outputs).lower()
    config = (raw / "config.yaml").read_text()
    assert pg_url not in config and "catalog: postgresql://umit:***@127.0.0.1:" in config


@pytest.mark.postgres
def test_preprocess_reads_a_postgres_catalog_and_locks_prep(tmp_path, pg_url, postgres):
    files = _pool(tmp_path / "pool")
    files[7].unlink()
    ingest(
        IngestConfig(src=tmp_path / "pool", out=tmp_path / "raw", catalog=pg_url), progress=False
    )
    assert not (tmp_path / "raw" / "catalog.db").exists()
    prep = tmp_path / "prep"
    cfg = PreprocessConfig(raw=tmp_path / "raw", out=prep, catalog=pg_url, workers=1)
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        with Catalog(pg_url) as cat, cat.transaction() as db:  # a live run holds PREP
            import socket

            row = dict(
                name=lock_name(prep), pid=holder.pid, host=socket.gethostname(), started_at="x"
            )
            db.upsert("locks", row, ("name",))
        with pytest.raises(InputError) as err:
            preprocess(cfg)
        assert f"another umit preprocess is writing {prep.resolve()} (pid {holder.pid})" in str(
            err.value
        )
    finally:
        holder.kill()
        holder.wait()
    result = preprocess(cfg)  # the holder is gone: its lock is stale and taken over
    assert result.done == N_FILES - 1 and result.failed == 0
    assert postgres.password not in (prep / "config.yaml").read_text()
    with Catalog(pg_url) as cat:
        assert cat._db.all("SELECT * FROM locks") == []


def test_two_preprocess_runs_on_one_prep_with_sqlite(tmp_path):
    """The embedded backend locks too: a second run in another process is refused by name."""
    files = _pool(tmp_path / "pool")
    files[7].unlink()
    ingest(IngestConfig(src=tmp_path / "pool", out=tmp_path / "raw"), progress=False)
    prep = tmp_path / "prep"
    code = (
        "import sys, time; from umit.ingest.catalog import Catalog; "
        "c = Catalog(sys.argv[1]); c.acquire_lock(sys.argv[2]); print('held', flush=True); "
        "time.sleep(60)"
    )
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    holder = subprocess.Popen(
        [sys.executable, "-c", code, str(tmp_path / "raw" / "catalog.db"), lock_name(prep)],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(
            InputError, match=rf"another umit preprocess is writing .*prep \(pid {holder.pid}\)"
        ):
            preprocess(PreprocessConfig(raw=tmp_path / "raw", out=prep, workers=1))
    finally:
        holder.kill()
        holder.wait()
    assert preprocess(PreprocessConfig(raw=tmp_path / "raw", out=prep, workers=1)).done == 11
