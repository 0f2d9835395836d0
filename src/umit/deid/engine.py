"""DICOM de-identification: PS3.15 Annex E Basic Profile on datasets and folders (``umit deid``).

:class:`Deidentifier` applies Table E.1-1 (:mod:`umit.deid.profile`) to a pydicom dataset,
recursively through every sequence:

* **UIDs** (action U, and every other non-registered UID) become ``2.25.<int>`` UIDs derived from
  an HMAC of the original with the user's secret (:func:`umit.deid.secret.replace_uid`): the same UID gives the
  same replacement across files and runs, so series, studies and references (ReferencedSOP...,
  FrameOfReference) stay intact. Without the secret the mapping cannot be reversed or redone.
* **Dates** are emptied/dummied by default. With ``retain-modified-dates`` every DA/DT value is
  shifted by a whole number of days that is fixed per patient (from the same keyed hash of the
  PatientID), so intervals between a patient's studies are kept and the real dates are not.
  Times of day are kept under that option.
* **PatientID / PatientName** (action Z, which allows a dummy) become ``UMIT-<12 hex>``, the keyed
  pseudonym ``umit ingest`` uses as subject id with the same secret.
* **Private attributes** are removed unless kept by the Retain Safe Private option (the vendor
  elements of :mod:`umit.deid.safe_private`, numbers and codes only) or listed in a user safelist
  of (creator, group, element byte); either way an element is found through its private creator
  and block, never by its raw tag. **Curves and overlays** (groups 50xx/60xx) are removed.
* **Burned-in text**: a file that may carry text in its pixels
  (:func:`~umit.deid.profile.burned_in_reason`) is rejected (default) or masked: the top
  ``mask_band`` fraction of rows and/or given rectangles are set to the image minimum in every
  frame; then BurnedInAnnotation is set to NO and the Clean Pixel Data code is declared.
* **Method**: PatientIdentityRemoved=YES, DeidentificationMethod, DeidentificationMethodCodeSequence
  (CID 7050 codes of the profile and the options used) and LongitudinalTemporalInformationModified.
  An earlier de-identification record (another tool's, e.g. a refacing tool declaring Clean
  Recognizable Visual Features) is kept, as PS3.15 E.1.1 requires: its method texts and code
  items stay, ours are appended, no code twice.

:func:`run` de-identifies a folder tree into ``out/<study>/<series>/<instance>.dcm`` (names are
the new UIDs), writes one audit record per file (``out/audit/...json``: which attributes got
which action, never a value) and a ``deid_report.json``; a bad file is a failure row and the run
goes on; every write is atomic.
"""

from __future__ import annotations

import datetime as _dt
import io
import logging
import math
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pydicom
from pydantic import Field
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence as DicomSequence
from pydicom.tag import Tag
from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from tqdm import tqdm

from umit import __version__
from umit.config import UmitConfig
from umit.deid.check import TEXT_PATTERNS
from umit.deid.profile import (
    CODING_SCHEME,
    CURVE_GROUPS,
    DUMMY_VALUES,
    OPTION_CODES,
    OVERLAY_GROUPS,
    basic_profile,
    burned_in_reason,
    normalise_options,
)
from umit.deid.safe_private import conforms, safe_private
from umit.deid.secret import (
    SECRET_NAME,
    date_shift_days,
    patient_pseudonym,
    pseudonym,
    replace_uid,
    resolve_secret,
)
from umit.errors import InputError
from umit.utils.fileio import atomic_write_bytes, atomic_write_json

log = logging.getLogger(__name__)

PROFILE_NAME = "DICOM PS3.15 Annex E Basic Application Level Confidentiality Profile (Table E.1-1)"
AUDIT_DIR = "audit"
REPORT_NAME = "deid_report.json"
TEXT_VRS = frozenset({"LO", "SH", "ST", "LT", "UT", "UC", "PN"})
CLASS_UID_SUFFIXES = ("ClassUID", "TransferSyntaxUID", "CodingSchemeUID")
"""Keywords of UIDs that name a kind of thing, not an instance: never replaced."""
FILE_META_IDENTIFYING = (0x00020016, 0x00020017, 0x00020018, 0x00020100, 0x00020102)
"""Source/Sending/Receiving AE titles and private file-meta information."""
METHOD_RECORD_TAGS = (0x00120062, 0x00120063, 0x00120064)
"""PatientIdentityRemoved, DeidentificationMethod, DeidentificationMethodCodeSequence: an earlier
record is retained and added to (PS3.15 E.1.1), never cleaned or replaced."""


