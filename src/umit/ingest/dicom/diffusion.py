"""Diffusion encoding of DWI images: the b-value and gradient direction of each image, and the
table of one per time point of a (4D) series.

Where each value is read, first found wins:

* b-value: DiffusionBValue (0018,9087), at the top level or in the MR Diffusion functional group
  of an enhanced multi-frame file; Siemens B_value (0019,xx0C, ``SIEMENS MR HEADER``) and CSA
  ``B_value``; GE (0043,xx39, ``GEMS_PARM_01``) first value modulo 100000 (GE adds 1e9 offsets);
  Philips (2001,xx03, ``Philips Imaging DD 001``).
* direction: DiffusionGradientOrientation (0018,9089), top level or in the Diffusion Gradient
  Direction Sequence; Siemens DiffusionGradientDirection (0019,xx0E) and CSA
  ``DiffusionGradientDirection``, else the main eigenvector of CSA ``B_matrix``; Philips
  (2005,xxB0/B1/B2, right-left, anterior-posterior, foot-head). All of these are in the DICOM
  patient frame (LPS), which is how the table keeps them.

GE's private gradients (0019,xxBB/BC/BD) are in the scanner's logical frame (frequency, phase,
slice; dcm2niix's ``geCorrectBvecs``), not the patient frame, and need the phase-encoding
direction and patient position to convert: they are not used, so a GE series without the
standard attribute keeps its b-values but no directions.

A b=0 image, or one whose DiffusionDirectionality is ISOTROPIC or NONE (trace / ADC images), has
the direction (0, 0, 0), as in FSL's bvec files.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset

from umit.errors import GeometryError
from umit.ingest.dicom.attributes import _float, _floats
from umit.ingest.dicom.csa import csa_floats
from umit.ingest.dicom.private import SIEMENS_MR, private_numbers

logger = logging.getLogger(__name__)

GE_PARM = "GEMS_PARM_01"
PHILIPS_IMAGING = "Philips Imaging DD 001"
PHILIPS_MR = "Philips MR Imaging DD 001"

B_TOLERANCE = 1.0
"""b-values (s/mm^2) of one time point may differ across slices by this much (or 0.1 %)."""
DIRECTION_TOLERANCE = 1e-3
"""Directions of one time point may differ across slices by this much (1 - |cosine|)."""


@dataclass(frozen=True)
class Diffusion:
    """Diffusion encoding of one image.

    Attributes:
        b_value: s/mm^2.
        direction: Unit gradient direction in the patient frame (LPS); zeros for b=0 and
            isotropic images; None when the file does not say (or says it in a frame we do not
            convert).
    """

    b_value: float
    direction: np.ndarray | None


@dataclass(frozen=True)
class DiffusionTable:
    """One b-value and direction per time point of a series (directions None if any is unknown)."""

    b_values: list[float]
    directions: list[list[float]] | None


def _standard_b(item: Dataset | None) -> float | None:
    return None if item is None else _float(item.get("DiffusionBValue"))


def _standard_direction(item: Dataset | None) -> np.ndarray | None:
    if item is None:
        return None
    found = _floats(item.get("DiffusionGradientOrientation", []), 3)
    seq = item.get("DiffusionGradientDirectionSequence")
    if found is None and seq:
        found = _floats(seq[0].get("DiffusionGradientOrientation", []), 3)
    return found


def _csa_vector(csa: dict[str, list[str]] | None) -> np.ndarray | None:
    """CSA DiffusionGradientDirection, else the main eigenvector of B_matrix (bxx bxy bxz byy
    byz bzz; its sign is lost, which a diffusion direction does not need)."""
    if csa is None:
        return None
    vec = csa_floats(csa, "DiffusionGradientDirection")
    if vec is not None and vec.size == 3:
        return vec
    bm = csa_floats(csa, "B_matrix")
    if bm is None or bm.size != 6:
        return None
    xx, xy, xz, yy, yz, zz = bm
    w, v = np.linalg.eigh(np.array([[xx, xy, xz], [xy, yy, yz], [xz, yz, zz]]))
    return v[:, int(np.argmax(w))] if w.max() > 0 else None


def _b_value(ds: Dataset, csa: dict[str, list[str]] | None, group: Dataset | None) -> float | None:
    for b in (_standard_b(group), _standard_b(ds)):
        if b is not None:
            return b
    siemens = private_numbers(ds, 0x0019, SIEMENS_MR, 0x0C)
    if siemens is not None:
        return float(siemens[0])
    if csa is not None:
        b = csa_floats(csa, "B_value")
        if b is not None:
            return float(b[0])
    ge = private_numbers(ds, 0x0043, GE_PARM, 0x39)
    if ge is not None:
        return float(ge[0] % 100000)
    philips = private_numbers(ds, 0x2001, PHILIPS_IMAGING, 0x03)
    return None if philips is None else float(philips[0])


def _direction(
    ds: Dataset, csa: dict[str, list[str]] | None, group: Dataset | None
) -> np.ndarray | None:
    for vec in (_standard_direction(group), _standard_direction(ds)):
        if vec is not None:
            return vec
    siemens = private_numbers(ds, 0x0019, SIEMENS_MR, 0x0E)
    if siemens is not None and siemens.size == 3:
        return siemens
    vec = _csa_vector(csa)
    if vec is not None:
        return vec
    parts = [private_numbers(ds, 0x2005, PHILIPS_MR, e) for e in (0xB0, 0xB1, 0xB2)]
    if all(p is not None and p.size == 1 for p in parts):
        return np.array([float(p[0]) for p in parts])  # RL, AP, FH: the LPS axes
    return None


def read_diffusion(
    ds: Dataset, csa: dict[str, list[str]] | None = None, group: Dataset | None = None
) -> Diffusion | None:
    """The diffusion encoding of an image, or None for an image without a b-value.

    Args:
        ds: The file's dataset.
        csa: Its parsed Siemens CSA image header, if any.
        group: The frame's MR Diffusion functional group item (enhanced multi-frame files).
    """
    b = _b_value(ds, csa, group)
    if b is None:
        return None
    zero = np.zeros(3)
    source = group if group is not None else ds
    directionality = str(source.get("DiffusionDirectionality", "") or "").upper()
    if b <= 0 or directionality in ("ISOTROPIC", "NONE"):
        return Diffusion(max(b, 0.0), zero)
    vec = _direction(ds, csa, group)
    if vec is None:
        return Diffusion(b, None)
    norm = float(np.linalg.norm(vec))
    # A b>0 image with a zero vector is a derived (trace / ADC) image, as dcm2niix reads it.
    return Diffusion(b, zero if norm < 1e-6 else vec / norm)


def _same_direction(a: np.ndarray, b: np.ndarray) -> bool:
    """Both zero, or unit vectors along one axis (either sign)."""
    if not np.any(a) or not np.any(b):
        return not np.any(a) and not np.any(b)
    return 1 - abs(float(a @ b)) <= DIRECTION_TOLERANCE


def diffusion_table(
    per_frame: list[Diffusion | None], groups: list[np.ndarray], where: Path
) -> DiffusionTable | None:
    """One b-value and direction per time point, checked to agree across the slices.

    Args:
        per_frame: Each frame's encoding (None where the frame has none).
        groups: Frame indices per slice position, each ordered by time point.
        where: The series folder, named in errors.

    Returns:
        The table, or None when no frame has a b-value (or only some have one).

    Raises:
        GeometryError: the slices of one time point disagree (the time points are mixed up).
    """
    if all(d is None for d in per_frame):
        return None
    n_t = len(groups[0])
    b_values: list[float] = []
    directions: list[list[float]] | None = []
    for t in range(n_t):
        found = [per_frame[int(g[t])] for g in groups]
        if any(d is None for d in found):  # b-values in some images only: nothing reliable
            logger.warning("%s: b-values in some images only; diffusion table not kept", where)
            return None
        bs = np.array([d.b_value for d in found if d is not None])
        if bs.max() - bs.min() > max(B_TOLERANCE, 1e-3 * bs.max()):
            raise GeometryError(
                where,
                f"diffusion series: time point {t + 1} mixes b-values across slices "
                f"({', '.join(f'{b:g}' for b in sorted(set(bs.tolist())))})",
            )
        b_values.append(round(float(np.median(bs)), 4))
        vecs = [d.direction for d in found if d is not None and d.direction is not None]
        if not vecs:
            directions = None
            continue
        ref = vecs[0]
        if not all(_same_direction(v, ref) for v in vecs[1:]):
            raise GeometryError(
                where,
                f"diffusion series: time point {t + 1} mixes gradient directions across slices",
            )
        if directions is not None:
            directions.append([round(float(v), 6) + 0.0 for v in ref])
    return DiffusionTable(b_values, directions)
