"""DICOM PS3.15 Annex E, Table E.1-1: the Basic Application Level Confidentiality Profile.

The table below is data, not code: one line per attribute, ``TAG BASIC [OPTION FLAGS]``, taken
from the attribute list of PS3.15 Table E.1-1 (Basic Profile column and the option columns).
Action codes (PS3.15 E.3.1):

* ``X`` remove; ``Z`` replace with a zero-length (or dummy) value; ``D`` replace with a dummy
  value of the VR; ``U`` replace the UID with a consistent, non-identifying one; ``K`` keep;
  ``C`` clean (keep after removing identifying content; for dates: shift).
* Compound codes (``X/Z``, ``X/D``, ``Z/D``, ``X/Z/D``, ``X/Z/U*``) depend on the attribute's
  Type in the IOD, which a generic tool cannot know. They resolve to the action that keeps every
  IOD valid without keeping information (:data:`COMPOUND`): an attribute that may be Type 1 gets
  a dummy, one that may be Type 2 an empty value, and reference sequences keep their items with
  UIDs replaced (so references still resolve).

Option flags (the option columns of the table; upper case = ``K`` keep, lower case = ``C``):

====  ==================================================  ===================================
flag  option (CID 7050 code)                              effect on the attribute
====  ==================================================  ===================================
T     Retain Longitudinal Temporal Information, Modified  ``C``: dates shifted per patient
      Dates (113107)
T     Retain Longitudinal Temporal Information, Full      ``K`` (not offered; ``--check``
      Dates (113106)                                      honours it in files it reads)
P/p   Retain Patient Characteristics (113108)             ``K`` (P) or ``C`` (p)
D     Retain Device Identity (113109)                     ``K``
I     Retain Institution Identity (113112)                ``K``
C     Clean Descriptors (113105)                          ``C``
U     Retain UIDs (113110; not offered: UIDs are always   ``K`` (``--check`` honours it)
      replaced)
S, G  Clean Structured Content / Graphics (113104/113103; ``C``
      not offered: the basic action applies)
====  ==================================================  ===================================

Retain Safe Private (113111) has no column in Table E.1-1: it keeps the vendor private
elements listed in :mod:`umit.deid.safe_private`. Curves (groups 50xx) and overlays (60xx) are
matched by group; private attributes (odd groups) are removed unless kept by that option or a
user safelist (see :mod:`umit.deid.engine`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache, lru_cache

from pydicom.datadict import dictionary_keyword
from pydicom.tag import BaseTag, Tag

# fmt: off
TABLE_E11 = """
00001000 U U
00001001 U U
00020003 U U
00041511 U U
00080014 U U
00080015 X T
00080018 U U
00080020 Z T
00080021 X/D T
00080022 X/Z T
00080023 Z/D T
00080024 X T
00080025 X T
0008002A X/Z/D T
00080030 Z T
00080031 X/D T
00080032 X/Z T
00080033 Z/D T
00080034 X T
00080035 X T
00080050 Z
00080058 U U
00080080 X/Z/D I
00080081 X I
00080082 X/Z/D I
00080090 Z
00080092 X
00080094 X
00080096 X
0008009C Z
0008009D X
00080201 X T
00081010 X/Z/D D
00081030 X C
0008103E X C
00081040 X I
00081041 X I
00081048 X
00081049 X
00081050 X
00081052 X
00081060 X
00081062 X
00081070 X/Z/D
00081072 X/D
00081080 X C
00081084 X C
00081110 X/Z U
00081111 X/Z/D U
00081120 X
00081140 X/Z/U* U
00081155 U U
00081195 U U
00082111 X C
00082112 X/Z/U* U
00083010 U U
00084000 X C
00100010 Z
00100020 Z
00100021 X
00100030 Z
00100032 X
00100040 Z P
00100050 X
00100101 X
00100102 X
00101000 X
00101001 X
00101002 X
00101005 X
00101010 X P
00101020 X P
00101030 X P
00101040 X
00101050 X
00101060 X
00101080 X
00101081 X
00101090 X
00101100 X
00102000 X C
00102110 X p C
00102150 X
00102152 X
00102154 X
00102155 X
00102160 X P
00102180 X C
00102203 X/Z P
00102297 X
00102299 X
001021A0 X P
001021B0 X C
001021C0 X P
001021D0 X T
001021F0 X
00104000 X C
00120010 D
00120020 D
00120021 Z
00120030 Z I
00120031 Z I
00120040 D
00120042 D
00120050 Z
00120051 X C
00120060 Z I
00120071 X
00120072 X C
00120081 D I
00120082 X
0016002B X C
0016004B X C
0016004D X
0016004E X D
0016004F X D
00160050 X D
00160051 X D
00160070 X
00160071 X
00160072 X
00160073 X
00160074 X
00160075 X
00160076 X
00160077 X
00160078 X
00160079 X
0016007A X
0016007B X
0016007C X
0016007D X
0016007E X
0016007F X
00160080 X
00160081 X
00160082 X
00160083 X
00160084 X
00160085 X
00160086 X
00160087 X
00160088 X
00160089 X
0016008A X
0016008B X
0016008C X
0016008D X T
0016008E X
00180010 Z/D C
00181000 X/Z/D D
00181002 U U D
00181004 X D
00181005 X D
00181007 X D
00181008 X D
00181009 X D
0018100A X D
0018100B U U D
00181030 X/D C
00181400 X/D C
001811BB D C
00182042 U U
00184000 X C
00185011 X D
0018700A X/D D
00189185 X C
00189367 D D
00189369 D T
0018936A D T
00189371 D D
00189373 X D
0018937B X C
0018937F X C
00189424 X C
00189516 X/D T
00189517 X/D T
00189937 X C
0018A003 X C
00200010 Z
0020000D U U
0020000E U U
00200052 U U
00200200 U U
00203401 X
00203406 X
00204000 X C
00209158 X C
00209161 U U
00209164 U U
00281199 U U
00281214 U U
00284000 X
00321020 X D
00321021 X D
00321030 X C
00321032 X
00321033 X
00321060 X/Z C
00321066 X C
00321067 X C
00321070 X C
00324000 X C
00320012 X
00340001 D
00340002 D
00340005 D
00340007 D T
00380004 X
00380010 X
00380011 X
00380014 X
0038001E X
00380020 X T
00380021 X T
00380040 X C
00380050 X p
00380060 X
00380061 X
00380062 X C
00380064 X
00380300 X
00380400 X
00380500 X p C
00384000 X C
003A0310 U U
003A0314 D T
00400001 X D
00400002 X T
00400003 X T
00400004 X T
00400005 X T
00400006 X
00400007 X C
00400009 X
0040000B X
00400010 X D
00400011 X D
00400012 X p
00400241 X D
00400242 X D
00400243 X
00400244 X T
00400245 X T
00400250 X T
00400251 X T
00400253 X
00400254 X C
00400275 X C
00400280 X C
00400310 X C
00400512 D
00400513 Z
0040050A X
0040051A X C
00400551 D
00400554 U U
00400555 X/Z S
00400562 Z
00400600 X C
00400602 X C
00400610 Z S
004006FA X
00401001 X
00401002 X C
00401004 X
00401005 X
0040100A X C
00401010 X
00401011 X
00401101 D
00401102 X
00401103 X
00401104 X
00401400 X C
00402001 X C
00402008 X
00402009 X
00402010 X
00402011 X
00402016 Z
00402017 Z
00402400 X C
00403001 X
00404005 X T
00404008 X T
00404010 X T
00404011 X T
00404023 U U
00404025 X D
00404027 X D
00404028 X D
00404030 X D
00404034 X
00404035 X
00404036 X
00404037 X
00404050 X T
00404051 X T
00404052 X T
0040A027 D
0040A073 D
0040A075 D
0040A078 X
0040A07A X
0040A07C X
0040A088 Z
0040A123 D
0040A124 U
0040A171 U U
0040A172 U U
0040A192 X T
0040A193 X T
0040A307 X
0040A352 X
0040A353 X
0040A354 X
0040A358 X
0040A402 U U
0040A730 D S
0040DB0C U U
0040DB0D U U
0050001B X
00500020 X D
00500021 X C
00620021 U U
00700001 D G
00700084 Z/D
00700086 X
0070031A U U
00701101 U U
00701102 U U
00880140 U U
00880200 X
00880904 X
00880906 X
00880910 X
00880912 X
04000100 U
04000402 X
04000403 X
04000404 X
04000550 X
04000551 X
04000552 X
04000561 X
04000600 X
20300020 X
22000002 X/Z C
22000005 X/Z
30060002 D C
30060004 X C
30060006 X C
30060008 Z T
30060009 X/D T
30060024 U U
30060026 Z C
30060028 X C
30060038 X C
30060085 X C
30060088 X C
300600A6 Z
300600C2 U U
30080054 X/D T
30080056 X/D T
30080105 X/Z D
30080250 X/D T
30080251 X/D T
300A0002 D C
300A0003 X C
300A0004 X C
300A0006 X/D T
300A0007 X/D T
300A000E X C
300A0013 U U
300A0016 X C
300A0072 X C
300A0083 U U
300A00B2 X D
300A00C3 X C
300A00DD X C
300A0196 X C
300A01A6 X C
300A01B2 X C
300A0216 X D
300A02EB X C
300A0608 D C
300A0609 U U
300A0611 Z
300A0615 Z
300A0619 D C
300A0623 D C
300A062A D C
300A0650 U U
300A0676 X C
300A067C D C
300A067D Z C
300A0700 U U
300A0734 D C
300A0736 D T
300A073A D T
300A0741 D T
300A0742 D C
300A0760 D T
300A0783 D C
300C0113 X C
300E0008 X/Z
30100006 U U
3010000B U U
3010000F Z C
30100013 U U
30100015 U U
30100017 Z C
3010001B Z
3010002D D D
30100031 U U
30100033 D C
30100034 D C
30100035 D C
30100036 X C
30100037 X C
30100038 D C
3010003B U U
30100043 Z D
3010004C X/D T
3010004D X/D T
30100054 D C
30100056 X/D C
3010005A Z C
3010005C Z C
30100061 X C
3010006E U U
3010006F U U
30100077 D C
3010007A Z C
3010007B Z C
3010007F Z C
30100081 Z C
40000010 X
40004000 X
40080042 X
40080102 X
4008010A X
4008010B X C
4008010C X
40080111 X
40080114 X
40080115 X C
40080118 X
40080119 X
4008011A X
40080202 X
40080300 X C
40084000 X C
FFFAFFFA X
FFFCFFFC X
"""
# fmt: on

COMPOUND: dict[str, str] = {
    "X/Z": "Z",
    "X/D": "D",
    "Z/D": "Z",
    "X/Z/D": "Z",
    "X/Z/U*": "U",
}
"""How a compound code resolves when the IOD Type is unknown (see the module docstring)."""

CURVE_GROUPS = range(0x5000, 0x5020, 2)
"""Repeating groups of curve data (retired; Table E.1-1 "Curve Data" 50xx,xxxx: X)."""
OVERLAY_GROUPS = range(0x6000, 0x6020, 2)
"""Repeating groups of overlays (Table E.1-1 "Overlay Data/Comments" 60xx: X)."""

OPTION_FLAGS: dict[str, tuple[str, str]] = {
    "retain-modified-dates": ("T", "C"),
    "retain-patient-characteristics": ("P", "K"),
    "retain-device-identity": ("D", "K"),
    "retain-institution-identity": ("I", "K"),
    "clean-descriptors": ("C", "C"),
    "retain-full-dates": ("T", "K"),
    "retain-uids": ("U", "K"),
}
"""Options that change a Table E.1-1 action -> (flag in the table, action it selects). ``p``
(lower case) is the patient-characteristics flag whose action is ``C``. ``retain-full-dates``
and ``retain-uids`` are here so that ``umit deid --check`` can judge files another tool wrote
with them; ``umit deid`` does not offer them (:data:`NOT_OFFERED`)."""

OFFERED_OPTIONS: tuple[str, ...] = (
    "retain-modified-dates",
    "retain-patient-characteristics",
    "retain-device-identity",
    "retain-institution-identity",
    "clean-descriptors",
    "retain-safe-private",
)
"""The ``--options`` names ``umit deid`` accepts. ``retain-safe-private`` has no table flag: it
keeps the vendor private elements of :data:`umit.deid.safe_private.SAFE_PRIVATE`."""

NOT_OFFERED: dict[str, str] = {
    "retain-full-dates": "real dates identify; use retain-modified-dates (shifted per patient)",
    "retain-uids": "original UIDs link back to the source PACS; UIDs are always replaced",
    "clean-pixel-data": "declared by --burned-in mask when pixels are blanked",
    "clean-recognizable-visual-features": "faces are removed by `umit deface`",
    "clean-graphics": "not implemented: overlays and curves are removed",
    "clean-structured-content": "not implemented: SR content is dummied (the basic action)",
}
"""PS3.15 options ``umit deid`` does not offer, with the reason given to a user who asks."""

OPTION_ALIASES: dict[str, str] = {
    "retain-dates": "retain-modified-dates",
    "retain-longitudinal-modified-dates": "retain-modified-dates",
    "retain-patient-chars": "retain-patient-characteristics",
    "retain-device-id": "retain-device-identity",
    "retain-institution-id": "retain-institution-identity",
    "retain-private": "retain-safe-private",
}

OPTION_CODES: dict[str, tuple[str, str]] = {
    "basic": ("113100", "Basic Application Confidentiality Profile"),
    "clean-pixel-data": ("113101", "Clean Pixel Data Option"),
    "clean-recognizable-visual-features": (
        "113102",
        "Clean Recognizable Visual Features Option",
    ),
    "clean-graphics": ("113103", "Clean Graphics Option"),
    "clean-structured-content": ("113104", "Clean Structured Content Option"),
    "clean-descriptors": ("113105", "Clean Descriptors Option"),
    "retain-full-dates": (
        "113106",
        "Retain Longitudinal Temporal Information Full Dates Option",
    ),
    "retain-modified-dates": (
        "113107",
        "Retain Longitudinal Temporal Information Modified Dates Option",
    ),
    "retain-patient-characteristics": ("113108", "Retain Patient Characteristics Option"),
    "retain-device-identity": ("113109", "Retain Device Identity Option"),
    "retain-uids": ("113110", "Retain UIDs Option"),
    "retain-safe-private": ("113111", "Retain Safe Private Option"),
    "retain-institution-identity": ("113112", "Retain Institution Identity Option"),
}
"""CID 7050 (De-identification Method) codes, scheme ``DCM``: the ones ``umit deid`` writes to
DeidentificationMethodCodeSequence, and the ones ``--check`` reads from files."""
CODE_TO_OPTION: dict[str, str] = {code: name for name, (code, _) in OPTION_CODES.items()}
CODING_SCHEME = "DCM"
"""Coding scheme designator of the CID 7050 codes."""


@dataclass(frozen=True)
class ProfileEntry:
    """One row of Table E.1-1.

    Attributes:
        tag: The attribute tag.
        keyword: Its DICOM keyword (from pydicom's dictionary; "" when retired/unknown).
        basic: Basic Profile code as printed in the table (may be compound, e.g. ``X/Z``).
        flags: Option flags of the row (see the module docstring).
    """

    tag: BaseTag
    keyword: str
    basic: str
    flags: str = ""

    @property
    def basic_action(self) -> str:
        """The Basic Profile code with compound codes resolved (:data:`COMPOUND`)."""
        return COMPOUND.get(self.basic, self.basic)

    def action(self, options: frozenset[str] = frozenset()) -> str:
        """The action for this attribute under ``options`` (names from :data:`OPTION_FLAGS`).

        A keep (``K``) option wins over a clean (``C``) one, which wins over the basic action.
        """
        chosen = self.basic_action
        rank = {"K": 2, "C": 1}
        best = 0
        for opt in options:
            if opt not in OPTION_FLAGS:  # e.g. retain-safe-private: no table column
                continue
            flag, code = OPTION_FLAGS[opt]
            if flag == "P" and "p" in self.flags:
                code = "C"
            elif flag not in self.flags:
                continue
            if rank[code] > best:
                chosen, best = code, rank[code]
        return chosen


@dataclass(frozen=True)
class Profile:
    """Table E.1-1 as a lookup: tag -> :class:`ProfileEntry`."""

    entries: dict[int, ProfileEntry] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, tag: int) -> ProfileEntry | None:
        return self.entries.get(int(tag))


def parse_table(text: str = TABLE_E11) -> Profile:
    """Parse the compact table text into a :class:`Profile` (duplicate tags are an error)."""
    entries: dict[int, ProfileEntry] = {}
    for n, line in enumerate(text.strip().splitlines(), 1):
        parts = line.split()
        if len(parts) < 2:
            raise ValueError(f"Table E.1-1 line {n}: expected 'TAG CODE [FLAGS]', got {line!r}")
        tag = Tag(int(parts[0], 16))
        if int(tag) in entries:
            raise ValueError(f"Table E.1-1 line {n}: duplicate tag {tag}")
        if parts[1] not in ("X", "Z", "D", "U", "K", "C") and parts[1] not in COMPOUND:
            raise ValueError(f"Table E.1-1 line {n}: unknown action code {parts[1]!r}")
        try:
            keyword = dictionary_keyword(tag)
        except KeyError:
            keyword = ""
        entries[int(tag)] = ProfileEntry(tag, keyword, parts[1], "".join(parts[2:]))
    return Profile(entries)


@lru_cache(maxsize=1)
def basic_profile() -> Profile:
    """The parsed Table E.1-1 (cached)."""
    return parse_table()


def normalise_options(options: str | list[str] | tuple[str, ...] | None) -> frozenset[str]:
    """Option names from a comma-separated string or a list.

    Raises:
        ValueError: an unknown name, or a PS3.15 option ``umit deid`` does not offer (the
            message names it and why).
    """
    if options is None:
        return frozenset()
    items = options.split(",") if isinstance(options, str) else list(options)
    out = set()
    for raw in items:
        name = raw.strip().lower().replace("_", "-")
        if not name:
            continue
        name = OPTION_ALIASES.get(name, name)
        if name in NOT_OFFERED:
            raise ValueError(
                f"de-identification option {raw!r} ({OPTION_CODES[name][1]}, "
                f"{OPTION_CODES[name][0]}) is not offered: {NOT_OFFERED[name]}"
            )
        if name not in OFFERED_OPTIONS:
            known = ", ".join(sorted(OFFERED_OPTIONS))
            raise ValueError(f"unknown de-identification option {raw!r}; known options: {known}")
        out.add(name)
    return frozenset(out)


@cache
def _by_keyword() -> dict[str, ProfileEntry]:
    return {e.keyword: e for e in basic_profile().entries.values() if e.keyword}


def entry_for(keyword: str) -> ProfileEntry | None:
    """The Table E.1-1 row of a DICOM keyword, or None when the table does not list it."""
    return _by_keyword().get(keyword)


def profile_keeps(keyword: str, options: frozenset[str] = frozenset()) -> bool:
    """True when the profile keeps the attribute's value under ``options``.

    An attribute the table does not list is kept (:class:`~umit.deid.engine.Deidentifier` leaves
    unlisted standard attributes alone); a listed one only when its action is ``K`` or ``C``
    (kept after cleaning).
    """
    entry = entry_for(keyword)
    return entry is None or entry.action(options) in ("K", "C")


def identifying_keywords(options: frozenset[str] = frozenset()) -> frozenset[str]:
    """Keywords whose original value never survives the profile under ``options``.

    The rows whose action is X, Z, D or U: removed, emptied, dummied or replaced. The one list of
    "identifying attributes" for tests and benchmarks (e.g. which real-data placeholders must
    not survive); rows kept or cleaned under ``options`` are not in it.
    """
    return frozenset(
        e.keyword
        for e in basic_profile().entries.values()
        if e.keyword and e.action(options) in ("X", "Z", "D", "U")
    )


# --------------------------------------------------------------------------------------------
# Dummy values (action D, and Z where a value must stay) and the pseudonym form

DUMMY_TEXT = "ANONYMIZED"
DUMMY_VALUES: dict[str, str | int | float] = {
    "PN": DUMMY_TEXT,
    "LO": DUMMY_TEXT,
    "SH": DUMMY_TEXT,
    "CS": DUMMY_TEXT,
    "ST": DUMMY_TEXT,
    "LT": DUMMY_TEXT,
    "UT": DUMMY_TEXT,
    "UC": DUMMY_TEXT,
    "AE": DUMMY_TEXT,
    "DA": "19000101",
    "TM": "000000",
    "DT": "19000101000000",
    "AS": "000D",
    "IS": "0",
    "DS": "0",
    "US": 0,
    "SS": 0,
    "UL": 0,
    "SL": 0,
    "UV": 0,
    "SV": 0,
    "FL": 0.0,
    "FD": 0.0,
}
"""The dummy written for action ``D``, by VR (PS3.15 E.3.1: "a non-zero length value that may be
a dummy value and consistent with the VR"). The checker accepts exactly these."""

PSEUDONYM_PREFIX = "UMIT-"
"""PatientID/PatientName become ``UMIT-<12 hex>``, the keyed pseudonym that ``umit ingest`` also
uses as subject id (the same secret gives the same value)."""


# --------------------------------------------------------------------------------------------
# Burned-in annotation: which objects may carry text in their pixels

SECONDARY_CAPTURE_SOP_PREFIX = "1.2.840.10008.5.1.4.1.1.7"
"""Secondary Capture Image Storage and its multi-frame variants (.7.1 - .7.4)."""
ULTRASOUND_SOP_CLASSES = frozenset(
    {
        "1.2.840.10008.5.1.4.1.1.6.1",  # Ultrasound Image Storage
        "1.2.840.10008.5.1.4.1.1.3.1",  # Ultrasound Multi-frame Image Storage
        "1.2.840.10008.5.1.4.1.1.6.2",  # Enhanced US Volume Storage
    }
)
ALWAYS_BURNED_IN_MODALITIES = frozenset({"SC", "OT", "DOC"})
"""Screen captures and document scans: treated as carrying text whatever they declare."""
LIKELY_BURNED_IN_MODALITIES = frozenset({"US", "XC", "ES", "GM"})
"""Ultrasound, photographs, endoscopy: treated as carrying text unless BurnedInAnnotation=NO."""
SCREEN_IMAGE_TYPES = frozenset({"SCREEN SAVE", "SCREENSHOT", "SCREEN CAPTURE"})


def burned_in_reason(ds) -> str | None:
    """Why a dataset may carry burned-in text in its pixels, or None.

    Policy, not OCR: ``BurnedInAnnotation`` = YES; secondary captures, screen saves and modalities
    SC/OT/DOC whatever they declare; ultrasound (by SOP class or modality US) and photographic
    modalities unless they declare ``BurnedInAnnotation`` = NO.
    """
    flag = str(ds.get("BurnedInAnnotation", "") or "").strip().upper()
    if flag == "YES":
        return "BurnedInAnnotation is YES"
    sop = str(ds.get("SOPClassUID", "") or "")
    modality = str(ds.get("Modality", "") or "").strip().upper()
    image_type = ds.get("ImageType") or []
    image_type = {
        str(v).strip().upper()
        for v in ([image_type] if isinstance(image_type, str) else image_type)
    }
    if sop.startswith(SECONDARY_CAPTURE_SOP_PREFIX):
        return "secondary capture (SOP class may hold burned-in text)"
    if modality in ALWAYS_BURNED_IN_MODALITIES:
        return f"modality {modality} (screen capture / document: may hold burned-in text)"
    if image_type & SCREEN_IMAGE_TYPES:
        return f"ImageType {sorted(image_type & SCREEN_IMAGE_TYPES)[0]}"
    if flag != "NO" and (sop in ULTRASOUND_SOP_CLASSES or modality in LIKELY_BURNED_IN_MODALITIES):
        kind = "ultrasound" if (sop in ULTRASOUND_SOP_CLASSES or modality == "US") else modality
        return f"{kind} without BurnedInAnnotation=NO (often carries burned-in text)"
    return None
