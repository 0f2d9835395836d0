"""Synthetic DICOM with planted identifiers in every Table E.1-1 attribute (tests, benchmark).

:func:`planted_dataset` fills *every* attribute of Table E.1-1 that a file can hold (command and
file-meta groups aside) with a value of its VR that carries an identifier: person names, IDs,
dates, UIDs with an organisation root, free text with a name, an MRN and a phone number; plus a
private block, a curve, an overlay and sequences whose items hold names and UIDs. It returns the
planted strings so that a test can search de-identified bytes for any survivor.

:func:`plant_retained` puts realistic, identifier-like values (serial numbers, station names, an
institution's address) into the attributes a profile option keeps, and :func:`add_vendor_private`
adds Siemens, GE and Philips private blocks at unusual block numbers with the Retain Safe Private
elements beside unlisted and identifying ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian

from umit.deid.profile import basic_profile

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
US_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.6.1"
ORG_ROOT = "1.2.826.0.1.3680043.10.543"
"""A made-up organisation UID root: planted UIDs look like a hospital's."""

PATIENT = {
    "PatientName": "Doe^Jane^Q",
    "PatientID": "PID-123456",
    "PatientBirthDate": "19700101",
}
FREE_TEXT = "Brain MRI Jane Doe MRN 88812345 tel (555) 123-4567 2024-01-02"
"""Planted into descriptions: what Clean Descriptors must reduce to its non-identifying words."""
FREE_TEXT_KEPT_WORDS = ("Brain", "MRI")
IDENTITY_TOKENS = (
    "Jane",
    "Doe",
    "PID-123456",
    "19700101",
    "88812345",
    "123-4567",
    "Nowhere",
    "Springfield",
    "House",
    "Gregory",
    "ACC98765",
    "PACS_NOWHERE",
)
"""Words of the planted identity: none may survive de-identification, anywhere in the file."""


def _uid(*parts: int | str) -> str:
    return ".".join([ORG_ROOT, *(str(p) for p in parts)])


def _planted_value(vr: str, i: int, keyword: str) -> object | None:
    """A planted value of ``vr`` for table row ``i`` (None: leave the attribute out)."""
    marker = f"PLNT{i:03d}"
    if vr == "PN":
        return f"{marker}^Jane"
    if vr in ("LO", "ST", "LT", "UT", "UC"):
        if vr in ("ST", "LT", "UT"):
            return f"{marker} {FREE_TEXT}"
        if "Description" in keyword or "Comments" in keyword:
            return FREE_TEXT
        return f"{marker} Jane Doe"
    if vr in ("SH", "AE"):
        return marker
    if vr == "CS":
        return marker
    if vr == "DA":
        return f"2024{1 + i % 12:02d}{1 + i % 28:02d}"
    if vr == "TM":
        return "101500"
    if vr == "DT":
        return f"2024{1 + i % 12:02d}{1 + i % 28:02d}101500"
    if vr == "UI":
        return _uid(9, i)
    if vr == "AS":
        return "047Y"
    if vr == "IS":
        return str(100000 + i)
    if vr == "DS":
        return "70.5"
    if vr in ("US", "SS", "UL", "SL"):
        return i
    if vr in ("FL", "FD"):
        return float(i)
    if vr in ("OB", "OW", "UN"):
        return f"{marker} Jane Doe".encode().ljust(16, b" ")
    if vr == "UR":
        return f"http://hospital.example/{marker}"
    return None


