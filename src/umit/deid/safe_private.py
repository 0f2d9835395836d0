"""Retain Safe Private Option (PS3.15 Annex E, CID 7050 code 113111): the vendor private elements
``umit deid --options retain-safe-private`` keeps.

Private attributes are removed by the Basic Profile. A few hold acquisition parameters that BIDS
converters (dcm2niix, heudiconv) need and no standard attribute carries in classic (non-enhanced)
MR objects: diffusion b-values and gradient directions, slice timing of Siemens mosaics, the
phase-encode bandwidth. :data:`SAFE_PRIVATE` lists them, one element each, as
``(private creator, group, element offset)``.

A private element is found through its creator, never by its raw tag: a file reserves a block
``(gggg,00xx)`` holding the creator's name and then writes the creator's elements at
``(gggg,xxyy)``, where ``yy`` is the element offset listed here and ``xx`` is whatever block the
file chose (``0x10`` usually, but ``0x11`` or higher when another creator came first). So
``SIEMENS MR HEADER`` B_value is ``(0019,100C)`` in one file and ``(0019,110C)`` in another, and
``(0019,100C)`` of another creator is not B_value.

Only numbers and enumerated codes are listed, and a kept value must have that form
(:func:`conforms`): a numeric VR, a numeric string (IS/DS) or one of the listed code strings. A
value of any other form (text where a number belongs) is removed like any private element.
Siemens CSA headers ``(0029,xx10)`` / ``(0029,xx20)`` are **not** listed: they are binary
containers of hundreds of protocol fields, some of them free text (protocol and sequence names,
sometimes operator or patient remarks), which cannot be checked field by field here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from pydicom.multival import MultiValue


@dataclass(frozen=True)
class SafePrivate:
    """One private element kept by the Retain Safe Private option.

    Attributes:
        vendor: Manufacturer, for the documentation.
        creator: Private creator string, exactly as the vendor writes it (trailing spaces aside).
        group: The odd group of the block.
        offset: Element byte within the block (``yy`` of ``(gggg,xxyy)``).
        name: What the element holds.
        vr: Its value representation (the vendor's; pydicom's private dictionary agrees).
        codes: For a CS element, the only values kept.
    """

    vendor: str
    creator: str
    group: int
    offset: int
    name: str
    vr: str
    codes: frozenset[str] = frozenset()

    @property
    def label(self) -> str:
        return f"{self.creator}:{self.group:04X}:{self.offset:02X}"


_SIEMENS = "SIEMENS MR HEADER"
_GE_ACQU = "GEMS_ACQU_01"
_GE_PARM = "GEMS_PARM_01"
_PHILIPS_IMG = "Philips Imaging DD 001"
_PHILIPS_MR = "Philips MR Imaging DD 001"

SAFE_PRIVATE: tuple[SafePrivate, ...] = (
    SafePrivate("Siemens", _SIEMENS, 0x0019, 0x0A, "NumberOfImagesInMosaic", "US"),
    SafePrivate("Siemens", _SIEMENS, 0x0019, 0x0B, "SliceMeasurementDuration", "DS"),
    SafePrivate("Siemens", _SIEMENS, 0x0019, 0x0C, "B_value", "IS"),
    SafePrivate(
        "Siemens",
        _SIEMENS,
        0x0019,
        0x0D,
        "DiffusionDirectionality",
        "CS",
        frozenset({"DIRECTIONAL", "NONE", "ISOTROPIC", "BMATRIX"}),
    ),
    SafePrivate("Siemens", _SIEMENS, 0x0019, 0x0E, "DiffusionGradientDirection", "FD"),
    SafePrivate("Siemens", _SIEMENS, 0x0019, 0x27, "B_matrix", "FD"),
    SafePrivate("Siemens", _SIEMENS, 0x0019, 0x28, "BandwidthPerPixelPhaseEncode", "FD"),
    SafePrivate("Siemens", _SIEMENS, 0x0019, 0x29, "MosaicRefAcqTimes", "FD"),
    SafePrivate("GE", _GE_ACQU, 0x0019, 0xBB, "User data 20 (diffusion gradient x)", "DS"),
    SafePrivate("GE", _GE_ACQU, 0x0019, 0xBC, "User data 21 (diffusion gradient y)", "DS"),
    SafePrivate("GE", _GE_ACQU, 0x0019, 0xBD, "User data 22 (diffusion gradient z)", "DS"),
    SafePrivate("GE", _GE_PARM, 0x0043, 0x39, "slop_int_6..9 (b-value in the first)", "IS"),
    SafePrivate("Philips", _PHILIPS_IMG, 0x2001, 0x03, "Diffusion B-Factor", "FL"),
    SafePrivate("Philips", _PHILIPS_MR, 0x2005, 0xB0, "Diffusion Direction RL", "FL"),
    SafePrivate("Philips", _PHILIPS_MR, 0x2005, 0xB1, "Diffusion Direction AP", "FL"),
    SafePrivate("Philips", _PHILIPS_MR, 0x2005, 0xB2, "Diffusion Direction FH", "FL"),
)
"""The private elements the Retain Safe Private option keeps (see the module docstring)."""

_BY_KEY: dict[tuple[str, int, int], SafePrivate] = {
    (e.creator, e.group, e.offset): e for e in SAFE_PRIVATE
}
BINARY_NUMBER_SIZES: dict[str, int] = {
    "US": 2,
    "SS": 2,
    "UL": 4,
    "SL": 4,
    "FL": 4,
    "FD": 8,
    "UV": 8,
    "SV": 8,
}
_IS_RE = re.compile(r"^\s*[+-]?\d{1,12}\s*$")
_DS_RE = re.compile(r"^\s*[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?\s*$")


def safe_private(creator: str, group: int, offset: int) -> SafePrivate | None:
    """The :data:`SAFE_PRIVATE` entry of ``(creator, group, element offset)``, or None."""
    return _BY_KEY.get((creator.strip(), group, offset))


def _strings(value: Any) -> list[str]:
    if isinstance(value, (bytes, bytearray)):
        text = bytes(value).decode("ascii", errors="replace").rstrip("\0 ")
        return text.split("\\") if text else []
    if isinstance(value, (MultiValue, list, tuple)):
        return [str(v) for v in value]
    return [] if value is None else [str(value)]


def conforms(entry: SafePrivate, vr: str, value: Any) -> bool:
    """True when ``value`` (of ``vr`` as read) has the form ``entry`` allows: numbers of a
    binary numeric VR, numeric strings for IS/DS, listed codes for CS. A value read as ``UN``
    (an implicit-VR file without the private dictionary) is decoded as ``entry.vr``."""
    if vr not in (entry.vr, "UN"):
        return False
    if entry.vr in BINARY_NUMBER_SIZES:
        if vr == entry.vr:
            return True  # pydicom decoded it as numbers of that VR
        return (
            isinstance(value, (bytes, bytearray))
            and len(value) % BINARY_NUMBER_SIZES[entry.vr] == 0
        )
    strings = [s.strip() for s in _strings(value)]
    if entry.vr == "IS":
        return all(_IS_RE.match(s) for s in strings if s)
    if entry.vr == "DS":
        return all(_DS_RE.match(s) for s in strings if s)
    if entry.vr == "CS":
        return all(s in entry.codes for s in strings if s)
    return False
