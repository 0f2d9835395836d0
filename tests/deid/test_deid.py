"""`umit deid`: every Table E.1-1 action on planted identifiers, keyed UIDs and date shifts,
burned-in policy, private safelist, audit records without values, the CLI."""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.datadict import dictionary_VR

from umit.cli.main import main as cli_main
from umit.deid.check import REPLACED_UID_RE, check_dataset, check_folder
from umit.deid.engine import (
    AUDIT_DIR,
    REPORT_NAME,
    BurnedInError,
    DeidConfig,
    Deidentifier,
    DeidSettings,
    run,
)
from umit.deid.profile import (
    DUMMY_VALUES,
    PSEUDONYM_PREFIX,
    basic_profile,
    normalise_options,
)
from umit.deid.secret import date_shift_days, patient_pseudonym, replace_uid
from umit.deid.synth import (
    FREE_TEXT_KEPT_WORDS,
    IDENTITY_TOKENS,
    PATIENT,
    planted_dataset,
    write_burned_in,
    write_planted_series,
)

pytestmark = pytest.mark.filterwarnings("ignore:The value length")

SECRET = bytes(range(32))
ALL_OPTIONS = normalise_options(
    "retain-modified-dates,retain-patient-characteristics,retain-device-identity,"
    "retain-institution-identity,clean-descriptors"
)


def _roundtrip(ds: pydicom.Dataset) -> pydicom.Dataset:
    """Write and read back: what a user of the output file sees."""
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    buf.seek(0)
    return pydicom.dcmread(buf)


def _text(ds_value) -> list[str]:
    v = ds_value
    if isinstance(v, (list, tuple, pydicom.multival.MultiValue)):
        return [str(x) for x in v]
    return [str(v)]


# ---------------------------------------------------------------------------------------------
# The profile table


def test_profile_is_the_full_table_with_options():
    p = basic_profile()
    assert len(p) >= 400  # Table E.1-1 lists ~450 attributes; every one has a keyword
    assert all(e.keyword for e in p.entries.values())
    row = {e.keyword: e for e in p.entries.values()}
    assert row["PatientName"].action() == "Z"
    assert row["PatientBirthDate"].action(ALL_OPTIONS) == "Z"  # no option keeps the birth date
    assert row["StudyDate"].action() == "Z" and row["StudyDate"].action(ALL_OPTIONS) == "C"
    assert row["SOPInstanceUID"].action(ALL_OPTIONS) == "U"
    assert row["ReferencedImageSequence"].basic == "X/Z/U*"
    assert row["ReferencedImageSequence"].action() == "U"
    assert row["InstitutionName"].action() == "Z"  # X/Z/D
    assert row["InstitutionName"].action(ALL_OPTIONS) == "K"
    assert row["SeriesDescription"].action() == "X"
    assert row["SeriesDescription"].action(ALL_OPTIONS) == "C"
    assert row["PatientAge"].action() == "X"
    assert row["PatientAge"].action(frozenset({"retain-patient-characteristics"})) == "K"
    assert row["Allergies"].action(frozenset({"retain-patient-characteristics"})) == "C"
    assert row["DeviceSerialNumber"].action(frozenset({"retain-device-identity"})) == "K"
    assert row["SeriesDate"].action() == "D"  # X/D
    with pytest.raises(ValueError, match="unknown de-identification option"):
        normalise_options("retain-everything")


# ---------------------------------------------------------------------------------------------
# Every Table E.1-1 action on planted identifiers


def _expected(entry, options):
    return entry.action(options)


