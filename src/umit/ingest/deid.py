"""De-identification at the ingest boundary.

This module is where the DICOM PS3.15 Annex E confidentiality profile will live (a later issue).
What it already guarantees for ``umit ingest``:

* only an explicit allowlist of non-identifying attributes leaves the DICOM reader for the
  catalog and the NIfTI headers (:func:`safe_attributes`); anything else is dropped, so a new
  reader field cannot leak by accident;
* identifiers needed for grouping (patient ID, series UID) are replaced by keyed pseudonyms
  (:func:`pseudonym`, HMAC-SHA256 with a per-RAW-folder secret), so the same patient maps to the
  same subject id across runs without the ID itself being stored.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path
from typing import Any

SECRET_NAME = ".umit_secret"

# Attributes that may be copied into the catalog: acquisition and subgroup data, no identity.
SAFE_ATTRIBUTES: frozenset[str] = frozenset(
    {
        "modality",
        "body_part",
        "manufacturer",
        "model",
        "sex",
        "age_years",
        "age_band",
        "contrast",
        "site",
        "slice_thickness",
        "kvp",
        "magnetic_field_strength",
        "scanning_sequence",
        "sequence_variant",
        "echo_time",
        "repetition_time",
        "inversion_time",
        "photometric",
        "transfer_syntax",
        "n_frames",
        "n_timepoints",
        "convolution_kernel",
    }
)

# Never copied, whatever a reader returns (checked in tests against the allowlist above).
IDENTIFYING_ATTRIBUTES: frozenset[str] = frozenset(
    {
        "patient_name",
        "patient_id",
        "patient_birth_date",
        "accession_number",
        "institution_name",
        "institution_address",
        "referring_physician",
        "study_date",
        "series_date",
        "study_uid",
        "series_uid",
        "sop_instance_uid",
        "series_description",
        "study_description",
        "operators_name",
        "station_name",
    }
)


def safe_attributes(attributes: dict[str, Any]) -> dict[str, Any]:
    """Keep only allowlisted, non-empty attributes (free-text descriptions are dropped too)."""
    return {
        k: v
        for k, v in attributes.items()
        if k in SAFE_ATTRIBUTES and k not in IDENTIFYING_ATTRIBUTES and v not in (None, "")
    }


def load_or_create_secret(folder: str | Path) -> bytes:
    """The folder's pseudonymization key; created (mode 0600) on first use and kept for reruns."""
    path = Path(folder) / SECRET_NAME
    if path.is_file():
        return bytes.fromhex(path.read_text().strip())
    path.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_bytes(32)
    tmp = path.with_name(f".tmp-{SECRET_NAME}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key.hex())
    os.replace(tmp, path)
    return key


def pseudonym(secret: bytes, value: str, length: int = 12) -> str:
    """Keyed hash of an identifier: stable for one secret, not reversible without it."""
    return hmac.new(secret, value.encode("utf-8"), hashlib.sha256).hexdigest()[:length]
