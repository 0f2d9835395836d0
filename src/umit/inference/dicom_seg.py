"""A predicted label map as a DICOM Segmentation (highdicom) that references its source series.

:func:`write_dicom_seg` takes the label map ``umit predict`` wrote as NIfTI — on the source
series' own grid, ``(i, j, k)`` = (column, row, slice) as :func:`umit.ingest.read_volume` reads
it — and writes one DICOM Segmentation instance:

* **frames on the source images.** Each image of the series (each frame of an enhanced
  multi-frame file) is matched to a slice ``k`` of the label map by geometry — its position and
  orientation against the volume's affine, never by file or instance order — and the segment
  frames are stored on it, so each frame references its source image (Derivation Image /
  Source Image Sequence). A series that does not match the grid (resampled slices, a 4D series,
  a mosaic) is refused with the reason.
* **segments.** One per named label of the model (value > 0), numbered 1..n in label-value order
  (so label value = segment number when the values are 1..n), plus one per unnamed value found in
  the map, so no voxel is dropped. Each carries its name as label and the SNOMED CT codes of
  :mod:`umit.inference.seg_codes`. Segments with no voxels are described but hold no frames.
* **type.** ``BINARY`` (the widely supported Segmentation Storage SOP class) by default;
  ``labelmap`` writes the Label Map Segmentation Storage SOP class (DICOM Sup 243, 2024), which
  highdicom 0.28 writes but which older PACS and validators do not know.
* **identity.** Patient and study attributes are copied from the source files by highdicom, so a
  series de-identified by ``umit ingest``/``umit deid`` gives a SEG with the same pseudonyms and
  the UIDs present in those files. The SEG's own Series and SOP Instance UIDs are new
  ``2.25.<uuid>`` UIDs (:data:`UID_ROOT`: UUID-derived, ISO/IEC 9834-8 and PS3.5 B.2, no
  registered organisation root needed; the same form ``umit deid`` gives replaced UIDs), and so
  is its Dimension Organization UID.
* **provenance.** Segment Algorithm Type AUTOMATIC, algorithm identification (family Artificial
  Intelligence, name = model name, version = ``umit <version> sha256:<12 hex of the model
  file>``); Manufacturer "UMIT", model name and software version on the instance.

The file is written to a temporary name and renamed, so a crash leaves no half-written SEG.
"""

from __future__ import annotations

import hashlib
import logging
import time
import uuid
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from umit.data.meta import LPS_TO_RAS
from umit.errors import GeometryError, InputError
from umit.inference.seg_codes import SegmentCoding, segment_coding
from umit.ingest.dicom import DicomSeries
from umit.ingest.dicom.sources import SourceFrame, source_frames
from umit.ingest.read import one_series
from umit.utils.fileio import atomic_path

log = logging.getLogger(__name__)

UID_ROOT = "2.25."
"""Root of the UIDs of new SEG series and instances: ``2.25.<128-bit UUID as an integer>``."""

SEG_TYPES = ("binary", "labelmap")
SLICE_TOLERANCE = 0.1
"""Largest offset (in voxels, on each axis) of a source image from the slice it is matched to."""
ORIENTATION_TOLERANCE = 2e-3
"""Largest difference of a source image's direction cosines from the volume's."""


def new_uid() -> str:
    """A new ``2.25.<uuid>`` UID (at most 44 characters, under DICOM's 64)."""
    return f"{UID_ROOT}{uuid.uuid4().int}"