@pytest.mark.parametrize("options", [frozenset(), ALL_OPTIONS], ids=["basic", "all-options"])
def test_every_table_attribute_gets_its_action(options):
    original, _ = planted_dataset(seed=5)
    work = _roundtrip(original)
    deid = Deidentifier(SECRET, DeidSettings(options=options))
    audit = deid.deidentify(work)
    out = _roundtrip(work)
    pid = PATIENT["PatientID"]
    shift = date_shift_days(SECRET, pid)
    seen: Counter = Counter()
    for entry in basic_profile().entries.values():
        if entry.tag not in original or entry.tag.group == 0x0002:
            continue
        action = _expected(entry, options)
        vr = dictionary_VR(entry.tag).split(" or ")[0]
        before = original[entry.tag].value
        kw = entry.keyword
        seen[action] += 1
        if action == "X":
            assert entry.tag not in out, kw
        elif action == "Z":
            if vr == "SQ":
                assert len(out[entry.tag].value) == 0, kw
            elif kw in ("PatientID", "PatientName"):
                assert str(out[entry.tag].value) == patient_pseudonym(SECRET, pid), kw
            else:
                assert str(out[entry.tag].value or "") == "", kw
        elif action == "D":
            if vr == "SQ":
                item = out[entry.tag].value[0]
                assert str(item.PersonName) == DUMMY_VALUES["PN"], kw
                assert item.CodeMeaning == DUMMY_VALUES["LO"], kw
            elif vr in DUMMY_VALUES:
                assert str(out[entry.tag].value) == str(DUMMY_VALUES[vr]), kw
            else:  # no dummy for binary VRs: emptied
                assert not out[entry.tag].value, kw
        elif action == "U":
            if vr == "SQ":
                item = out[entry.tag].value[0]
                old = before[0].ReferencedSOPInstanceUID
                assert item.ReferencedSOPInstanceUID == replace_uid(SECRET, old), kw
                assert str(item.PersonName) == DUMMY_VALUES["PN"], kw  # PersonName is D inside
            else:
                new = str(out[entry.tag].value)
                assert REPLACED_UID_RE.match(new) and new == replace_uid(SECRET, str(before)), kw
        elif action == "C":
            if vr == "DA":
                d0 = np.datetime64(f"{before[:4]}-{before[4:6]}-{before[6:8]}")
                got = str(out[entry.tag].value)
                assert np.datetime64(f"{got[:4]}-{got[4:6]}-{got[6:8]}") - d0 == shift, kw
            elif vr == "DT":
                assert str(out[entry.tag].value)[8:] == str(before)[8:], kw  # time kept
                assert str(out[entry.tag].value)[:8] != str(before)[:8], kw
            elif vr in ("TM",):
                assert str(out[entry.tag].value) == str(before), kw
            elif vr == "SQ":
                item = out[entry.tag].value[0]
                assert "Jane" not in str(item.CodeMeaning) and "Doe" not in str(item.CodeMeaning)
            elif vr in ("OB", "OW", "UN"):
                assert entry.tag not in out, kw
            else:
                cleaned = " ".join(_text(out[entry.tag].value))
                for token in IDENTITY_TOKENS + ("555",):
                    assert token not in cleaned, (kw, token)
                if "Brain MRI" in str(before):
                    assert all(w in cleaned for w in FREE_TEXT_KEPT_WORDS), kw
        else:  # K
            assert action == "K"
            if vr == "SQ":  # items kept, the profile still applies inside them
                item = out[entry.tag].value[0]
                assert item.CodeValue == "121000" and "Jane" not in item.CodeMeaning, kw
                assert REPLACED_UID_RE.match(item.ReferencedSOPInstanceUID), kw
            elif isinstance(before, str) and "Jane" in before:
                assert "Jane" not in str(out[entry.tag].value), kw  # own name scrubbed
            else:
                assert out[entry.tag].value == before, kw
    if options:
        assert {"C", "K", "U", "Z", "X", "D"} <= set(seen)
    else:
        assert set(seen) == {"X", "Z", "D", "U"}
        assert not any("Jane" in str(e.value) for e in out.iterall() if e.VR != "SQ")
    assert str(out.PatientIdentityRemoved) == "YES"
    codes = {item.CodeValue for item in out.DeidentificationMethodCodeSequence}
    assert "113100" in codes
    assert ("113107" in codes) == ("retain-modified-dates" in options)
    assert out.LongitudinalTemporalInformationModified == ("MODIFIED" if options else "REMOVED")
    # private block, curve and overlay gone; the audit says so without values
    assert not [e for e in out if e.tag.is_private]
    assert not [e for e in out if e.tag.group in (0x5000, 0x6000)]
    assert audit["private_removed"] == 2
    assert audit["action_counts"]["X"] > 100
    assert out.file_meta.MediaStorageSOPInstanceUID == out.SOPInstanceUID
    assert "SourceApplicationEntityTitle" not in out.file_meta