def planted_dataset(
    seed: int = 0,
    patient: dict[str, str] | None = None,
    study_uid: str | None = None,
    series_uid: str | None = None,
    sop_uid: str | None = None,
    references: Sequence[str] | None = None,
) -> tuple[FileDataset, dict[str, str]]:
    """A small CT image with every Table E.1-1 attribute planted; returns ``(ds, planted)``.

    ``planted`` maps a label (keyword) to each identifying string put in the file, for leak
    searches. ``references``, when given, replace the planted ReferencedImageSequence by items
    pointing at these SOP Instance UIDs (to check references resolve after UID replacement).
    """
    patient = {**PATIENT, **(patient or {})}
    sop_uid = sop_uid or _uid(1, seed)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.SourceApplicationEntityTitle = "PACS_NOWHERE"
    ds = FileDataset("planted", {}, file_meta=meta, preamble=b"\0" * 128)
    planted: dict[str, str] = {}
    for i, entry in enumerate(sorted(basic_profile().entries.values(), key=lambda e: e.tag)):
        if entry.tag.group in (0x0000, 0x0002) or entry.tag == 0xFFFCFFFC:
            continue
        vr = dictionary_VR(entry.tag).split(" or ")[0]
        if vr == "SQ":
            item = Dataset()
            item.CodeValue = "121000"
            item.CodingSchemeDesignator = "99PLANT"
            item.CodeMeaning = f"PLNT{i:03d} Jane Doe"
            item.ReferencedSOPInstanceUID = _uid(8, i)
            item.PersonName = f"PLNT{i:03d}^Seq"
            ds.add_new(entry.tag, "SQ", DicomSequence([item]))
            planted[f"{entry.keyword}.item"] = f"PLNT{i:03d} Jane Doe"
            planted[f"{entry.keyword}.uid"] = _uid(8, i)
            continue
        value = _planted_value(vr, i, entry.keyword)
        if value is None:
            continue
        ds.add_new(entry.tag, vr, value)
        if isinstance(value, str) and vr not in ("DS", "IS", "TM", "AS"):
            planted[entry.keyword] = value
    # the patient, the study and the image as a real file would have them
    for k, v in patient.items():
        setattr(ds, k, v)
        planted[k] = v
    ds.PatientSex = "F"
    ds.PatientAge = "047Y"
    ds.PatientWeight = "70.5"
    ds.StudyDate = "20240102"
    ds.SeriesDate = "20240102"
    ds.SOPClassUID = CT_IMAGE_STORAGE
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid or _uid(2, seed)
    ds.SeriesInstanceUID = series_uid or _uid(3, seed)
    ds.FrameOfReferenceUID = _uid(4, seed)
    ds.StudyDescription = FREE_TEXT
    ds.SeriesDescription = f"T1 {FREE_TEXT}"
    ds.InstitutionName = "Saint Nowhere Hospital"
    ds.InstitutionAddress = "1 Hospital Road, Springfield"
    ds.ReferringPhysicianName = "House^Gregory"
    ds.AccessionNumber = "ACC98765"
    for k in (
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "SOPInstanceUID",
        "FrameOfReferenceUID",
        "InstitutionName",
        "InstitutionAddress",
        "ReferringPhysicianName",
        "AccessionNumber",
    ):
        planted[k] = str(ds.get(k))
    if references is not None:
        items = []
        for ref in references:
            item = Dataset()
            item.ReferencedSOPClassUID = CT_IMAGE_STORAGE
            item.ReferencedSOPInstanceUID = ref
            items.append(item)
        ds.ReferencedImageSequence = DicomSequence(items)
    ds.Modality = "CT"
    ds.Manufacturer = "ACME"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.InstanceNumber = seed + 1
    ds.ImagePositionPatient = [0, 0, 2.5 * seed]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [0.8, 0.8]
    # private block, curve and overlay
    ds.private_block(0x0011, "ACME PRIVATE", create=True).add_new(0x01, "LO", "PLNTPRIV Jane Doe")
    ds.private_block(0x0011, "ACME PRIVATE").add_new(0x02, "SH", "PLNTPRIV2")
    planted["private"] = "PLNTPRIV"
    ds.add_new(0x50000005, "US", 1)
    ds.add_new(0x50003000, "OW", b"PLNTCURV" * 2)
    ds.add_new(0x60000010, "US", 8)
    ds.add_new(0x60000011, "US", 8)
    ds.add_new(0x60003000, "OW", b"\xff" * 8)
    ds.add_new(0x60004000, "LT", "PLNTOVLY Jane Doe")
    planted["curve"] = "PLNTCURV"
    planted["overlay"] = "PLNTOVLY"
    _pixels(ds, np.arange(64, dtype=np.int16).reshape(8, 8) + seed)
    return ds, planted


def _pixels(ds: Dataset, img: np.ndarray) -> None:
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = img.shape[:2]
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1 if img.dtype == np.int16 else 0
    ds.PixelData = np.ascontiguousarray(img).tobytes()


def write_planted_series(
    folder: Path, n: int = 3, seed: int = 0, patient: dict[str, str] | None = None
) -> tuple[list[Path], dict[str, str]]:
    """``n`` planted files of one series (one study); each references the previous file."""
    folder.mkdir(parents=True, exist_ok=True)
    study, series = _uid(2, 1000 + seed), _uid(3, 1000 + seed)
    paths, planted, prev = [], {}, None
    for k in range(n):
        sop = _uid(1, seed * 1000 + k)
        ds, p = planted_dataset(
            seed=k,
            patient=patient,
            study_uid=study,
            series_uid=series,
            sop_uid=sop,
            references=[prev] if prev else [],
        )
        path = folder / f"{p['PatientID']}_{k:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
        planted.update(p)
        prev = sop
    return paths, planted


