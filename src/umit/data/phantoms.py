"""Procedural synthetic CT (torso) and MRI (head) phantoms with voxel labels.

The default data of the demo and of the tests: deterministic by seed, a fraction of a second per
volume on one CPU core, and realistic enough that every pipeline stage has something to do:

- anatomy drawn per subject (organ sizes, positions, rotations within anatomical limits; sex and
  age band modulate body size, fat, bone density and brain atrophy);
- acquisition effects per site and scanner: voxel spacing, stored orientation (RAS, LPS as from
  DICOM, LAS radiological, LIA permuted), Gaussian PSF, noise (Gaussian in HU for CT, Rician for
  MR), a calibration offset per CT scanner, gain and a smooth multiplicative bias field for MR;
- subject attributes (sex, age band, site, scanner, contrast) whose distributions differ by site,
  so that subgroup analyses have something to find.

Geometry: ``shape`` is the grid, in RAS order (x: right-left, y: anterior-posterior, z: head-foot),
of the field of view sampled at the modality's reference spacing (``CT_REFERENCE_SPACING``,
``MR_REFERENCE_SPACING``). The physical field of view, and with it the anatomy in millimetres, is
therefore the same for every site; each site samples it at its own spacing, so the stored array
shape follows the site's spacing (and is permuted to the site's stored orientation). We keep the
field of view rather than the array shape fixed because the anatomy must not change size with the
scanner: after ``umit preprocess`` resamples every case to one spacing, organs of one subject have
the same size whichever site scanned them, and what differs between sites is what differs between
real scanners (spacing, orientation, PSF, noise, calibration), not a scale factor the phantom
invented. The CT reference spacing sits between the site spacings, so the mean array size over
sites is close to ``shape``. Anatomy is miniature (a 96 x 96 voxel torso at 1.2 mm is 115 mm
wide) to keep the demo fast on 2 cores; realistic spacings matter more than realistic size here.

World coordinates are nibabel's RAS+: x increases from the patient's left to the patient's Right,
y from posterior to Anterior, z from inferior to Superior. The liver lies on the patient's right,
so its world x is larger than the spleen's whatever the stored orientation (tested).
"""

from __future__ import annotations

import csv
import io
import json
import math
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from multiprocessing import get_all_start_methods, get_context
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from scipy import ndimage

from umit.data.meta import ImageMeta
from umit.errors import InputError
from umit.utils.fileio import atomic_path, atomic_write_json, atomic_write_text, remove_stale_temps

__all__ = [
    "AGE_BANDS",
    "CT_CONTRASTS",
    "CT_LABELS",
    "CT_REFERENCE_SPACING",
    "CT_SITES",
    "MR_CONTRASTS",
    "MR_BRAIN_LABELS",
    "MR_LABELS",
    "MR_REFERENCE_SPACING",
    "MR_SITES",
    "SEXES",
    "Phantom",
    "Scanner",
    "SiteProtocol",
    "SubjectAttributes",
    "brain_mask",
    "check_shape",
    "make_ct_phantom",
    "make_mr_phantom",
    "sample_attributes",
    "site_grid_shape",
    "write_phantom_collection",
]

CT_LABELS: dict[int, str] = {
    0: "background",
    1: "body",
    2: "lung_left",
    3: "lung_right",
    4: "liver",
    5: "spleen",
    6: "kidney_left",
    7: "kidney_right",
    8: "spine",
    9: "aorta",
}
MR_LABELS: dict[int, str] = {
    0: "background",
    1: "head",
    2: "csf",
    3: "grey_matter",
    4: "white_matter",
    5: "lesion",
}
# Labels inside the intracranial cavity; their union is the brain mask (CSF included).
MR_BRAIN_LABELS: tuple[int, ...] = (2, 3, 4, 5)

SEXES: tuple[str, ...] = ("F", "M")
AGE_BANDS: tuple[str, ...] = ("18-39", "40-59", "60-79", "80+")
CT_CONTRASTS: tuple[str, ...] = ("none", "arterial", "portal")
MR_CONTRASTS: tuple[str, ...] = ("none", "gadolinium")
CT_CHANNELS: tuple[str, ...] = ("CT",)
MR_CHANNELS: tuple[str, ...] = ("T1", "T2", "FLAIR")

# Spacing (mm, RAS x, y, z) at which ``shape`` is measured; see the module docstring.
CT_REFERENCE_SPACING: tuple[float, float, float] = (1.2, 1.2, 2.0)
MR_REFERENCE_SPACING: tuple[float, float, float] = (1.0, 1.0, 1.0)

_INT16_MAX = 32767
_MIN_AXIS = 16
_MAX_AXIS = 512


@dataclass(frozen=True)
class Scanner:
    """One scanner model of a site.

    Attributes:
        manufacturer: DICOM-style manufacturer string.
        model: DICOM-style model name.
        weight: Relative frequency of this scanner within its site.
        calibration: CT: HU offset added to every voxel (miscalibrated water). MR: receiver gain
            multiplying the arbitrary intensity units (x 1000).
    """

    manufacturer: str
    model: str
    weight: float
    calibration: float


@dataclass(frozen=True)
class SiteProtocol:
    """Acquisition protocol and patient population of one site.

    Attributes:
        spacing: Voxel size in mm along RAS x, y, z (before reorientation to ``orientation``).
        orientation: nibabel axis codes of the stored array, e.g. "RAS", "LPS", "LIA".
        noise: CT: noise standard deviation in HU. MR: Rician noise sigma as a fraction of the
            white-matter T1 signal scale (1.0 in tissue units).
        psf_mm: Gaussian PSF sigma in mm along RAS x, y, z (z includes the slice profile).
        world_center: RAS world position (mm) of the centre of the field of view.
        scanners: The site's scanners; one is drawn per subject.
        weight: Relative frequency of the site in ``sample_attributes``.
        p_male: Probability that a subject of this site is male.
        age_probs: Probabilities of ``AGE_BANDS``.
        contrast_probs: Probabilities of ``CT_CONTRASTS`` or ``MR_CONTRASTS``.
        table: CT only: whether the patient table is inside the reconstructed field of view.
        bias: MR only: amplitude of the smooth multiplicative bias field (log scale).
    """

    spacing: tuple[float, float, float]
    orientation: str
    noise: float
    psf_mm: tuple[float, float, float]
    world_center: tuple[float, float, float]
    scanners: tuple[Scanner, ...]
    weight: float
    p_male: float
    age_probs: tuple[float, ...]
    contrast_probs: tuple[float, ...]
    table: bool = False
    bias: float = 0.0


# CT sites. site_a: older scanners, thick slices, moderate noise, stored RAS (NIfTI tools).
# site_b: thin in-plane, 3 mm slices, sharp kernel and low dose (noisiest), stored LPS like
# arrays taken straight from DICOM. site_c: near-isotropic, iterative reconstruction (smooth, least
# noise), stored LAS (radiological, left-handed index) and reconstructed without the table.
CT_SITES: dict[str, SiteProtocol] = {
    "site_a": SiteProtocol(
        spacing=(1.5, 1.5, 2.5),
        orientation="RAS",
        noise=12.0,
        psf_mm=(0.9, 0.9, 1.0),
        world_center=(0.0, -60.0, -250.0),
        scanners=(
            Scanner("GE MEDICAL SYSTEMS", "LightSpeed VCT", 0.6, 4.0),
            Scanner("GE MEDICAL SYSTEMS", "Revolution CT", 0.4, -2.0),
        ),
        weight=0.40,
        p_male=0.50,
        age_probs=(0.10, 0.30, 0.45, 0.15),
        contrast_probs=(0.20, 0.10, 0.70),
        table=True,
    ),
    "site_b": SiteProtocol(
        spacing=(0.9, 0.9, 3.0),
        orientation="LPS",
        noise=25.0,
        psf_mm=(0.6, 0.6, 1.2),
        world_center=(2.0, -150.0, 640.0),
        scanners=(
            Scanner("SIEMENS", "SOMATOM Definition AS", 0.5, -6.0),
            Scanner("SIEMENS", "SOMATOM Force", 0.5, 1.0),
        ),
        weight=0.35,
        p_male=0.65,
        age_probs=(0.40, 0.35, 0.20, 0.05),
        contrast_probs=(0.20, 0.50, 0.30),
        table=True,
    ),
    "site_c": SiteProtocol(
        spacing=(1.2, 1.2, 1.5),
        orientation="LAS",
        noise=7.0,
        psf_mm=(1.0, 1.0, 0.8),
        world_center=(-4.0, 20.0, -1100.0),
        scanners=(
            Scanner("CANON_MEC", "Aquilion ONE", 0.7, 8.0),
            Scanner("Philips", "iCT 256", 0.3, -3.0),
        ),
        weight=0.25,
        p_male=0.40,
        age_probs=(0.25, 0.35, 0.30, 0.10),
        contrast_probs=(0.60, 0.10, 0.30),
        table=False,
    ),
}

