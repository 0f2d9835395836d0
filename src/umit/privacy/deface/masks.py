"""Head and brain masks, and the intensity model (CT or MR) that both depend on.

Head: an intensity threshold (Otsu-based for MR, -500 HU for CT), largest component, closing and
hole filling. Brain (when the user gives none): MR -- bright tissue inside the head, eroded to cut
it from scalp, orbit fat and muscle, the largest piece grown back, closed and filled; CT -- the
largest 0..100 HU region whose outer shell is mostly bone. Implausible estimates are refused.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from umit.data.meta import ImageMeta
from umit.errors import InputError
from umit.privacy.deface._common import (
    _axis_coord,
    _ball_dilate,
    _ball_erode,
    _largest_component,
    _otsu,
    _source,
    _world_points,
)

_CORD_AREA_FRACTION = 0.12  # axial brain area below which the mask is spinal cord, not brain
_MIN_BRAIN_FRACTION = 0.03  # of the head volume
_MAX_BRAIN_FRACTION = 0.85  # a "brain" filling the head means no scalp/skull was found
_MAX_VERTEX_GAP_MM = 30.0  # head top to brain top (scalp + skull + CSF)
_CSF_ALLOWANCE_MM = 4.0  # added around an estimated brain: the CSF layer it cannot see
_MR_EROSION_MM = (4.0, 6.0, 8.0, 10.0)  # tried in turn until the brain comes loose
_CT_EROSION_MM = (3.0, 6.0, 9.0, 12.0)  # the same for CT (a brainstem is ~15-25 mm wide)
_DARK_FRACTION = 0.3  # of the head's 95th percentile (fat, white matter): T1-dark bone and CSF
_RIM_MM = 10.0  # reach of the rim protected around an estimated brain (``brain_rim``)
BRAIN_VOLUME_ML: tuple[float, float] = (300.0, 2600.0)
"""Plausible volume of an estimated brain (tissue, before the CSF allowance): a newborn's
brain is ~350 mL, an adult's intracranial volume 1.1-2.0 L."""
_MIN_BRAIN_SPAN = 0.55  # brain width and length over the head's at the brain's levels
_LEAK_VOXELS = 2  # gaps in the head's outline up to twice this wide do not let the air in
_ENCLOSED_FRACTION = 0.005  # of the head: an interior region behind such a gap, not a crevice