def write_burned_in(
    path: Path, kind: str = "sc", flag: str | None = "YES", rows: int = 20, cols: int = 16
) -> Path:
    """A small image whose top rows hold "text" (value 4095): secondary capture or ultrasound."""
    meta = FileMetaDataset()
    sop_class = SECONDARY_CAPTURE if kind == "sc" else US_IMAGE_STORAGE
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = _uid(7, rows, cols)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = _uid(2, 7)
    ds.SeriesInstanceUID = _uid(3, 7)
    ds.Modality = "OT" if kind == "sc" else "US"
    for k, v in PATIENT.items():
        setattr(ds, k, v)
    if flag is not None:
        ds.BurnedInAnnotation = flag
    img = np.full((rows, cols), 100, dtype=np.uint16)
    img[:2, 2:-2] = 4095  # the "burned-in" banner
    _pixels(ds, img)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


# --------------------------------------------------------------------------------------------
# Attributes an option retains, with realistic identifier-like values

REALISTIC_RETAINED: dict[str, object] = {
    "StationName": "CTAWP45123456",
    "DeviceSerialNumber": "45123456",
    "DeviceUID": "1.3.12.2.1107.5.1.4.45123",
    "DetectorID": "DET-2019-4512",
    "GantryID": "GT 4512 3456",
    "InstitutionName": "Springfield General Hospital",
    "InstitutionAddress": "1200 Hospital Road, Springfield IL 62701, tel (217) 555-0100",
    "InstitutionalDepartmentName": "Radiology, Dr. Smith Wing",
    "ClinicalTrialSiteID": "SITE-20240117",
    "ClinicalTrialSiteName": "Springfield General, 1200 Hospital Road",
    "PatientSex": "F",
    "PatientAge": "047Y",
    "PatientSize": "1.68",
    "PatientWeight": "70.5",
    "EthnicGroup": "2106-3",
}
"""Values an option keeps that look like identifiers to a pattern scanner (serial numbers,
station names, an institution's address and phone): ``--check`` must accept them where the file
declares the option that retains them."""


def _retained_value(vr: str, i: int, keyword: str) -> object | None:
    """A realistic, identifier-like value of ``vr`` for a retained attribute (None: skip)."""
    if keyword in REALISTIC_RETAINED:
        return REALISTIC_RETAINED[keyword]
    if vr in ("LO", "SH", "UC", "ST", "LT", "UT"):
        return f"SN-{4512000 + i}"  # seven digits: the checker's "id" pattern
    if vr == "PN":
        return f"Station{i}^Operator"
    if vr == "CS":
        return "YES"
    if vr == "UI":
        return _uid(6, i)
    if vr == "DA":
        return f"2024{1 + i % 12:02d}{1 + i % 28:02d}"
    if vr == "DT":
        return f"2024{1 + i % 12:02d}{1 + i % 28:02d}101500"
    if vr == "TM":
        return "101500"
    if vr == "AS":
        return "047Y"
    if vr == "IS":
        return str(4512000 + i)
    if vr == "DS":
        return "70.5"
    if vr in ("US", "SS", "UL", "SL"):
        return i
    if vr in ("FL", "FD"):
        return float(i)
    return None


def plant_retained(ds: Dataset, options: frozenset[str]) -> dict[int, object]:
    """Fill every attribute a profile option in ``options`` keeps or shifts (``K`` or ``C``
    where the Basic Profile would not keep it; sequences and binary VRs aside) with a realistic
    identifier-like value; returns ``{tag: value}``."""
    written: dict[int, object] = {}
    for i, entry in enumerate(sorted(basic_profile().entries.values(), key=lambda e: e.tag)):
        action = entry.action(options)
        if entry.tag.group in (0x0000, 0x0002) or entry.basic_action in ("K", "C"):
            continue
        if not (action == "K" or action == "C" and "T" in entry.flags):
            continue  # only kept or date-shifted values; C of descriptors is text cleaning
        vr = dictionary_VR(entry.tag).split(" or ")[0]
        if vr == "SQ":
            continue
        value = _retained_value(vr, i, entry.keyword)
        if value is None:
            continue
        ds.add_new(entry.tag, vr, value)
        written[int(entry.tag)] = value
    return written


# --------------------------------------------------------------------------------------------
# Vendor private blocks (Retain Safe Private)

