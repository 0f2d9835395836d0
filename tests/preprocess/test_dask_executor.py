"""executor=dask: cases are tasks on a Dask cluster; the RAW folder, catalog and store equal
those of the local executor (bit for bit, timestamps aside); a killed worker loses nothing."""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from umit.data.phantoms import write_phantom_collection
from umit.deid.secret import SECRET_NAME, load_or_create_secret
from umit.ingest.catalog import Catalog
from umit.ingest.run import IngestConfig
from umit.ingest.run import run as ingest
from umit.preprocess.run import PreprocessConfig
from umit.preprocess.run import run as preprocess

distributed = pytest.importorskip("distributed", reason="dask.distributed absent (extra `scale`)")
pytestmark = pytest.mark.dask


def _raw(folder: Path, secret_from: Path) -> Path:
    folder.mkdir(parents=True)
    shutil.copy(secret_from / SECRET_NAME, folder / SECRET_NAME)
    return folder


def _catalog_rows(raw: Path) -> list[dict]:
    with Catalog(raw / "catalog.db") as cat:
        series = [{k: v for k, v in vars(r).items() if k != "ingested_at"} for r in cat.series()]
        failures = [{k: v for k, v in r.items() if k != "failed_at"} for r in cat.failures()]
    return series + failures


def _store_files(prep: Path) -> dict[str, object]:
    """Every file of the store: chunk bytes as they are; zarr.json without the timestamp."""
    out: dict[str, object] = {}
    root = prep / "store.zarr"
    for path in sorted(root.rglob("*")):
        if path.is_file():
            rel = str(path.relative_to(root))
            if path.name == "zarr.json":
                meta = json.loads(path.read_text())
                meta.get("attributes", {}).pop("processed_at", None)
                out[rel] = meta
            else:
                out[rel] = path.read_bytes()
    return out


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    root = tmp_path_factory.mktemp("dask_src")
    write_phantom_collection(root / "src", n=6, modality="ct", seed=5, shape=(32, 32, 20))
    (root / "src" / "imagesTr" / "phantom_ct_0003_0000.nii.gz").write_bytes(b"corrupt")
    load_or_create_secret(root / "secret")
    return root


def test_dask_executor_equals_local(collection, tmp_path):
    src, secret = collection / "src", collection / "secret"
    local_raw = _raw(tmp_path / "raw_local", secret)
    ingest(IngestConfig(src=src, out=local_raw), progress=False)
    preprocess(PreprocessConfig(raw=local_raw, out=tmp_path / "prep_local", workers=1))

    cluster = distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None
    )
    try:
        dask_raw = _raw(tmp_path / "raw_dask", secret)
        address = cluster.scheduler_address
        res = ingest(
            IngestConfig(src=src, out=dask_raw, executor="dask", scheduler=address), progress=False
        )
        assert (res.ingested, res.failed) == (5, 1)
        cfg = PreprocessConfig(
            raw=dask_raw, out=tmp_path / "prep_dask", executor="dask", scheduler=address
        )
        first = preprocess(cfg)
        assert (first.done, first.failed) == (5, 0)
        again = preprocess(cfg)  # resume: nothing left to do
        assert (again.done, again.skipped) == (0, 5)
    finally:
        cluster.close()
    assert _catalog_rows(dask_raw) == _catalog_rows(local_raw)
    assert len(_catalog_rows(local_raw)) == 6
    for name in sorted(os.listdir(local_raw / "images")):
        a, b = nib.load(local_raw / "images" / name), nib.load(dask_raw / "images" / name)
        assert np.array_equal(a.get_fdata(), b.get_fdata()) and np.array_equal(a.affine, b.affine)
    got, want = _store_files(tmp_path / "prep_dask"), _store_files(tmp_path / "prep_local")
    assert sorted(got) == sorted(want) and len(want) > 20
    assert got == want
    for name in ("index.json", "plan.json"):
        a = json.loads((tmp_path / "prep_dask" / name).read_text())
        b = json.loads((tmp_path / "prep_local" / name).read_text())
        for d in (a, b):
            d.pop("updated_at", None)
            d.pop("created_at", None)
            for row in d.get("cases", {}).values():
                row.pop("processed_at", None)
        assert a == b


def test_scheduler_needs_executor_dask(tmp_path):
    with pytest.raises(ValueError, match="scheduler='tcp://x:8786' needs executor=dask"):
        PreprocessConfig(raw=tmp_path, out=tmp_path / "p", scheduler="tcp://x:8786")


def test_unreachable_scheduler_is_a_clear_error(collection, tmp_path, monkeypatch):
    from umit.errors import InputError
    from umit.utils import executor

    monkeypatch.setattr(executor, "CONNECT_TIMEOUT_S", 1.0)
    raw = _raw(tmp_path / "raw", collection / "secret")
    cfg = IngestConfig(
        src=collection / "src", out=raw, executor="dask", scheduler="tcp://127.0.0.1:9"
    )
    with pytest.raises(InputError, match="cannot reach the Dask scheduler tcp://127.0.0.1:9"):
        ingest(cfg, progress=False)


@pytest.mark.slow
@pytest.mark.multiproc
def test_killed_worker_loses_nothing(collection, tmp_path):
    """SIGKILL one of two worker processes while cases run: Dask reruns its tasks; the store
    equals the local executor's and a rerun adds nothing."""
    src, secret = collection / "src", collection / "secret"
    raw = _raw(tmp_path / "raw", secret)
    ingest(IngestConfig(src=src, out=raw), progress=False)
    preprocess(PreprocessConfig(raw=raw, out=tmp_path / "prep_local", workers=1))
    cluster = distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
    )
    try:
        with distributed.Client(cluster) as client:
            pids = client.run(os.getpid)  # worker address -> pid
        prep = tmp_path / "prep_dask"
        cfg = PreprocessConfig(
            raw=raw, out=prep, executor="dask", scheduler=cluster.scheduler_address
        )
        killed: list[int] = []

        def kill_one_when_busy() -> None:
            cases = prep / "store.zarr" / "cases"
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                busy = cases.is_dir() and any(p.name.startswith(".tmp-") for p in cases.iterdir())
                if busy:
                    pid = sorted(pids.values())[0]
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                    return
                time.sleep(0.005)

        killer = threading.Thread(target=kill_one_when_busy)
        killer.start()
        first = preprocess(cfg)
        killer.join()
        assert killed, "no worker was killed: the run finished before a case was in flight"
        assert (first.done, first.failed) == (5, 0)
        again = preprocess(cfg)
        assert (again.done, again.skipped, again.failed) == (0, 5, 0)
    finally:
        cluster.close()
    assert _store_files(prep) == _store_files(tmp_path / "prep_local")


def test_dicomweb_source_refuses_executor_dask(tmp_path):
    from umit.errors import InputError

    cfg = IngestConfig(
        src="dicomweb+http://127.0.0.1:9/dicom-web", out=tmp_path / "raw", executor="dask"
    )
    with pytest.raises(InputError, match="executor=dask is for folder and file sources"):
        ingest(cfg, progress=False)