def test_planted_original_fails_check_on_every_attribute_the_profile_touches():
    ds, _ = planted_dataset(seed=1)
    findings = check_dataset(_roundtrip(ds))
    flagged = {f.path for f in findings}
    for entry in basic_profile().entries.values():
        if entry.tag not in ds or entry.tag.group == 0x0002:
            continue
        if dictionary_VR(entry.tag) == "SQ" and entry.action() != "Z":
            continue  # judged by their items
        assert entry.keyword in flagged, entry.keyword
    cats = {f.category for f in findings}
    assert {
        "name",
        "id",
        "date",
        "uid",
        "contact",
        "institution",
        "device",
        "free-text",
        "patient-characteristics",
        "private",
        "graphics",
        "method",
    } <= cats


# ---------------------------------------------------------------------------------------------
# Folder runs: no survivors, audit without values, UID and date consistency


def _all_bytes(folder: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file())


def test_run_leaves_no_planted_identifier_in_files_audit_or_report(tmp_path):
    _, planted = write_planted_series(tmp_path / "src" / "Doe_Jane", n=3)
    result = run(DeidConfig(src=tmp_path / "src", out=tmp_path / "out" / "dst"), progress=False)
    assert (result.written, result.failed) == (3, 0)
    dst = tmp_path / "out" / "dst"
    blob = _all_bytes(dst)
    for label, value in planted.items():
        assert value.encode() not in blob, f"{label} survived"
    for token in IDENTITY_TOKENS:
        assert token.encode() not in blob, f"{token} survived"
    audits = sorted((dst / AUDIT_DIR).rglob("*.json"))
    assert len(audits) == 3
    record = json.loads(audits[0].read_text())
    assert record["profile"].startswith("DICOM PS3.15")
    assert {"path": "PatientName", "action": "Z (pseudonym)", "count": 1} in record["actions"]
    assert record["method_codes"] == ["113100"]
    assert json.loads((dst / REPORT_NAME).read_text())["written"] == 3
    assert not (dst / ".umit_secret").exists() and (tmp_path / "out" / ".umit_secret").exists()
    assert check_folder(dst).passed


def _read_all(folder: Path) -> list[pydicom.Dataset]:
    return [
        pydicom.dcmread(p)
        for p in sorted(folder.rglob("*.dcm"))
        if AUDIT_DIR not in p.relative_to(folder).parts
    ]


def test_uids_consistent_across_files_and_reruns_and_references_resolve(tmp_path):
    write_planted_series(tmp_path / "src", n=4)
    key = tmp_path / "keys" / "site.key"
    runs = []
    for name in ("a", "b"):
        run(DeidConfig(src=tmp_path / "src", out=tmp_path / name, secret=key), progress=False)
        runs.append(_read_all(tmp_path / name))
    a, b = runs
    assert [d.SOPInstanceUID for d in a] == [d.SOPInstanceUID for d in b]  # reruns agree
    assert len({d.SeriesInstanceUID for d in a}) == 1 and len({d.StudyInstanceUID for d in a}) == 1
    assert all(REPLACED_UID_RE.match(d.SOPInstanceUID) for d in a)
    sops = {d.SOPInstanceUID for d in a}
    refs = [r.ReferencedSOPInstanceUID for d in a for r in d.get("ReferencedImageSequence", [])]
    assert len(refs) == 3 and set(refs) <= sops  # each file's reference still points at a file
    for d in a:  # the file is named by its new UIDs
        rel = Path(d.filename).relative_to(tmp_path / "a")
        assert rel.parts == (d.StudyInstanceUID, d.SeriesInstanceUID, f"{d.SOPInstanceUID}.dcm")
    # another secret gives other UIDs
    run(DeidConfig(src=tmp_path / "src", out=tmp_path / "c"), progress=False)
    c = _read_all(tmp_path / "c")
    assert not sops & {d.SOPInstanceUID for d in c}


