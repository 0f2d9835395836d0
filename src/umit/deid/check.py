"""Residual-identifier scanner: ``umit deid --check DIR``.

A de-identified file cannot be compared with its original (the original is not at hand), so the
check asks what the file itself says and whether its content agrees:

* **Profile rules.** The options the file declares in DeidentificationMethodCodeSequence (CID 7050
  codes of scheme DCM, whoever wrote them; none declared = the strictest reading) select the
  Table E.1-1 action of every attribute, nested sequences included. An attribute whose action is
  X must hold no value; Z must be empty, a dummy (:data:`~umit.deid.profile.DUMMY_VALUES`) or,
  for PatientID/PatientName, a pseudonym of the form ``UMIT-<12 hex>``; D must be empty or a
  dummy; U must be a ``2.25.<int>`` UID (the form of a replaced UID; a UID with an organisation
  root is reported).
* **Dates.** Every DA/DT value, listed in the table or not, must be empty or a dummy unless the
  file declares Retain Longitudinal Temporal Information (dates shifted or kept).
* **Free text.** Every text value left (LO, SH, ST, LT, UT, UC, PN) is searched for phone numbers,
  e-mail addresses, street addresses, dates, titled or DICOM-formatted person names and long ID
  numbers, except in an attribute that a declared option retains (K where the Basic Profile
  would not keep it: a station name or serial number under Retain Device Identity, an
  institution address under Retain Institution Identity...), and in the items of a sequence so
  retained: those are identifiers by nature and the file says it keeps them.
* **Private attributes, curves and overlays** must be gone; private ones may stay only when the
  file declares Retain Safe Private, and their text values are then searched like free text
  (safe private values hold no identifier). **Burned-in** pixels: BurnedInAnnotation=YES, or an
  object of a burned-in-prone type (see :func:`~umit.deid.profile.burned_in_reason`) without
  the Clean Pixel Data code, is reported. **Method**: PatientIdentityRemoved must be YES.

Findings name the file, the attribute path and the category, never the value.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from umit.deid.profile import (
    CODE_TO_OPTION,
    CODING_SCHEME,
    CURVE_GROUPS,
    DUMMY_VALUES,
    OPTION_FLAGS,
    OVERLAY_GROUPS,
    PSEUDONYM_PREFIX,
    ProfileEntry,
    basic_profile,
    burned_in_reason,
)
from umit.errors import InputError

TEXT_VRS = frozenset({"LO", "SH", "ST", "LT", "UT", "UC", "PN"})
DATE_VRS = frozenset({"DA", "DT"})

PSEUDONYM_RE = re.compile(rf"^{re.escape(PSEUDONYM_PREFIX)}[0-9a-f]{{12}}$")
REPLACED_UID_RE = re.compile(r"^2\.25\.(0|[1-9]\d{0,38})$")

TEXT_PATTERNS: dict[str, re.Pattern[str]] = {
    "phone": re.compile(
        r"(?<![\w.])(?:\+\d{1,3}[\s.-]?)?(?:\(\d{2,5}\)[\s.-]?|\d{2,5}[\s.-])\d{3,4}[\s.-]?\d{3,4}(?![\w.])"
    ),
    "email": re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+"),
    "address": re.compile(
        r"\b\d{1,5}\s+(?:[A-Za-z]+\s+){0,3}(?:road|rd|street|st|avenue|ave|lane|ln|drive|dr|"
        r"boulevard|blvd|way|court|ct|place|pl|square|sq|strasse|straße|rue|weg)\b\.?",
        re.IGNORECASE,
    ),
    "date": re.compile(
        r"\b(?:19|20)\d{2}[-/.](?:0?[1-9]|1[0-2])[-/.](?:0?[1-9]|[12]\d|3[01])\b"
        r"|\b(?:0?[1-9]|[12]\d|3[01])[-/.](?:0?[1-9]|1[0-2])[-/.](?:19|20)\d{2}\b"
        r"|\b(?:19|20)\d{2}(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])\b"
    ),
    "name": re.compile(
        r"\b(?:Dr|Mr|Mrs|Ms|Miss|Prof)\.?\s+[A-Z][a-z]+"
        r"|\b[A-Za-z][A-Za-z'-]+\^[A-Za-z][A-Za-z'-]*"
    ),
    "id": re.compile(r"\b(?:[A-Z]{1,5}[-#:]?)?\d{7,}\b"),
}
"""Patterns of identifiers in free text. Used by the checker and by the Clean action."""

SKIP_TEXT_SCAN = frozenset(
    {
        "CodeValue",
        "CodingSchemeDesignator",
        "CodingSchemeVersion",
        "DeidentificationMethod",
        "SpecificCharacterSet",
        "ImplementationVersionName",
    }
)
"""Text attributes that are codes, not prose (code values such as 113100 look like IDs)."""


@dataclass(frozen=True)
class Finding:
    """One residual identifier: where and what kind, never the value."""

    path: str
    """Attribute path, e.g. ``PatientName`` or ``ReferencedImageSequence[0].ReferencedSOPInstanceUID``."""
    category: str
    """name, id, date, uid, contact, institution, device, patient-characteristics, free-text,
    private, graphics, burned-in, method, other."""
    reason: str


@dataclass
class FileReport:
    path: Path
    findings: list[Finding] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not self.findings


@dataclass
class CheckReport:
    """Result of :func:`check_folder`."""

    root: Path
    files: list[FileReport] = field(default_factory=list)
    non_dicom: int = 0
    unreadable: list[tuple[Path, str]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def flagged(self) -> list[FileReport]:
        return [f for f in self.files if not f.clean]

    @property
    def passed(self) -> bool:
        return not self.flagged and not self.unreadable and bool(self.files)

    def by_category(self) -> Counter:
        return Counter(x.category for f in self.files for x in f.findings)


def declared_options(ds: Dataset) -> frozenset[str]:
    """Option names declared by the file's DeidentificationMethodCodeSequence: CID 7050 codes
    of coding scheme DCM (a code of another scheme is not the standard's option)."""
    out = set()
    for item in ds.get("DeidentificationMethodCodeSequence") or []:
        if str(item.get("CodingSchemeDesignator", "") or "").strip() != CODING_SCHEME:
            continue
        name = CODE_TO_OPTION.get(str(item.get("CodeValue", "") or "").strip())
        if name:
            out.add(name)
    return frozenset(out)


def retained_by_option(entry: ProfileEntry | None, options: frozenset[str]) -> bool:
    """True when a declared option keeps ``entry``'s attribute that the Basic Profile would not."""
    return entry is not None and entry.basic_action != "K" and entry.action(options) == "K"


def _category(entry: ProfileEntry, vr: str) -> str:
    kw = entry.keyword
    if "P" in entry.flags or "p" in entry.flags:
        return "patient-characteristics"
    if vr == "PN" or kw.endswith(("Name", "Names")) and "Physician" in kw:
        return "name"
    if vr in ("DA", "DT", "TM") or "T" in entry.flags:
        return "date"
    if vr == "UI":
        return "uid"
    if any(w in kw for w in ("Address", "Telephone", "Telecom", "Phone", "Residence")):
        return "contact"
    if "I" in entry.flags or "Institution" in kw:
        return "institution"
    if "D" in entry.flags:
        return "device"
    if "C" in entry.flags or kw.endswith(("Comments", "Description")):
        return "free-text"
    if kw.endswith(("ID", "IDs", "Number", "Identifier", "Numbers")) or "ID" in kw:
        return "id"
    return "other"


def _has_value(elem: DataElement) -> bool:
    if elem.VR == "SQ":
        return bool(elem.value) and len(elem.value) > 0
    if isinstance(elem.value, (bytes, bytearray)):
        return len(elem.value) > 0
    return any(x.strip() for x in _values(elem))


def _values(elem: DataElement) -> list[str]:
    v = elem.value
    if v is None:
        return []
    if isinstance(v, (MultiValue, list, tuple)):
        return [str(x) for x in v]
    return [str(v)]


def _is_dummy(elem: DataElement) -> bool:
    dummy = DUMMY_VALUES.get(elem.VR)
    if dummy is None:
        return False
    return all(str(x).strip() in (str(dummy), "") for x in _values(elem))


def _is_pseudonym(elem: DataElement) -> bool:
    return elem.keyword in ("PatientID", "PatientName") and all(
        PSEUDONYM_RE.match(str(x).strip()) for x in _values(elem)
    )


def scan_text(text: str) -> list[str]:
    """Names of :data:`TEXT_PATTERNS` that match ``text``."""
    return [name for name, pat in TEXT_PATTERNS.items() if pat.search(text)]


def _walk(
    ds: Dataset, options: frozenset[str], prefix: str = "", inside_retained: bool = False
) -> Iterator[tuple[str, DataElement, bool]]:
    """Every element with its path and whether it lies inside a sequence that a declared option
    retains (sequence items are walked too)."""
    profile = basic_profile()
    for elem in ds:
        name = elem.keyword or f"({elem.tag.group:04X},{elem.tag.element:04X})"
        path = f"{prefix}{name}"
        yield path, elem, inside_retained
        if elem.VR == "SQ" and elem.value:
            retained = inside_retained or retained_by_option(profile.get(elem.tag), options)
            for i, item in enumerate(elem.value):
                yield from _walk(item, options, f"{path}[{i}].", retained)


def check_dataset(ds: Dataset) -> list[Finding]:
    """Residual identifiers in one dataset (see the module docstring for the rules)."""
    profile = basic_profile()
    options = declared_options(ds)
    profile_options = frozenset(o for o in options if o in OPTION_FLAGS)
    dates_kept = bool({"retain-modified-dates", "retain-full-dates"} & options)
    safe_private = "retain-safe-private" in options
    findings: list[Finding] = []
    n_private = 0
    graphics_groups: set[int] = set()
    for path, elem, inside_retained in _walk(ds, profile_options):
        tag = elem.tag
        if tag.group == 0x0002:
            continue
        if tag.is_private:
            if tag.is_private_creator:
                continue
            if not safe_private:
                n_private += 1
            elif elem.VR in TEXT_VRS and _has_value(elem):
                hits = sorted({h for v in _values(elem) for h in scan_text(v)})
                if hits:
                    findings.append(
                        Finding(path, "private", f"safe private text looks like {', '.join(hits)}")
                    )
            continue
        if tag.group in CURVE_GROUPS or tag.group in OVERLAY_GROUPS:
            graphics_groups.add(tag.group)
            continue
        entry = profile.get(tag)
        has_value = _has_value(elem)
        if entry is not None and has_value:
            action = entry.action(profile_options)
            if elem.VR == "SQ" and action != "X":
                if action == "Z":
                    findings.append(
                        Finding(path, "other", "sequence has items; the profile empties it (Z)")
                    )
                # D, U, C, K: the items are walked (and judged) on their own
            elif action == "X":
                findings.append(
                    Finding(
                        path,
                        _category(entry, elem.VR),
                        "present with a value; the profile removes it (X)",
                    )
                )
                continue
            elif action == "Z" and not (_is_dummy(elem) or _is_pseudonym(elem)):
                findings.append(
                    Finding(
                        path,
                        _category(entry, elem.VR),
                        "not empty; the profile empties it (Z)",
                    )
                )
                continue
            elif action == "D" and not _is_dummy(elem):
                findings.append(
                    Finding(
                        path,
                        _category(entry, elem.VR),
                        "not a dummy value; the profile replaces it (D)",
                    )
                )
                continue
            elif action == "U" and elem.VR == "UI":
                bad = [u for u in _values(elem) if not REPLACED_UID_RE.match(u.strip())]
                if bad:
                    findings.append(Finding(path, "uid", "UID not in replaced form 2.25.<int> (U)"))
                continue
        if elem.VR in DATE_VRS and has_value and not dates_kept and not _is_dummy(elem):
            findings.append(
                Finding(path, "date", "date present without a retain-dates option declared")
            )
            continue
        if (
            elem.VR in TEXT_VRS
            and has_value
            and elem.keyword not in SKIP_TEXT_SCAN
            and not _is_pseudonym(elem)
            and not _is_dummy(elem)
            and not inside_retained
            and not retained_by_option(entry, profile_options)
        ):
            hits = sorted({h for v in _values(elem) for h in scan_text(v)})
            if hits:
                cat = {"phone": "contact", "email": "contact", "address": "contact"}
                findings.append(
                    Finding(
                        path,
                        cat.get(hits[0], "name" if hits[0] == "name" else "free-text"),
                        f"free text looks like {', '.join(hits)}",
                    )
                )
    if n_private:
        findings.append(
            Finding("(odd groups)", "private", f"{n_private} private attribute(s) present")
        )
    for g in sorted(graphics_groups):
        kind = "curve" if g in CURVE_GROUPS else "overlay"
        findings.append(Finding(f"({g:04X},xxxx)", "graphics", f"{kind} group present"))
    if str(ds.get("PatientIdentityRemoved", "")).strip().upper() != "YES":
        findings.append(Finding("PatientIdentityRemoved", "method", "not YES"))
    reason = burned_in_reason(ds)
    if reason is not None and (
        str(ds.get("BurnedInAnnotation", "")).upper() == "YES" or "clean-pixel-data" not in options
    ):
        findings.append(
            Finding("PixelData", "burned-in", f"{reason}; no Clean Pixel Data option declared")
        )
    return findings


def check_file(path: str | Path) -> FileReport:
    """Check one file; raises :class:`~umit.errors.InputError` when it is not readable DICOM."""
    path = Path(path)
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except Exception as exc:
        raise InputError(path, f"not readable as DICOM ({type(exc).__name__}: {exc})") from exc
    return FileReport(path, check_dataset(ds))


def _looks_dicom(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    if len(head) >= 132 and head[128:132] == b"DICM":
        return True
    if len(head) >= 8 and int.from_bytes(head[0:2], "little") in (0x0002, 0x0008):
        return True  # a dataset without the Part 10 preamble
    return path.suffix.lower() in (".dcm", ".dicom", ".ima")


def check_folder(root: str | Path) -> CheckReport:
    """Check every DICOM file under ``root`` (a folder tree or one file)."""
    start = time.perf_counter()
    root = Path(root)
    if not root.exists():
        raise InputError(root, "no such file or folder")
    paths = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    report = CheckReport(root)
    for p in paths:
        if p.name.upper() == "DICOMDIR" or not _looks_dicom(p):
            report.non_dicom += 1
            continue
        try:
            report.files.append(check_file(p))
        except InputError as exc:
            report.unreadable.append((p, exc.problem))
    report.seconds = time.perf_counter() - start
    return report
