"""`umit deid` records: an earlier de-identification record is kept and added to."""

from __future__ import annotations

import json
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence

from umit.deid.check import check_folder
from umit.deid.engine import AUDIT_DIR, DeidConfig, run
from umit.deid.profile import OPTION_CODES
from umit.deid.synth import planted_dataset

pytestmark = pytest.mark.filterwarnings("ignore:The value length", "ignore::UserWarning")


def _write(ds: Dataset, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def _deid(src: Path, out: Path, options: list[str] | None = None) -> pydicom.Dataset:
    result = run(DeidConfig(src=src, out=out, options=options or []), progress=False)
    assert (result.written, result.failed) == (1, 0), result.failures
    (path,) = [p for p in out.rglob("*.dcm") if AUDIT_DIR not in p.relative_to(out).parts]
    return pydicom.dcmread(path)


def _codes(ds: Dataset) -> list[str]:
    return [str(i.CodeValue) for i in ds.DeidentificationMethodCodeSequence]


def _code_item(code: str, scheme: str = "DCM") -> Dataset:
    item = Dataset()
    item.CodeValue = code
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = dict(OPTION_CODES.values()).get(code, "Local code")
    return item


def _declare(ds: Dataset, *codes: str, scheme: str = "DCM") -> None:
    ds.DeidentificationMethodCodeSequence = DicomSequence([_code_item(c, scheme) for c in codes])


# ---------------------------------------------------------------------------------------------
# 1. An earlier de-identification record is kept and added to (PS3.15 E.1.1)

REFACE_TOOL = "mri_reface 0.3.2"


def _refaced_input(tmp_path: Path) -> Path:
    """A file another tool already de-identified: refaced (113102), safe private kept (113111)."""
    ds, _ = planted_dataset(seed=4)
    ds.InstitutionName = "Reface Imaging Center"  # words of the file's identifiers ...
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = [REFACE_TOOL, "defaced, Clean Recognizable Visual Features"]
    _declare(ds, "113102", "113111")  # ... also in the tool's record: it must stay as it was
    return _write(ds, tmp_path / "src" / "refaced.dcm")


def test_earlier_record_is_kept_and_ours_appended(tmp_path):
    src = _refaced_input(tmp_path)
    out = _deid(src.parent, tmp_path / "o1")
    assert out.PatientIdentityRemoved == "YES"
    assert _codes(out) == ["113102", "113111", "113100"]
    items = out.DeidentificationMethodCodeSequence
    assert items[0].CodeMeaning == "Clean Recognizable Visual Features Option"
    assert {i.CodingSchemeDesignator for i in items} == {"DCM"}
    texts = list(out.DeidentificationMethod)
    assert texts[:2] == [REFACE_TOOL, "defaced, Clean Recognizable Visual Features"]
    assert any(t.startswith("UMIT ") for t in texts[2:])
    audit = json.loads(next((tmp_path / "o1" / AUDIT_DIR).rglob("*.json")).read_text())
    assert audit["earlier_method_codes"] == ["113102", "113111"]
    assert audit["method_codes"] == ["113100"]
    assert check_folder(tmp_path / "o1").passed

    # de-identified again, with an option: earlier items stay, no code and no text twice
    again = _deid(tmp_path / "o1", tmp_path / "o2", ["retain-device-identity"])
    assert _codes(again) == ["113102", "113111", "113100", "113109"]
    texts2 = list(again.DeidentificationMethod)
    assert texts2[: len(texts)] == texts and len(texts2) == len(set(texts2))
    assert "retain-device-identity" in texts2
    assert check_folder(tmp_path / "o2").passed


def test_a_record_without_identity_removed_is_kept_and_completed(tmp_path):
    ds, _ = planted_dataset(seed=5)
    ds.DeidentificationMethod = REFACE_TOOL  # one value, no PatientIdentityRemoved
    _declare(ds, "113102", "113100")
    out = _deid(_write(ds, tmp_path / "src" / "x.dcm").parent, tmp_path / "o")
    assert out.PatientIdentityRemoved == "YES"
    assert _codes(out) == ["113102", "113100"]  # 113100 already declared: not added again
    assert list(out.DeidentificationMethod)[0] == REFACE_TOOL
