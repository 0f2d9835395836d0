"""Defacing of head MRI and CT: remove the face (and optionally the ears), never the brain.

No template is available offline, so the geometry comes from the image itself (in the spirit
of Quickshear, Schimke et al. 2011):

1. Head mask: intensity threshold (Otsu-based for MR, -500 HU for CT), largest component,
   closing and hole filling.
2. Brain mask: given by the user, or estimated -- MR: bright tissue inside the head, eroded to
   cut it from scalp, orbit fat and muscle, the largest piece grown back, closed and filled; CT:
   the largest 0..100 HU region whose outer shell is mostly bone (enclosed by the skull).
3. Face region, in RAS millimetres through the affine (so oblique and LPS-stored volumes are
   handled exactly): project the brain onto the sagittal (y, z) plane, take its convex hull and
   the hull edges whose outward normals point anterior-inferior (between ``FACE_ANGLES`` degrees
   below anterior); every voxel beyond one of those edges by more than ``margin_mm`` is face.
   Ears (optional): voxels lateral to the brain's width plus the margin, at ear height. Orbits
   (default): under the frontal lobes' floor and in front of it, near the frontal pole, where
   the hull leaves the eyes, lids and brows.
4. Removal mask = face region AND NOT (brain dilated by ``margin_mm``; an estimated brain also
   protects the rim it may have missed): the brain cannot be touched by construction, and this
   is asserted on the output voxels.
5. Check: an anterior depth map of the head surface (RAS grid, first head voxel seen from the
   front) before and after; over the face window we report the largest protrusion above a
   quadratic fit (the nose) and the high-frequency relief, which defacing must flatten.

Inputs that are not plausibly a head (windowed CT, masks, a fruit, a slab, a torso) are refused,
and a result whose depth check no face can give is flagged (``plausible``).

The package holds one module per step: ``masks`` (1-2: head and brain masks, the CT/MR intensity
model), ``face`` (3: the face and orbit regions), ``volume`` (4: ``deface`` on an in-memory
volume), ``check`` (5: the depth-map check and its PNG), ``plausible`` (input and result
checks), ``files`` (``deface_file``, ``find_inputs``), ``_common`` (morphology and coordinate
helpers they share) and ``stage`` (``DefaceConfig`` and ``run`` behind ``umit deface``).
"""

from __future__ import annotations

from umit.privacy.deface.check import depth_check, save_depth_png
from umit.privacy.deface.face import FACE_ANGLES, face_region, orbit_region
from umit.privacy.deface.files import deface_file, find_inputs
from umit.privacy.deface.masks import estimate_brain_mask, guess_modality, head_mask
from umit.privacy.deface.plausible import ImplausibleResult
from umit.privacy.deface.stage import SUMMARY_NAME, DefaceConfig
from umit.privacy.deface.volume import DefaceResult, deface

__all__ = [
    "FACE_ANGLES",
    "SUMMARY_NAME",
    "DefaceConfig",
    "DefaceResult",
    "ImplausibleResult",
    "deface",
    "deface_file",
    "depth_check",
    "estimate_brain_mask",
    "face_region",
    "find_inputs",
    "guess_modality",
    "head_mask",
    "orbit_region",
    "save_depth_png",
]
