"""The ingest catalog: one row per written series/channel, plus a table of failures.

The catalog is the hand-over from ``umit ingest`` to ``umit preprocess`` and to the bias
analysis: it holds geometry and acquisition metadata and the subgroup attributes (sex, age band,
site, contrast), never patient identifiers. Beside the ``series`` table, ``failures`` lists what
could not be ingested, ``set_aside`` what was left out on purpose (localizers),
``remote_series`` which series of a DICOMweb source (a PACS) are done, by pseudonymised UID, and
``locks`` which output folders a running ``umit preprocess`` holds and ``case_owners`` which
source claimed each case id (before writing its files, so concurrent writers cannot clash). Each series is committed in
its own transaction, so a killed ingest can be resumed: a source whose ``source_key`` is present
is not redone, nor a remote series that has its row.

Two backends share one schema and one numbered list of migrations (:data:`MIGRATIONS`):

- SQLite (the embedded default): a file, ``RAW/catalog.db`` unless told otherwise;
- PostgreSQL: a URL ``postgresql://USER@HOST:PORT/DB`` (password from ``~/.pgpass`` or
  ``$PGPASSWORD``; one in the URL works but is redacted wherever the URL is shown or saved), so
  that ingest workers on many machines can write one catalog at once. Unique keys and one
  transaction per series keep it free of duplicates and lost rows.

Layout of a RAW folder (paths in the catalog are relative to it)::

    RAW/catalog.db                 (SQLite backend)
    RAW/images/<case_id>_<channel:04d>.nii.gz
    RAW/labels/<case_id>.nii.gz
"""

from __future__ import annotations

import json
import os
import re
import socket
import sqlite3
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from umit.errors import InputError

CATALOG_NAME = "catalog.db"
POSTGRES_SCHEMES = ("postgresql://", "postgres://")


def is_postgres_url(location: str | Path | None) -> bool:
    return isinstance(location, str) and location.startswith(POSTGRES_SCHEMES)


def redact_url(location: str | Path | None) -> str | None:
    """``location`` with any password replaced by ``***`` (safe for logs and config.yaml)."""
    if location is None:
        return None
    text = str(location)
    if "://" not in text:
        return text
    parts = urlsplit(text)
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        if ":" in userinfo:
            userinfo = userinfo.split(":", 1)[0] + ":***"
        netloc = f"{userinfo}@{host}"
    query = re.sub(r"(?i)(password=)[^&]*", r"\1***", parts.query)
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def catalog_location(catalog: str | Path | None, raw: str | Path) -> str | Path:
    """Where the catalog of ``raw`` lives: ``catalog`` if given (a path or a PostgreSQL URL),
    else ``RAW/catalog.db``."""
    if catalog is None or str(catalog) == "":
        return Path(raw) / CATALOG_NAME
    return catalog if is_postgres_url(catalog) else Path(catalog)


# -- schema: one numbered list of migrations, for both backends ------------------------------

_SCHEMA_1 = """
CREATE TABLE IF NOT EXISTS series (
    series_id    TEXT PRIMARY KEY,
    source_key   TEXT NOT NULL,
    case_id      TEXT NOT NULL,
    subject_id   TEXT,
    channel      INTEGER NOT NULL DEFAULT 0,
    channel_name TEXT,
    image_path   TEXT NOT NULL,
    label_path   TEXT,
    source       TEXT NOT NULL,
    source_format TEXT NOT NULL,
    modality     TEXT,
    body_part    TEXT,
    shape        TEXT NOT NULL,
    spacing      TEXT NOT NULL,
    orientation  TEXT NOT NULL,
    dtype        TEXT,
    manufacturer TEXT,
    model        TEXT,
    site         TEXT,
    sex          TEXT,
    age_band     TEXT,
    contrast     TEXT,
    split        TEXT,
    target       TEXT,
    extra        TEXT,
    ingested_at  TEXT NOT NULL,
    UNIQUE (case_id, channel)
);
CREATE INDEX IF NOT EXISTS series_source_key ON series (source_key);
CREATE TABLE IF NOT EXISTS failures (
    source_key TEXT PRIMARY KEY,
    source     TEXT NOT NULL,
    stage      TEXT NOT NULL,
    reason     TEXT NOT NULL,
    failed_at  TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS info (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS set_aside (
    source_key      TEXT PRIMARY KEY,
    source          TEXT NOT NULL,
    kind            TEXT NOT NULL,
    reason          TEXT NOT NULL,
    n_images        INTEGER NOT NULL,
    modality        TEXT,
    series_number   INTEGER,
    deid_series_uid TEXT,
    set_aside_at    TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS remote_series (
    deid_series_uid TEXT PRIMARY KEY,
    deid_study_uid  TEXT NOT NULL,
    modality        TEXT,
    n_instances     INTEGER NOT NULL,
    n_bytes         BIGINT NOT NULL,
    n_items         INTEGER NOT NULL,
    n_failed        INTEGER NOT NULL,
    retrieved_at    TEXT NOT NULL
)
"""


