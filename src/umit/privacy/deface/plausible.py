"""Is this a head, and is the result a defaced face? Checks that refuse what the cut cannot handle.

Defacing has no template: it trusts that the input is a head and that its intensities mean what
the CT or MR rules expect. These checks refuse, with the reason, what is not plausibly so:

- ``check_contrast`` (before any mask): CT that is not in Hounsfield units (windowed to 0-255,
  no air at -1000), and images with too few intensity levels (binary masks, label maps) or
  clipped at their maximum (windowed exports).
- ``check_head_shape`` (on the head mask, in RAS mm): a head's width and length over its top
  ``HEAD_SLAB_MM``, its height, a roughly elliptical widest axial section, and a field of view
  that does not cut the object on two opposite sides.
- ``check_result`` (after the cut): depth-check figures that no defaced face can produce (a
  relief after the cut far taller than any facial feature, a surface moved back deeper than a
  face); :class:`ImplausibleResult` carries the result so that its report can still be written.

The brain estimate has its own checks (volume, width and length against the head) in
:mod:`umit.privacy.deface.masks`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import ndimage

from umit.data.meta import ImageMeta
from umit.errors import InputError
from umit.privacy.deface._common import _largest_component
from umit.privacy.deface.check import _ras_resample_codes

HEAD_WIDTH_MM: tuple[float, float] = (100.0, 210.0)
"""Right-left extent of a head (newborn ~95-100 mm skull breadth; adult 130-165 mm, ears to
~200 mm), measured over the head's top ``HEAD_SLAB_MM`` so that shoulders do not count."""
HEAD_LENGTH_MM: tuple[float, float] = (110.0, 260.0)
"""Anterior-posterior extent, nose included (newborn ~115 mm; adult 180-215 mm + nose)."""
MIN_HEAD_HEIGHT_MM = 100.0
"""Superior-inferior extent below which the volume is a slab: it cannot hold brain and face."""
HEAD_SLAB_MM = 150.0
"""Depth below the top of the head over which width, length and shape are measured."""
AXIAL_FILL: tuple[float, float] = (0.6, 0.9)
"""Area of the widest axial section over its bounding rectangle: 0.785 for an ellipse, ~0.75-0.8
measured on heads (nose and ears stick out), 1.0 for a box."""
_CUT_SIDE_MM2 = 1500.0  # object area on an array face beyond which the field of view cuts it
_SHAPE_STEP_MM = 2.0  # RAS grid of the shape measurements
_THIN_VOXELS = 2  # opening of the shape grid: drops attachments up to ~10 mm thick
_MIN_LEVELS = 16  # distinct intensities in the head below which it is a mask or label map
_MAX_CLIPPED = 0.02  # share of the head at exactly the maximum value: a window clipped it
MAX_RELIEF_AFTER_MM = 50.0
"""No facial feature sticks out 50 mm from a 30 mm neighbourhood (a nose: 15-35 mm): relief of
that size after the cut means the depth check did not see a face."""
MAX_MOVED_BACK_MM = 120.0
"""Deeper than a face: the nose tip lies ~60-110 mm in front of the anterior-inferior brain."""


class ImplausibleResult(InputError):
    """The cut ran, but its check says that what was cut is not a defaced face.

    Attributes:
        result: The :class:`~umit.privacy.deface.volume.DefaceResult`, so that its report and
            depth maps can be written for inspection (never the defaced image).
    """

    def __init__(self, path: str | None, problem: str, result: Any):
        super().__init__(path, problem)
        self.result = result

    def __reduce__(self) -> tuple:
        return (type(self), (self.path, self.problem, self.result))