def test_date_shift_is_one_per_patient_and_keeps_intervals(tmp_path):
    opts = ["retain-modified-dates"]
    (tmp_path / "src").mkdir()
    for pid, dates in (("P1", ("20200105", "20200215")), ("P2", ("20200105", "20211231"))):
        for k, date in enumerate(dates):
            ds, _ = planted_dataset(seed=k, patient={"PatientID": pid, "PatientName": f"{pid}^X"})
            ds.StudyInstanceUID = f"1.2.3.{pid[1]}.{k}"  # two studies per patient
            ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = date
            ds.StudyTime = "101500"
            ds.save_as(tmp_path / "src" / f"{pid}_{k}.dcm", enforce_file_format=True)
    run(DeidConfig(src=tmp_path / "src", out=tmp_path / "o", options=opts), progress=False)
    out = {}
    for d in _read_all(tmp_path / "o"):
        out.setdefault(str(d.PatientID), []).append(d)
    key = bytes.fromhex((tmp_path / ".umit_secret").read_text())
    assert set(out) == {patient_pseudonym(key, p) for p in ("P1", "P2")}
    shifts = {}
    for pid, files in out.items():
        per_file = set()
        for d in files:
            for kw in ("StudyDate", "SeriesDate", "AcquisitionDate"):
                got = np.datetime64(f"{d[kw].value[:4]}-{d[kw].value[4:6]}-{d[kw].value[6:]}")
                per_file.add(int((got - np.datetime64("2020-01-05")).astype(int)))
            assert d.StudyTime == "101500"  # time of day kept
            assert d.LongitudinalTemporalInformationModified == "MODIFIED"
        shifts[pid] = per_file
    # each patient: dates moved by one shift, so the first and second study keep their interval
    for s in shifts.values():
        assert len(s) == 2, s
    intervals = sorted(max(s) - min(s) for s in shifts.values())
    assert intervals == [41, 726]
    assert all(min(s) < 0 for s in shifts.values())
    assert len({min(s) for s in shifts.values()}) == 2  # the two patients moved differently
    # the shift is the keyed one
    for pid in ("P1", "P2"):
        assert min(shifts[patient_pseudonym(key, pid)]) == date_shift_days(key, pid)
    # without the option, no date survives
    run(DeidConfig(src=tmp_path / "src", out=tmp_path / "basic"), progress=False)
    for d in _read_all(tmp_path / "basic"):
        assert str(d.get("StudyDate", "")) == "" and d.SeriesDate == DUMMY_VALUES["DA"]
        assert "AcquisitionDate" not in d or str(d.AcquisitionDate) == ""


# ---------------------------------------------------------------------------------------------
# --check: fails on any residual, passes on output


RESIDUALS = {
    "name": ("PatientName", "Doe^Jane"),
    "id": ("OtherPatientIDs", "MRN-4471"),
    "date": ("StudyDate", "20240102"),
    "uid": ("StudyInstanceUID", "1.2.826.0.1.3680043.10.543.2.1"),
    "contact": ("PatientTelephoneNumbers", "555-123-4567"),
    "institution": ("InstitutionName", "Saint Nowhere Hospital"),
    "device": ("DeviceSerialNumber", "SN-99812"),
    "patient-characteristics": ("PatientAge", "047Y"),
    "free-text": ("SeriesDescription", "T1 axial"),
}