class BurnedInError(InputError):
    """A file that may hold burned-in text was rejected by the burned-in policy."""


# --------------------------------------------------------------------------------------------
# Settings


def parse_private_safelist(items: list[str] | tuple[str, ...]) -> tuple[tuple[str, int, int], ...]:
    """``"CREATOR:GGGG:EE"`` strings -> (creator, group, element byte) triples."""
    out = []
    for raw in items:
        parts = raw.rsplit(":", 2)
        try:
            creator, group, elem = parts[0].strip(), int(parts[1], 16), int(parts[2], 16)
        except (IndexError, ValueError):
            raise ValueError(
                f"private safelist entry {raw!r} must be CREATOR:GGGG:EE, e.g. 'SIEMENS MR HEADER:0019:0C'"
            ) from None
        if group % 2 == 0 or not 0 <= elem <= 0xFF or not creator:
            raise ValueError(
                f"private safelist entry {raw!r}: odd group and element byte 00-FF needed"
            )
        out.append((creator, group, elem))
    return tuple(out)


@dataclass(frozen=True)
class DeidSettings:
    """How :class:`Deidentifier` treats a dataset.

    Attributes:
        options: Profile options (names from
            :data:`~umit.deid.profile.OFFERED_OPTIONS`).
        burned_in: ``reject`` (default) or ``mask`` files that may carry burned-in text.
        mask_band: Fraction of the image height, from the top, blanked by ``mask``.
        mask_rects: Extra rectangles ``(x0, y0, x1, y1)`` in pixels blanked by ``mask``.
        private_safelist: ``(creator, group, element byte)`` private attributes to keep, on top
            of :data:`~umit.deid.safe_private.SAFE_PRIVATE` under ``retain-safe-private``.
    """

    options: frozenset[str] = frozenset()
    burned_in: Literal["reject", "mask"] = "reject"
    mask_band: float = 0.1
    mask_rects: tuple[tuple[int, int, int, int], ...] = ()
    private_safelist: tuple[tuple[str, int, int], ...] = ()

    def __post_init__(self) -> None:
        if self.burned_in not in ("reject", "mask"):
            raise ValueError(f"burned_in must be 'reject' or 'mask', got {self.burned_in!r}")
        if not 0.0 <= self.mask_band <= 1.0:
            raise ValueError(f"mask_band must be in [0, 1], got {self.mask_band}")
        for r in self.mask_rects:
            if len(r) != 4 or r[0] >= r[2] or r[1] >= r[3] or min(r) < 0:
                raise ValueError(f"mask rectangle {r} must be (x0, y0, x1, y1) with x0<x1, y0<y1")


# --------------------------------------------------------------------------------------------
# Value helpers


def _shift_date(value: str, days: int) -> str | None:
    """Shift a DA value (or a DA range ``a-b``); None when it cannot be parsed."""
    parts = value.strip().split("-")
    out = []
    for p in parts:
        p = p.strip()
        if not p:
            out.append("")
            continue
        try:
            d = _dt.datetime.strptime(p[:8], "%Y%m%d").date()
        except ValueError:
            return None
        if len(p) != 8:
            return None
        out.append((d + _dt.timedelta(days=days)).strftime("%Y%m%d"))
    return "-".join(out)


def _shift_datetime(value: str, days: int) -> str | None:
    """Shift the date part of a DT value (time of day and offset kept); None if unparseable."""
    v = value.strip()
    if len(v) < 8:
        return None
    shifted = _shift_date(v[:8], days)
    return None if shifted is None else shifted + v[8:]


def token_pattern(tokens: set[str] | frozenset[str]) -> re.Pattern[str] | None:
    """One case-insensitive whole-word pattern for all ``tokens`` (longest first)."""
    if not tokens:
        return None
    alternatives = "|".join(re.escape(t) for t in sorted(tokens, key=len, reverse=True))
    return re.compile(rf"(?<![A-Za-z0-9])(?:{alternatives})(?![A-Za-z0-9])", re.IGNORECASE)