# MR sites. site_a: 3T, 1 mm isotropic 3D, low noise, strong bias, stored RAS. site_b: 1.5T,
# 1.5 mm slices, noisiest, weak bias, stored LPS (DICOM). site_c: 3T sagittal 3D with 1.3 mm
# left-right spacing, stored LIA (FreeSurfer-style, axes permuted).
MR_SITES: dict[str, SiteProtocol] = {
    "site_a": SiteProtocol(
        spacing=(1.0, 1.0, 1.0),
        orientation="RAS",
        noise=0.02,
        psf_mm=(0.45, 0.45, 0.45),
        world_center=(0.0, 10.0, 20.0),
        scanners=(
            Scanner("SIEMENS", "MAGNETOM Prisma", 0.7, 1.0),
            Scanner("SIEMENS", "MAGNETOM Skyra", 0.3, 0.9),
        ),
        weight=0.45,
        p_male=0.50,
        age_probs=(0.30, 0.35, 0.25, 0.10),
        contrast_probs=(0.65, 0.35),
        bias=0.25,
    ),
    "site_b": SiteProtocol(
        spacing=(0.9, 0.9, 1.5),
        orientation="LPS",
        noise=0.045,
        psf_mm=(0.4, 0.4, 0.7),
        world_center=(-3.0, -12.0, 35.0),
        scanners=(
            Scanner("GE MEDICAL SYSTEMS", "SIGNA Artist", 0.6, 0.6),
            Scanner("GE MEDICAL SYSTEMS", "Optima MR450w", 0.4, 0.55),
        ),
        weight=0.30,
        p_male=0.55,
        age_probs=(0.15, 0.30, 0.40, 0.15),
        contrast_probs=(0.40, 0.60),
        bias=0.12,
    ),
    "site_c": SiteProtocol(
        spacing=(1.3, 1.0, 1.0),
        orientation="LIA",
        noise=0.03,
        psf_mm=(0.6, 0.45, 0.45),
        world_center=(1.0, 0.0, 0.0),
        scanners=(Scanner("Philips", "Ingenia", 1.0, 1.5),),
        weight=0.25,
        p_male=0.45,
        age_probs=(0.35, 0.35, 0.20, 0.10),
        contrast_probs=(0.80, 0.20),
        bias=0.30,
    ),
}


@dataclass
class SubjectAttributes:
    """Who was scanned, where and how: the subgroup attributes a bias analysis needs.

    Attributes:
        sex: "F" or "M".
        age_band: One of ``AGE_BANDS``.
        site: A key of ``CT_SITES`` / ``MR_SITES`` (the same names for both modalities).
        manufacturer: Scanner manufacturer.
        model: Scanner model.
        contrast: CT: "none", "arterial" or "portal" phase. MR: "none" or "gadolinium".
    """

    sex: str
    age_band: str
    site: str
    manufacturer: str
    model: str
    contrast: str = "none"

    def __post_init__(self) -> None:
        if self.sex not in SEXES:
            raise ValueError(f"sex must be one of {SEXES}, got {self.sex!r}")
        if self.age_band not in AGE_BANDS:
            raise ValueError(f"age_band must be one of {AGE_BANDS}, got {self.age_band!r}")
        if self.contrast not in CT_CONTRASTS + MR_CONTRASTS:
            raise ValueError(
                f"contrast must be one of {CT_CONTRASTS} (CT) or {MR_CONTRASTS} (MR), "
                f"got {self.contrast!r}"
            )

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


@dataclass
class Phantom:
    """One synthetic subject: co-registered channels, a label map and their geometry.

    Attributes:
        images: Channel name -> ``(i, j, k)`` array in stored orientation (CT: int16 HU;
            MR: float32 arbitrary positive units), in ``meta.channel_names`` order.
        label: ``(i, j, k)`` uint8 label map on the same grid.
        meta: Affine (voxel -> RAS mm), modality, source ``phantom:<kind>:<seed>``, channel
            names, and ``extra`` = the subject attributes as a dict.
        label_names: Label value -> name (``CT_LABELS`` or ``MR_LABELS``).
        attributes: The subject attributes.
    """

    images: dict[str, np.ndarray]
    label: np.ndarray
    meta: ImageMeta
    label_names: dict[int, str]
    attributes: SubjectAttributes

    def stacked(self) -> np.ndarray:
        """Channel-first float32 array ``(C, i, j, k)`` in ``meta.channel_names`` order."""
        names = self.meta.channel_names or tuple(self.images)
        return np.stack([self.images[n].astype(np.float32) for n in names])


def brain_mask(label: np.ndarray) -> np.ndarray:
    """Boolean brain mask (intracranial: CSF, grey and white matter, lesion) of an MR label map."""
    return np.isin(label, MR_BRAIN_LABELS)


# --------------------------------------------------------------------------------------------
# Argument checks and random streams


def _check_modality(modality: str) -> str:
    if not isinstance(modality, str) or modality.lower() not in ("ct", "mr"):
        raise ValueError(f"modality must be 'ct' or 'mr', got {modality!r}")
    return modality.lower()


def _check_seed(seed: Any, name: str = "seed") -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {seed!r}")
    return int(seed)


def check_shape(shape: Any) -> tuple[int, int, int]:
    """Validate a phantom ``shape`` (three ints, each 16..512) and return it as a tuple."""
    try:
        dims = tuple(shape)
    except TypeError:
        raise ValueError(f"shape must be three integers, got {shape!r}") from None
    if len(dims) != 3 or not all(
        isinstance(d, (int, np.integer)) and not isinstance(d, bool) for d in dims
    ):
        raise ValueError(f"shape must be three integers, got {shape!r}")
    if any(d < _MIN_AXIS or d > _MAX_AXIS for d in dims):
        raise ValueError(
            f"shape must have {_MIN_AXIS}..{_MAX_AXIS} voxels on every axis, got {tuple(dims)}"
        )
    return tuple(int(d) for d in dims)  # type: ignore[return-value]


_MODALITY_CODE = {"ct": 1, "mr": 2}


def _streams(seed: int, modality: str) -> list[np.random.Generator]:
    """Independent generators: attributes, anatomy, acquisition.

    Anatomy draws only scalars whose number does not depend on the grid, so one seed gives the
    same anatomy at every site (only the acquisition differs).
    """
    ss = np.random.SeedSequence([seed, _MODALITY_CODE[modality]])
    return [np.random.default_rng(s) for s in ss.spawn(3)]


def _choice(rng: np.random.Generator, options: tuple | list, probs: tuple | list) -> Any:
    p = np.asarray(probs, dtype=np.float64)
    return options[int(rng.choice(len(options), p=p / p.sum()))]


def sample_attributes(rng: np.random.Generator, modality: str) -> SubjectAttributes:
    """Draw subject attributes; sites differ in population (sex, age) and protocol (contrast).

    Args:
        rng: The generator to draw from (always five draws).
        modality: "ct" or "mr".
    """
    modality = _check_modality(modality)
    sites = CT_SITES if modality == "ct" else MR_SITES
    contrasts = CT_CONTRASTS if modality == "ct" else MR_CONTRASTS
    names = tuple(sites)
    site = _choice(rng, names, [sites[n].weight for n in names])
    proto = sites[site]
    sex = "M" if rng.random() < proto.p_male else "F"
    age_band = _choice(rng, AGE_BANDS, proto.age_probs)
    scanner = _choice(rng, proto.scanners, [s.weight for s in proto.scanners])
    contrast = _choice(rng, contrasts, proto.contrast_probs)
    return SubjectAttributes(sex, age_band, site, scanner.manufacturer, scanner.model, contrast)