def file_sha256(path: str | Path) -> str:
    """SHA-256 hex digest of a file (read in 1 MiB blocks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class Algorithm:
    """What made the segmentation, for the SEG's algorithm identification.

    Attributes:
        name: Model name (e.g. ``swin_unetr_base``).
        version: umit version.
        checkpoint_sha256: SHA-256 hex digest of the model file.
    """

    name: str
    version: str
    checkpoint_sha256: str

    @property
    def short_hash(self) -> str:
        return self.checkpoint_sha256[:12]

    @property
    def version_string(self) -> str:
        return f"umit {self.version} sha256:{self.short_hash}"


@dataclass
class Segment:
    """One segment of a written SEG: its number, the label value it came from, its coding."""

    number: int
    value: int
    coding: SegmentCoding
    voxels: int


@dataclass
class SegWritten:
    """What :func:`write_dicom_seg` wrote."""

    path: Path
    series_instance_uid: str
    sop_instance_uid: str
    segment_type: str
    segments: list[Segment]
    n_frames: int
    seconds: float
    source_sop_instance_uids: list[str] = field(repr=False)
    """The referenced source images, in slice order ``k`` (single-frame series) or the one
    multi-frame source file."""

    @property
    def fallback_labels(self) -> list[str]:
        return [s.coding.label for s in self.segments if not s.coding.known]


# ---------------------------------------------------------------------------------------------
# segments
# ---------------------------------------------------------------------------------------------
def plan_segments(label_map: np.ndarray, label_names: Mapping[str, int]) -> list[Segment]:
    """The segments of ``label_map``: every named value > 0, plus unnamed values present.

    Raises:
        ValueError: two names for one value, or a negative value.
    """
    by_value: dict[int, str] = {}
    for name, value in label_names.items():
        value = int(value)
        if value < 0:
            raise ValueError(f"label {name!r} has a negative value {value}")
        if value == 0:
            continue  # background
        if value in by_value:
            raise ValueError(f"labels {by_value[value]!r} and {name!r} share the value {value}")
        by_value[value] = str(name)
    values, counts = np.unique(label_map, return_counts=True)
    present = dict(zip(values.tolist(), counts.tolist(), strict=True))
    if values.size and values[0] < 0:
        raise ValueError(f"label map holds a negative value {values[0]}")
    for value in present:
        if value > 0 and value not in by_value:
            by_value[int(value)] = f"label_{value}"
    return [
        Segment(n, v, segment_coding(by_value[v]), int(present.get(v, 0)))
        for n, v in enumerate(sorted(by_value), start=1)
    ]


def _description(segment: Segment, algorithm: Algorithm) -> hd.seg.SegmentDescription:
    c = segment.coding
    desc = hd.seg.SegmentDescription(
        segment_number=segment.number,
        segment_label=c.label[:64],
        segmented_property_category=c.category.code(),
        segmented_property_type=c.type.code(),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name=algorithm.name[:64],
            family=codes.cid7162.ArtificialIntelligence,
            version=algorithm.version_string[:64],
            source="UMIT",
        ),
    )
    desc.SegmentDescription = f"label value {segment.value}"
    if c.modifier is not None:  # laterality, nested in the type item (PS3.3 C.8.20-4)
        desc.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [
            hd.sr.CodedConcept(c.modifier.value, c.modifier.scheme, c.modifier.meaning)
        ]
    return desc


# ---------------------------------------------------------------------------------------------
# geometry: which slice k each source image is
# ---------------------------------------------------------------------------------------------
def match_slices(
    frames: list[SourceFrame], shape: tuple[int, ...], affine: np.ndarray, where: Path | None
) -> list[int]:
    """Slice index ``k`` of each source image, from its position and orientation.

    Raises:
        GeometryError: an image off the grid, of another size or orientation, two images on one
            slice, or a slice without an image.
    """
    lps = LPS_TO_RAS @ np.asarray(affine, np.float64)  # RAS -> LPS (the matrix is its own inverse)
    to_voxel = np.linalg.inv(lps)
    spacing = np.linalg.norm(lps[:3, :2], axis=0)  # (column spacing, row spacing)
    row_dir, col_dir = lps[:3, 0] / spacing[0], lps[:3, 1] / spacing[1]
    n_i, n_j, n_k = shape[:3]
    slices: list[int] = []
    for n, f in enumerate(frames):
        what = f"source image {n + 1}" + ("" if f.frame is None else f" (frame {f.frame + 1})")
        if (f.columns, f.rows) != (n_i, n_j):
            raise GeometryError(
                where,
                f"{what} is {f.rows}x{f.columns} pixels but the label map's slices are "
                f"{n_j}x{n_i}: the mask is not on this series' grid",
            )
        iop = np.asarray(f.iop, np.float64)
        off = max(
            np.abs(iop[:3] / np.linalg.norm(iop[:3]) - row_dir).max(),
            np.abs(iop[3:] / np.linalg.norm(iop[3:]) - col_dir).max(),
        )
        if off > ORIENTATION_TOLERANCE:
            raise GeometryError(where, f"{what} has another orientation than the label map")
        if not np.allclose(f.spacing, spacing[::-1], rtol=1e-3):
            raise GeometryError(
                where, f"{what} has pixel spacing {f.spacing}, the label map {tuple(spacing[::-1])}"
            )
        ijk = (to_voxel @ np.append(np.asarray(f.ipp, np.float64), 1.0))[:3]
        k = int(np.rint(ijk[2]))
        if np.abs(ijk - [0.0, 0.0, k]).max() > SLICE_TOLERANCE or not 0 <= k < n_k:
            raise GeometryError(
                where,
                f"{what} at voxel ({ijk[0]:.2f}, {ijk[1]:.2f}, {ijk[2]:.2f}) of the label map is "
                "not on one of its slices (resampled, 4D or mosaic series are not supported)",
            )
        slices.append(k)
    counts = np.bincount(slices, minlength=n_k)
    if counts.max() > 1:
        k = int(np.argmax(counts))
        raise GeometryError(where, f"{counts[k]} source images lie on slice {k} (a 4D series?)")
    if counts.min() == 0:
        k = int(np.argmin(counts))
        raise GeometryError(where, f"no source image lies on slice {k} of the label map")
    return slices


# ---------------------------------------------------------------------------------------------
# the writer
# ---------------------------------------------------------------------------------------------
_SHARED_UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID")
_PATIENT_STUDY_TYPE2 = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID",
    "StudyDate", "StudyTime", "ReferringPhysicianName",
)  # fmt: skip
"""Type 2 attributes the SEG copies from its source: written empty when the source lacks them
(de-identified files often do), never invented."""


def _prepare_source_headers(datasets: list[Dataset], where: Path) -> None:
    """The source images must carry the UIDs a SEG references, one study, series and frame of
    reference. An empty SOP Class/Instance UID is taken from the file meta, which PS3.10 requires
    to hold the same values (some anonymizers blank only the dataset's copy); absent Type 2
    patient/study attributes are set empty. Only the in-memory headers change, never the files.

    Raises:
        InputError: a missing or empty study, series or frame-of-reference UID, or several.
    """
    for ds in datasets:
        for key in _PATIENT_STUDY_TYPE2:
            if key not in ds:
                setattr(ds, key, "")
        meta = getattr(ds, "file_meta", None)
        for key, meta_key in (
            ("SOPClassUID", "MediaStorageSOPClassUID"),
            ("SOPInstanceUID", "MediaStorageSOPInstanceUID"),
        ):
            if not str(ds.get(key) or "") and meta is not None and meta.get(meta_key):
                setattr(ds, key, meta.get(meta_key))
    problems = []
    for key in ("SOPClassUID", "SOPInstanceUID", *_SHARED_UIDS):
        values = {str(ds.get(key) or "") for ds in datasets}
        if "" in values:
            problems.append(f"{key} missing or empty")
        elif key in _SHARED_UIDS and len(values) > 1:
            problems.append(f"{len(values)} different {key}s")
    if problems:
        raise InputError(
            where,
            "the source images cannot be referenced by a DICOM SEG: " + "; ".join(problems),
        )


def write_dicom_seg(
    label_map: np.ndarray,
    series: str | Path | DicomSeries,
    out: str | Path,
    *,
    affine: np.ndarray,
    label_names: Mapping[str, int],
    algorithm: Algorithm,
    seg_type: Literal["binary", "labelmap"] = "binary",
    series_number: int | None = None,
    series_description: str | None = None,
) -> SegWritten:
    """Write ``label_map`` as a DICOM Segmentation of ``series`` to ``out``.

    Args:
        label_map: ``(i, j, k)`` non-negative integer label map on the series' grid, as
            :func:`umit.ingest.read_volume` returns the series' voxels.
        series: The DICOM series folder it was predicted from (or its :class:`DicomSeries`).
        out: The SEG file to write.
        affine: The RAS affine of ``label_map`` (``meta.affine`` of ``read_volume``); every
            source image is matched against it.
        label_names: Structure name -> label value (e.g. the model's ``label_names``).
        algorithm: Model name, umit version and model-file hash.
        seg_type: ``binary`` (default) or ``labelmap``.
        series_number: SeriesNumber of the SEG (default: the source's + 1000).
        series_description: SeriesDescription of the SEG.

    Raises:
        ValueError: a bad ``seg_type``, a label map that is not 3D integer.
        InputError / GeometryError: unreadable series, or one that does not match the map.
    """
    t0 = time.perf_counter()
    label_map = _check_request(label_map, seg_type)
    if not isinstance(series, DicomSeries):
        series = one_series(series)
    where = series.folder
    datasets, frames = source_frames(series)
    _prepare_source_headers(datasets, where)
    if len(datasets) > 1 and any(f.frame is not None for f in frames):
        raise InputError(where, "several multi-frame files in one stack: not supported for SEG")
    slices = match_slices(frames, label_map.shape, affine, where)
    segments = plan_segments(label_map, label_names)
    if not segments:
        raise ValueError("nothing to write: no named label and no foreground in the label map")
    number = series_number
    if number is None:
        number = (int(datasets[0].get("SeriesNumber") or 0) + 1000) % (2**31)
    with warnings.catch_warnings():
        # highdicom doubts one-component names (umit's pseudonyms "UMIT-..."): copied, not ours
        warnings.filterwarnings("ignore", message=".*unlikely to represent the intended person")
        seg = hd.seg.Segmentation(
            source_images=datasets,
            pixel_array=_frames(label_map, slices, segments),
            segmentation_type=seg_type.upper(),
            segment_descriptions=[_description(s, algorithm) for s in segments],
            series_instance_uid=new_uid(),
            series_number=number,
            sop_instance_uid=new_uid(),
            instance_number=1,
            manufacturer="UMIT",
            manufacturer_model_name=algorithm.name[:64],
            software_versions=algorithm.version_string[:64],
            device_serial_number=algorithm.short_hash,
            content_label="UMIT_SEG",
            content_description=f"{algorithm.name} segmentation"[:64],
            series_description=(series_description or f"UMIT {algorithm.name} segmentation")[:64],
            omit_empty_frames=True,
        )
    _own_dimension_uid(seg)
    out = Path(out)
    with atomic_path(out) as tmp:
        seg.save_as(tmp, enforce_file_format=True)
    if frames[0].frame is not None:  # one multi-frame source file
        refs = [str(datasets[0].SOPInstanceUID)]
    else:
        refs = [str(datasets[frames[i].dataset].SOPInstanceUID) for i in np.argsort(slices)]
    written = SegWritten(
        path=out,
        series_instance_uid=str(seg.SeriesInstanceUID),
        sop_instance_uid=str(seg.SOPInstanceUID),
        segment_type=seg_type,
        segments=segments,
        n_frames=int(seg.get("NumberOfFrames", 0)),
        seconds=time.perf_counter() - t0,
        source_sop_instance_uids=refs,
    )
    if written.fallback_labels:
        log.info("dicom seg: generic Tissue code for %s", ", ".join(written.fallback_labels))
    return written


def _own_dimension_uid(seg: hd.seg.Segmentation) -> None:
    """Every UID the SEG creates under :data:`UID_ROOT`: highdicom makes the Dimension
    Organization UID under its own root, replace it (in both places it appears)."""
    uid = new_uid()
    for item in [*seg.DimensionOrganizationSequence, *seg.DimensionIndexSequence]:
        item.DimensionOrganizationUID = uid


def _check_request(label_map: np.ndarray, seg_type: str) -> np.ndarray:
    if seg_type not in SEG_TYPES:
        raise ValueError(f"seg_type must be one of {', '.join(SEG_TYPES)}, got {seg_type!r}")
    label_map = np.asarray(label_map)
    if label_map.ndim != 3 or not np.issubdtype(label_map.dtype, np.integer):
        raise ValueError(
            f"label_map must be a 3D integer array, got {label_map.dtype} {label_map.shape}"
        )
    return label_map


def _frames(label_map: np.ndarray, slices: list[int], segments: list[Segment]) -> np.ndarray:
    """One ``(rows, cols)`` frame of segment numbers per source image, in source order."""
    lut = np.zeros(max(int(label_map.max()), max(s.value for s in segments)) + 1, np.uint16)
    for s in segments:
        lut[s.value] = s.number
    lut = lut.astype(np.uint8 if len(segments) < 256 else np.uint16)
    return np.stack([lut[label_map[:, :, k].T] for k in slices])  # (F, rows, cols)


def summary(written: SegWritten) -> dict[str, Any]:
    """A JSON-able summary of a written SEG (for ``umit predict``'s output rows)."""
    return {
        "path": str(written.path),
        "type": written.segment_type,
        "series_instance_uid": written.series_instance_uid,
        "sop_instance_uid": written.sop_instance_uid,
        "frames": written.n_frames,
        "segments": {
            s.coding.label: {"number": s.number, "value": s.value, "voxels": s.voxels}
            for s in written.segments
        },
        "generic_code": written.fallback_labels,
    }