def scrub_tokens(text: str, pattern: re.Pattern[str] | None) -> str:
    """Remove the file's own identifying tokens (``pattern`` from :func:`token_pattern`)."""
    if pattern is None:
        return text
    out = pattern.sub(" ", text)
    return out if out == text else re.sub(r"\s{2,}", " ", out).strip(" ,;:-/^")


def clean_text(text: str, tokens: re.Pattern[str] | None = None) -> str:
    """Remove the file's own identifying tokens (a :func:`token_pattern`) and identifier-like
    patterns (phone, e-mail, address, date, name, long IDs) from free text."""
    out = scrub_tokens(text, tokens)
    for pat in TEXT_PATTERNS.values():
        out = pat.sub(" ", out)
    return re.sub(r"\s{2,}", " ", out).strip(" ,;:-/^")


PATIENT_TOKEN_KEYWORDS = (
    "PatientID",
    "OtherPatientIDs",
    "AccessionNumber",
    "StudyID",
    "PatientBirthDate",
    "StudyDate",
    "PatientAddress",
    "MilitaryRank",
    "RequestingService",
)
INSTITUTION_TOKEN_KEYWORDS = (
    "InstitutionName",
    "InstitutionAddress",
    "InstitutionalDepartmentName",
)
DEVICE_TOKEN_KEYWORDS = ("StationName",)


def _identifying_tokens(ds: Dataset, options: frozenset[str] = frozenset()) -> set[str]:
    """Words of this file's identifiers, to clean free text with: every person name, the
    patient's IDs and dates, and the institution/station unless an option retains them."""
    keywords = set(PATIENT_TOKEN_KEYWORDS)
    if "retain-institution-identity" not in options:
        keywords.update(INSTITUTION_TOKEN_KEYWORDS)
    if "retain-device-identity" not in options:
        keywords.update(DEVICE_TOKEN_KEYWORDS)
    tokens: set[str] = set()
    for elem in ds.iterall():
        if elem.VR == "PN" or elem.keyword in keywords:
            for v in _values(elem):
                s = str(v).strip()
                if len(s) >= 3:
                    tokens.add(s)
                for w in re.split(r"[\s^,;/]+", s):
                    if len(w) >= 3 and not w.isdigit() or len(w) >= 5:
                        tokens.add(w)
    return tokens


def _is_registered_uid(value: str) -> bool:
    return UID(value).name != value


def _empty_value(vr: str) -> Any:
    return (
        ""
        if vr in TEXT_VRS or vr in ("DA", "TM", "DT", "AS", "CS", "AE", "UI", "IS", "DS", "UR")
        else None
    )


def mask_pixels(
    ds: Dataset, band: float = 0.1, rects: tuple[tuple[int, int, int, int], ...] = ()
) -> list[list[int]]:
    """Blank the top ``band`` of rows and ``rects`` in every frame; returns the regions blanked.

    The pixels are decoded (compressed data is written back uncompressed, Explicit VR Little
    Endian) and the regions set to the image minimum. Regions are ``[x0, y0, x1, y1]``.
    """
    if "PixelData" not in ds:
        raise InputError(None, "burned-in masking needs PixelData; this file has none")
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    arr = np.array(ds.pixel_array, copy=True)
    frames = arr if n_frames > 1 else arr[None]  # (F, rows, cols[, samples])
    rows, cols = int(frames.shape[1]), int(frames.shape[2])
    fill = frames.min()
    regions: list[list[int]] = []
    if band > 0:
        n = max(1, math.ceil(rows * band))
        frames[:, :n] = fill
        regions.append([0, 0, cols, n])
    for x0, y0, x1, y1 in rects:
        x0, x1 = min(x0, cols), min(x1, cols)
        y0, y1 = min(y0, rows), min(y1, rows)
        if x0 < x1 and y0 < y1:
            frames[:, y0:y1, x0:x1] = fill
            regions.append([x0, y0, x1, y1])
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    if photometric.startswith("YBR"):
        photometric = "RGB"  # pydicom decodes YBR to RGB
    ds.set_pixel_data(
        frames if n_frames > 1 else frames[0],
        photometric,
        int(ds.get("BitsStored", 8 * frames.itemsize)),
        generate_instance_uid=False,
    )
    return regions