def _migration_1(db: _Db) -> None:
    for statement in _SCHEMA_1.split(";"):
        if statement.strip():
            db.execute(statement)


def _migration_2(db: _Db) -> None:
    if "transform" not in db.columns("series"):
        db.execute("ALTER TABLE series ADD COLUMN transform TEXT")


def _migration_3(db: _Db) -> None:
    db.execute(
        "CREATE TABLE IF NOT EXISTS locks (name TEXT PRIMARY KEY, pid INTEGER NOT NULL, "
        "host TEXT NOT NULL, started_at TEXT NOT NULL)"
    )


def _migration_4(db: _Db) -> None:
    db.execute(
        "CREATE TABLE IF NOT EXISTS case_owners (case_id TEXT PRIMARY KEY, "
        "source_key TEXT NOT NULL, source TEXT NOT NULL)"
    )
    db.execute(
        "INSERT INTO case_owners (case_id, source_key, source) "
        "SELECT case_id, MIN(source_key), MIN(source) FROM series GROUP BY case_id"
    )


def _migration_5(db: _Db) -> None:
    db.execute(
        "CREATE TABLE IF NOT EXISTS label_sources (case_id TEXT NOT NULL, source TEXT NOT NULL, "
        "label_path TEXT NOT NULL, details TEXT, added_at TEXT NOT NULL, "
        "PRIMARY KEY (case_id, source))"
    )


def _migration_6(db: _Db) -> None:
    db.execute(
        "CREATE TABLE IF NOT EXISTS labels (case_id TEXT NOT NULL, finding TEXT NOT NULL, "
        "value TEXT NOT NULL, sentence_start INTEGER, sentence_end INTEGER, report_row INTEGER, "
        "source TEXT NOT NULL, labeler TEXT NOT NULL, labeled_at TEXT NOT NULL, "
        "PRIMARY KEY (case_id, finding, source))"
    )
    db.execute("CREATE INDEX IF NOT EXISTS labels_finding ON labels (finding, source)")


MIGRATIONS: list[tuple[int, str, Callable[[_Db], None]]] = [
    (1, "tables series, failures, info, set_aside, remote_series", _migration_1),
    (2, "series.transform: what ingest changed in the voxels", _migration_2),
    (3, "locks: output folders held by a running umit preprocess", _migration_3),
    (
        4,
        "case_owners: a case id is claimed by one source before its files are written",
        _migration_4,
    ),
    (5, "label_sources: other labels of a case (e.g. a raters' consensus)", _migration_5),
    (6, "labels: per-case finding labels (umit labels from-reports)", _migration_6),
]
"""Numbered, append-only: a catalog at version k gets migrations k+1.. on open, in one
transaction (a second process opening at once waits, then finds nothing to do)."""
SCHEMA_VERSION = MIGRATIONS[-1][0]


