"""Checks of a written DICOM SEG shared by the SEG tests: dciodvfy, and reading it back.

Reading back goes two independent ways: per referenced source image
(``get_pixels_by_source_instance``: the frame references are right) and as a volume in patient
space (``get_volume``: the SEG's own plane positions put every voxel where the mask has it).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from umit.data.meta import LPS_TO_RAS

# What dicom3tools 2022 (Debian bookworm) says of the Label Map Segmentation SOP class (DICOM
# Sup 243, 2024), which it predates: it knows no such IOD, and it applies BINARY's
# segment-numbering rule to LABELMAP's background segment 0.
LABELMAP_VALIDATOR_ERRORS = (
    "Error - Information Object Not found",
    "Error - SegmentNumber not monotonically increasing from one by one",
)


def dciodvfy(path: Path, allowed_errors: tuple[str, ...] = ()) -> list[str]:
    """Validate ``path`` with dciodvfy: no Error lines (but ``allowed_errors`` prefixes); return
    the Warning lines. Skips the calling test, at its end, when dciodvfy is not installed."""
    exe = shutil.which("dciodvfy")
    if exe is None:
        pytest.skip(
            "dciodvfy not installed (apt-get install dicom3tools): the SEG was read back "
            "and compared, but not validated"
        )
    done = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=120)
    lines = [line.strip() for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    errors = [
        line
        for line in lines
        if line.startswith("Error") and not line.startswith(tuple(allowed_errors))
    ]
    assert not errors, "dciodvfy errors:\n" + "\n".join(errors)
    return [line for line in lines if line.startswith("Warning")]


def frames_of(label_map: np.ndarray) -> np.ndarray:
    """``(i, j, k)`` label map -> ``(k, rows, cols)`` frames, as DICOM stores slices."""
    return np.stack([label_map[:, :, k].T for k in range(label_map.shape[2])])


def segment_values(seg: hd.seg.Segmentation) -> np.ndarray:
    """Lookup segment number -> label value, from each segment's description
    ("label value N")."""
    pairs = {
        int(s.SegmentNumber): int(str(s.SegmentDescription).split()[-1])
        for s in seg.SegmentSequence
        if int(s.SegmentNumber) > 0  # LABELMAP's background segment 0 has no description
    }
    lut = np.zeros(max(pairs) + 1, np.int64)
    for number, value in pairs.items():
        lut[number] = value
    return lut


def read_back_by_source(seg_path: Path, source_uids_in_k_order: list[str]) -> np.ndarray:
    """The SEG as an ``(i, j, k)`` label map, frame by referenced source image."""
    seg = hd.seg.segread(seg_path)
    px = seg.get_pixels_by_source_instance(
        source_uids_in_k_order, combine_segments=True, relabel=False
    )  # (k, rows, cols) segment numbers
    return np.transpose(segment_values(seg)[px], (2, 1, 0))


def read_back_in_space(seg_path: Path, affine: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """The SEG's voxels placed on the grid ``(affine, shape)`` by their patient coordinates.

    The SEG's own plane positions must map every voxel onto a voxel of the grid (a signed
    permutation of axes plus an integer shift); a voxel off the grid fails.
    """
    seg = hd.seg.segread(seg_path)
    vol = seg.get_volume(combine_segments=True, relabel=False)
    to_grid = np.linalg.inv(LPS_TO_RAS @ affine) @ vol.affine  # SEG (s, r, c) -> grid (i, j, k)
    np.testing.assert_allclose(to_grid[:3, :3], np.round(to_grid[:3, :3]), atol=2e-3)
    np.testing.assert_allclose(to_grid[:3, 3], np.round(to_grid[:3, 3]), atol=0.05)
    index = np.indices(vol.array.shape).reshape(3, -1)
    ijk = np.rint(to_grid[:3, :3] @ index + to_grid[:3, 3:]).astype(int)
    inside = np.all((ijk >= 0) & (ijk < np.asarray(shape)[:, None]), axis=0)
    values = segment_values(seg)[vol.array.reshape(-1)]
    assert not values[~inside].any(), "SEG voxels outside the grid"
    out = np.zeros(shape, np.int64)
    out[tuple(ijk[:, inside])] = values[inside]
    return out


def sop_uids(paths: list[Path]) -> list[str]:
    return [str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths]