def _clean_output(tmp_path: Path) -> Path:
    write_planted_series(tmp_path / "src", n=1)
    run(DeidConfig(src=tmp_path / "src", out=tmp_path / "out"), progress=False)
    return next(p for p in (tmp_path / "out").rglob("*.dcm"))


@pytest.mark.parametrize("category", sorted(RESIDUALS))
def test_check_flags_each_residual_category(tmp_path, category):
    path = _clean_output(tmp_path)
    assert check_folder(path).passed
    ds = pydicom.dcmread(path)
    keyword, value = RESIDUALS[category]
    setattr(ds, keyword, value)
    ds.save_as(path)
    findings = check_folder(path).files[0].findings
    assert any(f.category == category and f.path == keyword for f in findings), findings


@pytest.mark.parametrize(
    "plant",
    ["phone", "email", "address", "name", "private", "overlay", "burned-in", "identity-flag"],
)
def test_check_flags_free_text_patterns_and_structure(tmp_path, plant):
    path = _clean_output(tmp_path)
    ds = pydicom.dcmread(path)
    text = {
        "phone": "call +1 (555) 123-4567",
        "email": "jane.doe@hospital.org",
        "address": "12 Elm Street",
        "name": "read by Dr. Gregory",
    }
    if plant in text:
        ds.SoftwareVersions = text[plant]  # an attribute the table keeps: only the scan sees it
        want = "contact" if plant != "name" else "name"
    elif plant == "private":
        ds.private_block(0x0013, "X CORP", create=True).add_new(0x01, "LO", "x")
        want = "private"
    elif plant == "overlay":
        ds.add_new(0x60000010, "US", 8)
        want = "graphics"
    elif plant == "burned-in":
        ds.BurnedInAnnotation = "YES"
        want = "burned-in"
    else:
        del ds.PatientIdentityRemoved
        want = "method"
    ds.save_as(path)
    report = check_folder(path)
    assert not report.passed
    assert want in {f.category for f in report.files[0].findings}


def test_cli_deid_then_check(tmp_path, capsys):
    write_planted_series(tmp_path / "src", n=2)
    dst = tmp_path / "out" / "dst"
    code = cli_main(
        [
            "deid",
            str(tmp_path / "src"),
            "--out",
            str(dst),
            "--options",
            "retain-dates,clean-descriptors",
        ]
    )
    assert code == 0
    assert "2 of 2 DICOM file(s) de-identified, 0 failed" in capsys.readouterr().out
    assert cli_main(["deid", "--check", str(dst)]) == 0
    assert "0 with residual identifiers" in capsys.readouterr().out
    assert cli_main(["deid", "--check", str(tmp_path / "src")]) == 1
    out = capsys.readouterr().out
    assert "[name] PatientName" in out and "residual identifier(s)" in out
    findings = "\n".join(line for line in out.splitlines() if line.startswith("  ["))
    for value in PATIENT.values():
        assert value not in findings  # findings never print values
    # wrong usage is a clear error
    assert cli_main(["deid", str(tmp_path / "src")]) == 2
    assert cli_main(["deid", "--options", "nope", str(tmp_path / "src"), "--out", str(dst)]) == 2
    assert "unknown de-identification option" in capsys.readouterr().err


def test_secret_never_inside_output(tmp_path):
    from umit.errors import InputError

    write_planted_series(tmp_path / "src", n=1)
    with pytest.raises(InputError, match="must not be stored inside the output"):
        run(
            DeidConfig(src=tmp_path / "src", out=tmp_path / "o", secret=tmp_path / "o" / "k"),
            progress=False,
        )
    with pytest.raises(InputError, match="must not be the source folder or inside it"):
        run(DeidConfig(src=tmp_path / "src", out=tmp_path / "src" / "o"), progress=False)


# ---------------------------------------------------------------------------------------------
# Burned-in policy and private safelist


