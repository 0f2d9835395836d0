"""DICOM series discovery, slice sorting and geometry: folders of files -> ``(array, ImageMeta)``.

Two steps, so that a batch ingest can list, key and resume work before touching pixels:

* :func:`discover_series` walks a folder tree, reads headers only, groups files by
  SeriesInstanceUID and splits each group into stacks of one orientation and one image size
  (localizers/scouts mixed into a series are dropped and reported). Enhanced multi-frame files
  are one stack each. Unreadable, truncated and non-DICOM files are counted, never fatal.
* :func:`load_series` reads the pixels of one stack, applies the rescale, sorts slices by their
  position along the slice normal (never by file name or InstanceNumber), checks the spacing and
  builds the RAS affine from ImageOrientationPatient, PixelSpacing and the measured slice step.

Array convention (the same as nibabel/ITK): ``i`` = column index, ``j`` = row index, ``k`` =
slice, optionally ``t`` (4D: several images per position). In DICOM's LPS world the voxel
``(i, j, k)`` lies at ``IPP_0 + i * col_spacing * row_cosine + j * row_spacing * col_cosine +
k * step``, where PixelSpacing = (row spacing, column spacing) and ImageOrientationPatient =
(row cosine, column cosine); the affine is that matrix converted to RAS.

Identifiers: :class:`DicomSeries` carries the raw PatientID only as ``patient_key`` so that
``umit ingest`` can derive a keyed pseudonym; it is hidden from ``repr`` and never copied into
:class:`~umit.data.meta.ImageMeta`, whose ``extra`` holds only the attributes listed in
:data:`EXTRA_FIELDS`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from umit.data.meta import LPS_TO_RAS, ImageMeta
from umit.deid.allowlist import READER_FIELDS
from umit.deid.profile import burned_in_reason
from umit.errors import GeometryError, InputError

logger = logging.getLogger(__name__)

DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"
DICOM_SUFFIXES = (".dcm", ".dicom", ".dic", ".ima")
"""File suffixes that claim a file is DICOM even without the ``DICM`` preamble."""

IOP_TOLERANCE = 1e-3
"""Direction cosines that differ by less than this belong to the same orientation."""
POSITION_TOLERANCE_MM = 1e-2
"""Slices closer than this along the normal share a position (a 4D series)."""
LOCALIZER_MAX_SLICES = 3
"""Stacks with fewer slices that look like localizers are dropped (and reported)."""

EXTRA_FIELDS: tuple[str, ...] = READER_FIELDS
"""The only keys :func:`load_series` puts in ``ImageMeta.extra``: the reader fields of the
allowlist derived from the Annex E profile (:mod:`umit.deid.allowlist`); none identifies a person."""

_HEADER_DEFER_BYTES = 1024  # header reads skip (defer) values larger than this: pixel data


# --------------------------------------------------------------------------------------------
# Public data types


@dataclass
class DicomSeries:
    """One stack of DICOM images to be read as one volume.

    Attributes:
        series_uid: SeriesInstanceUID (several stacks of one series share it; see ``key``).
        study_uid: StudyInstanceUID.
        patient_key: The raw PatientID. Identifying: only for ingest's keyed pseudonym; never
            logged (hidden from ``repr``) and never put in ImageMeta.
        files: The files of this stack (one file for an enhanced multi-frame image).
        modality: DICOM Modality ("CT", "MR", ...).
        description: SeriesDescription.
        n_slices: Number of images (frames) in the stack, all time points included.
        skipped: ``(path, reason)`` of files of this series left out (localizers, orientation
            minorities, duplicates).
        stack_tag: Orientation/size of this stack (or the multi-frame file's instance), which
            tells apart stacks of one series.
        multiframe: True for an enhanced (multi-frame) file.
        series_number: SeriesNumber, when present (for ordering).
    """

    series_uid: str
    study_uid: str
    patient_key: str | None = field(repr=False)
    files: list[Path]
    modality: str
    description: str
    n_slices: int
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    stack_tag: str = ""
    multiframe: bool = False
    series_number: int | None = None
    burned_in: list[tuple[Path, str]] = field(default_factory=list, repr=False)
    """``(path, reason)`` of files that may carry burned-in text (see
    :func:`umit.deid.profile.burned_in_reason`); ``umit ingest`` rejects or masks them."""

    @property
    def key(self) -> str:
        """Stable sha256 hex of the series UID and stack tag: the same stack, the same key."""
        return hashlib.sha256(f"{self.series_uid}|{self.stack_tag}".encode()).hexdigest()

    @property
    def folder(self) -> Path:
        """Common parent folder of the files."""
        return Path(os.path.commonpath([str(p.parent) for p in self.files]))


class SeriesList(list):
    """``list[DicomSeries]`` returned by :func:`discover_series`, plus what was left out.

    Attributes:
        unreadable: ``(path, reason)`` of files that claim to be DICOM but are corrupt/truncated.
        skipped: ``(path, reason)`` of DICOM files that are no image stack to load: non-image
            objects (structured reports, ...) and series made only of localizers.
        n_non_dicom: Number of files that are not DICOM (skipped silently).
        n_dicomdir: Number of DICOMDIR index files (skipped).
    """

    def __init__(self, items: Iterable[DicomSeries] = ()):
        super().__init__(items)
        self.unreadable: list[tuple[Path, str]] = []
        self.skipped: list[tuple[Path, str]] = []
        self.n_non_dicom = 0
        self.n_dicomdir = 0


@dataclass
class _Header:
    """What discovery needs from one file's header."""

    path: Path
    series_uid: str
    study_uid: str
    patient_id: str | None
    sop_uid: str
    modality: str
    description: str
    series_number: int | None
    rows: int
    cols: int
    iop: np.ndarray | None
    localizer: bool
    n_frames: int
    multiframe: bool
    burned_in: str | None = None


@dataclass
class _Frame:
    """Geometry and ordering keys of one 2D image (a file, or a frame of a multi-frame file)."""

    label: str
    ipp: np.ndarray
    iop: np.ndarray
    spacing: tuple[float, float]  # PixelSpacing: (row spacing, column spacing)
    slope: float
    intercept: float
    temporal: float | None = None
    acq_time: float | None = None
    echo: float | None = None
    instance: float | None = None


# --------------------------------------------------------------------------------------------
# Small public helpers


def slice_normal(iop: Sequence[float]) -> np.ndarray:
    """Unit normal of the image plane: row cosine x column cosine (DICOM LPS world).

    Args:
        iop: ImageOrientationPatient, six direction cosines (row direction, column direction).
    """
    iop = np.asarray([float(v) for v in iop], dtype=np.float64)
    if iop.shape != (6,):
        raise ValueError(f"ImageOrientationPatient needs 6 values, got {iop.shape[0]}")
    normal = np.cross(iop[:3], iop[3:])
    norm = np.linalg.norm(normal)
    if not np.isfinite(norm) or norm < 1e-6:
        raise ValueError(f"ImageOrientationPatient {iop.tolist()} has parallel row/column axes")
    return normal / norm


def age_band(age_years: float | None) -> str | None:
    """Age band for subgroup analysis: "0-17", "18-39", "40-59", "60-79", "80+" (None if unknown)."""
    if age_years is None:
        return None
    age = float(age_years)
    if not np.isfinite(age) or age < 0:
        raise ValueError(f"age_years must be a non-negative number, got {age_years!r}")
    for upper, band in ((18, "0-17"), (40, "18-39"), (60, "40-59"), (80, "60-79")):
        if age < upper:
            return band
    return "80+"


def parse_age(value: Any) -> float | None:
    """PatientAge ("042Y", "006M", "003W", "010D", or a bare number) -> years; None if absent."""
    if value is None:
        return None
    m = re.fullmatch(r"\s*(\d{1,3}(?:\.\d+)?)\s*([DWMYdwmy]?)\s*", str(value))
    if not m:
        return None
    n = float(m.group(1))
    per_year = {"": 1.0, "Y": 1.0, "M": 12.0, "W": 365.25 / 7, "D": 365.25}[m.group(2).upper()]
    return n / per_year


# --------------------------------------------------------------------------------------------
# Discovery


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


def _str(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    return "" if value is None else str(value).strip()


def _float(value: Any) -> float | None:
    if value is None or value == "":
        return None
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if np.isfinite(out) else None


def _int(value: Any) -> int | None:
    f = _float(value)
    return None if f is None else int(f)


def _floats(value: Any, n: int) -> np.ndarray | None:
    try:
        out = np.asarray([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        return None
    return out if out.shape == (n,) and np.all(np.isfinite(out)) else None


def _fg_item(ds: Dataset, frame_item: Dataset | None, sequence: str) -> Dataset | None:
    """First item of a functional group ``sequence``: per-frame if present, else shared."""
    for container in (frame_item, _shared_groups(ds)):
        if container is not None and sequence in container and len(container[sequence].value):
            return container[sequence].value[0]
    return None


def _shared_groups(ds: Dataset) -> Dataset | None:
    seq = ds.get("SharedFunctionalGroupsSequence")
    return seq[0] if seq else None


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
    )


def _iop_tag(iop: np.ndarray | None) -> str:
    if iop is None:
        return "no-orientation"
    return ",".join(f"{round(float(v), 3) + 0.0:.3f}" for v in iop)


@dataclass
class _Stack:
    iop: np.ndarray | None
    rows: int
    cols: int
    localizer: bool
    members: list[_Header] = field(default_factory=list)

    def accepts(self, h: _Header) -> bool:
        if (h.rows, h.cols, h.localizer) != (self.rows, self.cols, self.localizer):
            return False
        if self.iop is None or h.iop is None:
            return self.iop is None and h.iop is None
        return bool(np.max(np.abs(self.iop - h.iop)) < IOP_TOLERANCE)

    @property
    def tag(self) -> str:
        return f"{self.rows}x{self.cols}|{_iop_tag(self.iop)}" + (
            "|localizer" if self.localizer else ""
        )


def _split_group(headers: list[_Header], result: SeriesList) -> list[DicomSeries]:
    """Split one SeriesInstanceUID's files into stacks; drop localizer-like small stacks."""
    first = headers[0]
    skipped: list[tuple[Path, str]] = []
    # Exact duplicates (the same SOP instance copied twice) would look like a 4D series.
    seen: dict[str, Path] = {}
    unique: list[_Header] = []
    for h in headers:
        if h.sop_uid in seen:
            skipped.append((h.path, f"duplicate of {seen[h.sop_uid].name} (same SOP instance)"))
        else:
            seen[h.sop_uid] = h.path
            unique.append(h)

    stacks: list[_Stack] = []
    multiframes: list[_Header] = []
    for h in unique:
        if h.multiframe:
            multiframes.append(h)
            continue
        for s in stacks:
            if s.accepts(h):
                s.members.append(h)
                break
        else:
            stacks.append(_Stack(h.iop, h.rows, h.cols, h.localizer, [h]))

    regular = [s for s in stacks if not s.localizer]
    main = max(regular, key=lambda s: len(s.members)) if regular else None
    kept: list[_Stack] = []
    for s in stacks:
        n = len(s.members)
        reason = None
        if n < LOCALIZER_MAX_SLICES and s.localizer:
            reason = f"localizer (ImageType LOCALIZER), {n} image(s) of size {s.cols}x{s.rows}"
        elif (
            n < LOCALIZER_MAX_SLICES
            and main is not None
            and s is not main
            and not (
                s.iop is not None
                and main.iop is not None
                and np.max(np.abs(s.iop - main.iop)) < IOP_TOLERANCE
            )
        ):
            reason = (
                f"orientation minority (localizer-like): {n} image(s) with orientation "
                f"[{_iop_tag(s.iop)}] unlike the main stack's [{_iop_tag(main.iop)}] "
                f"({len(main.members)} images)"
            )
        if reason is None:
            kept.append(s)
        else:
            skipped.extend((h.path, reason) for h in s.members)

    out: list[DicomSeries] = []
    for s in kept:
        out.append(
            DicomSeries(
                series_uid=first.series_uid,
                study_uid=first.study_uid,
                patient_key=first.patient_id,
                files=[h.path for h in s.members],
                modality=first.modality,
                description=first.description,
                n_slices=len(s.members),
                stack_tag=s.tag,
                series_number=first.series_number,
                burned_in=[(h.path, h.burned_in) for h in s.members if h.burned_in],
            )
        )
    for h in multiframes:
        out.append(
            DicomSeries(
                series_uid=h.series_uid,
                study_uid=h.study_uid,
                patient_key=h.patient_id,
                files=[h.path],
                modality=h.modality,
                description=h.description,
                n_slices=h.n_frames,
                stack_tag=f"multiframe|{h.sop_uid}",
                multiframe=True,
                series_number=h.series_number,
                burned_in=[(h.path, h.burned_in)] if h.burned_in else [],
            )
        )
    if out:
        # The main (largest) stack reports what was left out of its series.
        target = max(out, key=lambda s: s.n_slices)
        target.skipped.extend(skipped)
    else:
        result.skipped.extend(skipped)
    return out


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
    image size; stacks of fewer than :data:`LOCALIZER_MAX_SLICES` images that are localizers
    (ImageType LOCALIZER) or an orientation minority are dropped and listed in the series'
    ``skipped``. Each enhanced multi-frame file is its own stack.

    Args:
        root: Folder to walk (recursively) or a single file.
        progress: Show a progress bar over the files.
        exclude: Files for which this returns True are ignored (not read, not counted), e.g.
            NIfTI files or collections that another reader handles.

    Returns:
        ``(series, unreadable)``: ``series`` is a :class:`SeriesList` (a list of
        :class:`DicomSeries`, ordered by study, series number and UID, whose ``unreadable``,
        ``skipped``, ``n_non_dicom`` and ``n_dicomdir`` report the files left out);
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
        from tqdm import tqdm

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


# --------------------------------------------------------------------------------------------
# Loading pixels and geometry


def _time_seconds(value: Any) -> float | None:
    """DICOM TM ("HHMMSS.ffffff", also "HH:MM:SS") or the time part of a DT -> seconds."""
    if value is None:
        return None
    s = str(value).strip().replace(":", "")
    if len(s) >= 14 and s[:8].isdigit():  # DT: YYYYMMDDHHMMSS...
        s = s[8:]
    s = re.split(r"[+-]", s)[0]
    try:
        hh = int(s[0:2])
        mm = int(s[2:4]) if len(s) >= 4 else 0
        ss = float(s[4:]) if len(s) > 4 else 0.0
    except ValueError:
        return None
    return hh * 3600.0 + mm * 60.0 + ss


def _decode_pydicom(ds: Dataset) -> np.ndarray:
    return ds.pixel_array


def _decode_sitk(path: Path) -> np.ndarray:
    """Pixels through SimpleITK/GDCM, which applies the rescale itself."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetImageIO("GDCMImageIO")
    reader.SetFileName(str(path))
    return sitk.GetArrayFromImage(reader.Execute())


def _pixels(ds: Dataset, path: Path, n_frames: int) -> tuple[np.ndarray, bool]:
    """Decoded pixels shaped (frames, rows, cols[, samples]) and whether already rescaled."""
    try:
        arr = _decode_pydicom(ds)
        rescaled = False
    except Exception as exc:  # no decoder for this transfer syntax, or corrupt data
        ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "unknown")
        try:
            arr = _decode_sitk(path)
        except Exception as exc2:
            raise InputError(
                path,
                f"cannot decode pixel data (transfer syntax {ts}): pydicom: {exc}; "
                f"SimpleITK: {str(exc2).strip().splitlines()[-1] if str(exc2).strip() else exc2}",
            ) from exc
        logger.info("%s: pydicom could not decode (%s); read with SimpleITK", path, exc)
        rescaled = True
    spp = int(ds.get("SamplesPerPixel", 1) or 1)
    want = 2 + (spp > 1)
    if arr.ndim == want:
        arr = arr[None]
    if arr.ndim != want + 1 or arr.shape[0] != n_frames:
        raise InputError(path, f"decoded pixel array has unexpected shape {arr.shape}")
    return arr, rescaled


def _rescale(ds: Dataset, item: Dataset | None = None) -> tuple[float, float]:
    src = item if item is not None else ds
    slope = _float(src.get("RescaleSlope"))
    intercept = _float(src.get("RescaleIntercept"))
    return (1.0 if slope is None or slope == 0 else slope), (
        0.0 if intercept is None else intercept
    )


def _frame_single(ds: Dataset, path: Path) -> _Frame:
    iop = _floats(ds.get("ImageOrientationPatient", []), 6)
    ipp = _floats(ds.get("ImagePositionPatient", []), 3)
    spacing = _floats(ds.get("PixelSpacing", []), 2)
    if iop is None or ipp is None:
        raise GeometryError(
            path, "no valid ImageOrientationPatient/ImagePositionPatient: not a 3D image slice"
        )
    if spacing is None or np.any(spacing <= 0):
        raise GeometryError(path, f"missing or invalid PixelSpacing {ds.get('PixelSpacing')!r}")
    slope, intercept = _rescale(ds)
    return _Frame(
        label=path.name,
        ipp=ipp,
        iop=iop,
        spacing=(float(spacing[0]), float(spacing[1])),
        slope=slope,
        intercept=intercept,
        temporal=_float(ds.get("TemporalPositionIdentifier")),
        acq_time=_time_seconds(ds.get("AcquisitionTime")),
        echo=_float(ds.get("EchoNumbers")),  # multi-valued -> None
        instance=_float(ds.get("InstanceNumber")),
    )


def _frames_multi(ds: Dataset, path: Path, n_frames: int) -> list[_Frame]:
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame is not None and len(per_frame) != n_frames:
        raise GeometryError(
            path,
            f"PerFrameFunctionalGroupsSequence has {len(per_frame)} items for {n_frames} frames",
        )
    if per_frame is None and _shared_groups(ds) is None:
        raise GeometryError(
            path, "multi-frame image without functional groups (per-frame geometry): not supported"
        )
    frames = []
    for f in range(n_frames):
        item = per_frame[f] if per_frame is not None else None
        pos = _fg_item(ds, item, "PlanePositionSequence")
        ori = _fg_item(ds, item, "PlaneOrientationSequence")
        meas = _fg_item(ds, item, "PixelMeasuresSequence")
        ipp = None if pos is None else _floats(pos.get("ImagePositionPatient", []), 3)
        iop = None if ori is None else _floats(ori.get("ImageOrientationPatient", []), 6)
        spacing = None if meas is None else _floats(meas.get("PixelSpacing", []), 2)
        if ipp is None or iop is None or spacing is None or np.any(spacing <= 0):
            raise GeometryError(
                path,
                f"frame {f + 1}: missing PlanePosition/PlaneOrientation/PixelMeasures "
                "functional group (per-frame or shared)",
            )
        pvt = _fg_item(ds, item, "PixelValueTransformationSequence")
        slope, intercept = _rescale(ds, pvt)
        content = _fg_item(ds, item, "FrameContentSequence")
        temporal = acq = None
        if content is not None:
            temporal = _float(content.get("TemporalPositionIndex"))
            acq = _time_seconds(content.get("FrameAcquisitionDateTime"))
        frames.append(
            _Frame(
                label=f"{path.name} frame {f + 1}",
                ipp=ipp,
                iop=iop,
                spacing=(float(spacing[0]), float(spacing[1])),
                slope=slope,
                intercept=intercept,
                temporal=temporal,
                acq_time=acq,
                instance=float(f),
            )
        )
    return frames


def _extra(ds: Dataset) -> dict[str, Any]:
    """The allowlisted attributes of EXTRA_FIELDS, in that order (None where absent)."""

    def text(keyword: str) -> str | None:
        value = ds.get(keyword)
        if value is None:
            return None
        if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
            s = "\\".join(str(v).strip() for v in value)
        else:
            s = str(value).strip()
        return s or None

    sex = (text("PatientSex") or "").upper()
    file_meta = getattr(ds, "file_meta", None)
    ts = getattr(file_meta, "TransferSyntaxUID", None) if file_meta is not None else None
    readers: dict[str, Callable[[], Any]] = {
        "modality": lambda: text("Modality"),
        "body_part": lambda: (text("BodyPartExamined") or "").upper() or None,
        "manufacturer": lambda: text("Manufacturer"),
        "model": lambda: text("ManufacturerModelName"),
        "sex": lambda: sex if sex in ("F", "M", "O") else None,
        "age_years": lambda: parse_age(ds.get("PatientAge")),
        "contrast": lambda: "yes" if text("ContrastBolusAgent") else None,
        "slice_thickness": lambda: _float(ds.get("SliceThickness")),
        "kvp": lambda: _float(ds.get("KVP")),
        "magnetic_field_strength": lambda: _float(ds.get("MagneticFieldStrength")),
        "scanning_sequence": lambda: text("ScanningSequence"),
        "sequence_variant": lambda: text("SequenceVariant"),
        "echo_time": lambda: _float(ds.get("EchoTime")),
        "repetition_time": lambda: _float(ds.get("RepetitionTime")),
        "inversion_time": lambda: _float(ds.get("InversionTime")),
        "photometric": lambda: text("PhotometricInterpretation"),
        "transfer_syntax": lambda: str(ts) if ts else None,
    }
    missing = set(EXTRA_FIELDS) - set(readers)
    if missing:  # a new allowlist reader field needs a reader here
        raise RuntimeError(f"no DICOM reader for allowlisted field(s) {sorted(missing)}")
    return {name: readers[name]() for name in EXTRA_FIELDS}


def _position_groups(d: np.ndarray) -> list[np.ndarray]:
    """Indices of frames grouped by position along the normal (ascending), ``d`` unsorted."""
    order = np.argsort(d, kind="stable")
    groups: list[list[int]] = [[int(order[0])]]
    for prev, cur in pairwise(order):
        if d[cur] - d[prev] > POSITION_TOLERANCE_MM:
            groups.append([])
        groups[-1].append(int(cur))
    return [np.asarray(g) for g in groups]


def _fmt_mm(values: Iterable[float], limit: int = 12) -> str:
    values = list(values)
    text = ", ".join(f"{v:.4g}" for v in values[:limit])
    return f"[{text}{', ...' if len(values) > limit else ''}]"


def _order_4d(
    frames: list[_Frame], groups: list[np.ndarray], where: str | Path
) -> list[np.ndarray]:
    """Order the images at each position into time points; check the pattern is consistent."""
    counts = [len(g) for g in groups]
    n_t = counts[0]
    if len(set(counts)) > 1:
        histogram = Counter(counts)
        dup = [g for g in groups if len(g) > 1]
        if histogram.get(1, 0) >= len(groups) / 2:
            example = ", ".join(frames[i].label for i in dup[0][:3])
            raise GeometryError(
                where,
                f"duplicate slice positions: {len(dup)} of {len(groups)} positions hold more than "
                f"one image (e.g. {example}) and this is no 4D pattern",
            )
        raise GeometryError(
            where,
            "inconsistent number of images per slice position (a 4D series needs the same count "
            f"at every position): counts {dict(sorted(histogram.items()))}",
        )

    def key(i: int) -> tuple[float, ...]:
        f = frames[i]
        return tuple(0.0 if v is None else v for v in (f.temporal, f.acq_time, f.echo, f.instance))

    ordered = [np.asarray(sorted(g.tolist(), key=key)) for g in groups]
    temporal = [[frames[i].temporal for i in g] for g in ordered]
    if all(v is not None for row in temporal for v in row):
        for t in range(n_t):
            if len({row[t] for row in temporal}) > 1:
                raise GeometryError(
                    where, f"4D series: time point {t + 1} mixes temporal positions across slices"
                )
    return ordered


def load_series(
    series: DicomSeries, *, max_relative_spacing_deviation: float = 0.01
) -> tuple[np.ndarray, ImageMeta]:
    """Read one stack: pixels (rescaled), slice order, spacing checks and the RAS affine.

    Args:
        series: A stack from :func:`discover_series`.
        max_relative_spacing_deviation: Largest allowed ``max |step - median| / median`` of the
            slice steps; smaller deviations are averaged out (with a warning).

    Returns:
        ``(array, meta)``: int16 when every slope is 1, every intercept integral and the values
        fit, else float32; shape ``(i, j, k)`` or ``(i, j, k, t)`` for 4D series (or
        ``(i, j, k, c)`` for colour images).

    Raises:
        InputError: unreadable/undecodable file, a single slice (2D).
        GeometryError: mixed orientations or pixel spacings, missing slices, non-uniform
            spacing, duplicate positions, inconsistent 4D pattern.
    """
    if not max_relative_spacing_deviation >= 0:
        raise ValueError(
            f"max_relative_spacing_deviation must be >= 0, got {max_relative_spacing_deviation!r}"
        )
    if not series.files:
        raise InputError(None, "DicomSeries has no files")
    where = series.folder
    frames: list[_Frame] = []
    pixels: list[np.ndarray] = []
    rescaled: list[bool] = []
    first_ds: Dataset | None = None
    for path in series.files:
        try:
            ds = pydicom.dcmread(path)
        except Exception as exc:
            raise InputError(path, f"unreadable DICOM file ({type(exc).__name__}: {exc})") from exc
        if first_ds is None:
            first_ds = ds
        n_frames = _int(ds.get("NumberOfFrames")) or 1
        if series.multiframe or "PerFrameFunctionalGroupsSequence" in ds:
            new = _frames_multi(ds, path, n_frames)
        elif n_frames > 1:
            raise GeometryError(
                path, f"multi-frame file ({n_frames} frames) without functional groups"
            )
        else:
            new = [_frame_single(ds, path)]
        arr, done = _pixels(ds, path, n_frames)
        frames.extend(new)
        pixels.extend(arr)
        rescaled.extend([done] * len(new))
        del ds
    assert first_ds is not None

    shapes = {p.shape for p in pixels}
    if len(shapes) > 1:
        raise GeometryError(where, f"images of different sizes in one stack: {sorted(shapes)}")

    # Orientation and in-plane spacing must agree across the stack.
    iop0 = frames[0].iop
    dev_iop = max(float(np.max(np.abs(f.iop - iop0))) for f in frames)
    if dev_iop > IOP_TOLERANCE:
        raise GeometryError(
            where, f"slices have different orientations (direction cosines differ by {dev_iop:.3g})"
        )
    sp0 = np.asarray(frames[0].spacing)
    if any(not np.allclose(f.spacing, sp0, rtol=1e-3, atol=0) for f in frames):
        found = sorted({tuple(round(v, 5) for v in f.spacing) for f in frames})
        raise GeometryError(where, f"slices have different PixelSpacing: {found}")

    row_cos = iop0[:3] / np.linalg.norm(iop0[:3])
    col_cos = iop0[3:] / np.linalg.norm(iop0[3:])
    normal = slice_normal(iop0)
    d = np.asarray([float(f.ipp @ normal) for f in frames])
    groups = _position_groups(d)
    if len(groups) < 2:
        raise InputError(
            where,
            f"2D image, expected a 3D volume: all {len(frames)} image(s) lie at one slice position",
        )
    is_4d = any(len(g) > 1 for g in groups)
    if is_4d:
        groups = _order_4d(frames, groups, where)
    n_k, n_t = len(groups), len(groups[0])

    # Positions: one per slice (the mean over time points, which share it within tolerance).
    ipps = np.stack([np.mean([frames[i].ipp for i in g], axis=0) for g in groups])  # (K, 3)
    pos = ipps @ normal
    steps = np.diff(pos)
    median = float(np.median(steps))
    rel = np.abs(steps - median) / median
    deviation = float(rel.max())
    # SeriesNumber, not SeriesDescription: this message can land in the catalog's failure rows,
    # and the Basic Profile removes SeriesDescription (umit.deid.allowlist).
    desc = f" (series number {series.series_number})" if series.series_number is not None else ""
    if deviation > max_relative_spacing_deviation:
        ratio = steps / median
        whole = np.rint(ratio)
        if np.all(np.abs(ratio - whole) <= 0.1) and np.any(whole >= 2):
            gaps = np.flatnonzero(whole >= 2)
            where_gaps = "; ".join(
                f"{pos[g]:.3f} and {pos[g + 1]:.3f} mm (gap {steps[g]:.3f} mm, "
                f"~{int(whole[g]) - 1} missing)"
                for g in gaps[:5]
            )
            raise GeometryError(
                where,
                f"missing slice(s) between positions {where_gaps} along the slice normal; "
                f"the usual spacing is {median:.4g} mm{desc}",
            )
        raise GeometryError(
            where,
            f"non-uniform slice spacing: measured spacings {_fmt_mm(steps)} mm (median "
            f"{median:.4g} mm, max deviation {deviation:.2%} > {max_relative_spacing_deviation:.2%})"
            f"{desc}",
        )
    step = (ipps[-1] - ipps[0]) / (n_k - 1)  # mean step vector (keeps gantry tilt)
    if deviation > 1e-4:
        logger.warning(
            "%s: slice spacing varies by up to %.3f%% (limit %.3f%%); using the mean step %.5g mm",
            where,
            100 * deviation,
            100 * max_relative_spacing_deviation,
            float(np.linalg.norm(step)),
        )
    # The slices must lie on a line (a tilt is fine, a jump sideways is not).
    lateral = ipps - np.outer(pos, normal)
    fit = lateral[0] + np.outer((pos - pos[0]) / (pos[-1] - pos[0]), lateral[-1] - lateral[0])
    off = float(np.max(np.linalg.norm(lateral - fit, axis=1)))
    if off > 0.25 * float(min(sp0)):
        raise GeometryError(
            where,
            f"slices are not aligned: in-plane positions deviate up to {off:.3f} mm from a line",
        )

    lps = np.eye(4)
    lps[:3, 0] = row_cos * sp0[1]  # i runs along a row: column spacing
    lps[:3, 1] = col_cos * sp0[0]  # j runs down a column: row spacing
    lps[:3, 2] = step
    lps[:3, 3] = ipps[0]
    affine = LPS_TO_RAS @ lps

    array = _assemble(pixels, frames, rescaled, groups, n_k, n_t, is_4d, where)
    extra = _extra(first_ds)
    meta = ImageMeta(
        affine=affine,
        source=str(where),
        modality=extra["modality"] or "unknown",
        extra=extra,
    )
    return array, meta


def _assemble(
    pixels: list[np.ndarray],
    frames: list[_Frame],
    rescaled: list[bool],
    groups: list[np.ndarray],
    n_k: int,
    n_t: int,
    is_4d: bool,
    where: Path,
) -> np.ndarray:
    """Stack (rows, cols) images into (i=col, j=row, k[, t]) with the rescale applied."""
    rows, cols = pixels[0].shape[:2]
    samples = pixels[0].shape[2] if pixels[0].ndim == 3 else 1
    if samples > 1 and is_4d:
        raise InputError(where, "4D colour (multi-sample) series are not supported")
    slopes = [1.0 if done else f.slope for f, done in zip(frames, rescaled, strict=True)]
    inters = [0.0 if done else f.intercept for f, done in zip(frames, rescaled, strict=True)]
    all_int = all(np.issubdtype(p.dtype, np.integer) for p in pixels)
    if samples > 1:
        dtype = pixels[0].dtype  # colour: no rescale
    elif all_int and all(s == 1.0 for s in slopes) and all(float(b).is_integer() for b in inters):
        lo = min(int(p.min()) + int(b) for p, b in zip(pixels, inters, strict=True))
        hi = max(int(p.max()) + int(b) for p, b in zip(pixels, inters, strict=True))
        info = np.iinfo(np.int16)
        dtype = np.dtype(np.int16) if info.min <= lo and hi <= info.max else np.dtype(np.float32)
    else:
        dtype = np.dtype(np.float32)
    shape = (cols, rows, n_k) + ((n_t,) if is_4d else ()) + ((samples,) if samples > 1 else ())
    out = np.empty(shape, dtype=dtype)
    for k, g in enumerate(groups):
        for t, idx in enumerate(g):
            p = pixels[idx]
            if samples > 1:
                img = p
            elif dtype == np.int16:
                img = p.astype(np.int32) + int(inters[idx])
            else:
                img = p.astype(np.float64) * slopes[idx] + inters[idx]
            img = np.swapaxes(img, 0, 1)  # (rows, cols[, s]) -> (i=col, j=row[, s])
            if is_4d:
                out[:, :, k, t] = img
            else:
                out[:, :, k] = img
    return out
