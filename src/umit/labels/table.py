"""The catalog's ``labels`` table: per-case finding labels, written in one transaction.

One row per (case, finding, source)::

    case_id         the catalog's (pseudonymous) case id
    finding         vocabulary finding name, e.g. "pleural_effusion"
    value           present | uncertain | absent | not_mentioned
    sentence_start  character span of the deciding sentence in the report (None when not
    sentence_end    mentioned); the report text itself is never stored
    report_row      row number of the report in its input file (1 = first data row)
    source          where the label came from, e.g. "reports" (other labelers add their own)
    labeler         labeler version and vocabulary tag, e.g. "umit-context/1 ct_default@v1:0d45ac58"
    labeled_at      UTC ISO time of the run

A rerun of a source replaces all of that source's rows at once (delete + insert in one
transaction), so readers see the old set or the new one, never a mix.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

from umit.config import UmitConfig
from umit.errors import InputError
from umit.ingest.catalog import CATALOG_NAME, Catalog

LABEL_COLUMNS = (
    "case_id",
    "finding",
    "value",
    "sentence_start",
    "sentence_end",
    "report_row",
    "source",
    "labeler",
    "labeled_at",
)
UNCERTAIN_POLICIES = ("ignore", "present", "absent")


def catalog_path(raw_or_db: str | Path) -> Path:
    """``RAW/catalog.db`` for a RAW folder, or the given catalog file; a clear error if absent."""
    p = Path(raw_or_db)
    path = p / CATALOG_NAME if p.is_dir() else p
    if not path.is_file():
        raise InputError(p, f"no {CATALOG_NAME} here; run `umit ingest SRC --out RAW` first")
    return path


def replace_labels(catalog: Catalog, source: str, rows: Iterable[dict]) -> int:
    """Replace every row of ``source`` by ``rows`` in one transaction; returns the row count.
    The table is the catalog's (migration 6 of :mod:`umit.ingest.catalog`)."""
    rows = list(rows)
    with catalog.transaction() as con:
        con.execute("DELETE FROM labels WHERE source = ?", (source,))
        con.executemany(
            f"INSERT INTO labels ({', '.join(LABEL_COLUMNS)}) "
            f"VALUES ({', '.join('?' for _ in LABEL_COLUMNS)})",
            [tuple(r[c] for c in LABEL_COLUMNS) for r in rows],
        )
    return len(rows)


def read_labels(
    raw_or_db: str | Path, finding: str | None = None, source: str | None = None
) -> list[dict]:
    """Rows of the labels table (read-only; optionally one finding and/or one source)."""
    path = catalog_path(raw_or_db)
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    con.row_factory = sqlite3.Row
    try:
        has_table = con.execute("SELECT 1 FROM sqlite_master WHERE name = 'labels'").fetchone()
        if not has_table or not con.execute("SELECT 1 FROM labels LIMIT 1").fetchone():
            raise InputError(
                path, "has no labels yet; run `umit labels from-reports REPORTS --catalog RAW`"
            )
        where, params = [], []
        if finding is not None:
            where.append("finding = ?")
            params.append(finding)
        if source is not None:
            where.append("source = ?")
            params.append(source)
        sql = "SELECT * FROM labels" + (f" WHERE {' AND '.join(where)}" if where else "")
        return [dict(r) for r in con.execute(sql + " ORDER BY case_id, finding", params)]
    finally:
        con.close()


def binary_targets(
    rows: list[dict],
    uncertain: str = "ignore",
    not_mentioned: str = "absent",
) -> dict[str, int]:
    """Case -> 0/1 from label rows of one finding: present 1, absent 0, uncertain and
    not_mentioned as their policies say ("ignore" leaves the case out)."""
    if uncertain not in UNCERTAIN_POLICIES:
        raise ValueError(f"uncertain must be one of {UNCERTAIN_POLICIES}, got {uncertain!r}")
    if not_mentioned not in UNCERTAIN_POLICIES:
        raise ValueError(
            f"not_mentioned must be one of {UNCERTAIN_POLICIES}, got {not_mentioned!r}"
        )
    policy = {"present": 1, "absent": 0, "ignore": None}
    out = {}
    for r in rows:
        v = r["value"]
        y = (
            1
            if v == "present"
            else 0
            if v == "absent"
            else policy[uncertain]
            if v == "uncertain"
            else policy[not_mentioned]
        )
        if y is not None:
            out[r["case_id"]] = y
    return out


class LabelsTableConfig(UmitConfig):
    """Where per-case finding labels come from: the catalog's ``labels`` table."""

    catalog: Path
    """RAW folder (or its catalog.db) holding the labels table (``umit labels from-reports``)."""
    source: str = "reports"
    """Labels of this source only (``reports``: from ``umit labels from-reports``)."""
    uncertain: Literal["ignore", "present", "absent"] = "ignore"
    """What an ``uncertain`` label counts as; ``ignore`` leaves the case out of that finding."""
    not_mentioned: Literal["ignore", "present", "absent"] = "absent"
    """What ``not_mentioned`` counts as (a report that does not name a finding usually means
    the reader saw none)."""


def table_targets(cfg: LabelsTableConfig, finding: str) -> dict[str, int]:
    """Case -> 0/1 for ``finding`` under ``cfg``'s policies; a clear error if it has no rows."""
    rows = read_labels(cfg.catalog, finding=finding, source=cfg.source)
    if not rows:
        known = sorted({r["finding"] for r in read_labels(cfg.catalog, source=cfg.source)})
        raise InputError(
            catalog_path(cfg.catalog),
            f"the labels table has no {finding!r} rows of source {cfg.source!r} (it has: "
            f"{', '.join(known) or 'none'})",
        )
    return binary_targets(rows, cfg.uncertain, cfg.not_mentioned)


def overlay_index(index: dict[str, dict[str, Any]], cfg: LabelsTableConfig, finding: str) -> int:
    """Set ``index[case][finding]`` to the table's 0/1 label for every case of the store index
    (None where the table has none, so the case counts as unlabeled); returns how many got one."""
    targets = table_targets(cfg, finding)
    for case, entry in index.items():
        entry[finding] = targets.get(case)
    return sum(case in targets for case in index)
