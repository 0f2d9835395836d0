"""`umit deid` records and options: an earlier de-identification record is kept and added to,
`--check` honours the options a file declares, and the Retain Safe Private option keeps only
the listed vendor elements (found through their private creator, at any block)."""

from __future__ import annotations

import json
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence

from umit.cli.main import main as cli_main
from umit.deid.check import check_folder
from umit.deid.engine import AUDIT_DIR, DeidConfig, run
from umit.deid.profile import OFFERED_OPTIONS, OPTION_CODES, basic_profile, normalise_options
from umit.deid.safe_private import SAFE_PRIVATE, conforms, safe_private
from umit.deid.synth import (
    REALISTIC_RETAINED,
    add_vendor_private,
    plant_retained,
    planted_dataset,
)

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


# ---------------------------------------------------------------------------------------------
# 2. --check honours the options the file declares


def _retained_input(tmp_path: Path, options: frozenset[str]) -> tuple[Path, dict[int, object]]:
    ds, _ = planted_dataset(seed=6)
    written = plant_retained(ds, options)
    if "retain-safe-private" in options:
        written.update(add_vendor_private(ds))
    return _write(ds, tmp_path / "src" / "r.dcm"), written


OPTION_CASES = [(o,) for o in OFFERED_OPTIONS] + [OFFERED_OPTIONS]


@pytest.mark.parametrize("opts", OPTION_CASES, ids=[",".join(c) for c in OPTION_CASES])
def test_deid_then_check_passes_with_each_option_and_all(tmp_path, opts):
    options = normalise_options(list(opts))
    src, written = _retained_input(tmp_path, options)
    out = _deid(src.parent, tmp_path / "o", list(opts))
    report = check_folder(tmp_path / "o")
    assert report.passed, [(f.path, f.reason) for f in report.files[0].findings]
    assert set(_codes(out)) == {"113100"} | {OPTION_CODES[o][0] for o in options}
    # what the options retain is really there, unchanged: the check passed with it present
    profile = basic_profile()
    kept = {
        t: v
        for t, v in written.items()
        if (e := profile.get(t)) is None or e.action(options) == "K"
    }
    for tag, value in kept.items():
        assert tag in out and out[tag].value == value, hex(tag)
    if "retain-device-identity" in options:
        assert out.StationName == REALISTIC_RETAINED["StationName"]
        assert out.DeviceSerialNumber == REALISTIC_RETAINED["DeviceSerialNumber"]
    if "retain-institution-identity" in options:
        assert out.InstitutionAddress == REALISTIC_RETAINED["InstitutionAddress"]
    if "retain-patient-characteristics" in options:
        assert (out.PatientSex, out.PatientAge) == ("F", "047Y")


def test_cli_deid_then_check_with_all_options(tmp_path, capsys):
    src, _ = _retained_input(tmp_path, normalise_options(list(OFFERED_OPTIONS)))
    dst = tmp_path / "out" / "dst"
    opts = ",".join(OFFERED_OPTIONS)
    assert cli_main(["deid", str(src.parent), "--out", str(dst), "--options", opts]) == 0
    capsys.readouterr()
    assert cli_main(["deid", "--check", str(dst)]) == 0
    out = capsys.readouterr().out
    assert "1 DICOM file(s), 0 with residual identifiers (none)" in out


def _basic_output(tmp_path: Path, options: list[str]) -> Path:
    ds, _ = planted_dataset(seed=7)
    _deid(_write(ds, tmp_path / "src" / "b.dcm").parent, tmp_path / "o", options)
    return next(p for p in (tmp_path / "o").rglob("*.dcm") if AUDIT_DIR not in p.parts)


def _findings(path: Path) -> list[tuple[str, str, str]]:
    return [(f.path, f.category, f.reason) for f in check_folder(path).files[0].findings]


