"""Helpers shared by tests: where the real data lives, and a synthetic DICOM series factory.

The real data (``../shared/data``, see its README) is optional: tests that need it call
:func:`require_shared` and skip with a reason when it is absent.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.1"
EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"

# Identifying values written into synthetic headers; tests check none of them leaks.
IDENTIFIERS = {
    "PatientName": "Doe^Jane^Q",
    "PatientID": "PID-123456",
    "PatientBirthDate": "19700101",
    "AccessionNumber": "ACC98765",
    "InstitutionName": "Saint Nowhere Hospital",
    "InstitutionAddress": "1 Hospital Road, Springfield",
    "ReferringPhysicianName": "House^Gregory",
    "StudyDate": "20240102",
    "StudyID": "STUDY42",
}


def shared_data_dir() -> Path | None:
    """The shared real-data folder (``$UMIT_SHARED_DATA`` or ``<repo>/../shared/data``), or None."""
    env = os.environ.get("UMIT_SHARED_DATA")
    path = Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"
    return path if path.is_dir() else None


def require_shared(*parts: str) -> Path:
    """Path inside the shared data folder; skips the test with a reason when it is absent."""
    root = shared_data_dir()
    if root is None:
        pytest.skip("real data folder ../shared/data absent (set UMIT_SHARED_DATA to point at it)")
    path = root.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real data {path} absent")
    return path


def new_uid() -> str:
    return "2.25." + str(uuid.uuid4().int)


def ds_str(value: float) -> str:
    """A DICOM DS string (at most 16 characters) for ``value``."""
    for digits in range(10, 0, -1):
        s = f"{value:.{digits}f}".rstrip("0").rstrip(".")
        if s in ("-0", ""):
            s = "0"
        if len(s) <= 16:
            return s
    raise ValueError(value)


def ds_round(values: Sequence[float]) -> np.ndarray:
    """What a reader gets back after the values went through :func:`ds_str`."""
    return np.asarray([float(ds_str(v)) for v in values])


def rotation(ax: float, ay: float, az: float) -> np.ndarray:
    """Rotation matrix from three angles in degrees (x, then y, then z)."""
    ax, ay, az = np.deg2rad([ax, ay, az])
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _base_dataset(path: Path, sop_class: str, sop_uid: str) -> Any:
    from pydicom.dataset import FileDataset, FileMetaDataset

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = EXPLICIT_VR_LITTLE_ENDIAN
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    for key, value in IDENTIFIERS.items():
        setattr(ds, key, value)
    return ds


def _set_pixels(ds: Any, pixels: np.ndarray) -> None:
    """``pixels`` (frames?, rows, cols) int16 or uint16."""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = int(pixels.shape[-2]), int(pixels.shape[-1])
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1 if pixels.dtype == np.int16 else 0
    ds.PixelData = np.ascontiguousarray(pixels).astype(pixels.dtype.newbyteorder("<")).tobytes()


def write_ct_series(
    folder: Path,
    stored: np.ndarray,
    *,
    iop: Sequence[float] = (1, 0, 0, 0, 1, 0),
    pixel_spacing: tuple[float, float] = (0.8, 0.7),
    origin: Sequence[float] = (-20.0, -30.0, 40.0),
    positions: Sequence[Sequence[float]] | None = None,
    slice_step: float = 2.5,
    slope: float = 1.0,
    intercept: float = -1024.0,
    series_uid: str | None = None,
    study_uid: str | None = None,
    rng: np.random.Generator | None = None,
    extra: dict[str, Any] | None = None,
    per_slice: Sequence[dict[str, Any]] | None = None,
    modality: str = "CT",
    image_type: Sequence[str] = ("ORIGINAL", "PRIMARY", "AXIAL"),
) -> list[Path]:
    """Write ``stored`` (cols, rows, n) — i.e. ``(i, j, k)`` — as single-frame CT files.

    Slice ``k`` is written at ``positions[k]`` (default: ``origin + k * slice_step * normal``)
    under a random file name with a shuffled InstanceNumber, so readers must sort by position.
    Returns the paths in slice order ``k``.
    """
    rng = rng if rng is not None else np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    iop_s = [ds_str(v) for v in iop]
    iop_f = np.asarray([float(v) for v in iop_s])
    normal = np.cross(iop_f[:3], iop_f[3:])
    n = stored.shape[2]
    if positions is None:
        positions = [np.asarray(origin) + k * slice_step * normal for k in range(n)]
    series_uid = series_uid or new_uid()
    study_uid = study_uid or new_uid()
    instance_numbers = rng.permutation(n) + 1
    paths = []
    for k in range(n):
        sop = new_uid()
        path = folder / f"{uuid.uuid4().hex[:12]}"
        ds = _base_dataset(path, CT_IMAGE_STORAGE, sop)
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = study_uid + ".1"
        ds.Modality = modality
        ds.SeriesDescription = "synthetic ct"
        ds.SeriesNumber = 3
        ds.ImageType = list(image_type)
        ds.InstanceNumber = int(instance_numbers[k])
        ds.ImageOrientationPatient = iop_s
        ds.ImagePositionPatient = [ds_str(v) for v in positions[k]]
        ds.PixelSpacing = [ds_str(v) for v in pixel_spacing]
        ds.SliceThickness = ds_str(abs(slice_step))
        ds.RescaleSlope = ds_str(slope)
        ds.RescaleIntercept = ds_str(intercept)
        for key, value in (extra or {}).items():
            setattr(ds, key, value)
        for key, value in ((per_slice[k] if per_slice else None) or {}).items():
            setattr(ds, key, value)
        _set_pixels(ds, stored[:, :, k].T)  # (i, j) -> (rows, cols)
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def expected_affine(
    iop: Sequence[float],
    pixel_spacing: Sequence[float],
    origin: Sequence[float],
    step: Sequence[float],
) -> np.ndarray:
    """The RAS affine of a series, computed by hand from DS-rounded header values."""
    iop = ds_round(iop)
    ps = ds_round(pixel_spacing)
    lps = np.eye(4)
    lps[:3, 0] = iop[:3] * ps[1]
    lps[:3, 1] = iop[3:] * ps[0]
    lps[:3, 2] = step
    lps[:3, 3] = ds_round(origin)
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def write_enhanced_ct(
    path: Path,
    stored: np.ndarray,
    *,
    iop: Sequence[float],
    pixel_spacing: tuple[float, float],
    positions: Sequence[Sequence[float]],
    frame_order: Sequence[int],
    slope: float = 1.0,
    intercept: float = -1024.0,
    shared_measures: bool = True,
) -> Path:
    """An Enhanced CT (multi-frame) file by hand: frame ``f`` holds slice ``frame_order[f]``."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence as DicomSequence

    ds = _base_dataset(path, ENHANCED_CT_IMAGE_STORAGE, new_uid())
    ds.StudyInstanceUID = new_uid()
    ds.SeriesInstanceUID = new_uid()
    ds.Modality = "CT"
    ds.SeriesDescription = "synthetic enhanced ct"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL", "NONE"]
    ds.InstanceNumber = 1
    ds.NumberOfFrames = len(frame_order)

    def item(**kw: Any) -> Dataset:
        d = Dataset()
        for k, v in kw.items():
            setattr(d, k, v)
        return d

    measures = item(PixelSpacing=[ds_str(v) for v in pixel_spacing], SliceThickness="1")
    orientation = item(ImageOrientationPatient=[ds_str(v) for v in iop])
    transform = item(
        RescaleSlope=ds_str(slope), RescaleIntercept=ds_str(intercept), RescaleType="HU"
    )
    shared = item(
        PlaneOrientationSequence=DicomSequence([orientation]),
        PixelValueTransformationSequence=DicomSequence([transform]),
    )
    if shared_measures:
        shared.PixelMeasuresSequence = DicomSequence([measures])
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])
    frames = []
    for f, k in enumerate(frame_order):
        fg = item(
            PlanePositionSequence=DicomSequence(
                [item(ImagePositionPatient=[ds_str(v) for v in positions[k]])]
            ),
            FrameContentSequence=DicomSequence([item(InStackPositionNumber=f + 1)]),
        )
        if not shared_measures:
            fg.PixelMeasuresSequence = DicomSequence([measures])
        frames.append(fg)
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(frames)
    pixels = np.stack([stored[:, :, k].T for k in frame_order])  # (frames, rows, cols)
    _set_pixels(ds, pixels)
    ds.save_as(path, enforce_file_format=True)
    return path


MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"


def csa_header_bytes(tags: dict[str, tuple[str, Sequence[str]]], extra_items: int = 2) -> bytes:
    """A Siemens CSA header (SV10 layout) from ``{name: (vr, values)}``, built byte by byte.

    Each tag gets ``extra_items`` empty items after its ``vm`` values, as scanners write them.
    """
    import struct

    out = bytearray(b"SV10" + b"\x04\x03\x02\x01" + struct.pack("<II", len(tags), 77))
    for name, (vr, values) in tags.items():
        n_items = len(values) + extra_items
        out += struct.pack("<64si4siii", name.encode(), len(values), vr.encode(), 3, n_items, 77)
        for i in range(n_items):
            data = (str(values[i]).encode() + b"\0") if i < len(values) else b""
            out += struct.pack("<4i", len(data), len(data), 77, len(data))
            out += data + b"\0" * (-len(data) % 4)
    return bytes(out)


def mosaic_position(
    first: Sequence[float],
    iop: Sequence[float],
    pixel_spacing: Sequence[float],
    mosaic_rc: tuple[int, int],
    tile_rc: tuple[int, int],
) -> np.ndarray:
    """ImagePositionPatient a scanner writes for a mosaic whose first slice starts at ``first``
    (the top-left corner of the whole tiled image: the inverse of the reader's correction)."""
    iop = np.asarray(iop, dtype=float)
    return (
        np.asarray(first, dtype=float)
        - (mosaic_rc[1] - tile_rc[1]) / 2 * pixel_spacing[1] * iop[:3]
        - (mosaic_rc[0] - tile_rc[0]) / 2 * pixel_spacing[0] * iop[3:]
    )


