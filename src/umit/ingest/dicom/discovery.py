"""Reading and discovery: file sniffing, header-only reads and grouping files into series.

:func:`is_dicom_file` tells DICOM files apart by preamble, dataset start or suffix;
:func:`discover_series` walks a folder tree, reads headers only (truncated and corrupt files are
counted as unreadable, never fatal), groups the files by SeriesInstanceUID and hands each group
to :mod:`~umit.ingest.dicom.stacks` to be split into loadable stacks.
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from tqdm import tqdm

from umit.deid.profile import burned_in_reason
from umit.errors import InputError
from umit.ingest.dicom.attributes import _floats, _int, _str
from umit.ingest.dicom.series import SeriesList, _Header
from umit.ingest.dicom.stacks import _split_group

logger = logging.getLogger(__name__)


DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"
DICOM_SUFFIXES = (".dcm", ".dicom", ".dic", ".ima")
"""File suffixes that claim a file is DICOM even without the ``DICM`` preamble."""


_HEADER_DEFER_BYTES = 1024  # header reads skip (defer) values larger than this: pixel data


def _sniff(path: Path) -> str | None:
    """'part10' (DICM preamble), 'raw' (no preamble, starts like a dataset), 'named' (DICOM
    suffix only) or None (not DICOM)."""
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return "named"  # unreadable file: let dcmread report why
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "part10"
    if len(head) >= 8:
        group = int.from_bytes(head[0:2], "little")
        element = int.from_bytes(head[2:4], "little")
        if group in (0x0002, 0x0008) and element < 0x0100:
            return "raw"
    if path.suffix.lower() in DICOM_SUFFIXES:
        return "named"
    return None


def is_dicom_file(path: Path) -> bool:
    """Whether ``path`` looks like a DICOM file (preamble, raw dataset start, or suffix)."""
    return _sniff(Path(path)) is not None


def _is_image_sop(ds: Dataset) -> bool:
    sop = ds.get("SOPClassUID") or getattr(ds.get("file_meta"), "MediaStorageSOPClassUID", None)
    try:
        return sop is not None and "Image Storage" in pydicom.uid.UID(str(sop)).name
    except Exception:  # an unknown UID: judge by the image attributes alone
        return False


def _incomplete(ds: Dataset, path: Path) -> str | None:
    """Why a header-read file is truncated/corrupt, or None if it looks complete."""
    elem = ds.get_item(0x7FE00010, keep_deferred=True)
    has_geometry = "Rows" in ds and "Columns" in ds
    if elem is None:
        if has_geometry or _is_image_sop(ds):
            return "truncated or corrupt: image header without pixel data"
        return None
    if not has_geometry:
        return "corrupt: pixel data without Rows/Columns"
    length = getattr(elem, "length", None)
    if length is None or length == 0xFFFFFFFF:
        return None  # encapsulated (compressed) data: checked when decoded
    value = elem.value
    size = os.path.getsize(path)
    tell = getattr(elem, "value_tell", None)
    if value is None and tell is not None and tell + length > size:
        return f"truncated: pixel data needs {length} bytes from offset {tell}, file has {size}"
    if value is not None and len(value) < length:
        return f"truncated: pixel data has {len(value)} of {length} bytes"
    try:
        expected = (
            int(ds.Rows)
            * int(ds.Columns)
            * int(ds.get("SamplesPerPixel", 1) or 1)
            * int(ds.get("NumberOfFrames", 1) or 1)
            * int(ds.get("BitsAllocated", 16) or 16)
            + 7
        ) // 8
    except (TypeError, ValueError):
        return "corrupt: invalid image size attributes"
    if length < expected:
        return f"truncated or corrupt: pixel data has {length} bytes, the header needs {expected}"
    return None


def _read_header(path: Path, kind: str) -> Dataset:
    # Header only: pixel data is skipped (deferred, not loaded), which still lets us see its
    # length and catch truncated files here rather than at load time.
    return pydicom.dcmread(path, defer_size=_HEADER_DEFER_BYTES, force=kind != "part10")


def _header(ds: Dataset, path: Path) -> _Header | str:
    """Parse what grouping needs; a string is the reason the file is no image to stack."""
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        sop = ds.get("SOPClassUID")
        name = pydicom.uid.UID(str(sop)).name if sop else "unknown SOP class"
        return f"non-image DICOM object ({name})"
    multiframe = (
        "PerFrameFunctionalGroupsSequence" in ds or (_int(ds.get("NumberOfFrames")) or 1) > 1
    )
    iop = None
    if not multiframe:
        iop = _floats(ds.get("ImageOrientationPatient", []), 6)
    image_type = ds.get("ImageType") or []
    image_type = [
        str(v).upper() for v in (image_type if not isinstance(image_type, str) else [image_type])
    ]
    series_uid = _str(ds, "SeriesInstanceUID") or f"no-series-uid:{path.parent}"
    return _Header(
        path=path,
        series_uid=series_uid,
        study_uid=_str(ds, "StudyInstanceUID"),
        patient_id=_str(ds, "PatientID") or None,
        sop_uid=_str(ds, "SOPInstanceUID") or str(path),
        modality=_str(ds, "Modality") or "unknown",
        description=_str(ds, "SeriesDescription"),
        series_number=_int(ds.get("SeriesNumber")),
        rows=int(ds.Rows),
        cols=int(ds.Columns),
        iop=iop,
        localizer="LOCALIZER" in image_type,
        n_frames=_int(ds.get("NumberOfFrames")) or 1,
        multiframe=multiframe,
        burned_in=burned_in_reason(ds),
        accession=_str(ds, "AccessionNumber") or None,
    )


def _walk(root: Path) -> list[Path]:
    if root.is_file():
        return [root]
    paths: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        paths.extend(Path(dirpath) / name for name in sorted(filenames))
    return paths


def discover_series(
    root: str | Path,
    progress: bool = False,
    *,
    exclude: Callable[[Path], bool] | None = None,
) -> tuple[SeriesList, list[tuple[Path, str]]]:
    """Find the DICOM image stacks under ``root`` (a folder tree, any file names, or one file).

    Reads headers only. Files are grouped by SeriesInstanceUID, then split by orientation and
    image size; localizers (ImageType LOCALIZER, scouts of a few images in several orientations,
    small orientation minorities) are set aside: listed in the series' ``skipped`` (or the
    list's, when nothing of the series is left) and reported per series in ``set_aside``. Each
    enhanced multi-frame file is its own stack.

    Args:
        root: Folder to walk (recursively) or a single file.
        progress: Show a progress bar over the files.
        exclude: Files for which this returns True are ignored (not read, not counted), e.g.
            NIfTI files or collections that another reader handles.

    Returns:
        ``(series, unreadable)``: ``series`` is a :class:`SeriesList` (a list of
        :class:`DicomSeries`, ordered by study, series number and UID, whose ``unreadable``,
        ``skipped``, ``set_aside``, ``n_non_dicom`` and ``n_dicomdir`` report the files left
        out);
        ``unreadable`` is ``series.unreadable``, the ``(path, reason)`` of files that claim to be
        DICOM but are truncated or corrupt.
    """
    root = Path(root)
    if not root.exists():
        raise InputError(root, "no such folder")
    paths = _walk(root)
    result = SeriesList()
    groups: dict[str, list[_Header]] = defaultdict(list)
    iterator: Iterable[Path] = paths
    if progress:
        iterator = tqdm(paths, desc=f"scanning {root.name or root}", unit="file")
    for path in iterator:
        if exclude is not None and exclude(path):
            continue
        if path.name.upper() == "DICOMDIR":
            result.n_dicomdir += 1
            continue
        kind = _sniff(path)
        if kind is None:
            result.n_non_dicom += 1
            continue
        try:
            ds = _read_header(path, kind)
        except Exception as exc:  # pydicom raises many types on corrupt input
            if kind == "raw":  # only looked like a dataset: not DICOM after all
                result.n_non_dicom += 1
            else:
                result.unreadable.append((path, f"corrupt DICOM ({type(exc).__name__}: {exc})"))
            continue
        sop_class = str(
            ds.get("SOPClassUID") or getattr(ds.get("file_meta"), "MediaStorageSOPClassUID", "")
        )
        if sop_class == DICOMDIR_SOP_CLASS:
            result.n_dicomdir += 1
            continue
        if kind != "part10" and "SOPClassUID" not in ds and "SeriesInstanceUID" not in ds:
            if kind == "raw":
                result.n_non_dicom += 1
            else:
                result.unreadable.append(
                    (path, "not a valid DICOM file (no DICOM attributes found)")
                )
            continue
        reason = _incomplete(ds, path)
        if reason is not None:
            result.unreadable.append((path, reason))
            continue
        try:
            header = _header(ds, path)
        except Exception as exc:
            result.unreadable.append((path, f"corrupt DICOM header ({type(exc).__name__}: {exc})"))
            continue
        if isinstance(header, str):
            result.skipped.append((path, header))
            continue
        groups[header.series_uid].append(header)

    for headers in groups.values():
        result.extend(_split_group(headers, result))
    result.sort(
        key=lambda s: (
            s.study_uid,
            s.series_number if s.series_number is not None else 1 << 62,
            s.series_uid,
            -s.n_slices,
            s.stack_tag,
        )
    )
    if result.unreadable:
        logger.warning("%s: %d unreadable DICOM file(s)", root, len(result.unreadable))
    return result, result.unreadable
