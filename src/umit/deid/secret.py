"""The pseudonymization secret and everything keyed on it.

One secret (``.umit_secret``, 32 random bytes as hex, mode 0600) gives, through HMAC-SHA256:

* :func:`pseudonym`: the keyed hash of an identifier (``umit ingest`` subject/case ids);
* :func:`accession_pseudonym`: the keyed hash of an AccessionNumber (joins reports to studies);
* :func:`patient_pseudonym`: ``UMIT-<12 hex>``, what ``umit deid`` writes to PatientID/Name;
* :func:`replace_uid`: the consistent ``2.25.<int>`` UID replacing a DICOM UID;
* :func:`date_shift_days`: the per-patient date shift of the retain-modified-dates option.

The same secret therefore gives the same subject id in the catalog and the same UIDs in the
files ``umit deid`` writes. Without it the mapping cannot be reversed or redone.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

from umit.deid.profile import PSEUDONYM_PREFIX
from umit.errors import InputError

SECRET_NAME = ".umit_secret"
DATE_SHIFT_RANGE_DAYS = (1, 3650)
"""Dates move back by a per-patient number of days in this range (never 0)."""


def load_or_create_secret(folder: str | Path) -> bytes:
    """The folder's pseudonymization key; created (mode 0600) on first use and kept for reruns."""
    path = Path(folder) / SECRET_NAME
    if path.is_file():
        return bytes.fromhex(path.read_text().strip())
    path.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_bytes(32)
    tmp = path.with_name(f".tmp-{os.getpid()}-{secrets.token_hex(4)}-{SECRET_NAME}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key.hex())
        f.flush()
        os.fsync(f.fileno())
    try:  # link, not rename: of several ingest processes starting at once, the first one wins
        os.link(tmp, path)
    except FileExistsError:
        return bytes.fromhex(path.read_text().strip())
    finally:
        tmp.unlink()
    return key


def pseudonym(secret: bytes, value: str, length: int = 12) -> str:
    """Keyed hash of an identifier: stable for one secret, not reversible without it."""
    return hmac.new(secret, value.encode("utf-8"), hashlib.sha256).hexdigest()[:length]


def accession_pseudonym(secret: bytes, accession: str) -> str:
    """Keyed hash of an AccessionNumber (16 hex), the catalog's join key for reports."""
    return pseudonym(secret, f"accession:{accession.strip()}", 16)


def replace_uid(secret: bytes, uid: str) -> str:
    """Consistent replacement of ``uid``: a ``2.25.<int>`` UID from 128 bits of HMAC-SHA256.

    The 128 bits are shaped as a version-8 (custom) UUID, as ``2.25`` UIDs are UUID-derived.
    """
    value = bytearray(bytes.fromhex(pseudonym(secret, f"uid:{uid.strip()}", 32)))
    value[6] = (value[6] & 0x0F) | 0x80  # version 8
    value[8] = (value[8] & 0x3F) | 0x80  # RFC 4122 variant
    return f"2.25.{int.from_bytes(value, 'big')}"


def patient_pseudonym(secret: bytes, patient_key: str) -> str:
    """``UMIT-<12 hex>``: the value PatientID/PatientName get; equals ingest's subject id."""
    return f"{PSEUDONYM_PREFIX}{pseudonym(secret, patient_key)}"


def date_shift_days(secret: bytes, patient_key: str) -> int:
    """Days (negative) every date of this patient moves by; fixed by the secret and the key."""
    lo, hi = DATE_SHIFT_RANGE_DAYS
    return -(lo + int(pseudonym(secret, f"dateshift:{patient_key}", 8), 16) % (hi - lo + 1))


def resolve_secret(secret: str | Path | None, out: str | Path) -> tuple[bytes, Path]:
    """Load (or create, mode 0600) the pseudonymization key; returns ``(key, path)``.

    ``secret`` may be a folder (its ``.umit_secret`` is used, as ``umit ingest`` does for RAW), a
    key file (hex) or a file to create. Default: ``.umit_secret`` beside ``out`` (in its parent),
    never inside it, so sharing ``out`` never shares the key.
    """
    out = Path(out).resolve()
    path = Path(secret).resolve() if secret is not None else out.parent / SECRET_NAME
    if path.is_dir():
        path = path / SECRET_NAME
    if path == out or out in path.parents:
        raise InputError(path, f"the secret must not be stored inside the output folder {out}")
    if path.name == SECRET_NAME:
        return load_or_create_secret(path.parent), path
    if path.is_file():
        text = path.read_text().strip()
        try:
            key = bytes.fromhex(text)
        except ValueError as exc:
            raise InputError(path, "secret file must hold a hex key (as written by umit)") from exc
        if len(key) < 16:
            raise InputError(path, f"secret key has {len(key)} bytes; at least 16 are needed")
        return key, path
    path.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_bytes(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key.hex())
    return key, path