SAFE_PRIVATE_VALUES: dict[tuple[str, int, int], tuple[str, object]] = {
    ("SIEMENS MR HEADER", 0x0019, 0x0A): ("US", 36),
    ("SIEMENS MR HEADER", 0x0019, 0x0B): ("DS", "4512345"),
    ("SIEMENS MR HEADER", 0x0019, 0x0C): ("IS", "1000"),
    ("SIEMENS MR HEADER", 0x0019, 0x0D): ("CS", "DIRECTIONAL"),
    ("SIEMENS MR HEADER", 0x0019, 0x0E): ("FD", [0.577, -0.577, 0.577]),
    ("SIEMENS MR HEADER", 0x0019, 0x27): ("FD", [333.0, 0.0, 0.0, 333.0, 0.0, 334.0]),
    ("SIEMENS MR HEADER", 0x0019, 0x28): ("FD", 21.552),
    ("SIEMENS MR HEADER", 0x0019, 0x29): ("FD", [0.0, 1237.5, 82.5, 1320.0]),
    ("GEMS_ACQU_01", 0x0019, 0xBB): ("DS", "0.707107"),
    ("GEMS_ACQU_01", 0x0019, 0xBC): ("DS", "-0.707107"),
    ("GEMS_ACQU_01", 0x0019, 0xBD): ("DS", "0"),
    ("GEMS_PARM_01", 0x0043, 0x39): ("IS", ["1000001000", "8", "0", "0"]),
    ("Philips Imaging DD 001", 0x2001, 0x03): ("FL", 1000.0),
    ("Philips MR Imaging DD 001", 0x2005, 0xB0): ("FL", 0.5),
    ("Philips MR Imaging DD 001", 0x2005, 0xB1): ("FL", -0.5),
    ("Philips MR Imaging DD 001", 0x2005, 0xB2): ("FL", 0.75),
}
"""A value of each :data:`umit.deid.safe_private.SAFE_PRIVATE` element (the B_value with a
seven-digit SliceMeasurementDuration, as real files have: numbers that look like IDs)."""


def add_vendor_private(ds: Dataset) -> dict[int, object]:
    """Vendor private blocks at unusual block numbers, with the safe elements, unlisted ones and
    identifiers; returns ``{tag: value}`` of the safe elements (what retain-safe-private keeps).

    Group 0019: block 0x10 is another creator ("ACME RESEARCH") whose element at offset 0x0C
    (the raw tag of Siemens B_value in most files) holds an ID, so SIEMENS MR HEADER lands in
    block 0x11 and GEMS_ACQU_01 in 0x12. Each vendor block also holds an unlisted element and one
    with the patient's name; a Siemens CSA header (0029) and a SIEMENS MR HEADER block in group
    0051 (same creator, other group) hold text.
    """
    acme = ds.private_block(0x0019, "ACME RESEARCH", create=True)
    acme.add_new(0x0C, "IS", "88812345")
    acme.add_new(0x10, "LO", "Doe^Jane MRN 88812345")
    siemens = ds.private_block(0x0019, "SIEMENS MR HEADER", create=True)
    ge_acqu = ds.private_block(0x0019, "GEMS_ACQU_01", create=True)
    assert (acme.block_start, siemens.block_start, ge_acqu.block_start) == (0x1000, 0x1100, 0x1200)
    siemens.add_new(0x08, "CS", "IMAGE NUM 4")  # unlisted
    siemens.add_new(0x10, "LO", "Doe^Jane tel (555) 123-4567")  # unlisted, identifying
    ge_acqu.add_new(0x9C, "LO", "epi2_pepolar Jane")  # pulse sequence name: unlisted text
    blocks = {
        ("SIEMENS MR HEADER", 0x0019): siemens,
        ("GEMS_ACQU_01", 0x0019): ge_acqu,
        ("GEMS_PARM_01", 0x0043): ds.private_block(0x0043, "GEMS_PARM_01", create=True),
        ("Philips Imaging DD 001", 0x2001): ds.private_block(
            0x2001, "Philips Imaging DD 001", create=True
        ),
        ("Philips MR Imaging DD 001", 0x2005): ds.private_block(
            0x2005, "Philips MR Imaging DD 001", create=True
        ),
    }
    blocks[("GEMS_PARM_01", 0x0043)].add_new(0x3A, "LO", "Jane Doe")  # unlisted
    blocks[("Philips Imaging DD 001", 0x2001)].add_new(0x04, "LO", "Doe^Jane")  # unlisted
    kept: dict[int, object] = {}
    for (creator, group, offset), (vr, value) in SAFE_PRIVATE_VALUES.items():
        block = blocks[(creator, group)]
        block.add_new(offset, vr, value)
        kept[block.get_tag(offset)] = value
    csa = ds.private_block(0x0029, "SIEMENS CSA HEADER", create=True)
    csa.add_new(0x10, "OB", b"SV10\x04\x03\x02\x01PatientName Doe^Jane ".ljust(32, b" "))
    ds.private_block(0x0051, "SIEMENS MR HEADER", create=True).add_new(0x0C, "LO", "FoV 220*220")
    return kept