def _resolve_attributes(
    attributes: SubjectAttributes | None, rng: np.random.Generator, modality: str
) -> tuple[SubjectAttributes, SiteProtocol, Scanner]:
    sites = CT_SITES if modality == "ct" else MR_SITES
    contrasts = CT_CONTRASTS if modality == "ct" else MR_CONTRASTS
    if attributes is None:
        attributes = sample_attributes(rng, modality)
    elif not isinstance(attributes, SubjectAttributes):
        raise ValueError(f"attributes must be SubjectAttributes or None, got {attributes!r}")
    if attributes.site not in sites:
        raise ValueError(
            f"unknown {modality.upper()} site {attributes.site!r}; known: {sorted(sites)}"
        )
    if attributes.contrast not in contrasts:
        raise ValueError(
            f"contrast {attributes.contrast!r} is not a {modality.upper()} contrast {contrasts}"
        )
    proto = sites[attributes.site]
    scanner = next(
        (
            s
            for s in proto.scanners
            if (s.manufacturer, s.model) == (attributes.manufacturer, attributes.model)
        ),
        Scanner(attributes.manufacturer, attributes.model, 1.0, 0.0 if modality == "ct" else 1.0),
    )
    return attributes, proto, scanner


# --------------------------------------------------------------------------------------------
# Grid, shapes and acquisition helpers


def site_grid_shape(shape: tuple[int, int, int], modality: str, site: str) -> tuple[int, int, int]:
    """Stored array shape of a phantom of requested ``shape`` acquired at ``site``."""
    modality = _check_modality(modality)
    sites = CT_SITES if modality == "ct" else MR_SITES
    if site not in sites:
        raise ValueError(f"unknown {modality.upper()} site {site!r}; known: {sorted(sites)}")
    ras = _ras_grid_shape(check_shape(shape), modality, sites[site])
    ornt = _storage_ornt(sites[site].orientation)
    return tuple(int(ras[int(ax)]) for ax in ornt[:, 0].argsort())  # type: ignore[return-value]


def _ras_grid_shape(shape: tuple[int, int, int], modality: str, proto: SiteProtocol) -> tuple:
    ref = CT_REFERENCE_SPACING if modality == "ct" else MR_REFERENCE_SPACING
    return tuple(
        max(8, int(round(n * r / s))) for n, r, s in zip(shape, ref, proto.spacing, strict=True)
    )


