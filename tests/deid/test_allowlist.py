"""The catalog allowlist derives from the Annex E profile table, and every list of kept or
identifying attributes in the code base agrees with it."""

from __future__ import annotations

from pydicom.datadict import keyword_dict

from umit.deid import allowlist
from umit.deid.allowlist import (
    CATALOG_ATTRIBUTES,
    COLUMN_ATTRIBUTES,
    READER_FIELDS,
    SAFE_ATTRIBUTES,
    safe_attributes,
)
from umit.deid.profile import (
    OPTION_FLAGS,
    basic_profile,
    entry_for,
    identifying_keywords,
    profile_keeps,
)
from umit.deid.synth import planted_dataset
from umit.ingest import dicom, run
from umit.ingest.catalog import SeriesRecord

SECRET = bytes(range(32))


def test_every_allowlisted_attribute_is_kept_by_the_profile_or_explained():
    names = [a.name for a in CATALOG_ATTRIBUTES]
    assert len(names) == len(set(names))
    for attr in CATALOG_ATTRIBUTES:
        if attr.name not in SAFE_ATTRIBUTES:
            continue
        for kw in attr.keywords:
            assert kw in keyword_dict, (attr.name, kw)
        if attr.kept_by_profile:
            assert all(profile_keeps(kw) for kw in attr.keywords)
            assert not attr.reason, f"{attr.name}: kept by the profile, needs no reason"
            continue
        # an explicit addition: a reason, and Annex E itself keeps it under the named option
        assert attr.reason, f"{attr.name}: removed by the Basic Profile and no reason given"
        assert attr.option in OPTION_FLAGS, attr.name
        for kw in attr.keywords:
            assert profile_keeps(kw, frozenset({attr.option})), (attr.name, kw)


def test_nothing_the_profile_removes_slips_in_without_a_reason():
    explicit = {a.name for a in CATALOG_ATTRIBUTES if a.reason}
    removed = identifying_keywords()
    for attr in CATALOG_ATTRIBUTES:
        if attr.name in SAFE_ATTRIBUTES and set(attr.keywords) & removed:
            assert attr.name in explicit, attr.name
    assert explicit == {"sex", "age_years", "age_band", "contrast"}


def test_series_description_follows_the_profile():
    """Basic Profile: SeriesDescription is X (kept only under Clean Descriptors)."""
    entry = entry_for("SeriesDescription")
    assert entry is not None and entry.action() == "X"
    assert entry.action(frozenset({"clean-descriptors"})) == "C"
    assert "series_description" not in SAFE_ATTRIBUTES
    assert "series_description" not in dicom.EXTRA_FIELDS
    assert "SeriesDescription" in identifying_keywords()
    assert "SeriesDescription" not in identifying_keywords(frozenset({"clean-descriptors"}))


def test_ingest_lists_are_the_allowlist():
    assert dicom.EXTRA_FIELDS == READER_FIELDS
    assert set(dicom.EXTRA_FIELDS) <= SAFE_ATTRIBUTES
    assert run._COLUMN_ATTRS == COLUMN_ATTRIBUTES
    assert COLUMN_ATTRIBUTES <= SAFE_ATTRIBUTES
    # every column attribute is a field of the catalog row
    assert set(SeriesRecord.__dataclass_fields__) >= COLUMN_ATTRIBUTES


def test_reader_returns_exactly_the_allowlisted_fields_and_no_planted_identifier():
    ds, planted = planted_dataset(0)
    extra = dicom._extra(ds)
    assert tuple(extra) == dicom.EXTRA_FIELDS
    # planted identifiers of attributes the profile removes never reach ImageMeta.extra, except
    # the explicit additions, which the reader reduces (sex code, age in years, contrast yes/no)
    values = {str(v) for v in extra.values() if v is not None}
    leaked = {
        label
        for label, value in planted.items()
        if len(value) >= 4 and value in values and label.split(":")[0] in identifying_keywords()
    }
    assert not leaked
    kept = safe_attributes({**extra, "series_description": "x", "patient_id": "y"})
    assert set(kept) <= SAFE_ATTRIBUTES


def test_identifying_keywords_come_from_the_table():
    rows = basic_profile().entries.values()
    basic = identifying_keywords()
    assert {"PatientName", "PatientID", "StudyInstanceUID", "InstitutionName"} <= basic
    assert basic <= {e.keyword for e in rows}
    # an option only ever shrinks the set (keeps or cleans more)
    for opt in OPTION_FLAGS:
        assert identifying_keywords(frozenset({opt})) <= basic
    assert "PatientSex" not in identifying_keywords(frozenset({"retain-patient-characteristics"}))
    assert not hasattr(allowlist, "IDENTIFYING_ATTRIBUTES")  # one table, no hand-kept list
