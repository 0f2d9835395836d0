"""The catalog's two backends: SQLite (a path) and PostgreSQL (a URL), one schema, one list of
migrations, locks on output folders, credentials kept out of messages."""

from __future__ import annotations

import sqlite3
import subprocess
import sys

import pytest

from umit.errors import InputError
from umit.ingest.catalog import (
    MIGRATIONS,
    SCHEMA_VERSION,
    Catalog,
    SeriesRecord,
    _Db,
    catalog_location,
    redact_url,
    schema_version,
)


def _rec(case: str, ch: int = 0, key: str | None = None, **kw) -> SeriesRecord:
    base = dict(
        series_id=f"{case}_{ch:04d}",
        source_key=key or f"key-{case}",
        case_id=case,
        channel=ch,
        image_path=f"images/{case}_{ch:04d}.nii.gz",
        source=f"src/{case}",
        source_format="nifti",
        shape=(4, 5, 6),
        spacing=(1.0, 1.0, 2.5),
        orientation="RAS",
    )
    base.update(kw)
    return SeriesRecord(**base)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def location(request, tmp_path):
    if request.param == "sqlite":
        return tmp_path / "catalog.db"
    return request.getfixturevalue("pg_url")


def _fill(cat: Catalog) -> None:
    cat.add_series([_rec("a", 0, sex="F", target=1, extra={"kvp": 120}), _rec("a", 1, sex="F")])
    cat.add_series([_rec("b", label_path="labels/b.nii.gz", sex="M", site="s1")])
    cat.add_failure("key-c", "src/c", "src/c: broken")
    cat.add_failure("key-c", "src/c", "src/c: still broken")  # replaces
    cat.add_set_aside("key-s", "scout [3 images]", "localizer", n_images=3, modality="CT")
    cat.add_remote_series(
        "2.25.1",
        "2.25.2",
        modality="CT",
        n_instances=3,
        n_bytes=5_000_000_000,
        n_items=1,
        n_failed=0,
    )
    cat.set_info("labels", {"background": 0, "liver": 1})
    cat.add_series(
        [_rec("b", label_path="labels/b.nii.gz", sex="M", site="s2")]
    )  # same key: replace


def _content(cat: Catalog) -> dict:
    drop = {"ingested_at", "failed_at", "set_aside_at", "retrieved_at"}
    return {
        "series": [{k: v for k, v in vars(r).items() if k not in drop} for r in cat.series()],
        "failures": [{k: v for k, v in r.items() if k not in drop} for r in cat.failures()],
        "set_aside": [{k: v for k, v in r.items() if k not in drop} for r in cat.set_aside()],
        "remote": [{k: v for k, v in r.items() if k not in drop} for r in cat.remote_series()],
        "info": cat.info(),
        "summary": cat.summary(),
    }


def test_both_backends_hold_the_same_catalog(location, tmp_path):
    with Catalog(location) as cat:
        _fill(cat)
        got = _content(cat)
        assert cat.done_keys() == {"key-a", "key-b", "key-c"}
        with pytest.raises(InputError, match="already ingested from another source"):
            cat.add_series([_rec("a", 0, key="key-other")])
    with Catalog(tmp_path / "reference.db") as ref:  # SQLite as the reference
        _fill(ref)
        assert got == _content(ref)
    assert got["series"][2]["site"] == "s2" and got["series"][0]["extra"] == {"kvp": 120}
    assert got["failures"] == [
        {
            "source_key": "key-c",
            "source": "src/c",
            "stage": "ingest",
            "reason": "src/c: still broken",
        }
    ]
    assert got["remote"][0]["n_bytes"] == 5_000_000_000  # past 32 bits: BIGINT
    assert got["info"]["schema_version"] == SCHEMA_VERSION
    assert got["summary"]["cases"] == 2 and got["summary"]["by_site"] == {"-": 1, "s2": 1}


_SCHEMA_2_SQLITE = """
CREATE TABLE series (series_id TEXT PRIMARY KEY, source_key TEXT NOT NULL, case_id TEXT NOT NULL,
 subject_id TEXT, channel INTEGER NOT NULL DEFAULT 0, channel_name TEXT, image_path TEXT NOT NULL,
 label_path TEXT, source TEXT NOT NULL, source_format TEXT NOT NULL, modality TEXT, body_part TEXT,
 shape TEXT NOT NULL, spacing TEXT NOT NULL, orientation TEXT NOT NULL, dtype TEXT,
 manufacturer TEXT, model TEXT, site TEXT, sex TEXT, age_band TEXT, contrast TEXT, split TEXT,
 target TEXT, extra TEXT, ingested_at TEXT NOT NULL, transform TEXT, UNIQUE (case_id, channel));
CREATE INDEX series_source_key ON series (source_key);
CREATE TABLE failures (source_key TEXT PRIMARY KEY, source TEXT NOT NULL, stage TEXT NOT NULL,
 reason TEXT NOT NULL, failed_at TEXT NOT NULL);
CREATE TABLE info (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE set_aside (source_key TEXT PRIMARY KEY, source TEXT NOT NULL, kind TEXT NOT NULL,
 reason TEXT NOT NULL, n_images INTEGER NOT NULL, modality TEXT, series_number INTEGER,
 deid_series_uid TEXT, set_aside_at TEXT NOT NULL);
CREATE TABLE remote_series (deid_series_uid TEXT PRIMARY KEY, deid_study_uid TEXT NOT NULL,
 modality TEXT, n_instances INTEGER NOT NULL, n_bytes INTEGER NOT NULL, n_items INTEGER NOT NULL,
 n_failed INTEGER NOT NULL, retrieved_at TEXT NOT NULL);
INSERT INTO info VALUES ('schema_version', '2');
INSERT INTO series (series_id, source_key, case_id, channel, image_path, source, source_format,
 shape, spacing, orientation, target, extra, ingested_at, transform) VALUES ('old_0000', 'key-old',
 'old', 0, 'images/old_0000.nii.gz', 'src/old', 'nifti', '[4, 5, 6]', '[1.0, 1.0, 2.5]', 'RAS',
 'null', '{}', '2026-01-01T00:00:00+00:00', NULL);
"""


