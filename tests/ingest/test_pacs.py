"""`umit ingest dicomweb+http://...` against a real Orthanc: a retrieved series ingests exactly
like the same files on disk, selection by study and query, credentials never written, clear
errors, failure rows, and a rerun after kill -9 equal to an uninterrupted run."""

from __future__ import annotations

import base64
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from umit.cli.main import main as cli_main
from umit.ingest.catalog import Catalog
from umit.ingest.dicomweb import DicomWebError
from umit.ingest.pacs import TMP_DIR
from umit.ingest.run import IngestConfig, run

from _orthanc import free_port
from _shared import IDENTIFIERS, corrupt_pixels, require_shared, write_ct_series

pytestmark = pytest.mark.pacs
SECRET = "11" * 32


def _raw(path: Path) -> Path:
    """A RAW folder with a fixed pseudonym key, so two runs can be compared row by row."""
    path.mkdir(parents=True)
    (path / ".umit_secret").write_text(SECRET)
    return path


def _series(folder: Path, seed: int, shape=(20, 16, 6), **kw) -> list[Path]:
    stored = np.random.default_rng(seed).integers(0, 1500, size=shape).astype(np.int16)
    return write_ct_series(folder, stored, rng=np.random.default_rng(seed), **kw)


def _snapshot(raw: Path, drop: tuple[str, ...] = ("ingested_at",)) -> dict:
    """Catalog rows (without the columns in ``drop``) and voxels of every written image."""
    con = sqlite3.connect(raw / "catalog.db")
    cur = con.execute("SELECT * FROM series ORDER BY series_id")
    cols = [d[0] for d in cur.description]
    rows = [tuple(v for c, v in zip(cols, r, strict=True) if c not in drop) for r in cur]
    con.close()
    files = {
        str(p.relative_to(raw)): np.asarray(nib.load(p).dataobj).tobytes()
        for p in sorted((raw / "images").glob("*.nii.gz"))
    }
    return {"rows": rows, "files": files}


def _cli(*args: str) -> int:
    return cli_main(["ingest", *args])


def test_retrieved_series_ingest_exactly_like_local_ones(orthanc_empty, tmp_path):
    src = tmp_path / "src"
    _series(src / "a", 0, extra={"PatientSex": "F", "PatientAge": "047Y", "Manufacturer": "ACME"})
    _series(src / "b", 1, shape=(12, 12, 4), extra={"PatientID": "OTHER-9"})
    orthanc_empty.upload(src)
    local = _raw(tmp_path / "local")
    run(IngestConfig(src=src, out=local), progress=False)
    remote = _raw(tmp_path / "remote")
    result = run(
        IngestConfig(src=orthanc_empty.ingest_url, out=remote, pacs_workers=2),
        progress=False,
        auth=orthanc_empty.auth,
    )
    assert (result.ingested, result.failed, result.retrieved) == (2, 0, 2)
    # same keys, case ids, geometry, attributes and pseudonyms; only `source` differs
    assert _snapshot(remote, ("ingested_at", "source")) == _snapshot(
        local, ("ingested_at", "source")
    )
    with Catalog(remote / "catalog.db") as cat:
        records = cat.series()
        done = cat.remote_series()
    assert {r.source.split(" ")[0] for r in records} == {
        f"dicomweb:{r.extra['deid_series_uid']}" for r in records
    }
    assert {d["deid_series_uid"] for d in done} == {r.extra["deid_series_uid"] for r in records}
    assert sum(d["n_instances"] for d in done) == 10
    assert not (remote / TMP_DIR).exists()
    dump = b"".join(p.read_bytes() for p in remote.rglob("*") if p.is_file())
    for value in [*IDENTIFIERS.values(), "OTHER-9"]:
        assert value.encode() not in dump, value
    for p in src.rglob("*"):  # no original UID either: only their keyed replacements
        if p.is_file():
            ds = pydicom.dcmread(p)
            assert ds.SeriesInstanceUID.encode() not in dump
            assert ds.StudyInstanceUID.encode() not in dump