def check_contrast(array: np.ndarray, modality: str, source: str) -> None:
    """Refuse intensities the CT or MR rules cannot read.

    Raises:
        InputError: CT without Hounsfield units, or an image that is a mask, a label map or
            clipped by a display window.
    """
    a = np.asarray(array)
    lo, hi = float(a.min()), float(a.max())
    sample = a.ravel()[:: max(1, a.size // 1_000_000)]
    if modality == "CT":
        if a.dtype == np.uint8 or (lo >= 0.0 and hi <= 255.0):
            raise InputError(
                source,
                f"CT looks windowed to 0-255 ({a.dtype}, values {lo:.0f}..{hi:.0f}, none below "
                "0): defacing needs Hounsfield units (air -1000, bone > 300); export the series "
                "without a display window",
            )
        if lo >= 0.0:
            raise InputError(
                source,
                f"CT has no values below 0 (values {lo:.0f}..{hi:.0f}): not in Hounsfield units "
                "(air is -1000 HU); apply the rescale slope/intercept",
            )
        if lo > -900.0 and float(np.mean(sample == lo)) > 0.2:
            raise InputError(
                source,
                f"CT looks windowed: {100 * float(np.mean(sample == lo)):.0f}% of the voxels sit "
                f"at its minimum {lo:.0f} HU (air would be -1000): defacing needs Hounsfield "
                "units without a display window",
            )
        return
    levels = np.unique(sample).size
    if levels < _MIN_LEVELS:
        raise InputError(
            source,
            f"only {levels} distinct intensities: a mask or label map, not an MR image",
        )
    fg = sample[sample > lo]
    clipped = float(np.mean(fg == hi)) if fg.size > 0.05 * sample.size else 0.0
    if clipped > _MAX_CLIPPED:
        raise InputError(
            source,
            f"{100 * clipped:.0f}% of the foreground sits at the maximum value {hi:.0f} "
            f"({a.dtype}): the image looks windowed or saturated (a display export, or a "
            "windowed CT?); defacing needs the scanner's intensities",
        )


def head_shape(head: np.ndarray, meta: ImageMeta) -> dict[str, Any]:
    """Extents (mm) and widest-section fill of a head mask, on a 2 mm RAS grid, without thin
    attachments (an opening removes what is thinner than ~10 mm)."""
    vol, axes = _ras_resample_codes(head.astype(np.uint8), meta, head, _SHAPE_STEP_MM)
    # Thin attachments (a CT head holder or table, ~5-10 mm) are not the head's shape.
    m = _largest_component(ndimage.binary_opening(vol > 0, iterations=_THIN_VOXELS))
    if not m.any():
        m = vol > 0
    has_z = np.nonzero(m.any(axis=(0, 1)))[0]
    z_top = float(axes[2][has_z.max()])
    height = float(axes[2][has_z.max()] - axes[2][has_z.min()]) + _SHAPE_STEP_MM
    slab = m & (axes[2][None, None, :] > z_top - HEAD_SLAB_MM)
    xs = np.nonzero(slab.any(axis=(1, 2)))[0]
    ys = np.nonzero(slab.any(axis=(0, 2)))[0]
    width = float(np.ptp(axes[0][xs])) + _SHAPE_STEP_MM
    length = float(np.ptp(axes[1][ys])) + _SHAPE_STEP_MM
    areas = slab.sum(axis=(0, 1))
    k = int(areas.argmax())
    sec = slab[:, :, k]
    rect = (np.ptp(np.nonzero(sec.any(1))[0]) + 1) * (np.ptp(np.nonzero(sec.any(0))[0]) + 1)
    return {
        "width_mm": round(width, 1),
        "length_mm": round(length, 1),
        "height_mm": round(height, 1),
        "axial_fill": round(float(areas[k]) / float(rect), 3),
        "widest_section_cm2": round(float(areas[k]) * _SHAPE_STEP_MM**2 / 100.0, 1),
    }


def _cut_sides(head: np.ndarray, meta: ImageMeta) -> list[str]:
    """World axes ("R-L", "A-P") along which the object lies on both opposite array faces."""
    cut = []
    for ax in range(3):
        world = meta.affine[:3, ax] / np.linalg.norm(meta.affine[:3, ax])
        w = int(np.argmax(np.abs(world)))
        if w == 2:  # the neck leaves through the bottom, the vertex may touch the top
            continue
        face_mm2 = float(np.prod(meta.spacing)) / meta.spacing[ax]
        both = all(
            float(np.take(head, i, axis=ax).sum()) * face_mm2 > _CUT_SIDE_MM2 for i in (0, -1)
        )
        if both:
            cut.append(("R-L", "A-P")[w])
    return cut


def check_head_shape(head: np.ndarray, meta: ImageMeta, source: str) -> dict[str, Any]:
    """Refuse a foreground whose size or shape is not a head's; return the measurements.

    Raises:
        InputError: naming the measurement that is out of range and the expected range.
    """
    shape = head_shape(head, meta)
    w, length, h = shape["width_mm"], shape["length_mm"], shape["height_mm"]
    size = f"the foreground is {w:.0f} x {length:.0f} x {h:.0f} mm (R-L x A-P x S-I)"
    cut = _cut_sides(head, meta)
    if cut:
        raise InputError(
            source,
            f"not a whole head: the field of view cuts the object on both sides ({', '.join(cut)}"
            f"; {size}): a body or limb section, or a head too large for the field of view",
        )
    if not HEAD_WIDTH_MM[0] <= w <= HEAD_WIDTH_MM[1]:
        raise InputError(
            source,
            f"not a head: {size}; a head is {HEAD_WIDTH_MM[0]:.0f}-{HEAD_WIDTH_MM[1]:.0f} mm wide",
        )
    if not HEAD_LENGTH_MM[0] <= length <= HEAD_LENGTH_MM[1]:
        raise InputError(
            source,
            f"not a head: {size}; a head is {HEAD_LENGTH_MM[0]:.0f}-{HEAD_LENGTH_MM[1]:.0f} mm "
            "long (A-P)",
        )
    # Thickness along the array's own axes: an oblique slab looks tall in world S-I.
    spans = [
        int(np.count_nonzero(head.any(axis=tuple(a for a in range(3) if a != ax)))) * sp
        for ax, sp in enumerate(meta.spacing)
    ]
    thin = int(np.argmin(spans))
    if min(h, spans[thin]) < MIN_HEAD_HEIGHT_MM:
        n = int(round(spans[thin] / meta.spacing[thin]))
        raise InputError(
            source,
            f"thin slab: {size}, {spans[thin]:.0f} mm thick along array axis {thin} ({n} "
            f"slices of {meta.spacing[thin]:.2g} mm); defacing needs at least "
            f"{MIN_HEAD_HEIGHT_MM:.0f} mm of head in every direction (brain and face)",
        )
    fill = shape["axial_fill"]
    if not AXIAL_FILL[0] <= fill <= AXIAL_FILL[1]:
        raise InputError(
            source,
            f"not a head: its widest axial section fills {fill:.2f} of its bounding rectangle "
            f"(an ellipse 0.79, a head {AXIAL_FILL[0]}-{AXIAL_FILL[1]}, a box 1.0); {size}",
        )
    return shape


def check_result(report: dict[str, Any]) -> list[str]:
    """Reasons why a finished cut's depth check is not that of a defaced face (empty: fine)."""
    dc = report.get("depth_check")
    if not dc or not dc.get("face_window_area_cm2"):
        return []
    reasons = []
    after = dc["after"]["max_protrusion_mm"]
    if after > MAX_RELIEF_AFTER_MM:
        reasons.append(
            f"after the cut something sticks out {after:.0f} mm from the surface where the "
            f"face was (no facial feature exceeds {MAX_RELIEF_AFTER_MM:.0f} mm): the cut did "
            "not follow a face"
        )
    moved = (dc.get("strongest_feature") or {}).get("surface_moved_back_mm")
    if moved is not None and moved > MAX_MOVED_BACK_MM:
        reasons.append(
            f"the surface moved back {moved:.0f} mm at the strongest feature, deeper than a "
            f"face ({MAX_MOVED_BACK_MM:.0f} mm)"
        )
    return reasons
