"""The ingest catalog: one SQLite row per written series/channel, plus a table of failures.

The catalog is the hand-over from ``umit ingest`` to ``umit preprocess`` and to the bias
analysis: it holds geometry and acquisition metadata and the subgroup attributes (sex, age band,
site, contrast), never patient identifiers. Beside the ``series`` table, ``failures`` lists what
could not be ingested, ``set_aside`` what was left out on purpose (localizers) and
``remote_series`` which series of a DICOMweb source (a PACS) are done, by pseudonymised UID.
Each series is committed in its own transaction, so a killed ingest can be resumed: a source
whose ``source_key`` is present is not redone, nor a remote series that has its row.

Layout of a RAW folder (paths in the catalog are relative to it)::

    RAW/catalog.db
    RAW/images/<case_id>_<channel:04d>.nii.gz
    RAW/labels/<case_id>.nii.gz
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from umit.errors import InputError

CATALOG_NAME = "catalog.db"
SCHEMA_VERSION = 2

# Schema 1; series columns added since are in _ADDED_COLUMNS (added to every catalog on open).
_SCHEMA = """
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
CREATE TABLE IF NOT EXISTS label_sources (
    case_id    TEXT NOT NULL,
    source     TEXT NOT NULL,
    label_path TEXT NOT NULL,
    details    TEXT,
    added_at   TEXT NOT NULL,
    PRIMARY KEY (case_id, source)
);
CREATE TABLE IF NOT EXISTS remote_series (
    deid_series_uid TEXT PRIMARY KEY,
    deid_study_uid  TEXT NOT NULL,
    modality        TEXT,
    n_instances     INTEGER NOT NULL,
    n_bytes         INTEGER NOT NULL,
    n_items         INTEGER NOT NULL,
    n_failed        INTEGER NOT NULL,
    retrieved_at    TEXT NOT NULL
);
"""

_ADDED_COLUMNS: dict[str, str] = {
    "transform": "TEXT",  # schema 2
}
"""Series columns added after schema 1 (name -> SQL type). A catalog written by an older
version gets them on open (:func:`_migrate`); its earlier rows read them as None."""


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
    """SQLite catalog of a RAW folder. Use as a context manager or call :meth:`close`."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: we issue BEGIN/COMMIT ourselves, one transaction per series.
        self._con = sqlite3.connect(self.path, isolation_level=None, timeout=60)
        self._con.row_factory = sqlite3.Row
        self._con.execute("PRAGMA journal_mode=WAL")
        self._con.execute("PRAGMA synchronous=FULL")
        self._con.executescript(_SCHEMA)
        _migrate(self._con)

    @classmethod
    def open_raw(cls, raw: str | Path) -> Catalog:
        """Open the catalog of an existing RAW folder, with a clear error if there is none."""
        path = Path(raw) / CATALOG_NAME
        if not path.is_file():
            raise InputError(
                raw, f"no {CATALOG_NAME} here; run `umit ingest SRC --out {raw}` first"
            )
        return cls(path)

    def close(self) -> None:
        self._con.close()

    def __enter__(self) -> Catalog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One atomic unit: everything inside commits together or not at all."""
        self._con.execute("BEGIN IMMEDIATE")
        try:
            yield self._con
        except BaseException:
            self._con.execute("ROLLBACK")
            raise
        else:
            self._con.execute("COMMIT")

    # -- writing ---------------------------------------------------------------------------
    def add_series(self, records: list[SeriesRecord]) -> None:
        """Commit all channels of one source item at once, clearing an earlier failure of it."""
        if not records:
            return
        now = _now()
        with self.transaction() as con:
            for rec in records:
                clash = con.execute(
                    "SELECT source FROM series WHERE case_id = ? AND channel = ? AND source_key != ?",
                    (rec.case_id, rec.channel, rec.source_key),
                ).fetchone()
                if clash:
                    raise InputError(
                        rec.source,
                        f"case id {rec.case_id!r} channel {rec.channel} was already ingested from "
                        f"another source ({clash[0]}); case ids must be unique within a RAW folder",
                    )
                row = asdict(rec)
                row["ingested_at"] = now
                for key in _JSON_FIELDS:
                    row[key] = json.dumps(row[key])
                cols = ", ".join(row)
                marks = ", ".join("?" for _ in row)
                con.execute(
                    f"INSERT OR REPLACE INTO series ({cols}) VALUES ({marks})", list(row.values())
                )
                con.execute("DELETE FROM failures WHERE source_key = ?", (rec.source_key,))

    def add_failure(self, source_key: str, source: str, reason: str, stage: str = "ingest") -> None:
        """Record why one source item could not be ingested (replaces an earlier reason)."""
        with self.transaction() as con:
            con.execute(
                "INSERT OR REPLACE INTO failures VALUES (?, ?, ?, ?, ?)",
                (source_key, str(source), stage, reason, _now()),
            )

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
        with self.transaction() as con:
            con.execute(
                "INSERT OR REPLACE INTO set_aside VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    source_key,
                    source,
                    kind,
                    reason,
                    n_images,
                    modality,
                    series_number,
                    deid_series_uid,
                    _now(),
                ),
            )

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
        with self.transaction() as con:
            con.execute(
                "INSERT OR REPLACE INTO remote_series VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    deid_series_uid,
                    deid_study_uid,
                    modality,
                    n_instances,
                    n_bytes,
                    n_items,
                    n_failed,
                    _now(),
                ),
            )
            if clear_failure is not None:
                con.execute("DELETE FROM failures WHERE source_key = ?", (clear_failure,))

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
        with self.transaction() as con:
            if activate:
                row = con.execute(
                    "SELECT label_path FROM series WHERE case_id = ? LIMIT 1", (case_id,)
                ).fetchone()
                if row is None:
                    raise InputError(self.path, f"case {case_id!r} is not in the catalog")
                if row[0]:
                    con.execute(
                        "INSERT OR IGNORE INTO label_sources VALUES (?, 'original', ?, NULL, ?)",
                        (case_id, row[0], now),
                    )
                con.execute(
                    "UPDATE series SET label_path = ? WHERE case_id = ?", (str(label_path), case_id)
                )
            con.execute(
                "INSERT OR REPLACE INTO label_sources VALUES (?, ?, ?, ?, ?)",
                (case_id, source, str(label_path), json.dumps(details or {}), now),
            )

    def label_sources(self, case_id: str | None = None) -> list[dict[str, Any]]:
        """Rows of ``label_sources`` (all, or one case's), details parsed."""
        sql, params = "SELECT * FROM label_sources", ()
        if case_id is not None:
            sql, params = sql + " WHERE case_id = ?", (case_id,)
        rows = [dict(r) for r in self._con.execute(sql + " ORDER BY case_id, source", params)]
        for r in rows:
            r["details"] = json.loads(r["details"]) if r["details"] else {}
        return rows

    def set_info(self, key: str, value: Any) -> None:
        with self.transaction() as con:
            con.execute("INSERT OR REPLACE INTO info VALUES (?, ?)", (key, json.dumps(value)))

    # -- reading ---------------------------------------------------------------------------
    def done_keys(self) -> set[str]:
        """Source keys that are finished (ingested or failed for good)."""
        rows = self._con.execute(
            "SELECT source_key FROM series UNION SELECT source_key FROM failures"
        ).fetchall()
        return {r[0] for r in rows}

    def series(self, where: str = "", params: tuple = ()) -> list[SeriesRecord]:
        """All series rows (optionally filtered by a SQL ``where`` clause), ordered by case/channel."""
        sql = "SELECT * FROM series" + (f" WHERE {where}" if where else "")
        rows = self._con.execute(sql + " ORDER BY case_id, channel", params).fetchall()
        return [_record_from_row(r) for r in rows]

    def cases(self) -> dict[str, list[SeriesRecord]]:
        """Series grouped by case, channels in order."""
        out: dict[str, list[SeriesRecord]] = {}
        for rec in self.series():
            out.setdefault(rec.case_id, []).append(rec)
        return out

    def failures(self) -> list[dict[str, str]]:
        rows = self._con.execute("SELECT * FROM failures ORDER BY source").fetchall()
        return [dict(r) for r in rows]

    def set_aside(self) -> list[dict[str, Any]]:
        """Rows of images set aside on purpose (localizers), ordered by source."""
        rows = self._con.execute("SELECT * FROM set_aside ORDER BY source").fetchall()
        return [dict(r) for r in rows]

    def remote_series(self) -> list[dict[str, Any]]:
        """Series of DICOMweb sources that are done, by pseudonymised UID."""
        rows = self._con.execute("SELECT * FROM remote_series ORDER BY retrieved_at").fetchall()
        return [dict(r) for r in rows]

    def info(self) -> dict[str, Any]:
        return {r[0]: json.loads(r[1]) for r in self._con.execute("SELECT key, value FROM info")}

    def summary(self) -> dict[str, Any]:
        """Counts by modality / format / split / site / sex for the closing summary."""
        con = self._con
        out: dict[str, Any] = {
            "series": con.execute("SELECT COUNT(*) FROM series").fetchone()[0],
            "cases": con.execute("SELECT COUNT(DISTINCT case_id) FROM series").fetchone()[0],
            "labeled_cases": con.execute(
                "SELECT COUNT(DISTINCT case_id) FROM series WHERE label_path IS NOT NULL"
            ).fetchone()[0],
            "failures": con.execute("SELECT COUNT(*) FROM failures").fetchone()[0],
        }
        for col in ("modality", "source_format", "split", "site", "sex", "age_band", "contrast"):
            rows = con.execute(
                f"SELECT COALESCE({col}, '-') AS v, COUNT(DISTINCT case_id) FROM series GROUP BY v ORDER BY v"
            ).fetchall()
            out[f"by_{col}"] = {r[0]: r[1] for r in rows}
        return out


def _migrate(con: sqlite3.Connection) -> None:
    """Bring a catalog up to :data:`SCHEMA_VERSION`: add the series columns it lacks."""
    con.execute("BEGIN IMMEDIATE")  # before looking: two processes opening at once add once
    try:
        with_columns = {r[1] for r in con.execute("PRAGMA table_info(series)")}
        for name, sql_type in _ADDED_COLUMNS.items():
            if name not in with_columns:
                con.execute(f"ALTER TABLE series ADD COLUMN {name} {sql_type}")
        con.execute(
            "INSERT OR REPLACE INTO info VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),)
        )
    except BaseException:
        con.execute("ROLLBACK")
        raise
    con.execute("COMMIT")


_FIELD_NAMES = {f.name for f in fields(SeriesRecord)}


def _record_from_row(row: sqlite3.Row) -> SeriesRecord:
    data = {k: row[k] for k in row.keys() if k in _FIELD_NAMES}  # noqa: SIM118 (Row iterates values)
    for key in _JSON_FIELDS:
        data[key] = json.loads(data[key]) if data[key] is not None else None
    data["shape"] = tuple(data["shape"])
    data["spacing"] = tuple(data["spacing"])
    data["extra"] = data["extra"] or {}
    return SeriesRecord(**data)