def test_select_by_query_and_by_study(orthanc_empty, tmp_path):
    src = tmp_path / "src"
    ct = _series(src / "ct", 0, shape=(8, 8, 3))
    _series(src / "mr", 1, shape=(8, 8, 3), modality="MR")
    _series(src / "ct2", 2, shape=(8, 8, 3))
    orthanc_empty.upload(src)
    auth = orthanc_empty.write_auth_file(tmp_path / "auth")
    url = orthanc_empty.ingest_url

    assert _cli(url, "--out", str(tmp_path / "q"), "--auth-file", str(auth),
                "--query", "ModalitiesInStudy=MR") == 0  # fmt: skip
    with Catalog(tmp_path / "q" / "catalog.db") as cat:
        assert [r.modality for r in cat.series()] == ["MR"]

    study = pydicom.dcmread(ct[0]).StudyInstanceUID
    assert _cli(url, "--out", str(tmp_path / "s"), "--auth-file", str(auth), "--study", study) == 0
    with Catalog(tmp_path / "s" / "catalog.db") as cat:
        rows = cat.series()
    assert len(rows) == 1 and rows[0].modality == "CT" and rows[0].shape == (8, 8, 3)


def test_credentials_never_reach_raw_logs_or_output(orthanc_empty, tmp_path, caplog, capsys):
    _series(tmp_path / "src" / "a", 0)
    orthanc_empty.upload(tmp_path / "src")
    user, password = orthanc_empty.auth
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    auth_file = orthanc_empty.write_auth_file(tmp_path / "auth")
    caplog.set_level("DEBUG")  # urllib3's request lines included
    raws = [tmp_path / "raw_file", tmp_path / "raw_flag", tmp_path / "raw_env"]
    assert cli_main(["-v", "ingest", orthanc_empty.ingest_url, "--out", str(raws[0]),
                     "--auth-file", str(auth_file)]) == 0  # fmt: skip
    assert (
        _cli(orthanc_empty.ingest_url, "--out", str(raws[1]), "--auth", f"{user}:{password}") == 0
    )
    os.environ["UMIT_PACS_AUTH"] = f"{user}:{password}"
    try:
        assert _cli(orthanc_empty.ingest_url, "--out", str(raws[2])) == 0
    finally:
        del os.environ["UMIT_PACS_AUTH"]
    out = capsys.readouterr()
    text = caplog.text + out.out + out.err
    assert "GET /dicom-web/studies" in caplog.text  # the debug log did record the requests
    assert password not in text and token not in text
    for raw in raws:
        for p in raw.rglob("*"):
            if p.is_file():
                data = p.read_bytes()
                assert password.encode() not in data and token.encode() not in data, p
    config = (raws[0] / "config.yaml").read_text()  # the auth file's path, not what it holds
    assert f"pacs_auth_file: {auth_file}" in config and user not in config


def test_wrong_password_exits_1_and_writes_nothing(orthanc, tmp_path, capsys):
    out = tmp_path / "raw"
    assert _cli(orthanc.ingest_url, "--out", str(out), "--auth", f"{orthanc.auth[0]}:nope") == 1
    err = capsys.readouterr().err
    assert f"authentication failed for {orthanc.dicomweb_url}" in err
    assert "nope" not in err
    assert not out.exists()


def test_server_down_exits_1_after_bounded_retries(tmp_path, capsys):
    out = tmp_path / "raw"
    url = f"dicomweb+http://127.0.0.1:{free_port()}/dicom-web"
    t = time.perf_counter()
    code = _cli(url, "--out", str(out), "--auth", "u:pw", "pacs_retries=2",
                "pacs_backoff_s=0.01", "pacs_timeout_s=2")  # fmt: skip
    assert code == 1 and time.perf_counter() - t < 10
    err = capsys.readouterr().err
    assert "cannot reach http://127.0.0.1:" in err and "after 3 attempt(s)" in err
    assert not out.exists()


def test_series_that_fails_to_decode_is_a_failure_row_and_the_rest_lands(orthanc_empty, tmp_path):
    src = tmp_path / "src"
    _series(src / "good", 0)
    corrupt_pixels(_series(src / "bad", 1, shape=(8, 8, 4)))
    _series(src / "good2", 2, shape=(10, 8, 5))
    orthanc_empty.upload(src)
    raw = _raw(tmp_path / "raw")
    cfg = IngestConfig(src=orthanc_empty.ingest_url, out=raw)
    result = run(cfg, progress=False, auth=orthanc_empty.auth)
    assert (result.ingested, result.failed, result.retrieved) == (2, 1, 3)
    (failure,) = result.failures
    assert failure["source"].startswith("dicomweb:2.25.") and failure["stage"] == "ingest"
    assert "cannot decode pixel data" in failure["reason"]
    again = run(cfg, progress=False, auth=orthanc_empty.auth)  # done series are not retrieved
    assert (again.ingested, again.retrieved, again.skipped, again.failed) == (0, 0, 3, 1)
    with Catalog(raw / "catalog.db") as cat:
        assert sorted(r["n_failed"] for r in cat.remote_series()) == [0, 0, 1]
    retry = cfg.model_copy(update={"retry_failed": True})
    third = run(retry, progress=False, auth=orthanc_empty.auth)  # only the failed one again
    assert (third.retrieved, third.ingested, third.skipped, third.failed) == (1, 0, 2, 1)