# --------------------------------------------------------------------------------------------
# The de-identifier


class Deidentifier:
    """Applies the profile with one secret and one set of options; reusable across files."""

    def __init__(self, secret: bytes, settings: DeidSettings | None = None):
        if len(secret) < 16:
            raise ValueError(f"secret has {len(secret)} bytes; at least 16 are needed")
        self.secret = secret
        self.settings = settings or DeidSettings()
        self.profile = basic_profile()

    # -- public ---------------------------------------------------------------------------
    def uid(self, value: str) -> str:
        return replace_uid(self.secret, value)

    def deidentify(self, ds: Dataset) -> dict[str, Any]:
        """De-identify ``ds`` in place; returns its audit record (no original values in it).

        Raises:
            BurnedInError: the file may carry burned-in text and the policy is ``reject``.
        """
        s = self.settings
        options = set(s.options)
        audit: dict[str, Any] = {"burned_in": None}
        reason = burned_in_reason(ds)
        if reason is not None:
            if s.burned_in == "reject":
                raise BurnedInError(
                    None,
                    f"may carry burned-in text ({reason}); rejected by the burned-in policy "
                    "'reject' (use --burned-in mask to blank the text band instead)",
                )
            regions = mask_pixels(ds, s.mask_band, s.mask_rects)
            if not regions:
                raise InputError(None, f"burned-in masking ({reason}) had no region to blank")
            ds.BurnedInAnnotation = "NO"
            options.add("clean-pixel-data")
            audit["burned_in"] = {"reason": reason, "policy": "mask", "regions": regions}

        meta = getattr(ds, "file_meta", None)
        for kw, meta_kw in (
            ("SOPClassUID", "MediaStorageSOPClassUID"),
            ("SOPInstanceUID", "MediaStorageSOPInstanceUID"),
        ):  # some exports leave these empty in the dataset: take them from the file meta
            if not str(ds.get(kw, "") or "").strip() and meta is not None and meta.get(meta_kw):
                setattr(ds, kw, str(meta.get(meta_kw)))
        patient_key = (
            str(ds.get("PatientID", "") or "").strip()
            or str(ds.get("PatientName", "") or "").strip()
            or str(ds.get("StudyInstanceUID", "") or "").strip()
        )
        ctx = _Context(
            pseudonym=patient_pseudonym(self.secret, patient_key),
            shift=date_shift_days(self.secret, patient_key),
            tokens=token_pattern(_identifying_tokens(ds, s.options)),
            options=frozenset(s.options),
        )
        earlier = _pop_method_record(ds)
        self._walk(ds, "", ctx)
        if s.private_safelist and ctx.private_kept:
            options.add("retain-safe-private")
        self._write_method(ds, options, earlier)
        if hasattr(ds, "file_meta") and ds.file_meta is not None:
            for t in FILE_META_IDENTIFYING:
                if t in ds.file_meta:
                    del ds.file_meta[t]
                    ctx.record(
                        "file_meta." + (pydicom.datadict.keyword_for_tag(t) or str(Tag(t))), "X"
                    )
            if "SOPInstanceUID" in ds:
                ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
                ctx.record("file_meta.MediaStorageSOPInstanceUID", "U")
        audit.update(
            {
                "profile": PROFILE_NAME,
                "options": sorted(options - {"clean-pixel-data"}),
                "method_codes": [OPTION_CODES[o][0] for o in _method_options(options)],
                "earlier_method_codes": [code for code, _ in map(_code_key, earlier.items)],
                "dates": "shifted per patient"
                if "retain-modified-dates" in s.options
                else "removed",
                "private_removed": ctx.private_removed,
                "private_kept": ctx.private_kept,
                "actions": [
                    {"path": p, "action": a, "count": n}
                    for (p, a), n in sorted(ctx.actions.items())
                ],
                "action_counts": dict(Counter(a for (_, a) in ctx.actions.elements())),
            }
        )
        return audit

    # -- internals ------------------------------------------------------------------------
    def _walk(self, ds: Dataset, prefix: str, ctx: _Context, mode: str = "") -> None:
        """Apply the profile to ``ds``. ``mode`` is how unlisted text is treated: "" (scrub the
        file's own identifiers), "clean" (inside a C sequence) or "dummy" (inside a D one)."""
        self._privates(ds, prefix, ctx)
        for elem in list(ds):
            tag = elem.tag
            if tag.is_private:
                if elem.VR == "SQ":  # a safelisted private sequence: still clean inside
                    for item in elem.value or []:
                        self._walk(item, f"{prefix}{tag}[].", ctx, mode)
                continue
            name = elem.keyword or str(tag)
            path = f"{prefix}{name}"
            if tag.group in CURVE_GROUPS or tag.group in OVERLAY_GROUPS:
                del ds[tag]
                ctx.record(f"{prefix}({tag.group:04X},xxxx) curve/overlay", "X")
                continue
            entry = self.profile.get(tag)
            note = None
            if entry is not None:
                action = entry.action(ctx.options)
            elif elem.VR in ("DA", "DT"):
                # Dates the table does not list are treated like its dates (stricter than E.1-1).
                action = "C" if "retain-modified-dates" in ctx.options else "D"
                note = "unlisted date"
            elif elem.VR == "UI" and not name.endswith(CLASS_UID_SUFFIXES):
                if all(_is_registered_uid(str(v)) for v in _values(elem)):
                    continue
                action, note = "U", "unlisted UID"
            elif elem.VR == "SQ":
                action = "K"
            elif elem.VR in TEXT_VRS and mode == "dummy":
                action = "D"
            elif elem.VR in TEXT_VRS and mode == "clean":
                action = "C"
            elif elem.VR in TEXT_VRS and _has_value(elem):
                # Stricter than E.1-1: the file's own names/IDs are scrubbed from any free text.
                vals = [scrub_tokens(str(v), ctx.tokens) for v in _values(elem)]
                if vals != [str(v) for v in _values(elem)]:
                    elem.value = vals[0] if len(vals) == 1 else vals
                    ctx.record(path, "C", "own identifier in unlisted text")
                continue
            else:
                continue
            self._apply(ds, elem, action, path, ctx, mode, note)

    def _apply(
        self,
        ds: Dataset,
        elem: Any,
        action: str,
        path: str,
        ctx: _Context,
        mode: str,
        note: str | None = None,
    ) -> None:
        vr = elem.VR
        if vr == "SQ":
            if action == "X":
                del ds[elem.tag]
                ctx.record(path, "X")
            elif action == "Z":
                elem.value = DicomSequence([])
                ctx.record(path, "Z")
            else:  # K, D, U, C: keep the items, apply the profile inside them
                inner = {"D": "dummy", "C": "clean"}.get(action, mode)
                for item in elem.value or []:
                    self._walk(item, f"{path}[].", ctx, inner)
            return
        if action == "K":
            if vr in TEXT_VRS and _has_value(elem):
                # Kept by an option, but never with the file's own patient/staff names or IDs.
                vals = [scrub_tokens(str(v), ctx.tokens) for v in _values(elem)]
                if vals != [str(v) for v in _values(elem)]:
                    elem.value = vals[0] if len(vals) == 1 else vals
                    ctx.record(path, "C", "own identifier in retained text")
            return
        if action == "X":
            del ds[elem.tag]
            ctx.record(path, "X")
            return
        if action == "Z":
            if elem.keyword in ("PatientID", "PatientName"):
                elem.value = ctx.pseudonym
                ctx.record(path, "Z", "pseudonym")
            elif _has_value(elem):
                elem.value = _empty_value(vr)
                ctx.record(path, "Z")
            return
        if action == "D":
            if not _has_value(elem) and vr not in ("DA", "DT", "TM"):
                return
            dummy = DUMMY_VALUES.get(vr)
            elem.value = dummy if dummy is not None else _empty_value(vr)
            ctx.record(path, "D", note)
            return
        if action == "U":
            if vr == "UI" and _has_value(elem):
                new = [self.uid(str(v)) for v in _values(elem)]
                elem.value = new[0] if len(new) == 1 else new
                ctx.record(path, "U", note)
            elif _has_value(elem):
                elem.value = _empty_value(vr)
                ctx.record(path, "Z", "U on a non-UID value")
            return
        # action == "C"
        if vr in ("DA", "DT"):
            if not _has_value(elem):
                return
            shift = _shift_date if vr == "DA" else _shift_datetime
            new = [shift(str(v), ctx.shift) for v in _values(elem)]
            if any(n is None for n in new):
                elem.value = DUMMY_VALUES[vr]
                ctx.record(path, "D", "unparseable date")
            else:
                elem.value = new[0] if len(new) == 1 else new
                ctx.record(path, "C", "date shifted")
        elif vr in TEXT_VRS:
            if not _has_value(elem):
                return
            vals = [clean_text(str(v), ctx.tokens) for v in _values(elem)]
            elem.value = vals[0] if len(vals) == 1 else vals
            ctx.record(path, "C", "cleaned")
        elif vr in ("OB", "OW", "UN", "OD", "OF", "OL", "OV") and _has_value(elem):
            del ds[elem.tag]  # a binary value cannot be cleaned or shifted
            ctx.record(path, "X", "binary value cannot be cleaned")
        # TM and numbers under C (modified dates keep the time of day): kept

    def _privates(self, ds: Dataset, prefix: str, ctx: _Context) -> None:
        """Remove private attributes except those kept by the user safelist or by the Retain
        Safe Private option; a creator reservation stays only for a block with a kept element."""
        safelist = set(self.settings.private_safelist)
        retain_safe = "retain-safe-private" in self.settings.options
        kept_blocks: set[int] = set()
        private = [e for e in ds if e.tag.is_private]
        removed = 0
        for elem in private:
            if elem.tag.is_private_creator:
                continue
            group, offset = elem.tag.group, elem.tag.element & 0xFF
            block = Tag(group, elem.tag.element >> 8)  # (gggg,00xx) reserves (gggg,xx00-xxFF)
            creator = str(ds[block].value).strip() if block in ds else ""
            where = f"{creator}:{group:04X}:{offset:02X}"
            reason = None
            if creator and (creator, group, offset) in safelist:
                reason = "safelist"
            elif creator and retain_safe and (entry := safe_private(creator, group, offset)):
                if conforms(entry, elem.VR, elem.value):
                    reason = "safe private"
                else:
                    ctx.record(f"{prefix}(private {where})", "X", "safe private, unexpected form")
            if reason is not None:
                kept_blocks.add(int(block))
                ctx.private_kept += 1
                ctx.record(f"{prefix}(private {where})", "K", reason)
                continue
            del ds[elem.tag]
            removed += 1
        for elem in private:
            if elem.tag.is_private_creator and int(elem.tag) not in kept_blocks:
                del ds[elem.tag]
        if removed:
            ctx.private_removed += removed
            ctx.record(f"{prefix}(private attributes)", "X", count=removed)

    def _write_method(self, ds: Dataset, options: set[str], earlier: _MethodRecord) -> None:
        """Declare what was done, after any earlier record (PS3.15 E.1.1): earlier method texts
        and code items are kept in their order; ours are appended unless already there."""
        ds.PatientIdentityRemoved = "YES"
        ours = [f"UMIT {__version__} deid", "PS3.15 E.1-1 Basic Profile"] + [
            o for o in sorted(options) if o != "clean-pixel-data"
        ]
        texts = list(dict.fromkeys(earlier.texts + ours))
        ds.DeidentificationMethod = texts[0] if len(texts) == 1 else texts
        items, seen = [], set()
        for item in earlier.items:
            if _code_key(item) not in seen:
                seen.add(_code_key(item))
                items.append(item)
        for opt in _method_options(options):
            code, meaning = OPTION_CODES[opt]
            if (code, CODING_SCHEME) in seen:
                continue
            item = Dataset()
            item.CodeValue = code
            item.CodingSchemeDesignator = CODING_SCHEME
            item.CodeMeaning = meaning
            items.append(item)
        ds.DeidentificationMethodCodeSequence = DicomSequence(items)
        ds.LongitudinalTemporalInformationModified = (
            "MODIFIED" if "retain-modified-dates" in options else "REMOVED"
        )


