"""Pixel data: decoding (pydicom, SimpleITK/GDCM as fallback) and assembling the volume array.

``_pixels`` decodes one file's frames; ``_assemble`` stacks the images of a stack, in slice (and
time point) order, into an ``(i, j, k[, t])`` array with the rescale applied, int16 where the
values allow it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset

from umit.errors import InputError
from umit.ingest.dicom.frames import _Frame

logger = logging.getLogger(__name__)


def _decode_pydicom(ds: Dataset) -> np.ndarray:
    return ds.pixel_array


def _decode_sitk(path: Path) -> np.ndarray:
    """Pixels through SimpleITK/GDCM, which applies the rescale itself."""
    import SimpleITK as sitk  # heavy, only for the pixel codecs pydicom lacks

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
