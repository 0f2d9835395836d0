"""The volume loader: :func:`load_series` reads one stack into ``(array, ImageMeta)``.

``load_series`` runs named steps: check the request, read the files (``_read_stack``; a Siemens
mosaic file is split into its slices there, :mod:`~umit.ingest.dicom.mosaic`), check the stack is
one volume and order its slices (:mod:`~umit.ingest.dicom.stacks`), build the affine
(:mod:`~umit.ingest.dicom.geometry`), assemble the array (:mod:`~umit.ingest.dicom.pixels`),
resample non-uniform slices when asked (:mod:`~umit.ingest.dicom.regrid`) and build the metadata
(``_meta``, with the b-values and gradient directions of a diffusion series,
:mod:`~umit.ingest.dicom.diffusion`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from umit.data.meta import ImageMeta
from umit.errors import GeometryError, InputError
from umit.ingest.dicom.attributes import _extra, _int
from umit.ingest.dicom.csa import CsaError
from umit.ingest.dicom.diffusion import DiffusionTable, diffusion_table
from umit.ingest.dicom.frames import _Frame, _frame_single, _frames_multi
from umit.ingest.dicom.geometry import _affine, _mean_step, _slice_positions, slice_normal
from umit.ingest.dicom.mosaic import is_mosaic, untile
from umit.ingest.dicom.pixels import _assemble, _pixels
from umit.ingest.dicom.private import image_csa
from umit.ingest.dicom.regrid import regrid_slices
from umit.ingest.dicom.series import DicomSeries
from umit.ingest.dicom.stacks import (
    _check_aligned,
    _check_image_sizes,
    _check_one_plane,
    _check_slice_spacing,
    _group_slices,
    _warn_spacing_jitter,
)


@dataclass
class _ReadStack:
    """The images of one stack as read from its files, in file order."""

    frames: list[_Frame]
    pixels: list[np.ndarray]  # one (rows, cols[, samples]) array per frame
    rescaled: list[bool]  # per frame: the decoder (SimpleITK) already applied the rescale
    first: Dataset  # the first file, source of the metadata


def load_series(
    series: DicomSeries,
    *,
    max_relative_spacing_deviation: float = 0.01,
    resample_nonuniform: bool = False,
) -> tuple[np.ndarray, ImageMeta]:
    """Read one stack: pixels (rescaled), slice order, spacing checks and the RAS affine.

    Args:
        series: A stack from :func:`discover_series`.
        max_relative_spacing_deviation: Largest allowed ``max |step - median| / median`` of the
            slice steps; smaller deviations are averaged out (with a warning).
        resample_nonuniform: Resample a stack whose spacing changes (beyond the deviation
            above) onto uniform slices at its smallest spacing
            (:func:`~umit.ingest.dicom.regrid.regrid_slices`) instead of refusing it; the
            volume is then float32 and ``meta.extra["transform"]`` says what was done.

    Returns:
        ``(array, meta)``: int16 when every slope is 1, every intercept integral and the values
        fit, else float32; shape ``(i, j, k)`` or ``(i, j, k, t)`` for 4D series (or
        ``(i, j, k, c)`` for colour images). A Siemens mosaic file is one volume; several at
        one position are a 4D series. ``meta.extra["b_values"]`` and
        ``["gradient_directions"]`` hold one entry per volume (time point) of a diffusion
        series (directions in the DICOM patient frame, LPS; None when unknown).

    Raises:
        InputError: unreadable/undecodable file, a single slice (2D), a mosaic without a tile
            count or slice spacing.
        GeometryError: mixed orientations or pixel spacings, missing slices, non-uniform
            spacing (unless resampled), duplicate positions, inconsistent 4D pattern.
    """
    _check_request(series, max_relative_spacing_deviation)
    where = series.folder
    stack = _read_stack(series)
    _check_image_sizes(stack.pixels, where)
    _check_one_plane(stack.frames, where)
    iop, pixel_spacing = stack.frames[0].iop, stack.frames[0].spacing
    normal = slice_normal(iop)
    groups, is_4d = _group_slices(stack.frames, normal, where)
    ipps = _slice_positions(stack.frames, groups)
    pos = ipps @ normal
    deviation = _check_slice_spacing(
        pos,
        max_relative_spacing_deviation,
        where,
        series.series_number,
        allow_nonuniform=resample_nonuniform,
    )
    _check_aligned(ipps, pos, normal, pixel_spacing, where)
    array = _assemble(
        stack.pixels,
        stack.frames,
        stack.rescaled,
        groups,
        len(groups),
        len(groups[0]),
        is_4d,
        where,
    )
    transform = None
    if deviation > max_relative_spacing_deviation:  # only with resample_nonuniform
        regridded = regrid_slices(array, ipps, pos, max_relative_spacing_deviation, where)
        array, step, transform = regridded.array, regridded.step, regridded.transform
    else:
        step = _mean_step(ipps)
        _warn_spacing_jitter(where, deviation, max_relative_spacing_deviation, step)
    diffusion = diffusion_table([f.diffusion for f in stack.frames], groups, where)
    meta = _meta(stack.first, where, _affine(iop, pixel_spacing, step, ipps[0]), diffusion)
    if transform is not None:
        meta.extra["transform"] = transform
    return array, meta


def _check_request(series: DicomSeries, max_relative_spacing_deviation: float) -> None:
    """Reject a negative (or NaN) spacing tolerance and a stack without files."""
    if not max_relative_spacing_deviation >= 0:
        raise ValueError(
            f"max_relative_spacing_deviation must be >= 0, got {max_relative_spacing_deviation!r}"
        )
    if not series.files:
        raise InputError(None, "DicomSeries has no files")


def _read_file(path: Path, multiframe: bool) -> tuple[list[_Frame], np.ndarray, bool, Dataset]:
    """Read one file: its images' headers, decoded pixels and whether they are rescaled already.

    Returns:
        ``(frames, pixels, rescaled, dataset)``: one ``_Frame`` per image (every frame of a
        multi-frame file), pixels shaped ``(frames, rows, cols[, samples])``.
    """
    try:
        ds = pydicom.dcmread(path)
    except Exception as exc:
        raise InputError(path, f"unreadable DICOM file ({type(exc).__name__}: {exc})") from exc
    n_frames = _int(ds.get("NumberOfFrames")) or 1
    csa, csa_problem = _read_csa(ds)
    if multiframe or "PerFrameFunctionalGroupsSequence" in ds:
        frames = _frames_multi(ds, path, n_frames)
    elif n_frames > 1:
        raise GeometryError(path, f"multi-frame file ({n_frames} frames) without functional groups")
    else:
        frames = [_frame_single(ds, path, csa)]
    arr, rescaled = _pixels(ds, path, n_frames)
    if len(frames) == 1 and is_mosaic(ds, csa):  # one volume tiled in one image
        frames, arr = untile(ds, csa, csa_problem, frames[0], arr[0], path)
    return frames, arr, rescaled, ds


def _read_csa(ds: Dataset) -> tuple[dict[str, list[str]] | None, str | None]:
    """The Siemens CSA image header, or ``(None, why)`` when it is there but unreadable (only a
    mosaic needs it, so a bad one is an error only then)."""
    try:
        return image_csa(ds), None
    except CsaError as exc:
        return None, str(exc)


def _read_stack(series: DicomSeries) -> _ReadStack:
    """Read every file of the stack, in the stack's file order; keep only the first dataset."""
    frames: list[_Frame] = []
    pixels: list[np.ndarray] = []
    rescaled: list[bool] = []
    first: Dataset | None = None
    for path in series.files:
        new, arr, done, ds = _read_file(path, series.multiframe)
        if first is None:
            first = ds
        frames.extend(new)
        pixels.extend(arr)
        rescaled.extend([done] * len(new))
    assert first is not None
    return _ReadStack(frames, pixels, rescaled, first)


def _meta(
    ds: Dataset, where: Path, affine: np.ndarray, diffusion: DiffusionTable | None = None
) -> ImageMeta:
    """ImageMeta of the volume: the affine and only the allowlisted :data:`EXTRA_FIELDS`, the
    diffusion fields filled from every image (not only the first file)."""
    extra = _extra(ds)
    if diffusion is not None:
        extra["b_values"] = diffusion.b_values
        extra["gradient_directions"] = diffusion.directions
    return ImageMeta(
        affine=affine,
        source=str(where),
        modality=extra["modality"] or "unknown",
        extra=extra,
    )
