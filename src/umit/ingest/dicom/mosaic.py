"""Siemens mosaic images: one file holds a whole volume as a grid of tiles (EPI, BOLD, DWI).

A mosaic of ``Rows x Columns`` pixels holds ``m x m`` tiles, ``m = ceil(sqrt(N))`` for ``N``
slices, each ``(Rows / m) x (Columns / m)``, in row-major order; only the first ``N`` tiles are
slices. ``N`` comes from ``NumberOfImagesInMosaic`` in the Siemens MR header (0019,xx0A) or the
CSA image header, else from the number of ``MosaicRefAcqTimes``.

Geometry (the well-known correction of nibabel's ``MosaicWrapper.image_position`` and dcm2niix):
ImagePositionPatient of a mosaic is the top-left corner of the *whole* tiled image, so the first
slice's first voxel lies at ::

    IPP + ((Columns - tile_cols) / 2) * PixelSpacing[1] * row_cosine
        + ((Rows - tile_rows) / 2) * PixelSpacing[0] * column_cosine

and slice ``k`` at that point plus ``k * spacing * n``, with ``n`` the CSA SliceNormalVector (else
row cosine x column cosine) and ``spacing`` SpacingBetweenSlices (else SliceThickness).

:func:`untile` turns a mosaic file into one ``_Frame`` and one image per slice, so the loader
sorts, checks and stacks them like any other series; mosaic files of one series at one position
are the time points of a 4D series.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset

from umit.errors import GeometryError, InputError
from umit.ingest.dicom.attributes import _float
from umit.ingest.dicom.csa import csa_floats
from umit.ingest.dicom.frames import _Frame
from umit.ingest.dicom.private import SIEMENS_MR, private_numbers

NORMAL_TOLERANCE = 1e-3
"""The CSA slice normal may differ from +/- (row x column cosine) by this much (cosine)."""


def _image_type(ds: Dataset) -> list[str]:
    value = ds.get("ImageType") or []
    return [str(v).upper() for v in ([value] if isinstance(value, str) else value)]


def tile_count(ds: Dataset, csa: dict[str, list[str]] | None) -> int | None:
    """Number of slices in a mosaic: NumberOfImagesInMosaic (private tag, then CSA), else the
    number of MosaicRefAcqTimes; None when none of them is there."""
    private = private_numbers(ds, 0x0019, SIEMENS_MR, 0x0A)
    if private is not None and private.size == 1 and private[0] >= 1:
        return int(private[0])
    if csa is not None:
        n = csa_floats(csa, "NumberOfImagesInMosaic")
        if n is not None and n.size == 1 and n[0] >= 1:
            return int(n[0])
        times = csa_floats(csa, "MosaicRefAcqTimes")
        if times is not None:
            return int(times.size)
    return None


def is_mosaic(ds: Dataset, csa: dict[str, list[str]] | None) -> bool:
    """ImageType says MOSAIC, or a Siemens header gives a tile count above one."""
    if "MOSAIC" in _image_type(ds):
        return True
    n = tile_count(ds, csa)
    return n is not None and n > 1


def _no_tile_count(csa: dict[str, list[str]] | None, csa_problem: str | None) -> str:
    if csa_problem is not None:
        return f"Siemens mosaic without a tile count (CSA header unreadable: {csa_problem})"
    if csa is None:
        return "Siemens mosaic without a tile count (no NumberOfImagesInMosaic, no CSA header)"
    return (
        "Siemens mosaic without a tile count (no NumberOfImagesInMosaic in (0019,xx0A) or the "
        "CSA header, no MosaicRefAcqTimes)"
    )


def _slice_normal(csa: dict[str, list[str]] | None, iop: np.ndarray, path: Path) -> np.ndarray:
    """Unit slice normal: CSA SliceNormalVector when present (its sign sets the slice order),
    else row cosine x column cosine."""
    cross = np.cross(iop[:3], iop[3:])
    cross /= np.linalg.norm(cross)
    vec = None if csa is None else csa_floats(csa, "SliceNormalVector")
    if vec is None:
        return cross
    if vec.size != 3 or np.linalg.norm(vec) < 1e-6:
        raise GeometryError(path, f"CSA SliceNormalVector {vec.tolist()} is no 3D direction")
    vec = vec / np.linalg.norm(vec)
    if abs(float(vec @ cross)) < 1 - NORMAL_TOLERANCE:
        raise GeometryError(
            path,
            f"CSA SliceNormalVector {np.round(vec, 4).tolist()} is not perpendicular to the "
            f"image plane (ImageOrientationPatient normal {np.round(cross, 4).tolist()})",
        )
    return vec


def _slice_spacing(ds: Dataset, path: Path) -> float:
    for keyword in ("SpacingBetweenSlices", "SliceThickness"):
        value = _float(ds.get(keyword))
        if value is not None and value > 0:
            return value
    raise InputError(
        path, "Siemens mosaic without slice spacing (no SpacingBetweenSlices or SliceThickness)"
    )


def untile(
    ds: Dataset,
    csa: dict[str, list[str]] | None,
    csa_problem: str | None,
    frame: _Frame,
    image: np.ndarray,
    path: Path,
) -> tuple[list[_Frame], np.ndarray]:
    """Split one mosaic image into its slices.

    Args:
        ds: The mosaic file's dataset.
        csa: Its parsed CSA image header, or None.
        csa_problem: Why the CSA header could not be parsed, if it could not.
        frame: The geometry read from the file's header (of the whole mosaic).
        image: The decoded mosaic, ``(Rows, Columns)``.
        path: The file, named in errors.

    Returns:
        ``(frames, tiles)``: one ``_Frame`` per slice (position corrected, see the module
        docstring) and the slices as ``(N, tile_rows, tile_cols)``.

    Raises:
        InputError: no tile count, no slice spacing, a colour mosaic.
        GeometryError: a mosaic size that ``m x m`` tiles do not divide, a CSA slice normal that
            does not fit the image plane.
    """
    n = tile_count(ds, csa)
    if n is None:
        raise InputError(path, _no_tile_count(csa, csa_problem))
    if image.ndim != 2:
        raise InputError(path, f"colour Siemens mosaic (pixels {image.shape}) is not supported")
    m = int(np.ceil(np.sqrt(n)))
    rows, cols = image.shape
    if rows % m or cols % m:
        raise GeometryError(
            path,
            f"Siemens mosaic of {rows}x{cols} pixels cannot hold {m}x{m} equal tiles "
            f"({n} images in mosaic)",
        )
    tile_rows, tile_cols = rows // m, cols // m
    # (m * tile_rows, m * tile_cols) -> (m, tile_rows, m, tile_cols) -> (m * m, tile_rows, tile_cols)
    tiles = image.reshape(m, tile_rows, m, tile_cols).transpose(0, 2, 1, 3)
    tiles = tiles.reshape(m * m, tile_rows, tile_cols)[:n]

    row_cos = frame.iop[:3] / np.linalg.norm(frame.iop[:3])
    col_cos = frame.iop[3:] / np.linalg.norm(frame.iop[3:])
    row_spacing, col_spacing = frame.spacing
    first = (
        frame.ipp
        + (cols - tile_cols) / 2 * col_spacing * row_cos
        + (rows - tile_rows) / 2 * row_spacing * col_cos
    )
    step = _slice_spacing(ds, path) * _slice_normal(csa, frame.iop, path)
    frames = [
        replace(frame, label=f"{frame.label} tile {k + 1}", ipp=first + k * step) for k in range(n)
    ]
    return frames, tiles