def test_check_still_flags_what_no_declared_option_retains(tmp_path):
    others = [o for o in OFFERED_OPTIONS if o != "retain-device-identity"]
    path = _basic_output(tmp_path, others)
    assert _findings(path) == []
    ds = pydicom.dcmread(path)
    ds.StationName = REALISTIC_RETAINED["StationName"]
    ds.DeviceSerialNumber = REALISTIC_RETAINED["DeviceSerialNumber"]
    ds.SoftwareVersions = "VE11C tel (555) 123-4567"  # kept by the profile: scanned always
    ds.save_as(path)
    found = {(p, c) for p, c, _ in _findings(path)}
    assert {("StationName", "device"), ("DeviceSerialNumber", "device")} <= found
    assert ("SoftwareVersions", "contact") in found
    # 113109 declared, but in another coding scheme: not the standard's option
    ds.DeidentificationMethodCodeSequence.append(_code_item("113109", "99LOCAL"))
    ds.save_as(path)
    assert {("StationName", "device")} <= {(p, c) for p, c, _ in _findings(path)}
    # declared properly: the device identity passes, the phone number in unlisted text does not
    ds.DeidentificationMethodCodeSequence[-1].CodingSchemeDesignator = "DCM"
    ds.save_as(path)
    assert {(p, c) for p, c, _ in _findings(path)} == {("SoftwareVersions", "contact")}


def test_check_does_not_scan_the_items_of_a_sequence_an_option_retains(tmp_path):
    path = _basic_output(tmp_path, ["retain-institution-identity"])
    ds = pydicom.dcmread(path)
    item = Dataset()
    item.CodeValue = "SGH01"
    item.CodingSchemeDesignator = "99SITE"
    item.CodeMeaning = "Springfield General, 1200 Hospital Road"
    ds.InstitutionCodeSequence = DicomSequence([item])  # (0008,0082): kept by 113112
    ds.save_as(path)
    assert _findings(path) == []
    ds.AnatomicRegionSequence = DicomSequence([item])  # not retained by an option: scanned
    ds.save_as(path)
    found = [(p, c) for p, c, _ in _findings(path)]
    assert found == [("AnatomicRegionSequence[0].CodeMeaning", "contact")]


def test_check_honours_full_dates_and_uids_declared_by_another_tool(tmp_path):
    path = _basic_output(tmp_path, [])
    ds = pydicom.dcmread(path)
    ds.StudyDate = "20240102"
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.10.543.2.1"  # an organisation-root UID
    ds.save_as(path)
    cats = {(p, c) for p, c, _ in _findings(path)}
    assert {("StudyDate", "date"), ("StudyInstanceUID", "uid")} <= cats
    _declare(ds, "113100", "113106", "113110")  # Retain Full Dates, Retain UIDs
    ds.save_as(path)
    assert _findings(path) == []


def test_check_scans_private_text_when_safe_private_is_declared(tmp_path):
    path = _basic_output(tmp_path, [])
    ds = pydicom.dcmread(path)
    ds.private_block(0x0019, "SIEMENS MR HEADER", create=True).add_new(0x0C, "IS", "1000")
    ds.save_as(path)
    assert [c for _, c, _ in _findings(path)] == ["private"]  # 113111 not declared
    ds.DeidentificationMethodCodeSequence.append(_code_item("113111"))
    ds.save_as(path)
    assert _findings(path) == []
    ds.private_block(0x0019, "SIEMENS MR HEADER").add_new(0x10, "LO", "Doe^Jane")
    ds.save_as(path)
    assert [(p, c) for p, c, _ in _findings(path)] == [("(0019,1010)", "private")]


def test_unknown_and_unoffered_options_are_clear_errors(tmp_path, capsys):
    with pytest.raises(ValueError, match="unknown de-identification option 'retain-all'"):
        normalise_options("retain-all")
    with pytest.raises(ValueError, match=r"'retain-uids' \(Retain UIDs Option, 113110\) is not"):
        normalise_options("retain-uids")
    with pytest.raises(ValueError, match="113106.*use retain-modified-dates"):
        normalise_options(["retain-full-dates"])
    src = _write(planted_dataset(seed=10)[0], tmp_path / "src" / "e.dcm")
    code = cli_main(["deid", str(src.parent), "--out", str(tmp_path / "o"), "--options", "uids"])
    assert code == 2 and "known options: clean-descriptors" in capsys.readouterr().err
    code = cli_main(
        ["deid", str(src.parent), "--out", str(tmp_path / "o"), "--options", "retain-uids"]
    )
    assert code == 2 and "UIDs are always replaced" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# 3. Retain Safe Private


