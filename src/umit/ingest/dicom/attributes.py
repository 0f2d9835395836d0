"""Typed values read out of DICOM datasets, and the allowlisted metadata a loaded volume carries.

Holds the tolerant value parsers (``_str``, ``_float``, ``_int``, ``_floats``, DICOM times),
functional-group lookup for enhanced multi-frame files, PatientAge parsing and age bands, and
``_extra``: the :data:`EXTRA_FIELDS` put in ``ImageMeta.extra`` (nothing that identifies a person).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import numpy as np
from pydicom.dataset import Dataset

from umit.deid.allowlist import READER_FIELDS

EXTRA_FIELDS: tuple[str, ...] = READER_FIELDS
"""The only keys :func:`load_series` puts in ``ImageMeta.extra``: the reader fields of the
allowlist derived from the Annex E profile (:mod:`umit.deid.allowlist`); none identifies a person."""


def _str(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    return "" if value is None else str(value).strip()


def _float(value: Any) -> float | None:
    if value is None or value == "":
        return None
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if np.isfinite(out) else None


def _int(value: Any) -> int | None:
    f = _float(value)
    return None if f is None else int(f)


def _floats(value: Any, n: int) -> np.ndarray | None:
    try:
        out = np.asarray([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        return None
    return out if out.shape == (n,) and np.all(np.isfinite(out)) else None


def _fg_item(ds: Dataset, frame_item: Dataset | None, sequence: str) -> Dataset | None:
    """First item of a functional group ``sequence``: per-frame if present, else shared."""
    for container in (frame_item, _shared_groups(ds)):
        if container is not None and sequence in container and len(container[sequence].value):
            return container[sequence].value[0]
    return None


def _shared_groups(ds: Dataset) -> Dataset | None:
    seq = ds.get("SharedFunctionalGroupsSequence")
    return seq[0] if seq else None


def _time_seconds(value: Any) -> float | None:
    """DICOM TM ("HHMMSS.ffffff", also "HH:MM:SS") or the time part of a DT -> seconds."""
    if value is None:
        return None
    s = str(value).strip().replace(":", "")
    if len(s) >= 14 and s[:8].isdigit():  # DT: YYYYMMDDHHMMSS...
        s = s[8:]
    s = re.split(r"[+-]", s)[0]
    try:
        hh = int(s[0:2])
        mm = int(s[2:4]) if len(s) >= 4 else 0
        ss = float(s[4:]) if len(s) > 4 else 0.0
    except ValueError:
        return None
    return hh * 3600.0 + mm * 60.0 + ss


def age_band(age_years: float | None) -> str | None:
    """Age band for subgroup analysis: "0-17", "18-39", "40-59", "60-79", "80+" (None if unknown)."""
    if age_years is None:
        return None
    age = float(age_years)
    if not np.isfinite(age) or age < 0:
        raise ValueError(f"age_years must be a non-negative number, got {age_years!r}")
    for upper, band in ((18, "0-17"), (40, "18-39"), (60, "40-59"), (80, "60-79")):
        if age < upper:
            return band
    return "80+"


def parse_age(value: Any) -> float | None:
    """PatientAge ("042Y", "006M", "003W", "010D", or a bare number) -> years; None if absent."""
    if value is None:
        return None
    m = re.fullmatch(r"\s*(\d{1,3}(?:\.\d+)?)\s*([DWMYdwmy]?)\s*", str(value))
    if not m:
        return None
    n = float(m.group(1))
    per_year = {"": 1.0, "Y": 1.0, "M": 12.0, "W": 365.25 / 7, "D": 365.25}[m.group(2).upper()]
    return n / per_year


def _extra(ds: Dataset) -> dict[str, Any]:
    """The allowlisted attributes of EXTRA_FIELDS, in that order (None where absent)."""

    def text(keyword: str) -> str | None:
        value = ds.get(keyword)
        if value is None:
            return None
        if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
            s = "\\".join(str(v).strip() for v in value)
        else:
            s = str(value).strip()
        return s or None

    sex = (text("PatientSex") or "").upper()
    file_meta = getattr(ds, "file_meta", None)
    ts = getattr(file_meta, "TransferSyntaxUID", None) if file_meta is not None else None
    readers: dict[str, Callable[[], Any]] = {
        "modality": lambda: text("Modality"),
        "body_part": lambda: (text("BodyPartExamined") or "").upper() or None,
        "manufacturer": lambda: text("Manufacturer"),
        "model": lambda: text("ManufacturerModelName"),
        "sex": lambda: sex if sex in ("F", "M", "O") else None,
        "age_years": lambda: parse_age(ds.get("PatientAge")),
        "contrast": lambda: "yes" if text("ContrastBolusAgent") else None,
        "slice_thickness": lambda: _float(ds.get("SliceThickness")),
        "kvp": lambda: _float(ds.get("KVP")),
        "magnetic_field_strength": lambda: _float(ds.get("MagneticFieldStrength")),
        "scanning_sequence": lambda: text("ScanningSequence"),
        "sequence_variant": lambda: text("SequenceVariant"),
        "echo_time": lambda: _float(ds.get("EchoTime")),
        "repetition_time": lambda: _float(ds.get("RepetitionTime")),
        "inversion_time": lambda: _float(ds.get("InversionTime")),
        "photometric": lambda: text("PhotometricInterpretation"),
        "transfer_syntax": lambda: str(ts) if ts else None,
        # per volume, from every image: filled by load_series (umit.ingest.dicom.diffusion)
        "b_values": lambda: None,
        "gradient_directions": lambda: None,
    }
    missing = set(EXTRA_FIELDS) - set(readers)
    if missing:  # a new allowlist reader field needs a reader here
        raise RuntimeError(f"no DICOM reader for allowlisted field(s) {sorted(missing)}")
    return {name: readers[name]() for name in EXTRA_FIELDS}