class _Grid:
    """Canonical RAS voxel grid with normalized anatomical coordinates.

    ``x[i]``, ``y[j]``, ``z[k]`` are 1D float32 coordinates of voxel centres in anatomy units
    (``mm / scale`` per axis); organs are described in these units, so they do not depend on the
    site's spacing.
    """

    def __init__(self, n: tuple, spacing: tuple, scale: tuple):
        self.n = tuple(int(v) for v in n)
        self.spacing = tuple(float(s) for s in spacing)
        self.scale = tuple(float(s) for s in scale)
        self.axes = [
            ((np.arange(m, dtype=np.float64) - (m - 1) / 2) * s / c).astype(np.float32)
            for m, s, c in zip(self.n, self.spacing, self.scale, strict=True)
        ]
        self.x = self.axes[0][:, None, None]
        self.y = self.axes[1][None, :, None]
        self.z = self.axes[2][None, None, :]

    def box(self, center: tuple, radius: tuple) -> tuple[slice, slice, slice]:
        """Index slices covering ``center +- radius`` (anatomy units), clipped to the grid."""
        out = []
        for ax, c, r in zip(self.axes, center, radius, strict=True):
            lo = int(np.searchsorted(ax, c - r, side="left"))
            hi = int(np.searchsorted(ax, c + r, side="right"))
            out.append(slice(lo, max(lo, hi)))
        return tuple(out)  # type: ignore[return-value]

    def coords(self, sl: tuple[slice, slice, slice]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return (
            self.axes[0][sl[0]][:, None, None],
            self.axes[1][sl[1]][None, :, None],
            self.axes[2][sl[2]][None, None, :],
        )

    def ellipsoid(
        self, center: tuple, axes: tuple, angle: float = 0.0
    ) -> tuple[tuple[slice, slice, slice], np.ndarray]:
        """Quadratic form ``q`` (< 1 inside) of an ellipsoid rotated by ``angle`` about z.

        Returns the bounding-box slices and ``q`` on that box.
        """
        r = max(axes[0], axes[1]) if angle else axes[0]
        ry = max(axes[0], axes[1]) if angle else axes[1]
        sl = self.box(center, (r, ry, axes[2]))
        x, y, z = self.coords(sl)
        dx, dy = x - center[0], y - center[1]
        if angle:
            c, s = math.cos(angle), math.sin(angle)
            dx, dy = dx * c + dy * s, -dx * s + dy * c
        q2 = (dx / axes[0]) ** 2 + (dy / axes[1]) ** 2
        return sl, q2 + ((z - center[2]) / axes[2]) ** 2

    def to_index(self, pts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Nearest voxel indices of points ``(N, 3)`` in anatomy units and an in-grid mask."""
        idx = np.empty(pts.shape, dtype=np.int64)
        for a in range(3):
            m = self.n[a]
            idx[:, a] = np.rint(pts[:, a] * self.scale[a] / self.spacing[a] + (m - 1) / 2)
        ok = np.all((idx >= 0) & (idx < np.asarray(self.n)), axis=1)
        return idx, ok

    def affine(self, world_center: tuple) -> np.ndarray:
        aff = np.diag([*self.spacing, 1.0])
        aff[:3, 3] = np.asarray(world_center) - (np.asarray(self.n) - 1) / 2 * np.asarray(
            self.spacing
        )
        return aff


def _kernel_gain(sigma: float, truncate: float) -> float:
    """``sqrt(sum(w**2))`` of scipy's 1D Gaussian kernel: how much it shrinks white noise."""
    radius = int(truncate * sigma + 0.5)
    if radius == 0 or sigma <= 0:
        return 1.0
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    w = np.exp(-0.5 / sigma**2 * x**2)
    w /= w.sum()
    return float(np.sqrt(np.sum(w**2)))


def _psf(img: np.ndarray, sigma_vox: list[float], truncate: float = 3.0) -> np.ndarray:
    return ndimage.gaussian_filter(img, sigma_vox, mode="nearest", truncate=truncate)


def _storage_ornt(axcodes: str) -> np.ndarray:
    start = nib.orientations.axcodes2ornt(("R", "A", "S"))
    return nib.orientations.ornt_transform(start, nib.orientations.axcodes2ornt(tuple(axcodes)))


def _to_storage(
    arrays: dict[str, np.ndarray], label: np.ndarray, affine: np.ndarray, axcodes: str
) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """Reorient canonical RAS arrays to ``axcodes`` and update the affine to match."""
    ornt = _storage_ornt(axcodes)
    new_affine = affine @ nib.orientations.inv_ornt_aff(ornt, label.shape)

    def apply(a: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(nib.orientations.apply_orientation(a, ornt))

    images = {k: apply(v) for k, v in arrays.items()}
    return images, apply(label), new_affine


def _u(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(rng.uniform(lo, hi))


def _n(rng: np.random.Generator, sd: float) -> float:
    return float(rng.normal(0.0, sd))


# --------------------------------------------------------------------------------------------
# CT torso

_AGE_INDEX = {band: i for i, band in enumerate(AGE_BANDS)}


def _ct_anatomy(rng: np.random.Generator, attrs: SubjectAttributes) -> dict[str, Any]:
    """Draw every anatomical parameter of a torso (a fixed number of draws)."""
    age = _AGE_INDEX[attrs.age_band]
    male = attrs.sex == "M"
    p: dict[str, Any] = {}
    ax = float(np.clip((0.86 if male else 0.80) + _n(rng, 0.03), 0.72, 0.92))
    ay = ax * float(np.clip(0.70 + _n(rng, 0.03), 0.62, 0.78))
    p["body"] = (ax, ay)
    p["body_cy"] = 0.03 + _n(rng, 0.01)
    fat = (0.075 if not male else 0.055) + (-0.01, 0.0, 0.012, 0.005)[age] + _n(rng, 0.012)
    p["fat"] = float(np.clip(fat, 0.03, 0.13))
    p["muscle"] = float(np.clip(0.05 + _n(rng, 0.008) - 0.004 * age, 0.03, 0.07))
    kx, ky = ax / 0.84, ay / 0.59

    def organ(cx, cy, cz, a0, a1, a2, angle, s_sd=0.08, c_sd=0.02, a_sd=0.1):
        s = float(np.clip(1.0 + _n(rng, s_sd), 0.8, 1.2))
        k = math.sqrt(kx * ky)
        return (
            ((cx + _n(rng, c_sd)) * kx, (cy + _n(rng, c_sd)) * ky, cz + _n(rng, c_sd)),
            (a0 * s * k, a1 * s * k, a2 * s),
            angle + _n(rng, a_sd),
        )

    # (x, y, z) centres in anatomy units; +x = patient right, +y = anterior, +z = superior.
    p["lung_right"] = organ(0.36, -0.04, 0.95, 0.28, 0.38, 0.92, 0.1)
    p["lung_left"] = organ(-0.36, -0.04, 0.96, 0.26, 0.37, 0.92, -0.1)
    p["heart"] = organ(-0.09, 0.16, 0.90, 0.24, 0.20, 0.36, 0.4)
    p["liver"] = organ(0.34, 0.02, -0.05, 0.33, 0.36, 0.52, 0.35)
    p["liver_lobe"] = organ(0.02, 0.20, 0.10, 0.28, 0.13, 0.26, 0.3)
    p["spleen"] = organ(-0.50, -0.15, -0.08, 0.11, 0.20, 0.26, -0.6)
    p["kidney_right"] = organ(0.27, -0.28, -0.58, 0.10, 0.14, 0.30, 0.5, c_sd=0.015)
    p["kidney_left"] = organ(-0.27, -0.28, -0.46, 0.10, 0.14, 0.30, -0.5, c_sd=0.015)
    p["aorta"] = (
        (-0.07 * kx + _n(rng, 0.01), -0.16 * ky + _n(rng, 0.01)),
        0.075 * (1 + _n(rng, 0.1)),
    )
    p["ivc"] = ((0.11 * kx + _n(rng, 0.01), -0.12 * ky + _n(rng, 0.01)), (0.065, 0.045))
    p["spine_y"] = -0.33 * ky + _n(rng, 0.01)
    p["spine_r"] = 0.10 * math.sqrt(kx * ky) * (1 + _n(rng, 0.05))
    p["spine_curve"] = _n(rng, 0.03)
    p["vertebra_period"] = _u(rng, 0.40, 0.50)
    p["vertebra_phase"] = _u(rng, 0.0, 1.0)
    p["table_gap"] = _u(rng, 0.02, 0.06)
    # Bowel content below the diaphragm: gas pockets, visceral fat, fluid-filled loops.
    n_blobs = 18
    p["blobs"] = {
        "center": rng.uniform((-0.5, -0.15, -1.0), (0.5, 0.4, 0.2), size=(n_blobs, 3))
        * (kx, ky, 1.0),
        "radius": rng.uniform(0.04, 0.1, size=n_blobs),
        "kind": rng.choice(3, size=n_blobs, p=(0.35, 0.45, 0.2)),
    }
    # Tissue HU for this subject (before contrast).
    p["hu_fat"] = -100.0 + 5.0 * age / 3 + _n(rng, 6)
    p["hu_muscle"] = 45.0 - 3.0 * age + _n(rng, 4)
    p["hu_visceral"] = 15.0 + _n(rng, 5)
    p["hu_lung"] = -850.0 + _n(rng, 20)
    p["hu_liver"] = 58.0 - 3.0 * max(0, age - 1) + _n(rng, 5)
    p["hu_spleen"] = 48.0 + _n(rng, 4)
    p["hu_kidney"] = 32.0 + _n(rng, 3)
    p["hu_blood"] = 40.0 + _n(rng, 3)
    p["hu_cancellous"] = (
        (320.0, 280.0, 235.0, 195.0)[age] - (15.0 if not male else 0.0) + _n(rng, 15)
    )
    p["hu_cortical"] = (720.0, 700.0, 660.0, 620.0)[age] + _n(rng, 30)
    p["enhance"] = {
        "aorta": _u(rng, 210, 310),
        "aorta_portal": _u(rng, 110, 140),
        "liver_arterial": _u(rng, 40, 55),
        "liver_portal": _u(rng, 48, 62),
    }
    # Lung vessels: rays from each hilum (continuous coordinates, independent of the grid).
    n_rays, n_pts = 64, 14
    dirs = rng.normal(size=(2, n_rays, 3))
    dirs /= np.linalg.norm(dirs, axis=-1, keepdims=True)
    p["vessel_dirs"] = dirs
    p["vessel_jitter"] = rng.normal(0.0, 0.012, size=(2, n_rays, n_pts, 3))
    p["vessel_len"] = rng.uniform(0.35, 0.75, size=(2, n_rays))
    p["speckle"] = rng.uniform(-1.0, 1.0, size=(2, 400, 3))
    return p


def _contrast_hu(p: dict[str, Any], contrast: str) -> dict[str, float]:
    """Mean HU of enhancing structures in the given phase."""
    e = p["enhance"]
    hu = {
        "liver": p["hu_liver"],
        "spleen": p["hu_spleen"],
        "cortex": p["hu_kidney"],
        "medulla": p["hu_kidney"] - 2.0,
        "aorta": p["hu_blood"],
        "ivc": p["hu_blood"],
        "heart": p["hu_blood"],
    }
    if contrast == "arterial":
        hu.update(
            liver=hu["liver"] + e["liver_arterial"],
            spleen=hu["spleen"] + 70.0,
            cortex=hu["cortex"] + 150.0,
            medulla=hu["medulla"] + 30.0,
            aorta=hu["aorta"] + e["aorta"],
            ivc=hu["ivc"] + 20.0,
            heart=hu["heart"] + 0.8 * e["aorta"],
        )
    elif contrast == "portal":
        hu.update(
            liver=hu["liver"] + e["liver_portal"],
            spleen=hu["spleen"] + 70.0,
            cortex=hu["cortex"] + 120.0,
            medulla=hu["medulla"] + 110.0,
            aorta=hu["aorta"] + e["aorta_portal"],
            ivc=hu["ivc"] + 110.0,
            heart=hu["heart"] + 120.0,
        )
    return hu


def _paint_ct(g: _Grid, p: dict[str, Any], contrast: str, table: bool):
    """Canonical RAS HU (float32, noiseless, sharp) and label (uint8) maps of one torso."""
    hu = np.full(g.n, -1000.0, dtype=np.float32)
    label = np.zeros(g.n, dtype=np.uint8)
    ax, ay = p["body"]
    cy = p["body_cy"]
    # Torso: an elliptic cylinder that widens slightly towards the chest.
    taper = 1.0 + 0.04 * g.z
    rb = ((g.x / ax) ** 2 + ((g.y - cy) / ay) ** 2) / taper**2  # (nx, ny, nz)
    body = rb < 1.0
    wall = rb < (1.0 - p["fat"] / ay) ** 2
    inner = rb < (1.0 - (p["fat"] + p["muscle"]) / ay) ** 2
    hu[body] = p["hu_fat"]
    label[body] = 1
    hu[wall] = p["hu_muscle"]
    hu[inner] = p["hu_visceral"]

    if table:
        top = cy - ay * 1.04 - p["table_gap"]
        ty = g.y - (top - 0.02 * (g.x / 0.9) ** 2)  # shallow curve, concave upwards
        tx = np.abs(g.x) < 0.95
        shell = (tx & (((ty < 0) & (ty > -0.03)) | ((ty < -0.07) & (ty > -0.1)))) & ~body
        core = tx & (ty <= -0.03) & (ty >= -0.07) & ~body
        hu[np.broadcast_to(core, g.n)] = -700.0
        hu[np.broadcast_to(shell, g.n)] = 180.0

    enh = _contrast_hu(p, contrast)

    def paint(key: str, value: float, lab: int, clip: np.ndarray) -> None:
        center, axes, angle = p[key]
        sl, q = g.ellipsoid(center, axes, angle)
        m = (q < 1.0) & clip[sl]
        hu[sl][m] = value
        label[sl][m] = lab

    inner3 = np.broadcast_to(inner, g.n)
    body3 = np.broadcast_to(body, g.n)
    blob_hu = np.array([-950.0, p["hu_fat"], 25.0], dtype=np.float32)
    for c, r, kind in zip(
        p["blobs"]["center"], p["blobs"]["radius"], p["blobs"]["kind"], strict=True
    ):
        sl, q = g.ellipsoid(tuple(c), (r, r, 1.6 * r))
        hu[sl][(q < 1.0) & inner3[sl]] = blob_hu[kind]
    # Paraspinal muscles behind the spine.
    sy, sr = p["spine_y"], p["spine_r"]
    for side in (1.0, -1.0):
        sl, q = g.ellipsoid((side * 1.3 * sr, sy - 1.25 * sr, 0.0), (0.09, 0.075, 10.0))
        m = (q < 1.0) & body3[sl]
        hu[sl][m] = p["hu_muscle"] + 5.0
    paint("lung_right", p["hu_lung"], 3, inner3)
    paint("lung_left", p["hu_lung"], 2, inner3)
    _lung_vessels(g, p, hu, label, enh["aorta"] if contrast == "arterial" else enh["heart"])
    paint("heart", enh["heart"], 1, inner3)
    paint("liver", enh["liver"], 4, inner3)
    paint("liver_lobe", enh["liver"], 4, inner3)
    paint("spleen", enh["spleen"], 5, inner3)
    for key, lab in (("kidney_right", 7), ("kidney_left", 6)):
        paint(key, enh["cortex"], lab, inner3)
        center, axes, angle = p[key]
        sl, q = g.ellipsoid(center, axes, angle)
        m = (q < 0.55**2) & inner3[sl]
        hu[sl][m] = enh["medulla"]
    # Vessels: elliptic tubes along z, following the spine's gentle curve.
    curve = p["spine_curve"] * (g.z**2)
    (acx, acy), ar = p["aorta"]
    aorta = ((g.x - acx) ** 2 + (g.y - acy - curve) ** 2) < ar**2
    aorta &= body3
    hu[aorta] = enh["aorta"]
    label[aorta] = 9
    (icx, icy), (iax, iay) = p["ivc"]
    ivc = (((g.x - icx) / iax) ** 2 + ((g.y - icy - curve) / iay) ** 2 < 1.0) & (g.z < 0.6)
    ivc &= body3
    hu[ivc] = enh["ivc"]
    label[ivc] = 1
    _paint_spine(g, p, hu, label, body3, curve)
    return hu, label


def _lung_vessels(
    g: _Grid, p: dict[str, Any], hu: np.ndarray, label: np.ndarray, blood_hu: float
) -> None:
    """Vessel trees (rays from each hilum, tapering) and speckle inside the lungs.

    Each ray point stands for a short vessel segment of known volume in mm^3; it adds that
    fraction of a voxel's worth of blood contrast to the voxel it falls in (partial volume), so
    the lungs' mean HU does not depend on the voxel size.
    """
    pts, vols = [], []
    mm = np.asarray(g.scale)
    for side, key in enumerate(("lung_right", "lung_left")):
        (cx, cy, cz), axes, _ = p[key]
        hilum = np.array([cx - np.sign(cx) * 0.6 * axes[0], cy + 0.1 * axes[1], cz - 0.35])
        n_pts = p["vessel_jitter"].shape[2]
        t = np.linspace(0.05, 1.0, n_pts)
        length = p["vessel_len"][side][:, None, None]
        step = p["vessel_dirs"][side][:, None, :] * length * np.array(axes)  # (rays, 1, 3)
        ray = hilum + step * t[None, :, None] + p["vessel_jitter"][side]
        seg_mm = np.linalg.norm(step[:, 0, :] * mm, axis=-1) / n_pts  # (rays,)
        radius_mm = (0.020 - 0.014 * t)[None, :] * mm[0]  # (1, pts): thick at the hilum
        pts.append(ray.reshape(-1, 3))
        vols.append((np.pi * radius_mm**2 * seg_mm[:, None]).reshape(-1))
        sp = np.array([cx, cy, cz]) + p["speckle"][side] * np.array(axes) * 0.9
        pts.append(sp)
        vols.append(np.full(len(sp), np.pi * (0.006 * mm[0]) ** 2 * 0.03 * mm[0]))
    idx, ok = g.to_index(np.concatenate(pts))
    frac = np.concatenate(vols)[ok] / math.prod(g.spacing)
    idx = idx[ok]
    lab = label[idx[:, 0], idx[:, 1], idx[:, 2]]
    keep = (lab == 2) | (lab == 3)
    flat = np.ravel_multi_index(tuple(idx[keep].T), g.n)
    acc = np.bincount(flat, weights=frac[keep], minlength=hu.size).reshape(g.n)
    lung = (label == 2) | (label == 3)
    hu[lung] += (np.minimum(acc[lung], 1.0) * (blood_hu - hu[lung])).astype(np.float32)


def _paint_spine(
    g: _Grid,
    p: dict[str, Any],
    hu: np.ndarray,
    label: np.ndarray,
    body3: np.ndarray,
    curve: np.ndarray,
) -> None:
    """Vertebral bodies (cancellous core, cortical rim), discs, arch, canal, spinous process."""
    sy, r = p["spine_y"], p["spine_r"]
    box = g.box((0.0, sy - 1.2 * r, 0.0), (1.5 * r, 2.8 * r, 10.0))
    x, y, z = g.coords(box)
    yc = y - curve[box[2]] if curve.ndim == 3 else y
    dy = yc - sy
    rr = (x / r) ** 2 + (dy / (0.85 * r)) ** 2
    phase = ((z - p["vertebra_phase"] * p["vertebra_period"]) / p["vertebra_period"]) % 1.0
    disc = phase < 0.18
    endplate = (phase < 0.24) | (phase > 0.94)
    vbody = rr < 1.0
    rim = vbody & ((rr > 0.72) | endplate)
    # Posterior arch: an elliptic ring around the canal, then the spinous process.
    ay_ = dy + 1.45 * r
    ring = (x / (0.85 * r)) ** 2 + (ay_ / (0.6 * r)) ** 2
    canal = (x / (0.5 * r)) ** 2 + (ay_ / (0.38 * r)) ** 2 < 1.0
    arch = (ring < 1.0) & ~canal & ~disc
    spinous = ((x / (0.22 * r)) ** 2 + ((dy + 2.2 * r) / (0.55 * r)) ** 2 < 1.0) & ~disc
    b = body3[box]
    sub_hu, sub_lab = hu[box], label[box]
    bone = (vbody & ~disc) | arch | spinous
    bone &= b
    sub_hu[bone] = p["hu_cancellous"]
    sub_hu[(rim & ~disc & b) | ((arch | spinous) & b)] = p["hu_cortical"]
    sub_lab[bone] = 8
    d = vbody & disc & b
    sub_hu[d] = 90.0
    sub_lab[d] = 1
    c = canal & b
    sub_hu[c] = 15.0
    sub_lab[c] = 1


def make_ct_phantom(
    seed: int,
    shape: tuple[int, int, int] = (96, 96, 64),
    attributes: SubjectAttributes | None = None,
) -> Phantom:
    """A CT-like torso in Hounsfield units with organ labels (``CT_LABELS``).

    Args:
        seed: Non-negative integer; the same seed gives bit-identical arrays, and the same
            anatomy at every site.
        shape: RAS grid (x, y, z) of the field of view at ``CT_REFERENCE_SPACING``; the stored
            array follows the site's spacing and orientation (see ``site_grid_shape``).
        attributes: Subject attributes; drawn with ``sample_attributes`` from the seed if None.

    Returns:
        A ``Phantom`` with one int16 channel "CT" (air -1000, clipped to -1024..3071).
    """
    seed = _check_seed(seed)
    shape = check_shape(shape)
    rng_attr, rng_anat, rng_acq = _streams(seed, "ct")
    attrs, proto, scanner = _resolve_attributes(attributes, rng_attr, "ct")
    p = _ct_anatomy(rng_anat, attrs)

    fov = np.asarray(shape) * np.asarray(CT_REFERENCE_SPACING)
    inplane = min(fov[0], fov[1]) / 2
    g = _Grid(_ras_grid_shape(shape, "ct", proto), proto.spacing, (inplane, inplane, fov[2] / 2))
    hu, label = _paint_ct(g, p, attrs.contrast, proto.table)

    # Acquisition: calibration offset, correlated noise (white noise through the PSF, pre-scaled
    # so that its final standard deviation is the site's noise level), int16 with CT clipping.
    offset = scanner.calibration + _n(rng_acq, 1.5)
    sigma = [m / s for m, s in zip(proto.psf_mm, proto.spacing, strict=True)]
    gain = math.prod(_kernel_gain(s, 3.0) for s in sigma)
    noise = rng_acq.standard_normal(g.n, dtype=np.float32)
    noise *= np.float32(proto.noise / gain)
    hu += noise
    hu += np.float32(offset)
    hu = _psf(hu, sigma)
    ct = np.clip(np.rint(hu), -1024, 3071).astype(np.int16)

    images, label, affine = _to_storage(
        {"CT": ct}, label, g.affine(proto.world_center), proto.orientation
    )
    meta = ImageMeta(
        affine=affine,
        source=f"phantom:ct:{seed}",
        modality="CT",
        channel_names=CT_CHANNELS,
        extra=attrs.to_dict(),
    )
    return Phantom(images, label, meta, dict(CT_LABELS), attrs)


# --------------------------------------------------------------------------------------------
# MR head

# Tissue classes of the MR painter (not labels): index into the intensity tables below.
_T_AIR, _T_SCALP, _T_SKULL, _T_CSF, _T_GM, _T_WM = 0, 1, 2, 3, 4, 5
_T_LESION, _T_NECROSIS, _T_RIM, _T_EDEMA, _T_SOFT, _T_EYE, _T_NOSE = 6, 7, 8, 9, 10, 11, 12
# Label of each tissue class; oedema lies in white matter and keeps its label.
_T_LABEL = np.array([0, 1, 1, 2, 3, 4, 5, 5, 5, 4, 1, 1, 1], dtype=np.uint8)
# Relative intensities (T1, T2, FLAIR) per tissue class; WM T1 ~ 0.85.
_MR_TISSUE = np.array(
    [
        [0.00, 0.00, 0.00],  # air
        [0.95, 0.62, 0.55],  # scalp (skin + fat)
        [0.08, 0.06, 0.06],  # skull (cortical bone)
        [0.18, 1.00, 0.07],  # CSF
        [0.55, 0.72, 0.62],  # grey matter
        [0.85, 0.48, 0.45],  # white matter
        [0.42, 0.86, 0.98],  # lesion, solid
        [0.28, 0.95, 0.80],  # lesion, necrotic core
        [0.42, 0.84, 0.95],  # lesion, rim (enhances on T1 with gadolinium)
        [0.66, 0.74, 0.80],  # oedema around the lesion
        [0.50, 0.40, 0.40],  # face / neck soft tissue
        [0.15, 0.95, 0.08],  # eyes (vitreous)
        [0.70, 0.55, 0.50],  # nose / lips (fat, cartilage)
    ],
    dtype=np.float32,
)
_GAD_RIM_T1 = 1.10


def _mr_anatomy(rng: np.random.Generator, attrs: SubjectAttributes) -> dict[str, Any]:
    age = _AGE_INDEX[attrs.age_band]
    male = attrs.sex == "M"
    p: dict[str, Any] = {}
    hs = float(np.clip((1.0 if male else 0.95) + _n(rng, 0.025), 0.88, 1.06))
    p["head"] = ((0.0, -0.08 + _n(rng, 0.01), 0.10), (0.80 * hs, 0.98 * hs, 0.82 * hs))
    p["jaw"] = ((0.0, 0.12, -0.45), (0.52 * hs, 0.68 * hs, 0.36 * hs))
    p["neck"] = ((0.0, -0.18), (0.42 * hs, 0.48 * hs))
    p["scalp"] = 0.065 + _n(rng, 0.006)
    p["skull"] = 0.07 + _n(rng, 0.006)
    atrophy = (0.0, 0.015, 0.04, 0.065)[age] + abs(_n(rng, 0.008))
    p["csf"] = 0.045 + atrophy
    p["cortex"] = 0.14 + _n(rng, 0.008) - 0.3 * atrophy
    p["sulcus_width"] = 0.22 + 2.0 * atrophy
    p["folds"] = [
        (_u(rng, 0.6, 1.0), *(rng.uniform(8.0, 15.0, 3)), *(rng.uniform(0, 2 * np.pi, 3)))
        for _ in range(4)
    ]
    p["skull_base"] = -0.22 + _n(rng, 0.02)
    vs = 1.0 + 4.0 * atrophy + _n(rng, 0.05)
    p["ventricles"] = [
        ((side * 0.11, -0.02 + _n(rng, 0.01), 0.16 + _n(rng, 0.01)), (0.075 * vs, 0.30, 0.12 * vs))
        for side in (1.0, -1.0)
    ]
    p["deep_gm"] = [((side * 0.2, -0.05, 0.02), (0.09, 0.16, 0.09)) for side in (1.0, -1.0)]
    p_lesion = 0.35 + 0.08 * age
    p["lesion"] = bool(rng.random() < p_lesion)
    direction = rng.normal(size=3)
    direction /= np.linalg.norm(direction)
    direction[2] = abs(direction[2])
    radius = _u(rng, 0.22, 0.5)
    p["lesion_center"] = np.array([0.0, -0.05, 0.18]) + direction * radius * np.array(
        [0.8, 0.9, 0.6]
    )
    p["lesion_size"] = _u(rng, 0.10, 0.18)
    p["lesion_parts"] = rng.normal(0.0, 0.5, size=(3, 3))
    p["lesion_axes"] = rng.uniform(0.6, 1.0, size=(3, 3))
    p["tissue_jitter"] = 1.0 + rng.normal(0.0, 0.025, size=_MR_TISSUE.shape).astype(np.float32)
    p["face"] = {
        "nose": (_u(rng, 0.10, 0.15), _u(rng, 0.05, 0.075)),
        "eyes": _u(rng, 0.21, 0.26),
        "lips": _u(rng, 0.12, 0.17),
    }
    return p


def _front_y(p: dict[str, Any], z: float) -> float:
    """Anterior surface y of the head + jaw at height ``z`` on the midline."""
    best = -1.0
    for key in ("head", "jaw"):
        (cx, cy, cz), (_, ay_, az) = p[key]
        t = 1.0 - ((z - cz) / az) ** 2
        if t > 0:
            best = max(best, cy + ay_ * math.sqrt(t))
    return best


def _paint_mr(g: _Grid, p: dict[str, Any]) -> np.ndarray:
    """Canonical RAS tissue-class map (uint8) of one head."""
    t = np.zeros(g.n, dtype=np.uint8)
    (hc, ha) = p["head"]
    qh = ((g.x - hc[0]) / ha[0]) ** 2 + ((g.y - hc[1]) / ha[1]) ** 2 + ((g.z - hc[2]) / ha[2]) ** 2
    rho = np.sqrt(qh)  # (nx, ny, nz) normalized radius of the cranial ellipsoid
    # Neck and jaw: soft tissue outside the cranial ellipsoid.
    (nc, na) = p["neck"]
    neck = (((g.x - nc[0]) / na[0]) ** 2 + ((g.y - nc[1]) / na[1]) ** 2 < 1.0) & (g.z < hc[2] - 0.3)
    t[np.broadcast_to(neck, g.n)] = _T_SOFT
    jc, ja = p["jaw"]
    sl, q = g.ellipsoid(jc, ja)
    t[sl][q < 1.0] = _T_SOFT
    # Cranium: scalp, skull, then the intracranial cavity above the skull base.
    r_skull = 1.0 - p["scalp"]
    r_ic = r_skull - p["skull"]
    base = p["skull_base"] + 0.25 * g.y  # the anterior fossa sits higher than the posterior
    above = np.broadcast_to(g.z > base, g.n)
    t[rho < 1.0] = _T_SCALP
    t[(rho < r_skull) & (g.z > base - 0.12)] = _T_SKULL
    t[(rho < r_skull) & (g.z <= base - 0.12)] = _T_SOFT
    ic = (rho < r_ic) & above
    t[ic] = _T_CSF
    # Brain: a folded cortex. Sulci are the zero bands of a smooth random field ``f`` (a sum of
    # separable sine products, sd ~1); gyral white matter reaches out where |f| is large.
    f = np.zeros((1, 1, 1), dtype=np.float32)
    for amp, kx, ky, kz, px, py, pz in p["folds"]:
        fx = np.sin(kx * g.x + px).astype(np.float32)
        fy = np.sin(ky * g.y + py).astype(np.float32)
        fz = np.sin(kz * g.z + pz).astype(np.float32)
        f = f + np.float32(amp) * (fx * fy * fz)
    af = np.abs(f) / np.float32(math.sqrt(sum(fold[0] ** 2 for fold in p["folds"]) / 8.0))
    rb = rho / r_ic  # 1 at the inner table of the skull
    pial = 1.0 - p["csf"] / r_ic
    brain = ic & (rb < pial)
    t[brain] = _T_GM
    t[brain & (rb < pial - p["cortex"] - 0.07 + 0.05 * np.minimum(af, 1.5))] = _T_WM
    t[brain & (af < p["sulcus_width"]) & (rb > pial - 0.12)] = _T_CSF
    for c, a in p["deep_gm"]:
        sl, q = g.ellipsoid(c, a)
        t[sl][(q < 1.0) & brain[sl]] = _T_GM
    for c, a in p["ventricles"]:
        sl, q = g.ellipsoid(c, a)
        t[sl][(q < 1.0) & ic[sl]] = _T_CSF
    # Brain stem down to the foramen magnum.
    stem = (
        ((g.x / 0.11) ** 2 + ((g.y + 0.18) / 0.12) ** 2 < 1.0) & (g.z > base - 0.3) & (g.z <= base)
    )
    t[np.broadcast_to(stem, g.n) & (rho < r_skull)] = _T_WM
    if p["lesion"]:
        _paint_lesion(g, p, t, brain)
    _paint_face(g, p, t)
    return t


def _paint_lesion(g: _Grid, p: dict[str, Any], t: np.ndarray, brain: np.ndarray) -> None:
    size = p["lesion_size"]
    c0 = p["lesion_center"]
    q_min = None
    box = g.box(tuple(c0), (2.6 * size,) * 3)
    x, y, z = g.coords(box)
    for off, ax in zip(p["lesion_parts"], p["lesion_axes"], strict=True):
        c = c0 + off * size
        a = ax * size
        q = ((x - c[0]) / a[0]) ** 2 + ((y - c[1]) / a[1]) ** 2 + ((z - c[2]) / a[2]) ** 2
        q_min = q if q_min is None else np.minimum(q_min, q)
    assert q_min is not None
    b = brain[box]
    sub = t[box]
    sub[(q_min < 2.4) & b & (sub == _T_WM)] = _T_EDEMA  # oedema spreads along white matter
    sub[(q_min < 1.0) & b] = _T_RIM
    sub[(q_min < 0.55) & b] = _T_LESION
    sub[(q_min < 0.2) & b] = _T_NECROSIS


def _paint_face(g: _Grid, p: dict[str, Any], t: np.ndarray) -> None:
    """Nose, eyes (with lids bulging) and lips on the anterior side: what defacing removes."""
    nose_len, nose_w = p["face"]["nose"]
    z_nose = -0.28
    y0 = _front_y(p, z_nose)
    sl, q = g.ellipsoid((0.0, y0 + 0.2 * nose_len, z_nose), (nose_w, nose_len, 0.16))
    t[sl][q < 1.0] = _T_NOSE
    ex = p["face"]["eyes"]
    z_eye = -0.08
    ye = _front_y(p, z_eye) - 0.02
    for side in (1.0, -1.0):
        sl, q = g.ellipsoid((side * ex, ye + 0.02, z_eye), (0.11, 0.06, 0.08))
        t[sl][q < 1.0] = _T_SOFT  # lids bulge out of the face
        sl, q = g.ellipsoid((side * ex, ye - 0.07, z_eye), (0.085, 0.085, 0.085))
        t[sl][q < 1.0] = _T_EYE
    z_lips = -0.55
    yl = _front_y(p, z_lips)
    sl, q = g.ellipsoid((0.0, yl, z_lips), (p["face"]["lips"], 0.06, 0.05))
    t[sl][q < 1.0] = _T_NOSE


def make_mr_phantom(
    seed: int,
    shape: tuple[int, int, int] = (80, 96, 80),
    attributes: SubjectAttributes | None = None,
) -> Phantom:
    """An MRI-like head with co-registered T1, T2 and FLAIR and tissue labels (``MR_LABELS``).

    Args:
        seed: Non-negative integer; the same seed gives bit-identical arrays.
        shape: RAS grid (x, y, z) of the field of view at ``MR_REFERENCE_SPACING``; the stored
            array follows the site's spacing and orientation (see ``site_grid_shape``).
        attributes: Subject attributes; drawn with ``sample_attributes`` from the seed if None.

    Returns:
        A ``Phantom`` with float32 channels "T1", "T2", "FLAIR" (bias field, Rician noise),
        integer-valued in 0..32767 like scanner magnitude images (stored as int16 on disk).
    """
    seed = _check_seed(seed)
    shape = check_shape(shape)
    rng_attr, rng_anat, rng_acq = _streams(seed, "mr")
    attrs, proto, scanner = _resolve_attributes(attributes, rng_attr, "mr")
    p = _mr_anatomy(rng_anat, attrs)

    fov = np.asarray(shape) * np.asarray(MR_REFERENCE_SPACING)
    s = float(min(fov)) / 2
    g = _Grid(_ras_grid_shape(shape, "mr", proto), proto.spacing, (s, s, s))
    tissue = _paint_mr(g, p)
    label = _T_LABEL[tissue]

    table = _MR_TISSUE * p["tissue_jitter"]
    if attrs.contrast == "gadolinium":
        table[_T_RIM, 0] = _GAD_RIM_T1
    sigma = [m / sp for m, sp in zip(proto.psf_mm, proto.spacing, strict=True)]
    # Smooth receive-coil bias: separable exp(polynomial) shared by the sequences, plus a small
    # per-sequence tilt; built from 1D factors, so it costs two multiplications per voxel.
    coef = rng_acq.normal(0.0, 1.0, size=(2, 3)) * proto.bias
    amp = scanner.calibration * 1000.0 * (1.0 + _n(rng_acq, 0.03))
    images = {}
    for c, name in enumerate(MR_CHANNELS):
        tilt = rng_acq.normal(0.0, 0.2 * proto.bias, size=3)
        factors = [
            np.exp((coef[0, a] + tilt[a]) * g.axes[a] + coef[1, a] * (g.axes[a] ** 2 - 0.3)).astype(
                np.float32
            )
            for a in range(3)
        ]
        bias = factors[0][:, None, None] * factors[1][None, :, None] * factors[2][None, None, :]
        img = _psf(table[:, c][tissue], sigma)
        img *= bias
        img *= np.float32(amp)
        noise_sd = np.float32(proto.noise * amp)
        re = rng_acq.standard_normal(g.n, dtype=np.float32)
        re *= noise_sd
        re += img
        im = rng_acq.standard_normal(g.n, dtype=np.float32)
        im *= noise_sd
        mag = np.sqrt(re * re + im * im)  # Rician magnitude
        # Scanners store magnitude as integers; so do we (lossless as int16 on disk).
        images[name] = np.minimum(np.rint(mag, out=mag), np.float32(_INT16_MAX), out=mag)

    images, label, affine = _to_storage(
        images, label, g.affine(proto.world_center), proto.orientation
    )
    meta = ImageMeta(
        affine=affine,
        source=f"phantom:mr:{seed}",
        modality="MR",
        channel_names=MR_CHANNELS,
        extra=attrs.to_dict(),
    )
    return Phantom(images, label, meta, dict(MR_LABELS), attrs)


# --------------------------------------------------------------------------------------------
# Collections on disk (nnU-Net v2 / MSD style)

ATTRIBUTES_CSV = "attributes.csv"
ATTRIBUTE_COLUMNS: tuple[str, ...] = (
    "case_id",
    "sex",
    "age_band",
    "site",
    "manufacturer",
    "model",
    "contrast",
)
_FILE_ENDING = ".nii.gz"


def _case_seed(seed: int, split: str, index: int) -> int:
    """Phantom seed of case ``index`` of a split; independent streams for each collection seed."""
    code = 0 if split == "train" else 1
    return int(np.random.SeedSequence([seed, code, index]).generate_state(1, np.uint32)[0])


def _case_attributes(case_seed: int, modality: str) -> SubjectAttributes:
    """The attributes ``make_*_phantom(case_seed)`` will draw, without generating voxels."""
    return sample_attributes(_streams(case_seed, modality)[0], modality)


def _write_nifti(path: Path, array: np.ndarray, affine: np.ndarray) -> None:
    img = nib.Nifti1Image(array, affine)
    hdr = img.header
    hdr.set_data_dtype(array.dtype)
    hdr.set_sform(affine, code=1)
    hdr.set_qform(affine, code=1)
    hdr.set_xyzt_units("mm", "sec")
    hdr["descrip"] = b""
    with atomic_path(path) as tmp:
        nib.save(img, tmp)


@dataclass
class _Case:
    case_id: str
    case_seed: int
    split: str  # "train" or "test"
    images: list[str] = field(default_factory=list)  # relative to the collection root
    label: str | None = None


def _plan_cases(n: int, n_test: int, modality: str, seed: int) -> list[_Case]:
    channels = CT_CHANNELS if modality == "ct" else MR_CHANNELS
    cases = []
    for split, count, folder, stem in (
        ("train", n, "imagesTr", f"phantom_{modality}_"),
        ("test", n_test, "imagesTs", f"phantom_{modality}_test_"),
    ):
        for i in range(count):
            cid = f"{stem}{i:04d}"
            case = _Case(cid, _case_seed(seed, split, i), split)
            case.images = [f"{folder}/{cid}_{c:04d}{_FILE_ENDING}" for c in range(len(channels))]
            # test cases keep their reference labels apart (labelsTs/), so the fixed test
            # split of a phantom collection can be scored; nothing trains on them
            case.label = f"{'labelsTr' if split == 'train' else 'labelsTs'}/{cid}{_FILE_ENDING}"
            cases.append(case)
    return cases


def _write_case(args: tuple[Path, _Case, str, tuple[int, int, int]]) -> bool:
    """Generate and write one case unless all its files exist; True if it was written."""
    root, case, modality, shape = args
    paths = [root / p for p in case.images] + ([root / case.label] if case.label else [])
    if all(p.is_file() for p in paths):
        return False
    make = make_ct_phantom if modality == "ct" else make_mr_phantom
    ph = make(case.case_seed, shape)
    for rel, name in zip(case.images, ph.meta.channel_names or (), strict=True):
        arr = ph.images[name]
        if arr.dtype != np.int16:  # MR: integer-valued float32 in int16 range, see make_mr_phantom
            arr = arr.astype(np.int16)
        _write_nifti(root / rel, arr, ph.meta.affine)
    if case.label:
        _write_nifti(root / case.label, ph.label, ph.meta.affine)
    return True


def write_phantom_collection(
    out_dir: str | Path,
    n: int,
    modality: str = "ct",
    seed: int = 0,
    shape: tuple[int, int, int] | None = None,
    n_test: int = 0,
    workers: int = 1,
) -> Path:
    """Write an nnU-Net v2-style collection of phantoms that ``umit ingest`` accepts.

    Layout::

        out_dir/dataset.json        channel_names, labels (name -> int), numTraining, file_ending,
                                    "training" / "test" file lists (MSD style), "phantom" settings
        out_dir/attributes.csv      case_id,sex,age_band,site,manufacturer,model,contrast
        out_dir/imagesTr/<case>_<channel:04d>.nii.gz
        out_dir/labelsTr/<case>.nii.gz
        out_dir/imagesTs/<case>_<channel:04d>.nii.gz   (n_test held-out test cases)
        out_dir/labelsTs/<case>.nii.gz                 (their reference labels, for scoring only)

    Training cases are ``phantom_<modality>_0000``..., test cases ``phantom_<modality>_test_0000``;
    each case's phantom seed is derived from ``(seed, split, index)``, so collections with
    different seeds do not share subjects. Every file is written atomically and cases whose files
    exist are skipped, so a killed run resumes where it stopped (and ``n`` can be raised later).

    Args:
        out_dir: Collection folder (created).
        n: Number of labelled training cases (>= 1).
        modality: "ct" or "mr".
        seed: Collection seed (>= 0).
        shape: Reference grid passed to the generator; the generator default if None.
        n_test: Number of held-out test cases written to imagesTs (labels in labelsTs).
        workers: Processes generating cases in parallel.

    Returns:
        ``out_dir`` as a Path.
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n!r}")
    modality = _check_modality(modality)
    seed = _check_seed(seed)
    if isinstance(n_test, bool) or not isinstance(n_test, (int, np.integer)) or n_test < 0:
        raise ValueError(f"n_test must be an integer >= 0, got {n_test!r}")
    if isinstance(workers, bool) or not isinstance(workers, (int, np.integer)) or workers < 1:
        raise ValueError(f"workers must be an integer >= 1, got {workers!r}")
    if shape is None:
        shape = (96, 96, 64) if modality == "ct" else (80, 96, 80)
    shape = check_shape(shape)
    root = Path(out_dir)
    if root.exists() and not root.is_dir():
        raise InputError(root, "exists and is not a folder")
    settings = {"modality": modality, "seed": int(seed), "shape": list(shape)}
    _check_existing(root, settings)
    for sub in ("", "imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        remove_stale_temps(root / sub, recursive=False)

    cases = _plan_cases(int(n), int(n_test), modality, seed)
    jobs = [(root, c, modality, shape) for c in cases]
    if workers == 1 or len(jobs) == 1:
        for job in jobs:
            _write_case(job)
    else:
        # fork where available: workers need no re-import of the caller's __main__ (a script
        # without a main guard, stdin, a notebook) and start instantly; they only run
        # numpy/scipy/nibabel, never torch, so fork's threads caveat does not bite here.
        method = "fork" if "fork" in get_all_start_methods() else None
        with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=get_context(method)) as pool:
            list(pool.map(_write_case, jobs, chunksize=max(1, len(jobs) // (4 * workers))))

    attrs = {c.case_id: _case_attributes(c.case_seed, modality) for c in cases}
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(ATTRIBUTE_COLUMNS)
    for c in cases:
        a = attrs[c.case_id]
        writer.writerow([c.case_id, a.sex, a.age_band, a.site, a.manufacturer, a.model, a.contrast])
    atomic_write_text(root / ATTRIBUTES_CSV, buf.getvalue())

    channels = CT_CHANNELS if modality == "ct" else MR_CHANNELS
    labels = CT_LABELS if modality == "ct" else MR_LABELS
    channel_map = {str(i): name for i, name in enumerate(channels)}
    train = [c for c in cases if c.split == "train"]
    test = [c for c in cases if c.split == "test"]
    dataset = {
        "name": f"UmitPhantom{modality.upper()}",
        "description": (
            "Procedural synthetic "
            + ("CT torso" if modality == "ct" else "MRI head (T1, T2, FLAIR)")
            + " phantoms generated by umit.data.phantoms; subject attributes in "
            + ATTRIBUTES_CSV
        ),
        "reference": "synthetic (umit.data.phantoms)",
        "licence": "CC0-1.0",
        "tensorImageSize": "3D",
        "channel_names": channel_map,
        "modality": channel_map,
        "labels": {name: value for value, name in labels.items()},
        "numTraining": len(train),
        "numTest": len(test),
        "file_ending": _FILE_ENDING,
        "training": [
            {"image": [f"./{p}" for p in c.images], "label": f"./{c.label}"} for c in train
        ],
        "test": [{"image": [f"./{p}" for p in c.images], "label": f"./{c.label}"} for c in test],
        "phantom": {
            **settings,
            "generator": "umit.data.phantoms",
            "case_seeds": {c.case_id: c.case_seed for c in cases},
        },
    }
    atomic_write_json(root / "dataset.json", dataset)
    return root


def _check_existing(root: Path, settings: dict[str, Any]) -> None:
    """Refuse to resume into a collection written with other settings (cases would mix)."""
    path = root / "dataset.json"
    if not path.is_file():
        return
    try:
        old = json.loads(path.read_text()).get("phantom")
    except (OSError, ValueError, AttributeError) as exc:
        raise InputError(path, f"cannot read the existing dataset.json ({exc})") from exc
    if not isinstance(old, dict):
        raise InputError(root, "holds a dataset.json that is not a phantom collection")
    old_settings = {k: old.get(k) for k in settings}
    if old_settings != settings:
        raise InputError(
            root,
            f"holds a phantom collection written with {old_settings}, not {settings}; "
            "use another folder",
        )