def _vendor_input(tmp_path: Path) -> tuple[Path, dict[int, object]]:
    ds, _ = planted_dataset(seed=8)
    kept = add_vendor_private(ds)
    return _write(ds, tmp_path / "src" / "v.dcm"), kept


def test_default_removes_every_private_attribute(tmp_path):
    src, _ = _vendor_input(tmp_path)
    out = _deid(src.parent, tmp_path / "o")
    assert not [e for e in out if e.tag.is_private]
    assert "113111" not in _codes(out)


def test_retain_safe_private_keeps_only_the_listed_elements_and_their_creators(tmp_path):
    src, kept = _vendor_input(tmp_path)
    out = _deid(src.parent, tmp_path / "o", ["retain-safe-private"])
    private = {int(e.tag): e.value for e in out if e.tag.is_private}
    creators = {
        0x00190011: "SIEMENS MR HEADER",  # block 0x11: elements (0019,11xx)
        0x00190012: "GEMS_ACQU_01",
        0x00430010: "GEMS_PARM_01",
        0x20010010: "Philips Imaging DD 001",
        0x20050010: "Philips MR Imaging DD 001",
    }
    assert set(private) == set(kept) | set(creators)
    for tag, value in kept.items():
        assert private[tag] == value, hex(tag)
    for tag, creator in creators.items():
        assert private[tag] == creator
    assert 0x0019110C in private and 0x0019100C not in private  # by creator, not by raw tag
    assert out.private_block(0x0019, "SIEMENS MR HEADER")[0x0C].value == "1000"  # B_value
    assert not any(t >> 16 in (0x0029, 0x0051) for t in private)  # CSA, other group
    assert "113111" in _codes(out)
    audit = json.loads(next((tmp_path / "o" / AUDIT_DIR).rglob("*.json")).read_text())
    assert audit["private_kept"] == len(SAFE_PRIVATE) and audit["private_removed"] == 11
    raw = b"".join(p.read_bytes() for p in (tmp_path / "o").rglob("*") if p.is_file())
    for planted in (b"Jane", b"88812345", b"123-4567", b"epi2_pepolar", b"FoV 220"):
        assert planted not in raw, planted
    assert check_folder(tmp_path / "o").passed


def test_safe_private_value_of_an_unexpected_form_is_removed(tmp_path):
    ds, _ = planted_dataset(seed=9)
    block = ds.private_block(0x0019, "SIEMENS MR HEADER", create=True)
    block.add_new(0x0C, "LO", "Doe^Jane")  # B_value offset, but text
    block.add_new(0x0D, "CS", "JANE DOE")  # DiffusionDirectionality, not a listed code
    block.add_new(0x0A, "US", 36)
    out = _deid(_write(ds, tmp_path / "src" / "f.dcm").parent, tmp_path / "o", ["retain-private"])
    assert {int(e.tag) for e in out if e.tag.is_private} == {0x00190010, 0x0019100A}
    audit = json.loads(next((tmp_path / "o" / AUDIT_DIR).rglob("*.json")).read_text())
    unexpected = [a for a in audit["actions"] if "unexpected form" in a["action"]]
    assert len(unexpected) == 2


def test_conforms_decodes_values_read_as_un():
    b_value = safe_private("SIEMENS MR HEADER ", 0x0019, 0x0C)
    direction = safe_private("SIEMENS MR HEADER", 0x0019, 0x0E)
    assert b_value is not None and direction is not None
    assert safe_private("SIEMENS MR HEADER", 0x0051, 0x0C) is None  # same creator, other group
    assert safe_private("SIEMENS CSA HEADER", 0x0029, 0x10) is None
    assert conforms(b_value, "IS", "1000") and conforms(b_value, "UN", b"1000")
    assert not conforms(b_value, "UN", b"Doe^Jane") and not conforms(b_value, "LO", "1000")
    assert conforms(direction, "UN", bytes(24)) and not conforms(direction, "UN", bytes(5))