class _Db:
    """The few things the two backends do differently: placeholders, rows, locks, columns."""

    def __init__(self, location: str | Path):
        self.location = location
        self.postgres = is_postgres_url(location)
        if self.postgres:
            try:
                import psycopg
                from psycopg.rows import dict_row
            except ImportError as exc:  # pragma: no cover - the `scale` extra
                raise InputError(
                    redact_url(location),
                    "a PostgreSQL catalog needs psycopg: pip install 'umit[scale]'",
                ) from exc
            try:
                self.con = psycopg.connect(
                    str(location), autocommit=True, row_factory=dict_row, connect_timeout=30
                )
            except psycopg.Error as exc:
                raise InputError(
                    redact_url(location), f"cannot connect to the PostgreSQL catalog: {exc}"
                ) from None
        else:
            path = Path(location)
            path.parent.mkdir(parents=True, exist_ok=True)
            # isolation_level=None: we issue BEGIN/COMMIT ourselves, one transaction per series.
            self.con = sqlite3.connect(path, isolation_level=None, timeout=60)
            self.con.row_factory = _dict_row
            self.con.execute("PRAGMA journal_mode=WAL")
            self.con.execute("PRAGMA synchronous=FULL")

    def execute(self, sql: str, params: tuple | list = ()) -> Any:
        if self.postgres:
            sql = sql.replace("?", "%s")
        return self.con.execute(sql, params)

    def executemany(self, sql: str, rows: list[tuple] | list[list]) -> None:
        if self.postgres:
            with self.con.cursor() as cur:
                cur.executemany(sql.replace("?", "%s"), rows)
        else:
            self.con.executemany(sql, rows)

    def all(self, sql: str, params: tuple | list = ()) -> list[dict[str, Any]]:
        return list(self.execute(sql, params).fetchall())

    def one_value(self, sql: str, params: tuple | list = ()) -> Any:
        row = self.execute(sql, params).fetchone()
        return None if row is None else next(iter(row.values()))

    @contextmanager
    def transaction(self, lock: str | None = None) -> Iterator[_Db]:
        """One atomic unit. SQLite takes the write lock at BEGIN; PostgreSQL takes the advisory
        lock ``lock`` (a name) for the transaction, for check-then-write sequences."""
        self.execute("BEGIN" if self.postgres else "BEGIN IMMEDIATE")
        try:
            if lock is not None and self.postgres:
                self.execute("SELECT pg_advisory_xact_lock(?)", (_lock_id(lock),))
            yield self
        except BaseException:
            self.execute("ROLLBACK")
            raise
        else:
            self.execute("COMMIT")

    def upsert(self, table: str, row: dict[str, Any], keys: tuple[str, ...]) -> None:
        """Insert ``row``, replacing the one with the same ``keys`` (same SQL on both backends)."""
        cols = ", ".join(row)
        marks = ", ".join("?" for _ in row)
        update = ", ".join(f"{c} = excluded.{c}" for c in row if c not in keys)
        self.execute(
            f"INSERT INTO {table} ({cols}) VALUES ({marks}) "
            f"ON CONFLICT ({', '.join(keys)}) DO UPDATE SET {update}",
            list(row.values()),
        )

    def tables(self) -> set[str]:
        if self.postgres:
            rows = self.all(
                "SELECT table_name AS name FROM information_schema.tables "
                "WHERE table_schema = current_schema()"
            )
        else:
            rows = self.all("SELECT name FROM sqlite_master WHERE type = 'table'")
        return {r["name"] for r in rows}

    def columns(self, table: str) -> set[str]:
        if self.postgres:
            rows = self.all(
                "SELECT column_name AS name FROM information_schema.columns "
                "WHERE table_schema = current_schema() AND table_name = ?",
                (table,),
            )
        else:
            rows = self.all(f"PRAGMA table_info({table})")
        return {r["name"] for r in rows}

    def close(self) -> None:
        self.con.close()


def _dict_row(cursor: sqlite3.Cursor, row: tuple) -> dict[str, Any]:
    return {d[0]: v for d, v in zip(cursor.description, row, strict=True)}


def _lock_id(name: str) -> int:
    """A stable signed 64-bit id for a PostgreSQL advisory lock named ``name``."""
    return zlib.crc32(name.encode()) - 2**31


def schema_version(db: _Db) -> int:
    """The catalog's schema version: ``info.schema_version``, or, for a catalog written before
    versions were recorded, what its tables show (0: empty)."""
    tables = db.tables()
    if "info" in tables:
        value = db.one_value("SELECT value FROM info WHERE key = 'schema_version'")
        if value is not None:
            return int(json.loads(value))
    if "series" not in tables:
        return 0
    return 2 if "transform" in db.columns("series") else 1