@dataclass
class _MethodRecord:
    """An earlier de-identification record: DeidentificationMethod texts and code items."""

    texts: list[str] = field(default_factory=list)
    items: list[Dataset] = field(default_factory=list)


def _pop_method_record(ds: Dataset) -> _MethodRecord:
    """Take the earlier record out of ``ds`` (so the profile walk cannot clean or drop it)."""
    record = _MethodRecord()
    if "DeidentificationMethod" in ds:
        record.texts = [str(v).strip() for v in _values(ds["DeidentificationMethod"])]
        record.texts = [t for t in record.texts if t]
    if "DeidentificationMethodCodeSequence" in ds:
        record.items = list(ds.DeidentificationMethodCodeSequence or [])
    for tag in METHOD_RECORD_TAGS:
        if tag in ds:
            del ds[tag]
    return record


def _code_key(item: Dataset) -> tuple[str, str]:
    return (
        str(item.get("CodeValue", "") or "").strip(),
        str(item.get("CodingSchemeDesignator", "") or "").strip(),
    )


def _method_options(options: set[str]) -> list[str]:
    order = list(OPTION_CODES)
    return ["basic"] + sorted((o for o in options if o in OPTION_CODES), key=order.index)


@dataclass
class _Context:
    """Per-file state of one de-identification: keyed values, tokens and what was done."""

    pseudonym: str
    shift: int
    tokens: re.Pattern[str] | None
    options: frozenset[str]
    actions: Counter = field(default_factory=Counter)
    private_removed: int = 0
    private_kept: int = 0

    def record(self, path: str, action: str, note: str | None = None, count: int = 1) -> None:
        self.actions[(path, action + (f" ({note})" if note else ""))] += count


