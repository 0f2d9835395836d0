"""Siemens CSA header parser: the binary (SV10) blob in private tag (0029,xx10) -> tag values.

Siemens MR files carry a "CSA image header" (private creator ``SIEMENS CSA HEADER``, element
``xx10``) that holds what no public attribute does: ``NumberOfImagesInMosaic``,
``SliceNormalVector``, ``MosaicRefAcqTimes``, ``B_value``, ``DiffusionGradientDirection``,
``B_matrix`` and more. The layout (SV10, "CSA2") is little-endian::

    "SV10" + 4 unused bytes, n_tags (uint32), 1 unused uint32
    per tag:  name (64 bytes, NUL-terminated), vm (int32), vr (4 bytes), syngodt (int32),
              n_items (int32), a marker (int32: 77 or 205)
    per item: 4 int32 (the item's byte length is the second), then the value as text,
              padded to a multiple of 4 bytes

Only the first ``vm`` items of a tag hold values (all ``n_items`` when ``vm`` is 0); values are
NUL-terminated text. The old CSA1 layout (no "SV10" signature, used before syngo VB13) is not
read: :func:`parse_csa` says so.
"""

from __future__ import annotations

import struct

import numpy as np

MAX_CSA_TAGS = 1000
"""More tags (or items in one tag) than this means the blob is not a CSA header."""

_TAG = struct.Struct("<64si4siii")  # name, vm, vr, syngodt, n_items, marker
_ITEM = struct.Struct("<4i")  # the item's byte length is the second value


class CsaError(ValueError):
    """A CSA header that cannot be parsed (wrong signature, truncated, implausible counts)."""


def _text(raw: bytes) -> str:
    """A NUL-terminated, possibly space-padded string."""
    return raw.split(b"\0", 1)[0].decode("latin-1").strip()


def parse_csa(data: bytes) -> dict[str, list[str]]:
    """Parse an SV10 CSA header into ``{tag name: [value text, ...]}``.

    Args:
        data: The raw bytes of the CSA element.

    Returns:
        For each tag, its value items as stripped strings, trailing empty items dropped (a tag
        without values maps to an empty list).

    Raises:
        CsaError: not SV10, truncated, or with implausible tag/item counts.
    """
    data = bytes(data)
    if data[:4] != b"SV10":
        raise CsaError(
            f"not an SV10 CSA header (starts with {data[:4]!r}; the CSA1 layout is not read)"
        )
    if len(data) < 16:
        raise CsaError(f"CSA header of {len(data)} bytes is truncated")
    n_tags = struct.unpack_from("<I", data, 8)[0]
    if not 0 < n_tags <= MAX_CSA_TAGS:
        raise CsaError(f"CSA header claims {n_tags} tags (expected 1 to {MAX_CSA_TAGS})")
    pos = 16
    tags: dict[str, list[str]] = {}
    for t in range(n_tags):
        if pos + _TAG.size > len(data):
            raise CsaError(f"CSA header truncated in tag {t + 1} of {n_tags}")
        raw_name, vm, _vr, _syngodt, n_items, _marker = _TAG.unpack_from(data, pos)
        pos += _TAG.size
        name = _text(raw_name)
        if not 0 <= n_items <= MAX_CSA_TAGS or vm < 0:
            raise CsaError(f"CSA tag {name!r}: implausible vm {vm} / item count {n_items}")
        n_values = vm if vm > 0 else n_items
        values: list[str] = []
        for i in range(n_items):
            if pos + _ITEM.size > len(data):
                raise CsaError(f"CSA header truncated in tag {name!r}, item {i + 1}")
            length = _ITEM.unpack_from(data, pos)[1]
            pos += _ITEM.size
            if length < 0 or pos + length > len(data):
                raise CsaError(f"CSA tag {name!r}, item {i + 1}: length {length} runs past the end")
            if i < n_values:
                values.append(_text(data[pos : pos + length]))
            pos += length + (-length % 4)  # items are padded to 4 bytes
        while values and not values[-1]:  # unused trailing items
            values.pop()
        tags[name] = values
    return tags


def csa_floats(tags: dict[str, list[str]], name: str) -> np.ndarray | None:
    """The non-empty numeric values of tag ``name`` as float64, or None (absent, empty, not numbers)."""
    values = [v for v in tags.get(name, []) if v]
    if not values:
        return None
    try:
        out = np.asarray([float(v) for v in values], dtype=np.float64)
    except ValueError:
        return None
    return out if np.all(np.isfinite(out)) else None
