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

Geometry: ``shape`` is the RAS grid of the field of view at the modality's reference spacing,
so the anatomy in millimetres is the same at every site and the stored array follows the site's
spacing and orientation (the reasons: :mod:`umit.data.phantoms.scanner`). Anatomy is miniature
(a 96 x 96 voxel torso at 1.2 mm is 115 mm wide) to keep the demo fast on 2 cores; realistic
spacings matter more than realistic size here.

World coordinates are nibabel's RAS+: x increases from the patient's left to the patient's Right,
y from posterior to Anterior, z from inferior to Superior. The liver lies on the patient's right,
so its world x is larger than the spleen's whatever the stored orientation (tested).

The package holds one module per part: ``sites`` (attributes, site protocols and scanners),
``scanner`` (grid, PSF, noise scaling, stored orientation; the ``Phantom`` record), ``ct`` (torso),
``mr`` (head), ``ct_head`` (the MR head's anatomy as a head CT in HU: thick tilted slices, a head
holder), ``collection`` (collections on disk), ``_common`` (argument checks and random
streams they share), and ``stage`` (``PhantomsConfig`` and ``run``
behind ``umit phantoms``; not imported here, so the generators need no config machinery).
"""

from __future__ import annotations

from umit.data.phantoms.collection import (
    ATTRIBUTE_COLUMNS,
    ATTRIBUTES_CSV,
    write_phantom_collection,
)
from umit.data.phantoms.ct import CT_CHANNELS, CT_LABELS, make_ct_phantom
from umit.data.phantoms.ct_head import make_ct_head_phantom
from umit.data.phantoms.mr import (
    MR_BRAIN_LABELS,
    MR_CHANNELS,
    MR_LABELS,
    MR_TISSUE_CLASSES,
    brain_mask,
    make_mr_phantom,
    mr_tissue_map,
)
from umit.data.phantoms.scanner import (
    CT_REFERENCE_SPACING,
    MR_REFERENCE_SPACING,
    Phantom,
    check_shape,
    site_grid_shape,
)
from umit.data.phantoms.sites import (
    AGE_BANDS,
    CT_CONTRASTS,
    CT_SITES,
    MR_CONTRASTS,
    MR_SITES,
    SEXES,
    Scanner,
    SiteProtocol,
    SubjectAttributes,
    sample_attributes,
)

__all__ = [
    "AGE_BANDS",
    "ATTRIBUTE_COLUMNS",
    "ATTRIBUTES_CSV",
    "CT_CHANNELS",
    "CT_CONTRASTS",
    "CT_LABELS",
    "CT_REFERENCE_SPACING",
    "CT_SITES",
    "MR_CONTRASTS",
    "MR_BRAIN_LABELS",
    "MR_CHANNELS",
    "MR_LABELS",
    "MR_REFERENCE_SPACING",
    "MR_SITES",
    "MR_TISSUE_CLASSES",
    "SEXES",
    "Phantom",
    "Scanner",
    "SiteProtocol",
    "SubjectAttributes",
    "brain_mask",
    "check_shape",
    "make_ct_head_phantom",
    "make_ct_phantom",
    "make_mr_phantom",
    "mr_tissue_map",
    "sample_attributes",
    "site_grid_shape",
    "write_phantom_collection",
]