def _values(elem: Any) -> list[Any]:
    v = elem.value
    if v is None:
        return []
    if isinstance(v, (MultiValue, list, tuple)):
        return list(v)
    return [v]


def _has_value(elem: Any) -> bool:
    return any(str(v).strip() for v in _values(elem))


# --------------------------------------------------------------------------------------------
# Folder run


class DeidConfig(UmitConfig):
    """Settings of ``umit deid SRC --out DST``."""

    src: Path
    """A DICOM file or folder tree (any file names; non-DICOM files are skipped)."""
    out: Path
    """Output folder: <study>/<series>/<instance>.dcm named by the new UIDs, audit/, deid_report.json."""
    options: list[str] = []
    """Profile options: retain-modified-dates, retain-patient-characteristics,
    retain-device-identity, retain-institution-identity, clean-descriptors, retain-safe-private."""
    burned_in: Literal["reject", "mask"] = "reject"
    """Files that may carry burned-in text: reject (a failure row) or mask (blank regions)."""
    mask_band: float = Field(default=0.1, ge=0.0, le=1.0)
    """Top fraction of the image height blanked by burned_in=mask."""
    mask_rects: list[tuple[int, int, int, int]] = []
    """Extra rectangles (x0, y0, x1, y1), in pixels, blanked by burned_in=mask."""
    secret: Path | None = None
    """Key file or folder (default: .umit_secret beside the output folder, never inside it)."""
    keep_private: list[str] = []
    """Private attributes to keep, as CREATOR:GGGG:EE, on top of retain-safe-private's list
    (everything else private is removed)."""


