"""The data types of DICOM discovery: :class:`DicomSeries` (one stack to load as a volume),
:class:`SeriesList` (what :func:`~umit.ingest.dicom.discover_series` returns, with the files it
left out), :class:`SetAside` (a series' localizer images, left out on purpose and reported) and
``_Header`` (what discovery reads from one file's header, for stack splitting)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


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
    accession_key: str | None = field(default=None, repr=False)
    """The raw AccessionNumber. Identifying: only for ingest's keyed pseudonym (the join key of
    ``umit labels from-reports key=accession``); never logged, never stored."""

    @property
    def key(self) -> str:
        """Stable sha256 hex of the series UID and stack tag: the same stack, the same key."""
        return hashlib.sha256(f"{self.series_uid}|{self.stack_tag}".encode()).hexdigest()

    @property
    def folder(self) -> Path:
        """Common parent folder of the files."""
        return Path(os.path.commonpath([str(p.parent) for p in self.files]))


@dataclass
class SetAside:
    """The localizer (scout) images of one series: left out on purpose, reported, not a failure.

    Attributes:
        series_uid: SeriesInstanceUID (identifying: ingest stores only its keyed replacement).
        series_number: SeriesNumber, when present.
        modality: DICOM Modality.
        files: The files set aside.
        reason: Why, e.g. "localizer: 3 image(s) with ImageType LOCALIZER".
        whole_series: True when nothing of the series is left to load.
    """

    series_uid: str
    series_number: int | None
    modality: str
    files: list[Path]
    reason: str
    whole_series: bool

    @property
    def key(self) -> str:
        """Stable sha256 hex of the series UID: the same series, the same key."""
        return hashlib.sha256(f"{self.series_uid}|set-aside".encode()).hexdigest()

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
        set_aside: The localizer images of each series that has some, whole localizer series
            included (their files are also in ``skipped`` or their series' ``skipped``).
    """

    def __init__(self, items: Iterable[DicomSeries] = ()):
        super().__init__(items)
        self.unreadable: list[tuple[Path, str]] = []
        self.skipped: list[tuple[Path, str]] = []
        self.n_non_dicom = 0
        self.n_dicomdir = 0
        self.set_aside: list[SetAside] = []


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
    accession: str | None = field(default=None, repr=False)  # identifying: hashed by ingest
