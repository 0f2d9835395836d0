"""DICOM series discovery, slice sorting and geometry: folders of files -> ``(array, ImageMeta)``.

Two steps, so that a batch ingest can list, key and resume work before touching pixels:

* :func:`discover_series` walks a folder tree, reads headers only, groups files by
  SeriesInstanceUID and splits each group into stacks of one orientation and one image size
  (localizers/scouts are set aside and reported per series). Enhanced multi-frame files
  are one stack each. Unreadable, truncated and non-DICOM files are counted, never fatal.
* :func:`load_series` reads the pixels of one stack, applies the rescale, sorts slices by their
  position along the slice normal (never by file name or InstanceNumber), checks the spacing and
  builds the RAS affine from ImageOrientationPatient, PixelSpacing and the measured slice step.
  A stack whose spacing changes is refused, naming where it changes, or resampled onto uniform
  slices when asked (``resample_nonuniform``).

Array convention (the same as nibabel/ITK): ``i`` = column index, ``j`` = row index, ``k`` =
slice, optionally ``t`` (4D: several images per position). In DICOM's LPS world the voxel
``(i, j, k)`` lies at ``IPP_0 + i * col_spacing * row_cosine + j * row_spacing * col_cosine +
k * step``, where PixelSpacing = (row spacing, column spacing) and ImageOrientationPatient =
(row cosine, column cosine); the affine is that matrix converted to RAS.

Identifiers: :class:`DicomSeries` carries the raw PatientID only as ``patient_key`` so that
``umit ingest`` can derive a keyed pseudonym; it is hidden from ``repr`` and never copied into
:class:`~umit.data.meta.ImageMeta`, whose ``extra`` holds only the attributes listed in
:data:`EXTRA_FIELDS`.

Modules:

* :mod:`~umit.ingest.dicom.discovery`: file sniffing, header reads, :func:`discover_series`.
* :mod:`~umit.ingest.dicom.stacks`: splitting series into stacks (localizers), slice ordering,
  spacing/missing-slice and alignment checks.
* :mod:`~umit.ingest.dicom.geometry`: slice normal, mean slice step (gantry tilt), RAS affine.
* :mod:`~umit.ingest.dicom.regrid`: opt-in resampling of non-uniform slice spacing onto a
  uniform grid.
* :mod:`~umit.ingest.dicom.load`: :func:`load_series`, the volume loader.
* :mod:`~umit.ingest.dicom.frames`: per-image geometry and rescale from single/multi-frame headers.
* :mod:`~umit.ingest.dicom.pixels`: pixel decoding and assembling the volume array.
* :mod:`~umit.ingest.dicom.series`: :class:`DicomSeries`, :class:`SeriesList`, :class:`SetAside`.
* :mod:`~umit.ingest.dicom.attributes`: header value parsing and the allowlisted metadata.
* :mod:`~umit.ingest.dicom.mosaic`: Siemens mosaics (one volume tiled in one image) -> slices.
* :mod:`~umit.ingest.dicom.csa`: the Siemens CSA header parser; :mod:`~umit.ingest.dicom.private`:
  vendor private elements by creator.
* :mod:`~umit.ingest.dicom.diffusion`: b-value and gradient direction of DWI images, per time point.
"""

from umit.ingest.dicom.attributes import EXTRA_FIELDS, _extra, age_band, parse_age
from umit.ingest.dicom.discovery import (
    DICOM_SUFFIXES,
    DICOMDIR_SOP_CLASS,
    discover_series,
    is_dicom_file,
)
from umit.ingest.dicom.geometry import slice_normal
from umit.ingest.dicom.load import load_series
from umit.ingest.dicom.series import DicomSeries, SeriesList, SetAside
from umit.ingest.dicom.stacks import IOP_TOLERANCE, LOCALIZER_MAX_SLICES, POSITION_TOLERANCE_MM

__all__ = [
    "DICOMDIR_SOP_CLASS",
    "DICOM_SUFFIXES",
    "EXTRA_FIELDS",
    "IOP_TOLERANCE",
    "LOCALIZER_MAX_SLICES",
    "POSITION_TOLERANCE_MM",
    "DicomSeries",
    "SeriesList",
    "SetAside",
    "_extra",
    "age_band",
    "discover_series",
    "is_dicom_file",
    "load_series",
    "parse_age",
    "slice_normal",
]
