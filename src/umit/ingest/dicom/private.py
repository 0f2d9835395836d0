"""Vendor private attributes, found by their private creator, and the Siemens CSA image header.

A private element lives in a block that its creator reserves (e.g. ``(0019,0010) = "SIEMENS MR
HEADER"`` reserves ``(0019,10xx)``), so it is looked up by creator and offset, never by a fixed
tag. Values may arrive as text (IS/DS), numbers, or raw bytes (VR UN after a transfer through a
system that did not know the tag); :func:`private_numbers` turns each into floats.
"""

from __future__ import annotations

import numpy as np
from pydicom.datadict import get_private_entry
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset

from umit.ingest.dicom.csa import parse_csa

SIEMENS_MR = "SIEMENS MR HEADER"
SIEMENS_CSA = "SIEMENS CSA HEADER"

_BINARY = {"US": "<u2", "SS": "<i2", "UL": "<u4", "SL": "<i4", "FL": "<f4", "FD": "<f8"}


def private_element(ds: Dataset, group: int, creator: str, offset: int) -> DataElement | None:
    """The element at ``offset`` (0x00-0xFF) in the block ``creator`` reserves in ``group``."""
    try:
        return ds.private_block(group, creator)[offset]
    except KeyError:
        return None


def private_numbers(ds: Dataset, group: int, creator: str, offset: int) -> np.ndarray | None:
    """The numeric value(s) of a private element as float64, or None when absent or not numeric."""
    elem = private_element(ds, group, creator, offset)
    if elem is None or elem.value is None:
        return None
    value = elem.value
    if isinstance(value, bytes):  # VR UN: decode by the private dictionary's VR
        try:
            vr = get_private_entry(elem.tag, creator)[0]
        except KeyError:
            return None
        if vr in _BINARY:
            if len(value) % np.dtype(_BINARY[vr]).itemsize:
                return None
            return np.frombuffer(value, dtype=_BINARY[vr]).astype(np.float64)
        value = value.decode("latin-1").strip("\0 ").split("\\")
    items = (
        value
        if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue"
        else [value]
    )
    try:
        out = np.asarray([float(v) for v in items], dtype=np.float64)
    except (TypeError, ValueError):
        return None
    return out if out.size and np.all(np.isfinite(out)) else None


def image_csa(ds: Dataset) -> dict[str, list[str]] | None:
    """The parsed Siemens CSA image header (0029,xx10), or None when the file has none.

    Raises:
        CsaError: the header is present but cannot be parsed.
    """
    elem = private_element(ds, 0x0029, SIEMENS_CSA, 0x10)
    if elem is None or not elem.value:
        return None
    return parse_csa(elem.value)
