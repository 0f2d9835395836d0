"""The images a volume was read from, one entry per 2D image, for objects that reference them.

A derived object written back to the PACS (a DICOM Segmentation, :mod:`umit.inference.dicom_seg`)
must say which source image each of its frames lies on. :func:`source_frames` reads the headers
of a stack (no pixel data) and returns each image's geometry exactly as
:func:`~umit.ingest.dicom.load_series` parsed it, with the dataset it came from; matching an
image to a slice of the volume is then a question of geometry, never of file or instance order.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from umit.errors import GeometryError, InputError
from umit.ingest.dicom.attributes import _int
from umit.ingest.dicom.frames import _frame_single, _frames_multi
from umit.ingest.dicom.series import DicomSeries


@dataclass(frozen=True)
class SourceFrame:
    """One 2D image of a stack: a single-frame file, or one frame of a multi-frame file.

    Attributes:
        dataset: Index of its header in the list :func:`source_frames` returns.
        frame: 0-based frame number in a multi-frame file; None for a single-frame file.
        ipp: ImagePositionPatient (LPS mm).
        iop: ImageOrientationPatient (row cosine, column cosine).
        spacing: PixelSpacing (row spacing, column spacing) in mm.
        rows: Rows of the image.
        columns: Columns of the image.
    """

    dataset: int
    frame: int | None
    ipp: np.ndarray
    iop: np.ndarray
    spacing: tuple[float, float]
    rows: int
    columns: int


def source_frames(series: DicomSeries) -> tuple[list[Dataset], list[SourceFrame]]:
    """Headers (without pixel data) of the files of ``series`` and the images they hold.

    Raises:
        InputError: an unreadable file.
        GeometryError: an image without position, orientation or pixel spacing.
    """
    datasets: list[Dataset] = []
    frames: list[SourceFrame] = []
    for path in series.files:
        ds = _read_header(Path(path))
        n_frames = _int(ds.get("NumberOfFrames")) or 1
        if series.multiframe or "PerFrameFunctionalGroupsSequence" in ds:
            parsed = _frames_multi(ds, Path(path), n_frames)
            numbers: list[int | None] = list(range(n_frames))
        elif n_frames > 1:
            raise GeometryError(
                path, f"multi-frame file ({n_frames} frames) without functional groups"
            )
        else:
            parsed, numbers = [_frame_single(ds, Path(path))], [None]
        rows, columns = _int(ds.get("Rows")), _int(ds.get("Columns"))
        if not rows or not columns:
            raise InputError(path, "no Rows/Columns: not an image")
        for f, number in zip(parsed, numbers, strict=True):
            frames.append(
                SourceFrame(len(datasets), number, f.ipp, f.iop, f.spacing, rows, columns)
            )
        datasets.append(ds)
    return datasets, frames


def _read_header(path: Path) -> Dataset:
    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except Exception as exc:
        raise InputError(path, f"unreadable DICOM file ({type(exc).__name__}: {exc})") from exc
