"""``umit labels from-reports``: finding labels from a file of reports, into the catalog.

The reports file is CSV (or TSV) with a header row, or JSONL (one object per line). One column
holds the report text (``text``, ``report`` or ``report_text``), one the key that joins it to
the catalog, hashed exactly as ``umit ingest`` hashed it with the RAW folder's secret:

- ``study_uid``: the DICOM StudyInstanceUID -> the ``2.25`` UID ``umit deid``/``umit ingest``
  give it (``deid_study_uid`` of every series of the study); labels go to each case of the study;
- ``patient_id``: the PatientID (or a collection's subject id) -> the catalog's ``subject_id``
  (HMAC-SHA256 pseudonym); labels go to each case of the subject;
- ``accession``: the DICOM AccessionNumber -> its keyed pseudonym, which ingest stores for each
  DICOM series (``accession_pseudonym``); labels go to each case (series) of the study;
- ``case_id``: the catalog's own case id (already pseudonymous, or a collection's coded id).

Neither the raw key nor the text is stored: only the labels, with the character span of the
deciding sentence and the report's row number. Reports that match no case, have empty text or
repeat a case are counted and listed by row number in the summary (``info`` table key
``labels:reports`` and the return value), never silently dropped. All rows of the run replace
the previous run's in one transaction.
"""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from umit.config import UmitConfig
from umit.deid.secret import SECRET_NAME, accession_pseudonym, pseudonym, replace_uid
from umit.errors import InputError
from umit.ingest.catalog import Catalog
from umit.labels.context import ConText
from umit.labels.reports import LABELER_VERSION, label_report
from umit.labels.table import catalog_path, replace_labels
from umit.labels.vocabulary import load_vocabulary

log = logging.getLogger(__name__)

KEY_COLUMNS = ("case_id", "study_uid", "patient_id", "accession")
TEXT_COLUMNS = ("text", "report", "report_text")
SOURCE = "reports"
INFO_KEY = "labels:reports"


class FromReportsConfig(UmitConfig):
    """Settings of ``umit labels from-reports``."""

    reports: Path
    """CSV/TSV (header row) or JSONL file of reports: a key column and a text column."""
    catalog: Path
    """RAW folder written by ``umit ingest`` (or its catalog.db)."""
    vocab: Path | None = None
    """Findings vocabulary YAML; None: the shipped CT set (umit/labels/vocabularies/ct_default.yaml)."""
    findings: list[str] | None = None
    """Label only these findings of the vocabulary (None: all)."""
    key: Literal["auto", "case_id", "study_uid", "patient_id", "accession"] = "auto"
    """Join column; ``auto``: the first of case_id, study_uid, patient_id, accession present."""
    text_column: str | None = None
    """Column of the report text; None: the first of text, report, report_text present."""
    secret: Path | None = None
    """Pseudonymization key file; None: the RAW folder's .umit_secret (what ingest used)."""
    max_scope: int | None = Field(default=None, ge=1)
    """Longest trigger scope in tokens (None: to the sentence end or a termination term)."""


