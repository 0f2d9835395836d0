"""Sites, scanners and subject attributes of the synthetic phantoms.

Who was scanned, where and how: the attribute vocabularies (sex, age band, contrast), each
site's acquisition protocol and patient population (``CT_SITES``, ``MR_SITES``), the
``SubjectAttributes`` record, and ``sample_attributes``, which draws them so that their
distributions differ by site (subgroup analyses then have something to find).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from umit.data.phantoms._common import _check_modality

SEXES: tuple[str, ...] = ("F", "M")
AGE_BANDS: tuple[str, ...] = ("18-39", "40-59", "60-79", "80+")
CT_CONTRASTS: tuple[str, ...] = ("none", "arterial", "portal")
MR_CONTRASTS: tuple[str, ...] = ("none", "gadolinium")

_AGE_INDEX = {band: i for i, band in enumerate(AGE_BANDS)}


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