def migrate(db: _Db) -> int:
    """Bring the catalog to :data:`SCHEMA_VERSION`; returns the version it had before.

    Raises:
        InputError: the catalog was written by a newer UMIT (a version this one does not know).
    """
    with db.transaction(lock="umit-catalog-migrate"):  # before looking: one migrator at a time
        before = schema_version(db)
        if before > SCHEMA_VERSION:
            raise InputError(
                redact_url(db.location),
                f"catalog schema version {before} is newer than this UMIT's {SCHEMA_VERSION}; "
                "upgrade umit",
            )
        for number, _, step in MIGRATIONS:
            if number > before:
                step(db)
        if before < SCHEMA_VERSION:
            db.upsert("info", {"key": "schema_version", "value": str(SCHEMA_VERSION)}, ("key",))
    return before


@dataclass
class SeriesRecord:
    """One catalog row: a written image (one channel of one case) and what is known about it.

    Attributes:
        series_id: Stable pseudonymous id of this row (derived from ``case_id`` and channel).
        source_key: Stable hash of the source item; a present key means "already done".
        case_id: Groups the channels of one case and its label; pseudonymous.
        subject_id: Pseudonymous subject (keyed hash of the patient ID), for patient-level splits.
        channel: Channel index within the case.
        channel_name: E.g. "CT", "T1", "FLAIR".
        image_path: NIfTI path relative to the RAW folder.
        label_path: Label NIfTI path relative to the RAW folder, or None.
        source: The file or folder the series was read from.
        source_format: "dicom", "nifti", "nrrd", "mha", "msd", "nnunet", "medmnist".
        modality: "CT", "MR", ...
        body_part: Body part examined (upper case, as DICOM), when known.
        shape: Voxel shape of the written image.
        spacing: Voxel size in mm along each voxel axis.
        orientation: Orientation code of the written image, e.g. "RAS".
        dtype: NumPy dtype of the written voxels.
        manufacturer: Scanner manufacturer (device identity; kept for bias analysis).
        model: Scanner model name.
        site: Acquisition site label (a pseudonym, never an institution name).
        sex: "F", "M", "O" or None.
        age_band: E.g. "40-59", or None.
        contrast: "yes", "no", a phase name, or None.
        split: "train", "val" or "test" when the source defines one.
        target: JSON-encodable classification target (e.g. a class index), when given.
        extra: Other non-identifying metadata.
        transform: What ingest changed in the voxels beyond reading them, e.g. "resampled
            nonuniform slices 4.2/7.4 mm -> 4.2 mm (26 -> 35 slices)"; None when written as read.
        ingested_at: UTC ISO timestamp of the commit.
    """

    series_id: str
    source_key: str
    case_id: str
    image_path: str
    source: str
    source_format: str
    shape: tuple[int, ...]
    spacing: tuple[float, ...]
    orientation: str
    subject_id: str | None = None
    channel: int = 0
    channel_name: str | None = None
    label_path: str | None = None
    modality: str | None = None
    body_part: str | None = None
    dtype: str | None = None
    manufacturer: str | None = None
    model: str | None = None
    site: str | None = None
    sex: str | None = None
    age_band: str | None = None
    contrast: str | None = None
    split: str | None = None
    target: Any = None
    extra: dict[str, Any] = field(default_factory=dict)
    transform: str | None = None
    ingested_at: str = ""