def test_burned_in_rejected_by_default_and_the_batch_goes_on(tmp_path):
    write_planted_series(tmp_path / "src" / "ct", n=2)
    write_burned_in(tmp_path / "src" / "sc.dcm", kind="sc", flag="YES")
    write_burned_in(tmp_path / "src" / "us.dcm", kind="us", flag=None)
    result = run(DeidConfig(src=tmp_path / "src", out=tmp_path / "o"), progress=False)
    assert (result.written, result.failed) == (2, 2)
    reasons = {p.name: r for p, r in result.failures}
    assert "BurnedInAnnotation is YES" in reasons["sc.dcm"]
    assert "ultrasound" in reasons["us.dcm"]
    report = json.loads((tmp_path / "o" / REPORT_NAME).read_text())
    assert report["failed"] == 2 and "sc.dcm" not in json.dumps(report)  # no source paths
    with pytest.raises(BurnedInError):
        ds = pydicom.dcmread(tmp_path / "src" / "sc.dcm")
        Deidentifier(SECRET).deidentify(ds)


def test_burned_in_mask_blanks_the_band_and_declares_it(tmp_path):
    src = write_burned_in(tmp_path / "src" / "sc.dcm", kind="sc", flag="YES", rows=20)
    assert check_folder(src).files[0].findings  # the original fails the check
    result = run(
        DeidConfig(
            src=tmp_path / "src", out=tmp_path / "o", burned_in="mask", mask_rects=[(0, 18, 4, 20)]
        ),
        progress=False,
    )
    assert (result.written, result.burned_in_masked) == (1, 1)
    (out,) = _read_all(tmp_path / "o")
    px = out.pixel_array
    assert px[:2].max() == 100  # banner (4095) blanked to the image minimum
    assert (px[18:, :4] == 100).all() and px[5:15].max() == 100
    assert out.BurnedInAnnotation == "NO"
    assert "113101" in {i.CodeValue for i in out.DeidentificationMethodCodeSequence}
    audit = json.loads(next((tmp_path / "o" / AUDIT_DIR).rglob("*.json")).read_text())
    assert audit["burned_in"]["regions"] == [[0, 0, 16, 2], [0, 18, 4, 20]]
    assert check_folder(tmp_path / "o").passed


def test_ultrasound_declaring_no_burned_in_is_not_flagged(tmp_path):
    src = write_burned_in(tmp_path / "src" / "us.dcm", kind="us", flag="NO")
    result = run(DeidConfig(src=tmp_path / "src", out=tmp_path / "o"), progress=False)
    assert (result.written, result.failed) == (1, 0)
    (out,) = _read_all(tmp_path / "o")
    np.testing.assert_array_equal(out.pixel_array, pydicom.dcmread(src).pixel_array)


def test_private_safelist_keeps_only_listed_attributes(tmp_path):
    write_planted_series(tmp_path / "src", n=1)
    run(
        DeidConfig(src=tmp_path / "src", out=tmp_path / "o", keep_private=["ACME PRIVATE:0011:02"]),
        progress=False,
    )
    (out,) = _read_all(tmp_path / "o")
    block = out.private_block(0x0011, "ACME PRIVATE")
    assert block[0x02].value == "PLNTPRIV2" and 0x00111001 not in out
    assert "113111" in {i.CodeValue for i in out.DeidentificationMethodCodeSequence}
    assert check_folder(tmp_path / "o").passed
    with pytest.raises(Exception, match="CREATOR:GGGG:EE"):
        run(DeidConfig(src=tmp_path / "src", out=tmp_path / "p", keep_private=["bad"]))


# ---------------------------------------------------------------------------------------------
# Inside `umit ingest`: burned-in policy and the same UID pseudonyms


