"""Per-image headers: geometry, rescale and ordering keys of one 2D image.

``_Frame`` is what the loader needs of one image: ImagePositionPatient, ImageOrientationPatient,
PixelSpacing, rescale slope/intercept, the keys that order time points and the diffusion
encoding (:mod:`~umit.ingest.dicom.diffusion`). ``_frame_single``
reads it from a classic single-frame file, ``_frames_multi`` from each frame of an enhanced
multi-frame file (per-frame or shared functional groups).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset

from umit.errors import GeometryError
from umit.ingest.dicom.attributes import (
    _fg_item,
    _float,
    _floats,
    _shared_groups,
    _time_seconds,
)
from umit.ingest.dicom.diffusion import Diffusion, read_diffusion


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
    diffusion: Diffusion | None = None  # b-value and gradient direction of a DWI image


def _rescale(ds: Dataset, item: Dataset | None = None) -> tuple[float, float]:
    src = item if item is not None else ds
    slope = _float(src.get("RescaleSlope"))
    intercept = _float(src.get("RescaleIntercept"))
    return (1.0 if slope is None or slope == 0 else slope), (
        0.0 if intercept is None else intercept
    )


def _frame_single(ds: Dataset, path: Path, csa: dict[str, list[str]] | None = None) -> _Frame:
    """The one image of a classic file (``csa``: its parsed Siemens CSA header, if any)."""
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
        diffusion=read_diffusion(ds, csa),
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
                diffusion=read_diffusion(ds, None, _fg_item(ds, item, "MRDiffusionSequence")),
            )
        )
    return frames