_JSON_FIELDS = ("shape", "spacing", "target", "extra")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class Catalog:
    """The catalog of a RAW folder, in SQLite (a path) or PostgreSQL (a ``postgresql://`` URL).

    Use as a context manager or call :meth:`close`. The schema is created or migrated on open.
    """

    def __init__(self, location: str | Path):
        self._db = _Db(location)
        self.location = location
        try:
            migrate(self._db)
        except BaseException:
            self._db.close()
            raise

    @property
    def path(self) -> Path | None:
        """The SQLite file (None for PostgreSQL)."""
        return None if self._db.postgres else Path(self.location)

    @property
    def backend(self) -> str:
        return "postgresql" if self._db.postgres else "sqlite"

    def __repr__(self) -> str:
        return f"Catalog({redact_url(self.location)!r})"

    @classmethod
    def open_raw(cls, raw: str | Path, catalog: str | Path | None = None) -> Catalog:
        """Open the catalog of an existing RAW folder (``catalog`` if given), with a clear error
        if there is none."""
        location = catalog_location(catalog, raw)
        if not is_postgres_url(location) and not Path(location).is_file():
            raise InputError(location, f"no catalog here; run `umit ingest SRC --out {raw}` first")
        return cls(location)

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Catalog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def transaction(self, lock: str | None = None) -> Iterator[_Db]:
        """One atomic unit: everything inside commits together or not at all."""
        with self._db.transaction(lock=lock) as db:
            yield db

    # -- writing ---------------------------------------------------------------------------
    def add_series(self, records: list[SeriesRecord]) -> None:
        """Commit all channels of one source item at once, clearing an earlier failure of it.

        The case-id check and the writes are one transaction holding the case's lock, so two
        workers committing the same case at once write it once, and two sources claiming one
        case id cannot both win.
        """
        if not records:
            return
        now = _now()
        with self.transaction(lock=f"case:{records[0].case_id}") as db:
            for rec in records:
                clash = db.all(
                    "SELECT source FROM series WHERE case_id = ? AND channel = ? AND source_key != ?",
                    (rec.case_id, rec.channel, rec.source_key),
                )
                if clash:
                    raise InputError(
                        rec.source,
                        f"case id {rec.case_id!r} channel {rec.channel} was already ingested from "
                        f"another source ({clash[0]['source']}); case ids must be unique within "
                        "a RAW folder",
                    )
                row = asdict(rec)
                row["ingested_at"] = now
                for key in _JSON_FIELDS:
                    row[key] = json.dumps(row[key])
                db.upsert("series", row, ("series_id",))
                db.execute("DELETE FROM failures WHERE source_key = ?", (rec.source_key,))

    def add_failure(self, source_key: str, source: str, reason: str, stage: str = "ingest") -> None:
        """Record why one source item could not be ingested (replaces an earlier reason)."""
        row = dict(
            source_key=source_key, source=str(source), stage=stage, reason=reason, failed_at=_now()
        )
        with self.transaction() as db:
            db.upsert("failures", row, ("source_key",))

    def add_set_aside(
        self,
        source_key: str,
        source: str,
        reason: str,
        *,
        n_images: int,
        kind: str = "localizer",
        modality: str | None = None,
        series_number: int | None = None,
        deid_series_uid: str | None = None,
    ) -> None:
        """Record images left out on purpose (localizers): reported, not failures, never redone
        (a rerun finds them again and replaces the row)."""
        row = dict(
            source_key=source_key,
            source=source,
            kind=kind,
            reason=reason,
            n_images=n_images,
            modality=modality,
            series_number=series_number,
            deid_series_uid=deid_series_uid,
            set_aside_at=_now(),
        )
        with self.transaction() as db:
            db.upsert("set_aside", row, ("source_key",))

    def add_remote_series(
        self,
        deid_series_uid: str,
        deid_study_uid: str,
        *,
        modality: str | None,
        n_instances: int,
        n_bytes: int,
        n_items: int,
        n_failed: int,
        clear_failure: str | None = None,
    ) -> None:
        """Mark a series of a DICOMweb source done (after its items are committed), by its
        pseudonymised UIDs: ``n_items`` stacks and unreadable files found in it, ``n_failed``
        of them failure rows. ``clear_failure`` is the source key of an earlier failed
        retrieval of it, removed in the same transaction."""
        row = dict(
            deid_series_uid=deid_series_uid,
            deid_study_uid=deid_study_uid,
            modality=modality,
            n_instances=n_instances,
            n_bytes=n_bytes,
            n_items=n_items,
            n_failed=n_failed,
            retrieved_at=_now(),
        )
        with self.transaction() as db:
            db.upsert("remote_series", row, ("deid_series_uid",))
            if clear_failure is not None:
                db.execute("DELETE FROM failures WHERE source_key = ?", (clear_failure,))

    def add_label_source(
        self,
        case_id: str,
        source: str,
        label_path: str | Path,
        details: dict[str, Any] | None = None,
        activate: bool = False,
    ) -> None:
        """Record another label of a case (e.g. ``consensus_staple`` from several raters).

        With ``activate`` it also becomes the case's label (``series.label_path``, which
        ``umit preprocess`` reads); the label it replaces is kept as source ``original``.
        """
        now = _now()
        with self.transaction(lock=f"case:{case_id}") as db:
            if activate:
                rows = db.all("SELECT label_path FROM series WHERE case_id = ? LIMIT 1", (case_id,))
                if not rows:
                    raise InputError(
                        redact_url(self.location), f"case {case_id!r} is not in the catalog"
                    )
                if rows[0]["label_path"]:
                    db.execute(
                        "INSERT INTO label_sources VALUES (?, 'original', ?, NULL, ?) "
                        "ON CONFLICT (case_id, source) DO NOTHING",
                        (case_id, rows[0]["label_path"], now),
                    )
                db.execute(
                    "UPDATE series SET label_path = ? WHERE case_id = ?", (str(label_path), case_id)
                )
            db.upsert(
                "label_sources",
                {
                    "case_id": case_id,
                    "source": source,
                    "label_path": str(label_path),
                    "details": json.dumps(details or {}),
                    "added_at": now,
                },
                ("case_id", "source"),
            )

    def label_sources(self, case_id: str | None = None) -> list[dict[str, Any]]:
        """Rows of ``label_sources`` (all, or one case's), details parsed."""
        sql, params = "SELECT * FROM label_sources", ()
        if case_id is not None:
            sql, params = sql + " WHERE case_id = ?", (case_id,)
        rows = self._db.all(sql + " ORDER BY case_id, source", params)
        for r in rows:
            r["details"] = json.loads(r["details"]) if r["details"] else {}
        return rows

    def set_info(self, key: str, value: Any) -> None:
        with self.transaction() as db:
            db.upsert("info", {"key": key, "value": json.dumps(value)}, ("key",))

    def claim_cases(self, claims: list[tuple[str, str, str]]) -> dict[str, tuple[str, str]]:
        """Claim case ids for sources before their files are written: ``(case_id, source_key,
        source)`` each; returns case id -> ``(source_key, source)`` of its owner, which is the
        claimant unless another source claimed it first (here or in a concurrent process).

        One transaction: of two processes claiming one case id at once, one wins.
        """
        with self.transaction(lock="case-claims") as db:
            for case_id, key, source in claims:
                db.execute(
                    "INSERT INTO case_owners (case_id, source_key, source) VALUES (?, ?, ?) "
                    "ON CONFLICT (case_id) DO NOTHING",
                    (case_id, key, source),
                )
            wanted = {c for c, _, _ in claims}
            rows = db.all("SELECT case_id, source_key, source FROM case_owners")
        return {
            r["case_id"]: (r["source_key"], r["source"]) for r in rows if r["case_id"] in wanted
        }

    # -- locks -----------------------------------------------------------------------------
    def acquire_lock(self, name: str, holder: str = "umit preprocess") -> None:
        """Hold ``name`` (an output folder) for this process, or raise naming the holder.

        A lock held by a process of this host that no longer exists (killed) is taken over.

        Raises:
            InputError: another live process holds it.
        """
        host, pid = socket.gethostname(), os.getpid()
        with self.transaction(lock=f"lock:{name}") as db:
            rows = db.all("SELECT pid, host FROM locks WHERE name = ?", (name,))
            if rows:
                other = rows[0]
                mine = other["host"] == host and other["pid"] == pid
                dead = other["host"] == host and not _pid_alive(other["pid"])
                if not (mine or dead):
                    where = "" if other["host"] == host else f" on host {other['host']}"
                    raise InputError(
                        name,
                        f"another {holder} is writing {name} (pid {other['pid']}{where}); wait "
                        "for it to finish, or if it was killed on another host, delete its row "
                        f"from the catalog's locks table",
                    )
            db.upsert("locks", dict(name=name, pid=pid, host=host, started_at=_now()), ("name",))

    def release_lock(self, name: str) -> None:
        """Let go of ``name`` if this process holds it."""
        with self.transaction() as db:
            db.execute(
                "DELETE FROM locks WHERE name = ? AND pid = ? AND host = ?",
                (name, os.getpid(), socket.gethostname()),
            )

    @contextmanager
    def lock(self, name: str, holder: str = "umit preprocess") -> Iterator[None]:
        """:meth:`acquire_lock` for the ``with`` block."""
        self.acquire_lock(name, holder)
        try:
            yield
        finally:
            self.release_lock(name)

    # -- reading ---------------------------------------------------------------------------
    def done_keys(self) -> set[str]:
        """Source keys that are finished (ingested or failed for good)."""
        rows = self._db.all("SELECT source_key FROM series UNION SELECT source_key FROM failures")
        return {r["source_key"] for r in rows}

    def series(self, where: str = "", params: tuple = ()) -> list[SeriesRecord]:
        """All series rows (optionally filtered by a SQL ``where`` clause with ``?``
        placeholders), ordered by case/channel."""
        sql = "SELECT * FROM series" + (f" WHERE {where}" if where else "")
        rows = self._db.all(sql + " ORDER BY case_id, channel", params)
        return [_record_from_row(r) for r in rows]

    def cases(self) -> dict[str, list[SeriesRecord]]:
        """Series grouped by case, channels in order."""
        out: dict[str, list[SeriesRecord]] = {}
        for rec in self.series():
            out.setdefault(rec.case_id, []).append(rec)
        return out

    def failures(self) -> list[dict[str, str]]:
        return self._db.all("SELECT * FROM failures ORDER BY source, source_key")

    def set_aside(self) -> list[dict[str, Any]]:
        """Rows of images set aside on purpose (localizers), ordered by source."""
        return self._db.all("SELECT * FROM set_aside ORDER BY source, source_key")

    def remote_series(self) -> list[dict[str, Any]]:
        """Series of DICOMweb sources that are done, by pseudonymised UID."""
        return self._db.all("SELECT * FROM remote_series ORDER BY retrieved_at, deid_series_uid")

    def info(self) -> dict[str, Any]:
        return {r["key"]: json.loads(r["value"]) for r in self._db.all("SELECT * FROM info")}

    def summary(self) -> dict[str, Any]:
        """Counts by modality / format / split / site / sex for the closing summary."""
        db = self._db
        out: dict[str, Any] = {
            "series": db.one_value("SELECT COUNT(*) FROM series"),
            "cases": db.one_value("SELECT COUNT(DISTINCT case_id) FROM series"),
            "labeled_cases": db.one_value(
                "SELECT COUNT(DISTINCT case_id) FROM series WHERE label_path IS NOT NULL"
            ),
            "failures": db.one_value("SELECT COUNT(*) FROM failures"),
        }
        for col in ("modality", "source_format", "split", "site", "sex", "age_band", "contrast"):
            rows = db.all(
                f"SELECT COALESCE({col}, '-') AS v, COUNT(DISTINCT case_id) AS n FROM series "
                f"GROUP BY COALESCE({col}, '-') ORDER BY v"
            )
            out[f"by_{col}"] = {r["v"]: r["n"] for r in rows}
        return out

    def size_bytes(self) -> int:
        """Bytes the catalog takes on disk (the SQLite file, or the PostgreSQL database)."""
        if self._db.postgres:
            return int(self._db.one_value("SELECT pg_database_size(current_database())"))
        path = Path(self.location)
        return sum(
            p.stat().st_size for p in (path, Path(f"{path}-wal"), Path(f"{path}-shm")) if p.exists()
        )


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


_FIELD_NAMES = {f.name for f in fields(SeriesRecord)}


def _record_from_row(row: dict[str, Any]) -> SeriesRecord:
    data = {k: v for k, v in row.items() if k in _FIELD_NAMES}
    for key in _JSON_FIELDS:
        data[key] = json.loads(data[key]) if data[key] is not None else None
    data["shape"] = tuple(data["shape"])
    data["spacing"] = tuple(data["spacing"])
    data["extra"] = data["extra"] or {}
    return SeriesRecord(**data)
