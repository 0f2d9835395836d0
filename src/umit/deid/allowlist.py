"""The catalog / NIfTI attribute allowlist, derived from the Annex E profile table.

``umit ingest`` copies a few DICOM attributes into ``ImageMeta.extra`` and the catalog (for
subgroup and acquisition analysis). :data:`CATALOG_ATTRIBUTES` is the one list of them: each
entry names the catalog key, the DICOM keyword(s) it is read from and whether it is a column of
the catalog's series table. What may be kept is decided by Table E.1-1
(:mod:`umit.deid.profile`), not by hand:

* an attribute read from DICOM is allowlisted when the Basic Profile keeps its value
  (:func:`~umit.deid.profile.profile_keeps`: not listed in the table, or action K);
* an attribute the Basic Profile removes is allowlisted only as an **explicit addition**: an
  entry with a ``reason`` (and, where one exists, the profile ``option`` under which Annex E
  itself keeps it). These are the subgroup attributes bias analysis needs (sex, age band), kept
  in reduced form where possible.

Anything else is dropped, whatever a reader returns, so a new reader field cannot leak by
accident. ``SeriesDescription`` is removed by the Basic Profile (X; kept only under the Clean
Descriptors option), so it is neither read into ``ImageMeta.extra`` nor stored in the catalog.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from umit.deid.profile import profile_keeps


@dataclass(frozen=True)
class CatalogAttribute:
    """One attribute that may leave the DICOM reader for the catalog.

    Attributes:
        name: Key in ``ImageMeta.extra`` and the catalog.
        keywords: DICOM keywords it is read from; empty when it does not come from a DICOM
            attribute (operator input such as ``site``) or is derived by ingest.
        column: A column of the catalog's series table (else it goes to ``extra``).
        reader: Read by :func:`umit.ingest.dicom.load_series` into ``ImageMeta.extra``.
        option: The Annex E option under which the profile keeps the source attribute, for an
            explicit addition.
        reason: Why an attribute the Basic Profile removes is kept anyway (explicit addition).
    """

    name: str
    keywords: tuple[str, ...] = ()
    column: bool = False
    reader: bool = True
    option: str | None = None
    reason: str = ""

    @property
    def kept_by_profile(self) -> bool:
        """True when the Basic Profile keeps every source attribute."""
        return all(profile_keeps(kw) for kw in self.keywords)


_PATIENT_CHARS = "retain-patient-characteristics"

CATALOG_ATTRIBUTES: tuple[CatalogAttribute, ...] = (
    CatalogAttribute("modality", ("Modality",), column=True),
    CatalogAttribute("body_part", ("BodyPartExamined",), column=True),
    CatalogAttribute("manufacturer", ("Manufacturer",), column=True),
    CatalogAttribute("model", ("ManufacturerModelName",), column=True),
    # Explicit additions: subgroup attributes for bias analysis (Retain Patient Characteristics).
    CatalogAttribute(
        "sex",
        ("PatientSex",),
        column=True,
        option=_PATIENT_CHARS,
        reason="subgroup attribute for bias analysis; only F/M/O is kept",
    ),
    CatalogAttribute(
        "age_years",
        ("PatientAge",),
        option=_PATIENT_CHARS,
        reason="only to compute age_band: ingest drops the exact age before writing the catalog",
    ),
    CatalogAttribute(
        "contrast",
        ("ContrastBolusAgent",),
        column=True,
        option="clean-descriptors",
        reason="reduced to 'yes' / absent: the agent's text is never kept",
    ),
    CatalogAttribute("slice_thickness", ("SliceThickness",)),
    CatalogAttribute("kvp", ("KVP",)),
    CatalogAttribute("magnetic_field_strength", ("MagneticFieldStrength",)),
    CatalogAttribute("scanning_sequence", ("ScanningSequence",)),
    CatalogAttribute("sequence_variant", ("SequenceVariant",)),
    CatalogAttribute("echo_time", ("EchoTime",)),
    CatalogAttribute("repetition_time", ("RepetitionTime",)),
    CatalogAttribute("inversion_time", ("InversionTime",)),
    CatalogAttribute("photometric", ("PhotometricInterpretation",)),
    CatalogAttribute("transfer_syntax", ("TransferSyntaxUID",)),
    # One entry per volume (time point) of a diffusion series, filled by the loader from every
    # image; also read from vendor private fallbacks (umit.ingest.dicom.diffusion).
    CatalogAttribute("b_values", ("DiffusionBValue",)),
    CatalogAttribute("gradient_directions", ("DiffusionGradientOrientation",)),
    # Not read by the DICOM reader: derived by ingest or given by the operator / dataset files.
    CatalogAttribute(
        "age_band",
        ("PatientAge",),
        column=True,
        reader=False,
        option=_PATIENT_CHARS,
        reason="10-year band of PatientAge (quasi-identifier coarsened)",
    ),
    CatalogAttribute("site", column=True, reader=False),
    CatalogAttribute("n_frames", reader=False),
    CatalogAttribute("n_timepoints", reader=False),
    CatalogAttribute("convolution_kernel", ("ConvolutionKernel",), reader=False),
)
"""Every attribute that may be copied into the catalog (see the module docstring)."""


def _allowed(attr: CatalogAttribute) -> bool:
    return attr.kept_by_profile or bool(attr.reason)


SAFE_ATTRIBUTES: frozenset[str] = frozenset(a.name for a in CATALOG_ATTRIBUTES if _allowed(a))
"""Names that may be copied into the catalog: kept by the profile or an explicit addition."""

READER_FIELDS: tuple[str, ...] = tuple(
    a.name for a in CATALOG_ATTRIBUTES if a.reader and a.name in SAFE_ATTRIBUTES
)
"""The keys the DICOM reader puts in ``ImageMeta.extra`` (``umit.ingest.dicom.EXTRA_FIELDS``)."""

COLUMN_ATTRIBUTES: frozenset[str] = frozenset(
    a.name for a in CATALOG_ATTRIBUTES if a.column and a.name in SAFE_ATTRIBUTES
)
"""Allowlisted attributes stored as catalog columns; the others go to a row's ``extra``."""


def safe_attributes(attributes: dict[str, Any]) -> dict[str, Any]:
    """Keep only allowlisted, non-empty attributes (free-text descriptions are dropped too)."""
    return {k: v for k, v in attributes.items() if k in SAFE_ATTRIBUTES and v not in (None, "")}
