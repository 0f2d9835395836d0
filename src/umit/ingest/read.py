"""One reader for any single volume a user points at: an image file or a DICOM series folder.

Later stages (``umit predict``, ``umit deface``) accept both; the DICOM half needs the ingest
stage's series parser, so this function lives here rather than in :mod:`umit.data.io`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from umit.data.io import check_finite, read_image
from umit.data.meta import ImageMeta
from umit.errors import InputError
from umit.ingest import dicom


def read_volume(path: str | Path) -> tuple[np.ndarray, ImageMeta]:
    """Read an image file (NIfTI / NRRD / MetaImage) or a folder holding one DICOM series.

    Raises:
        InputError: as :func:`umit.data.io.read_image`, and for a folder with zero or several
            DICOM series.
    """
    path = Path(path)
    if not path.is_dir():
        return read_image(path)
    array, meta = dicom.load_series(one_series(path))
    check_finite(array, path)
    return array, meta


def one_series(path: str | Path) -> dicom.DicomSeries:
    """The one DICOM image series (stack) in folder ``path``: the stack :func:`read_volume` reads.

    Raises:
        InputError: the folder holds no readable DICOM image series, or several.
    """
    path = Path(path)
    found, _ = dicom.discover_series(path)
    if not found:
        extra = []
        if found.unreadable:
            first = found.unreadable[0]
            extra.append(
                f"{len(found.unreadable)} unreadable DICOM file(s), e.g. {first[0]}: {first[1]}"
            )
        if found.skipped:
            extra.append(f"{len(found.skipped)} localizer/non-image file(s) skipped")
        extra.append(f"{found.n_non_dicom} non-DICOM file(s)")
        raise InputError(
            path, "folder holds no readable DICOM image series (" + "; ".join(extra) + ")"
        )
    if len(found) > 1:
        listing = "; ".join(
            f"{s.modality} {s.description!r} ({s.n_slices} images)" for s in found[:10]
        )
        raise InputError(
            path,
            f"folder holds {len(found)} DICOM series ({listing}); read_volume needs exactly one: "
            "use `umit ingest` to convert every series, or point at a folder of one series",
        )
    return found[0]