def test_ingest_rejects_or_masks_burned_in_and_records_deid_uids(tmp_path):
    from umit.ingest.catalog import Catalog
    from umit.ingest.run import IngestConfig
    from umit.ingest.run import run as ingest

    from _shared import write_ct_series

    stored = np.full((10, 12, 4), 500, np.int16)
    stored[:, :2] = 3000  # "text" in the top rows (j = row index)
    write_ct_series(tmp_path / "src" / "sc", stored, extra={"BurnedInAnnotation": "YES"})
    paths = write_ct_series(tmp_path / "src" / "ct", stored)
    result = ingest(IngestConfig(src=tmp_path / "src", out=tmp_path / "raw"), progress=False)
    assert (result.ingested, result.failed) == (1, 1)
    with Catalog(tmp_path / "raw" / "catalog.db") as cat:
        (failure,) = cat.failures()
        (row,) = cat.series()
    assert "burned-in" in failure["reason"] and "/sc/" in failure["reason"]  # names the file
    # the ingested series carries the UIDs `umit deid` writes with the same secret
    key = tmp_path / "raw" / ".umit_secret"
    run(DeidConfig(src=tmp_path / "src" / "ct", out=tmp_path / "d", secret=key), progress=False)
    d = _read_all(tmp_path / "d")[0]
    assert row.extra["deid_series_uid"] == d.SeriesInstanceUID
    assert row.extra["deid_study_uid"] == d.StudyInstanceUID
    assert row.subject_id == str(d.PatientID)[len(PSEUDONYM_PREFIX) :]
    assert str(pydicom.dcmread(paths[0]).SeriesInstanceUID) not in json.dumps(row.extra)
    # mask policy: ingested, top rows blanked
    result = ingest(
        IngestConfig(src=tmp_path / "src" / "sc", out=tmp_path / "raw2", burned_in="mask"),
        progress=False,
    )
    assert (result.ingested, result.failed) == (1, 0)
    from umit.data.io import read_image

    with Catalog(tmp_path / "raw2" / "catalog.db") as cat:
        img, _ = read_image(tmp_path / "raw2" / cat.series()[0].image_path)
    assert (img == 500 - 1024).all()  # the bright top rows were blanked to the minimum


def test_empty_sop_uids_are_taken_from_the_file_meta(tmp_path):
    ds, _ = planted_dataset(seed=3)
    meta_uid = ds.file_meta.MediaStorageSOPInstanceUID
    ds.SOPInstanceUID = ""  # as some exports write it
    ds.SOPClassUID = ""
    (tmp_path / "src").mkdir()
    ds.save_as(tmp_path / "src" / "x.dcm", enforce_file_format=True)
    result = run(DeidConfig(src=tmp_path / "src", out=tmp_path / "o", secret=tmp_path / "k"))
    assert (result.written, result.failed) == (1, 0)
    (out,) = _read_all(tmp_path / "o")
    key = bytes.fromhex((tmp_path / "k").read_text())
    assert (
        out.SOPInstanceUID == replace_uid(key, meta_uid) == out.file_meta.MediaStorageSOPInstanceUID
    )
    assert out.SOPClassUID == ds.file_meta.MediaStorageSOPClassUID


def test_check_catches_what_dicognito_leaves_behind():
    """Recall of --check on another tool's output: every planted value that survives dicognito
    in a Table E.1-1 attribute is reported at that attribute."""
    anonymizer_mod = pytest.importorskip("dicognito.anonymizer")
    ds, planted = planted_dataset(seed=2)
    ds = _roundtrip(ds)
    anonymizer_mod.Anonymizer(seed="umit-test").anonymize(ds)
    out = _roundtrip(ds)
    flagged = {f.path for f in check_dataset(out)}
    rows = {e.keyword for e in basic_profile().entries.values()}
    survived = [
        kw
        for kw, value in planted.items()
        if kw in rows and kw in out and len(value) >= 4 and value in " ".join(_text(out[kw].value))
    ]
    assert len(survived) > 50  # dicognito leaves many table attributes as they were
    missed = [kw for kw in survived if kw not in flagged]
    assert not missed, missed