def guess_modality(array: np.ndarray, meta: ImageMeta) -> str:
    """ "CT" or "MR": the header's modality, else CT when a large share of voxels is < -500."""
    if meta.modality in ("CT", "MR"):
        return meta.modality
    sample = np.asarray(array).ravel()[:: max(1, array.size // 200_000)]
    return "CT" if np.mean(sample < -500) > 0.05 else "MR"


def head_mask(
    array: np.ndarray,
    meta: ImageMeta,
    modality: str,
    threshold: float | None = None,
) -> tuple[np.ndarray, float]:
    """Head (foreground) mask and the threshold used.

    MR: a third of the Otsu threshold of the whole volume (keeps dark skin and bone inside the
    surface while the noise floor stays out). CT: -500 HU (soft tissue vs air). Then the largest
    connected component, a 2-voxel closing and 3D hole filling that tolerates gaps of up to 4
    voxels in the outline (``_fill_enclosed``).
    """
    data = np.asarray(array, dtype=np.float32)
    if threshold is None:
        if modality == "CT":
            threshold = -500.0
        else:
            sample = data.ravel()[:: max(1, data.size // 2_000_000)]
            threshold = _otsu(sample) / 3.0
    fg = data > threshold
    if not fg.any():
        return fg, float(threshold)
    fg = ndimage.binary_opening(fg, iterations=1)  # drop single-voxel noise and thin ghosts
    fg = _largest_component(fg)
    fg = ndimage.binary_closing(fg, iterations=2) | fg
    return _fill_enclosed(fg, _LEAK_VOXELS), float(threshold)


def _fill_enclosed(fg: np.ndarray, leak: int) -> np.ndarray:
    """Hole filling that tolerates small leaks: background counts as outside only if it is
    reached from the array's border through gaps wider than ``2 * leak`` voxels.

    A plain 3D fill loses the whole dark layer of bone and CSF (T1) when a thin spot of scalp
    falls below the threshold anywhere (a 1.3 mm voxel across a 5 mm scalp, partial volume):
    that layer then joins the air outside, and with it the brain's CSF drops out of the head.
    """
    bg = ~fg
    core = ndimage.binary_erosion(bg, iterations=leak, border_value=1)
    labels, n = ndimage.label(core)
    if n == 0:
        return ndimage.binary_fill_holes(fg)
    faces = [labels[0], labels[-1], labels[:, 0], labels[:, -1], labels[:, :, 0], labels[:, :, -1]]
    touching = np.unique(np.concatenate([f.ravel() for f in faces]))
    outside = np.isin(labels, touching[touching > 0])
    outside = ndimage.binary_dilation(outside, iterations=leak, mask=bg)
    plain = ndimage.binary_fill_holes(fg)
    # What only the tolerant fill adds: the large dark interior behind a gap (kept), or narrow
    # crevices of the surface such as nostrils and lips (dropped: they are the face's relief).
    extra, n = ndimage.label(~outside & ~plain)
    if n == 0:
        return plain
    sizes = np.bincount(extra.ravel())
    sizes[0] = 0
    big = np.nonzero(sizes > _ENCLOSED_FRACTION * int(plain.sum()))[0]
    return plain | np.isin(extra, big)


def _tissue_mode(values: np.ndarray) -> float:
    """Most frequent intensity of a head's voxels (brain tissue dominates a head MR)."""
    lo, hi = np.percentile(values, [5.0, 99.5])
    hist, edges = np.histogram(values, bins=128, range=(float(lo), float(hi)))
    hist = ndimage.gaussian_filter1d(hist.astype(np.float64), 2.0)
    i = int(hist.argmax())
    return float(0.5 * (edges[i] + edges[i + 1]))


def _trim_waist(brain: np.ndarray, meta: ImageMeta) -> np.ndarray:
    """Cut a mask below the level of its largest axial (RAS z) area where the area drops below
    ``_CORD_AREA_FRACTION`` of it: drops the spinal cord (and what hangs on it) below the brain."""
    pts_z = _world_points(brain, meta)[:, 2]
    if pts_z.size == 0:
        return brain
    bin_mm = 2.0
    zmin = float(pts_z.min())
    counts = np.bincount(((pts_z - zmin) / bin_mm).astype(int))
    peak = int(counts.argmax())
    below = np.nonzero(counts[:peak] < _CORD_AREA_FRACTION * counts[peak])[0]
    if below.size == 0:
        return brain
    z_cut = zmin + (int(below.max()) + 1) * bin_mm
    return brain & (_axis_coord(meta, brain.shape, 2) >= z_cut)


def _ct_brain(
    data: np.ndarray, meta: ImageMeta, head: np.ndarray, z_floor: float, source: str
) -> np.ndarray:
    """CT: the 0..100 HU band, eroded (3 mm, more while it reaches the bottom of the head);
    the largest piece whose outer shell is mostly bone (> 250 HU) or air, grown back."""
    sp = meta.spacing
    band = head & (data > 0) & (data < 100)
    bone = data > 250
    dist = ndimage.distance_transform_edt(band, sampling=sp)
    found = None
    for radius in _CT_EROSION_MM:
        labels, n = ndimage.label(dist > radius)
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        enclosed = None
        for lab in np.argsort(sizes)[::-1][: min(8, n)]:
            comp = labels == lab
            grown = _ball_dilate(comp, radius + 2.0, sp) & band
            shell = _ball_dilate(grown, 2.0, sp) & ~grown
            if shell.any() and float(np.mean(bone[shell] | ~head[shell])) > 0.5:
                enclosed = comp
                break
        if enclosed is None:
            break
        found = (enclosed, radius)
        if _world_points(enclosed, meta)[:, 2].min() > z_floor:
            break
    if found is None:
        if not band.any():
            raise InputError(source, "no soft tissue (0..100 HU) inside the head: not a head CT?")
        raise InputError(source, "no soft tissue enclosed by bone found: not a head CT (no skull)?")
    comp, radius = found
    return _ball_dilate(comp, radius + 2.0, sp) & band


def _mr_brain(
    data: np.ndarray, meta: ImageMeta, head: np.ndarray, z_floor: float, source: str
) -> np.ndarray:
    """MR (T1): tissue between the CSF/grey-matter threshold and 2x the head's mode, eroded
    until it comes loose, the cord trimmed, the largest piece grown back within the band."""
    sp = meta.spacing
    inside = data[head]
    if inside.size == 0:
        raise InputError(source, "empty head mask")
    sample = inside[:: max(1, inside.size // 2_000_000)]
    # Brain tissue is the most frequent intensity once the dark class is set aside: a thick
    # skull and CSF (T1: < ~0.25 of white matter and fat) can outnumber any single tissue once
    # the head mask holds them.
    tissue = sample[sample > _DARK_FRACTION * float(np.percentile(sample, 95))]
    mode = _tissue_mode(tissue if tissue.size > 100 else sample)
    # Lower bound: between CSF/bone and grey matter (Otsu below the mode), or 0.6 x mode when
    # that is lower; the mode may be white matter, and grey matter darker by bias.
    darker = sample[sample < mode]
    low = min(0.6 * mode, _otsu(darker)) if darker.size > 100 else 0.6 * mode
    band = head & (data > low) & (data < 2.0 * mode)
    dist = ndimage.distance_transform_edt(band, sampling=sp)
    for radius in _MR_EROSION_MM:
        core = _largest_component(dist > radius)
        core = _largest_component(_trim_waist(core, meta))
        if not core.any() or _world_points(core, meta)[:, 2].min() > z_floor:
            break
    if not core.any():
        raise InputError(source, "no bright tissue region inside the head: not a head MR?")
    return _ball_dilate(core, radius + 1.0, sp) & band


def estimate_brain_mask(
    array: np.ndarray, meta: ImageMeta, head: np.ndarray, modality: str
) -> np.ndarray:
    """Heuristic brain (intracranial) mask; generous rather than tight.

    MR (T1-like contrast): voxels between the CSF/grey-matter threshold and 2x the head's
    most frequent intensity (brain tissue dominates a head), eroded by 4 mm (cuts the brain
    from scalp fat, orbits and muscle; 6-10 mm when the largest piece still reaches the bottom
    of the head), the spinal cord trimmed, the largest piece grown back within the band, closed
    by 6 mm (sulcal CSF), hole-filled (ventricles), then grown by ``_CSF_ALLOWANCE_MM`` (the
    CSF layer T1 cannot tell from bone).
    CT: 0..100 HU, eroded by 3 mm (6-12 mm while the piece reaches the bottom of the head); the
    largest piece whose outer shell is mostly bone (> 250 HU) or air, grown back and filled.

    Raises:
        InputError: no brain-like region was found, or it fills the head (no scalp/skull).
    """
    data = np.asarray(array, dtype=np.float32)
    sp = meta.spacing
    source = _source(meta)
    head_z = _world_points(head, meta)[:, 2]
    # A "brain" that reaches the bottom tenth of the head hangs on a bridge (brainstem into
    # neck tissue of brain-like intensity): erode harder to cut it.
    z_floor = float(head_z.min()) + 0.1 * float(np.ptp(head_z))
    if modality == "CT":
        brain = _ct_brain(data, meta, head, z_floor, source)
    else:
        brain = _mr_brain(data, meta, head, z_floor, source)
    brain = _ball_erode(_ball_dilate(brain, 6.0, sp), 6.0, sp) | brain
    brain = ndimage.binary_fill_holes(brain) & head
    if brain.any():
        # The brain's top lies under scalp, skull and CSF only (~10-20 mm): a "brain" far
        # below the vertex is the face or neck, which the cut would then spare or worse.
        gap = float(_world_points(head, meta)[:, 2].max() - _world_points(brain, meta)[:, 2].max())
        if gap > _MAX_VERTEX_GAP_MM:
            raise InputError(
                source,
                f"implausible brain estimate: its top lies {gap:.0f} mm below the top of the "
                f"head (expected < {_MAX_VERTEX_GAP_MM:.0f} mm); pass a brain mask (--brain-mask)",
            )
    frac = float(brain.sum()) / max(1, int(head.sum()))
    if frac < _MIN_BRAIN_FRACTION:
        raise InputError(
            source,
            f"no brain found (estimated brain is {100 * frac:.1f}% of the head): not a head "
            "image, or pass a brain mask (--brain-mask)",
        )
    if frac > _MAX_BRAIN_FRACTION:
        raise InputError(
            source,
            f"no scalp/skull layer around the estimated brain ({100 * frac:.0f}% of the head): "
            "not a head image, or pass a brain mask (--brain-mask)",
        )
    _check_brain_size(brain, head, meta, source)
    if modality == "CT":
        return brain  # the 0..100 HU band holds the CSF already
    # The T1 tissue mask misses the CSF around the brain (as dark as bone): grow it by a CSF
    # allowance so that the whole intracranial space is protected.
    return _ball_dilate(brain, _CSF_ALLOWANCE_MM, sp) & head


def _check_brain_size(brain: np.ndarray, head: np.ndarray, meta: ImageMeta, source: str) -> None:
    """Refuse an estimate that is not the size of a brain, or spans too little of its head.

    A brain fills most of the cranium's width and length (scalp, skull and CSF take ~10-15 mm
    a side): a small blob in the forehead or the neck that passed the other checks would put
    the cut through the real brain.
    """
    ml = float(brain.sum()) * float(np.prod(meta.spacing)) / 1000.0
    lo, hi = BRAIN_VOLUME_ML
    if not lo <= ml <= hi:
        raise InputError(
            source,
            f"implausible brain estimate: {ml:.0f} mL (a brain is {lo:.0f}-{hi:.0f} mL): not a "
            "head, or pass a brain mask (--brain-mask)",
        )
    b = _world_points(brain, meta)
    h = _world_points(head, meta)
    h = h[(h[:, 2] >= b[:, 2].min()) & (h[:, 2] <= b[:, 2].max())]
    for axis, name in ((0, "width (R-L)"), (1, "length (A-P)")):
        ratio = float(np.ptp(b[:, axis])) / max(float(np.ptp(h[:, axis])), 1e-6)
        if ratio < _MIN_BRAIN_SPAN:
            raise InputError(
                source,
                f"implausible brain estimate: its {name} is {100 * ratio:.0f}% of the head's at "
                f"its levels (a brain: > {100 * _MIN_BRAIN_SPAN:.0f}%); pass a brain mask "
                "(--brain-mask)",
            )


def brain_rim(
    array: np.ndarray, meta: ImageMeta, head: np.ndarray, brain: np.ndarray
) -> np.ndarray:
    """What an estimated T1 brain may have missed at its edge: dark voxels (CSF, bone; below
    half the estimate's median) reached from it through dark voxels only, within ``_RIM_MM``.

    A T1 estimate can stop at the grey matter where the CSF around it is thick (atrophy); the
    fixed CSF allowance then falls short. Growing through dark voxels covers that CSF but stops
    at fat and muscle (not dark), so the orbits' fat, muscles and eyes below the orbital roof
    stay outside. The caller protects the rim like the brain (it is not used to place the cut).
    """
    data = np.asarray(array, dtype=np.float32)
    if not brain.any():
        return brain.copy()
    dark = head & (data < 0.5 * float(np.median(data[brain])))
    steps = max(1, int(round(_RIM_MM / min(meta.spacing))))
    grown = ndimage.binary_dilation(brain, iterations=steps, mask=dark | brain)
    return grown & ~brain