def test_failed_retrieval_is_a_failure_row_retried_by_the_next_run(
    orthanc_empty, tmp_path, monkeypatch
):
    from umit.ingest.dicomweb import DicomWebClient

    src = tmp_path / "src"
    bad = _series(src / "a", 0)
    _series(src / "b", 1)
    orthanc_empty.upload(src)
    bad_uid = pydicom.dcmread(bad[0]).SeriesInstanceUID
    real = DicomWebClient.retrieve_series

    def flaky(self, study_uid, series_uid, folder, transfer_syntax="*"):
        if series_uid == bad_uid:
            raise DicomWebError(f"{self.url}: GET /studies/.../series failed with HTTP 500")
        return real(self, study_uid, series_uid, folder, transfer_syntax)

    monkeypatch.setattr(DicomWebClient, "retrieve_series", flaky)
    raw = _raw(tmp_path / "raw")
    cfg = IngestConfig(src=orthanc_empty.ingest_url, out=raw)
    result = run(cfg, progress=False, auth=orthanc_empty.auth)
    assert (result.ingested, result.failed) == (1, 1)
    assert result.failures[0]["stage"] == "retrieve" and "HTTP 500" in result.failures[0]["reason"]
    assert bad_uid not in json.dumps(result.failures)
    monkeypatch.setattr(DicomWebClient, "retrieve_series", real)
    again = run(cfg, progress=False, auth=orthanc_empty.auth)
    assert (again.ingested, again.failed, again.skipped) == (1, 0, 1)


@pytest.mark.slow
def test_kill_9_mid_transfer_then_rerun_equals_uninterrupted(orthanc_empty, tmp_path):
    src = tmp_path / "src"
    n = 6
    for i in range(n):  # big enough that writing each takes a noticeable while
        _series(src / f"s{i}", i, shape=(256, 256, 40))
    orthanc_empty.upload(src)
    auth = orthanc_empty.write_auth_file(tmp_path / "auth")
    ref, raw = _raw(tmp_path / "ref"), _raw(tmp_path / "raw")
    cfg = IngestConfig(src=orthanc_empty.ingest_url, out=ref, pacs_workers=2)
    assert run(cfg, progress=False, auth=orthanc_empty.auth).ingested == n

    cmd = [sys.executable, "-m", "umit.cli.main", "ingest", orthanc_empty.ingest_url,
           "--out", str(raw), "--auth-file", str(auth), "--pacs-workers", "2"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 120
    landed = 0
    while time.time() < deadline and landed < 1:
        time.sleep(0.02)
        assert proc.poll() is None, "ingest ended before it could be killed"
        try:
            con = sqlite3.connect(raw / "catalog.db")
            landed = con.execute("SELECT COUNT(*) FROM series").fetchone()[0]
            con.close()
        except sqlite3.OperationalError:  # not created yet
            landed = 0
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with Catalog(raw / "catalog.db") as cat:
        before = len(cat.series())
    assert 1 <= before < n, "the kill must land mid-run for this test to mean anything"
    assert (raw / TMP_DIR).exists()  # a killed run leaves its temp folder; the rerun removes it

    result = run(cfg.model_copy(update={"out": raw}), progress=False, auth=orthanc_empty.auth)
    assert result.ingested == n - before and result.failed == 0
    assert _snapshot(raw, ("ingested_at",)) == _snapshot(ref, ("ingested_at",))
    with Catalog(raw / "catalog.db") as cat:
        assert len(cat.remote_series()) == n
    assert not (raw / TMP_DIR).exists() and not list(raw.rglob(".tmp-*"))


@pytest.mark.realdata
@pytest.mark.slow
def test_real_ct_series_from_orthanc_equals_local_ingest(orthanc_empty, tmp_path):
    src = require_shared("abdomen_ct_dicom_tcia")
    orthanc_empty.upload(src)
    local, remote = _raw(tmp_path / "local"), _raw(tmp_path / "remote")
    run(IngestConfig(src=src, out=local), progress=False)
    result = run(
        IngestConfig(src=orthanc_empty.ingest_url, out=remote),
        progress=False,
        auth=orthanc_empty.auth,
    )
    assert (result.ingested, result.failed, result.retrieved) == (1, 0, 1)
    assert result.retrieved_bytes > 60e6  # 134 slices of 512 x 512
    assert _snapshot(remote, ("ingested_at", "source")) == _snapshot(
        local, ("ingested_at", "source")
    )