def write_mosaic_series(
    folder: Path,
    volumes: Sequence[np.ndarray],
    *,
    iop: Sequence[float] = (1, 0, 0, 0, 1, 0),
    pixel_spacing: tuple[float, float] = (2.5, 2.0),
    first: Sequence[float] = (-30.0, -40.0, 10.0),
    slice_spacing: float = 3.0,
    tile_count: str | None = "private",
    csa_normal: Sequence[float] | None = None,
    csa_extra: dict[str, tuple[str, Sequence[str]]] | None = None,
    with_csa: bool = True,
    per_volume: Sequence[dict[str, Any]] | None = None,
    image_type: Sequence[str] = ("ORIGINAL", "PRIMARY", "M", "ND", "MOSAIC"),
) -> list[Path]:
    """Write each ``(i, j, k)`` volume as one Siemens mosaic MR file (uint16), time point ``t``.

    Args:
        tile_count: Where NumberOfImagesInMosaic goes: "private" (0019,xx0A), "csa" (the CSA
            header), "times" (only MosaicRefAcqTimes in the CSA header) or None (nowhere).
        csa_normal: SliceNormalVector written to the CSA header (default: row x column
            cosine); slices are written along it.
        csa_extra: More CSA tags, e.g. diffusion fields.
        with_csa: Write the CSA image header at all.
        per_volume: Per time point: DICOM keywords to set, ``siemens_b`` /
            ``siemens_direction`` for the private (0019,xx0C) / (0019,xx0E) elements and
            ``csa`` for more CSA tags of that file.
    """
    folder.mkdir(parents=True, exist_ok=True)
    iop_s = [ds_str(v) for v in iop]
    iop_f = ds_round(iop)
    ps_s = [ds_str(v) for v in pixel_spacing]
    normal = np.cross(iop_f[:3], iop_f[3:])
    normal = np.asarray(csa_normal, dtype=float) if csa_normal is not None else normal
    series_uid, study_uid = new_uid(), new_uid()
    paths = []
    for t, vol in enumerate(volumes):
        cols_t, rows_t, n = vol.shape
        m = int(np.ceil(np.sqrt(n)))
        mosaic = np.zeros((m * rows_t, m * cols_t), dtype=np.uint16)
        for k in range(n):  # row-major tiles; tile k holds slice k as (rows, cols)
            a, b = divmod(k, m)
            mosaic[a * rows_t : (a + 1) * rows_t, b * cols_t : (b + 1) * cols_t] = vol[:, :, k].T
        ipp = mosaic_position(first, iop_f, ds_round(pixel_spacing), mosaic.shape, (rows_t, cols_t))
        path = folder / f"{uuid.uuid4().hex[:12]}"
        ds = _base_dataset(path, MR_IMAGE_STORAGE, new_uid())
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.Modality = "MR"
        ds.Manufacturer = "SIEMENS"
        ds.SeriesDescription = "synthetic mosaic"
        ds.SeriesNumber = 7
        ds.ImageType = list(image_type)
        ds.InstanceNumber = t + 1
        ds.AcquisitionTime = f"1200{t:02d}.000000"
        ds.ImageOrientationPatient = iop_s
        ds.ImagePositionPatient = [ds_str(v) for v in ipp]
        ds.PixelSpacing = ps_s
        ds.SliceThickness = ds_str(slice_spacing * 0.9)
        ds.SpacingBetweenSlices = ds_str(slice_spacing)
        mr = ds.private_block(0x0019, "SIEMENS MR HEADER", create=True)
        if tile_count == "private":
            mr.add_new(0x0A, "US", n)
        extra = dict((per_volume[t] if per_volume else None) or {})
        csa_more = extra.pop("csa", {})
        if "siemens_b" in extra:
            mr.add_new(0x0C, "IS", str(extra.pop("siemens_b")))
        if "siemens_direction" in extra:
            mr.add_new(0x0E, "FD", [float(v) for v in extra.pop("siemens_direction")])
        for key, value in extra.items():
            setattr(ds, key, value)
        tags: dict[str, tuple[str, Sequence[str]]] = {
            "AcquisitionMatrixText": ("SH", [f"{rows_t}p*{cols_t}"]),
            "SliceNormalVector": ("FD", [f"{v:.8f}" for v in normal]),
        }
        if tile_count == "csa":
            tags["NumberOfImagesInMosaic"] = ("US", [str(n)])
        if tile_count == "times":
            tags["MosaicRefAcqTimes"] = ("FD", [f"{37.5 * k:.4f}" for k in range(n)])
        tags.update(csa_extra or {})
        tags.update(csa_more)
        if with_csa:
            csa = ds.private_block(0x0029, "SIEMENS CSA HEADER", create=True)
            csa.add_new(0x08, "CS", "IMAGE NUM 4")
            csa.add_new(0x10, "OB", csa_header_bytes(tags))
        _set_pixels(ds, mosaic)
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