@dataclass
class FromReportsResult:
    """Counts of a run; rows are 1-based data rows of the reports file (header excluded)."""

    reports: int = 0
    labeled_reports: int = 0
    labeled_cases: int = 0
    rows_written: int = 0
    unmatched_rows: list[int] = field(default_factory=list)
    empty_rows: list[int] = field(default_factory=list)
    duplicate_rows: list[int] = field(default_factory=list)
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    key: str = ""
    labeler: str = ""

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def read_reports(path: Path, text_column: str | None, key: str) -> tuple[list[dict], str, str]:
    """Rows of the reports file as dicts, with the key and text column names it uses."""
    if not path.is_file():
        raise InputError(path, "reports file not found")
    try:
        raw = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(path, f"cannot read the reports ({exc})") from exc
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        rows = []
        for i, line in enumerate(raw.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(path, f"line {i} is not valid JSON ({exc.msg})") from exc
            if not isinstance(obj, dict):
                raise InputError(path, f"line {i} is not a JSON object")
            rows.append(obj)
        columns = list(dict.fromkeys(k for r in rows for k in r))
    else:
        delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
        try:
            reader = csv.DictReader(raw.splitlines(keepends=True), delimiter=delimiter)
            rows = list(reader)
        except csv.Error as exc:
            raise InputError(path, f"not a readable CSV file ({exc})") from exc
        columns = list(reader.fieldnames or [])
    if not rows:
        raise InputError(path, "holds no reports")
    if key == "auto":
        key = next((c for c in KEY_COLUMNS if c in columns), "")
        if not key:
            raise InputError(
                path, f"no key column: needs one of {KEY_COLUMNS}; it has columns {columns}"
            )
    elif key not in columns:
        raise InputError(path, f"missing column {key!r} (key={key}); it has columns {columns}")
    if text_column is None:
        text_column = next((c for c in TEXT_COLUMNS if c in columns), None)
        if text_column is None:
            raise InputError(
                path, f"no text column: needs one of {TEXT_COLUMNS}; it has columns {columns}"
            )
    elif text_column not in columns:
        raise InputError(path, f"missing column {text_column!r} (text_column); it has {columns}")
    return rows, key, text_column


def _load_secret(cfg: FromReportsConfig, db: Path) -> bytes:
    path = cfg.secret or db.parent / SECRET_NAME
    if not path.is_file():
        raise InputError(
            path,
            "pseudonymization secret not found: the key must be hashed with the secret "
            "`umit ingest` used (RAW/.umit_secret), or use key=case_id",
        )
    try:
        return bytes.fromhex(path.read_text().strip())
    except ValueError as exc:
        raise InputError(path, "secret file must hold a hex key (as written by umit)") from exc


def _join_index(catalog: Catalog, key: str, db: Path) -> dict[str, list[str]]:
    """Catalog value of the join -> case ids (sorted)."""
    index: dict[str, set[str]] = {}
    for rec in catalog.series():
        if key == "case_id":
            value = rec.case_id
        elif key == "patient_id":
            value = rec.subject_id
        elif key == "study_uid":
            value = (rec.extra or {}).get("deid_study_uid")
        else:
            value = (rec.extra or {}).get("accession_pseudonym")
        if value:
            index.setdefault(value, set()).add(rec.case_id)
    if key == "accession" and not index:
        raise InputError(
            db,
            "the catalog keeps no accession pseudonyms (no DICOM series with an AccessionNumber, "
            "or ingested by an older umit); re-ingest, or join by study_uid, patient_id or case_id",
        )
    return {k: sorted(v) for k, v in index.items()}


def _hash_key(key: str, value: str, secret: bytes | None) -> str:
    if key == "case_id":
        return value
    assert secret is not None
    if key == "study_uid":
        return replace_uid(secret, value)
    if key == "accession":
        return accession_pseudonym(secret, value)
    return pseudonym(secret, value)  # patient_id: as ingest hashes the subject key


def run(cfg: FromReportsConfig) -> FromReportsResult:
    """Label every report and replace the catalog's ``reports`` labels in one transaction."""
    db = catalog_path(cfg.catalog)
    vocab = load_vocabulary(cfg.vocab)
    if cfg.findings is not None:
        vocab.check_findings(cfg.findings, cfg.vocab or vocab.source)
        vocab.findings = {k: v for k, v in vocab.findings.items() if k in cfg.findings}
    rows, key, text_col = read_reports(Path(cfg.reports), cfg.text_column, cfg.key)
    engine = ConText(max_scope=cfg.max_scope)
    labeler = f"{LABELER_VERSION} {vocab.tag}"
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    result = FromReportsResult(reports=len(rows), key=key, labeler=labeler)
    out_rows: list[dict] = []
    seen: set[str] = set()
    with Catalog(db) as catalog:
        index = _join_index(catalog, key, db)
        secret = None if key == "case_id" else _load_secret(cfg, db)
        for i, row in enumerate(rows, start=1):
            raw_key = row.get(key)
            text = row.get(text_col)
            if not isinstance(text, str) or not text.strip():
                result.empty_rows.append(i)
                continue
            value = str(raw_key).strip() if raw_key is not None else ""
            cases = index.get(_hash_key(key, value, secret)) if value else None
            if not cases:
                result.unmatched_rows.append(i)
                continue
            if any(c in seen for c in cases):
                result.duplicate_rows.append(i)
                continue
            seen.update(cases)
            labels = label_report(text, vocab, engine)
            result.labeled_reports += 1
            for case in cases:
                for lab in labels.values():
                    out_rows.append(
                        {
                            "case_id": case,
                            "finding": lab.finding,
                            "value": lab.value,
                            "sentence_start": lab.sentence_start,
                            "sentence_end": lab.sentence_end,
                            "report_row": i,
                            "source": SOURCE,
                            "labeler": labeler,
                            "labeled_at": now,
                        }
                    )
                    per = result.counts.setdefault(lab.finding, {})
                    per[lab.value] = per.get(lab.value, 0) + 1
        result.labeled_cases = len(seen)
        result.rows_written = replace_labels(catalog, SOURCE, out_rows)
        catalog.set_info(INFO_KEY, result.as_dict())
    for what, listed in (
        ("match no case", result.unmatched_rows),
        ("have no text", result.empty_rows),
        ("repeat a case already labeled", result.duplicate_rows),
    ):
        if listed:
            log.warning(
                "%s: %d report(s) %s (rows %s%s)",
                cfg.reports,
                len(listed),
                what,
                ", ".join(map(str, listed[:20])),
                ", ..." if len(listed) > 20 else "",
            )
    return result