@dataclass
class DeidResult:
    """What one ``umit deid`` run did."""

    out: Path
    secret_path: Path | None = None
    files: int = 0
    written: int = 0
    non_dicom: int = 0
    seconds: float = 0.0
    failures: list[tuple[Path, str]] = field(default_factory=list)
    burned_in_masked: int = 0

    @property
    def failed(self) -> int:
        return len(self.failures)


def _sniff(path: Path) -> bool | None:
    """True: Part 10 file; False: a dataset without preamble; None: not DICOM."""
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return None
    if len(head) >= 132 and head[128:132] == b"DICM":
        return True
    if len(head) >= 8 and int.from_bytes(head[0:2], "little") in (0x0002, 0x0008):
        return False
    return False if path.suffix.lower() in (".dcm", ".dicom", ".ima") else None


def output_relpath(ds: Dataset) -> Path:
    """``<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm`` of a de-identified dataset."""
    parts = [
        str(ds.get(k, "") or "unknown").strip()
        for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
    ]
    for p in parts:
        if not re.fullmatch(r"[0-9.]+|unknown", p):
            raise InputError(None, "de-identified UIDs are not valid UID strings")
    return Path(parts[0]) / parts[1] / f"{parts[2]}.dcm"


def _encode(ds: Dataset) -> bytes:
    meta = getattr(ds, "file_meta", None)
    if meta is None:
        meta = ds.file_meta = FileMetaDataset()
    if "TransferSyntaxUID" not in meta:
        implicit, little = getattr(ds, "original_encoding", (True, True))
        meta.TransferSyntaxUID = (
            ImplicitVRLittleEndian
            if implicit
            else ExplicitVRLittleEndian
            if little
            else ExplicitVRBigEndian
        )
    if "SOPClassUID" in ds:
        meta.MediaStorageSOPClassUID = ds.SOPClassUID
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def run(cfg: DeidConfig, progress: bool = True) -> DeidResult:
    """De-identify every DICOM file under ``cfg.src`` into ``cfg.out`` (see the module docstring)."""
    start = time.perf_counter()
    src, out = Path(cfg.src), Path(cfg.out)
    if not src.exists():
        raise InputError(src, "source does not exist")
    if out.resolve() == src.resolve() or src.resolve() in out.resolve().parents:
        raise InputError(out, "the output folder must not be the source folder or inside it")
    try:
        settings = DeidSettings(
            options=normalise_options(cfg.options),
            burned_in=cfg.burned_in,
            mask_band=cfg.mask_band,
            mask_rects=tuple(tuple(r) for r in cfg.mask_rects),
            private_safelist=parse_private_safelist(cfg.keep_private),
        )
    except ValueError as exc:
        raise InputError(None, str(exc)) from exc
    key, key_path = resolve_secret(cfg.secret, out)
    deid = Deidentifier(key, settings)
    out.mkdir(parents=True, exist_ok=True)
    result = DeidResult(out=out, secret_path=key_path)
    paths = [src] if src.is_file() else sorted(p for p in src.rglob("*") if p.is_file())

    report_failures = []
    for path in tqdm(paths, desc="deid", unit="file", disable=not progress):
        kind = _sniff(path)
        if kind is None or path.name.upper() == "DICOMDIR" or path.name == SECRET_NAME:
            result.non_dicom += 1
            continue
        rel_src = str(path.relative_to(src)) if path != src else path.name
        try:
            try:
                ds = pydicom.dcmread(path, force=not kind)
            except Exception as exc:
                raise InputError(None, f"unreadable DICOM ({type(exc).__name__}: {exc})") from exc
            if not kind and "SOPClassUID" not in ds:
                result.non_dicom += 1
                continue
            result.files += 1
            audit = deid.deidentify(ds)
            rel = output_relpath(ds)
            atomic_write_bytes(out / rel, _encode(ds))
            audit["source_key"] = pseudonym(key, f"source:{rel_src}", 16)
            audit["output"] = rel.as_posix()
            atomic_write_json(out / AUDIT_DIR / rel.with_suffix(".json"), audit)
            result.written += 1
            result.burned_in_masked += audit["burned_in"] is not None
        except InputError as exc:
            result.failures.append((path, exc.problem))
            report_failures.append(
                {"source_key": pseudonym(key, f"source:{rel_src}", 16), "reason": exc.problem}
            )
        except Exception as exc:  # a corrupt file must not stop the batch
            log.debug("deid failed on %s", path, exc_info=True)
            problem = f"{type(exc).__name__}: {exc}"
            result.failures.append((path, problem))
            report_failures.append(
                {"source_key": pseudonym(key, f"source:{rel_src}", 16), "reason": problem}
            )
    result.seconds = time.perf_counter() - start

    atomic_write_json(
        out / REPORT_NAME,
        {
            "umit_version": __version__,
            "profile": PROFILE_NAME,
            "options": sorted(settings.options),
            "burned_in_policy": settings.burned_in,
            "files": result.files,
            "written": result.written,
            "failed": result.failed,
            "burned_in_masked": result.burned_in_masked,
            "non_dicom_skipped": result.non_dicom,
            "seconds": round(result.seconds, 3),
            "failures": report_failures,
        },
    )
    return result