def test_upgrade_of_a_catalog_written_by_the_previous_release(tmp_path):
    """A schema-2 catalog exactly as umit 0.1 wrote it (SQLite): migration 3 adds the locks."""
    path = tmp_path / "catalog.db"
    con = sqlite3.connect(path)
    con.executescript(_SCHEMA_2_SQLITE)
    con.close()
    with Catalog(path) as cat:
        assert cat.info()["schema_version"] == SCHEMA_VERSION == 6
        assert {"locks", "case_owners", "label_sources", "labels"} <= cat._db.tables()
        assert [r.series_id for r in cat.series()] == ["old_0000"]
        with cat.lock(str(tmp_path / "prep")):
            pass
        cat.add_series([_rec("new")])
        assert [r.case_id for r in cat.series()] == ["new", "old"]
        # migration 4 gave the existing case its owner: another source cannot claim it
        assert cat.claim_cases([("old", "key-x", "src/x")]) == {"old": ("key-old", "src/old")}


def test_migrations_step_by_step(location):
    """Each numbered migration brings version k-1 to k on both backends; reopening is a no-op."""
    db = _Db(location)
    try:
        assert schema_version(db) == 0
        for number, _, step in MIGRATIONS[:2]:  # what the previous release made
            with db.transaction():
                step(db)
            assert schema_version(db) == number
        assert "locks" not in db.tables()
    finally:
        db.close()
    with Catalog(location) as cat:
        assert cat.info()["schema_version"] == SCHEMA_VERSION
        cat.acquire_lock("PREP")
        cat.release_lock("PREP")
    with Catalog(location) as cat:  # idempotent
        assert cat.info()["schema_version"] == SCHEMA_VERSION


def test_newer_schema_is_refused(tmp_path):
    path = tmp_path / "catalog.db"
    with Catalog(path) as cat:
        cat.set_info("schema_version", 99)
    with pytest.raises(InputError, match="schema version 99 is newer"):
        Catalog(path)


def test_lock_names_the_live_holder_and_takes_over_a_dead_one(location, tmp_path):
    prep = str(tmp_path / "prep")
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        with Catalog(location) as cat:
            with cat.transaction() as db:  # a live process of this host holds the folder
                db.upsert(
                    "locks",
                    dict(name=prep, pid=holder.pid, host=_host(), started_at="x"),
                    ("name",),
                )
            with pytest.raises(InputError) as err:
                cat.acquire_lock(prep)
            assert f"another umit preprocess is writing {prep} (pid {holder.pid})" in str(err.value)
            holder.kill()
            holder.wait()
            cat.acquire_lock(prep)  # its holder died: taken over
            cat.release_lock(prep)
            with cat.transaction() as db:
                db.upsert(
                    "locks", dict(name=prep, pid=dead.pid, host=_host(), started_at="x"), ("name",)
                )
            with cat.lock(prep):
                assert cat._db.one_value("SELECT pid FROM locks WHERE name = ?", (prep,)) > 0
            assert cat._db.all("SELECT * FROM locks") == []
    finally:
        holder.kill()
        holder.wait()


def _host() -> str:
    import socket

    return socket.gethostname()


def test_password_is_redacted():
    url = "postgresql://alice:s3cr%40t@db.example:5432/umit?sslmode=require&password=p2"
    red = redact_url(url)
    assert "s3cr" not in red and "p2" not in red
    assert red == "postgresql://alice:***@db.example:5432/umit?sslmode=require&password=***"
    assert redact_url("postgresql://alice@db/umit") == "postgresql://alice@db/umit"
    assert catalog_location(None, "/raw").as_posix() == "/raw/catalog.db"
    assert catalog_location(url, "/raw") == url


@pytest.mark.postgres
def test_wrong_password_error_names_the_url_without_the_password(postgres):
    url = postgres.url().replace(postgres.password, "wrong-password-123")
    with pytest.raises(InputError) as err:
        Catalog(url)
    text = str(err.value)
    assert "cannot connect to the PostgreSQL catalog" in text
    assert "wrong-password-123" not in text and f"127.0.0.1:{postgres.port}" in text


@pytest.mark.postgres
def test_postgres_catalog_repr_hides_the_password(pg_url, postgres):
    with Catalog(pg_url) as cat:
        assert postgres.password not in repr(cat) and cat.backend == "postgresql"
        assert cat.size_bytes() > 0


def test_case_ids_are_claimed_once_across_connections(location):
    """Two ingest processes (two connections) claiming one case id: the first one owns it."""
    with Catalog(location) as one, Catalog(location) as two:
        assert one.claim_cases([("c1", "k1", "s1")]) == {"c1": ("k1", "s1")}
        got = two.claim_cases([("c1", "k2", "s2"), ("c2", "k3", "s3")])
        assert got == {"c1": ("k1", "s1"), "c2": ("k3", "s3")}
        assert one.claim_cases([("c1", "k1", "s1")]) == {"c1": ("k1", "s1")}  # idempotent