class TinySeg(torch.nn.Module):
    """A two-conv segmentation stand-in for the registry (fast fine-tuning tests)."""

    def __init__(self, in_chans=1, out_channels=2, img_size=None, width=8):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Conv3d(in_chans, width, 3, padding=1),
            torch.nn.GELU(),
            torch.nn.Conv3d(width, out_channels, 1),
        )

    def forward(self, x):
        return self.net(x)


class TinyCls(torch.nn.Module):
    """A strided conv + linear head classification stand-in for the registry."""

    def __init__(self, in_chans=1, num_classes=2, img_size=None, width=8):
        super().__init__()
        self.conv = torch.nn.Conv3d(in_chans, width, 3, stride=2, padding=1)
        self.head = torch.nn.Linear(width, num_classes)

    def forward(self, x):
        return self.head(self.conv(x).relu().mean(dim=(2, 3, 4)))


def corrupt_pixels(paths: Sequence[Path]) -> None:
    """Declare JPEG 2000 and replace the pixels with bytes no decoder reads (Orthanc stores
    them as they are)."""
    import pydicom
    from pydicom.encaps import encapsulate

    for p in paths:
        ds = pydicom.dcmread(p)
        ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.90"
        ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + b"not a codestream" * 4])
        ds["PixelData"].VR = "OB"
        ds.save_as(p, enforce_file_format=True)
