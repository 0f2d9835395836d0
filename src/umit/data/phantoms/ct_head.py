"""Head CT phantom in Hounsfield units, acquired the way clinical head CT is.

The anatomy is the MR head phantom's (:func:`~umit.data.phantoms.mr.mr_tissue_map`: the same
skull, brain, eyes, nose and lips), painted in HU; the acquisition is a head CT's:

- thick axial slices (default 5 mm) that average what they cross (partial volume);
- a gantry tilt: slices are tilted about the patient's left-right axis and stacked along the
  table, so the affine is sheared (the slice axis is not perpendicular to the slices), as a
  tilted DICOM series gives it;
- a head holder: a curved plastic support (``HOLDER_HU``) cradling the back of the head,
  touching the occiput, which a -500 HU threshold joins to the head;
- Gaussian noise in HU; ``windowed`` returns what a display export makes of it (uint8 after a
  brain window).
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from umit.data.meta import ImageMeta
from umit.data.phantoms.mr import (
    _T_LABEL,
    MR_LABELS,
    MR_TISSUE_CLASSES,
    mr_tissue_map,
)
from umit.data.phantoms.scanner import Phantom
from umit.data.phantoms.sites import SubjectAttributes

# HU of the MR painter's tissue classes (MR_TISSUE_CLASSES order).
_HU = {
    "air": -1000.0,
    "scalp": -40.0,  # skin over fat; the orbit's fat is painted as this class too
    "skull": 1400.0,  # cortical tables; the diploe between them: _DIPLOE_HU
    "csf": 8.0,
    "grey_matter": 38.0,
    "white_matter": 28.0,
    "lesion": 34.0,
    "necrosis": 18.0,
    "lesion_rim": 45.0,
    "edema": 20.0,
    "soft_tissue": 42.0,
    "eye": 10.0,
    "nose_lips": 35.0,
    "lid": 40.0,
    "brow": 30.0,
    "spinal_cord": 28.0,
}
HOLDER_HU = 150.0
"""A plastic / carbon-fibre head holder: dense enough to join the head at a -500 HU threshold."""
_HOLDER_RADIUS_MM = 95.0
_HOLDER_THICKNESS_MM = 6.0
_DIPLOE_HU = 450.0
_NOISE_HU = 6.0
_SUBSAMPLES = 5  # samples across a slice's thickness (partial volume)


def _hu_table() -> np.ndarray:
    table = np.zeros(len(MR_TISSUE_CLASSES), dtype=np.float32)
    for name, index in MR_TISSUE_CLASSES.items():
        table[index] = _HU[name]
    return table


def make_ct_head_phantom(
    seed: int,
    shape: tuple[int, int, int] = (160, 192, 160),
    *,
    slice_mm: float = 5.0,
    pixel_mm: float = 1.0,
    tilt_deg: float = 15.0,
    holder: bool = True,
) -> tuple[Phantom, np.ndarray]:
    """A head CT in HU (int16) with the MR head phantom's anatomy and labels.

    Args:
        seed: The MR phantom seed whose anatomy is used (site_a, female, 18-39).
        shape: Field of view of that MR phantom (RAS voxels at 1 mm).
        slice_mm: Table increment between slices (and slice thickness).
        pixel_mm: In-plane pixel size.
        tilt_deg: Gantry tilt about the left-right axis (0: an orthogonal affine).
        holder: Add the curved head holder touching the occiput.

    Returns:
        ``(phantom, tissue)``: a ``Phantom`` with channel "CT" (int16 HU) and ``MR_LABELS``
        labels, and the painter's tissue classes (``MR_TISSUE_CLASSES``) on the CT grid; both
        sampled at each voxel's centre.
    """
    attrs = SubjectAttributes("F", "18-39", "site_a", "x", "y")
    tissue, t_affine = mr_tissue_map(seed, shape, attrs)  # RAS, 1 mm
    hu = _hu_table()[tissue]
    # Skull: thin cortical tables (~1.5 mm) around trabecular diploe; at thick slices much of it
    # reads as a few hundred HU only.
    skull = tissue == MR_TISSUE_CLASSES["skull"]
    depth = ndimage.distance_transform_edt(skull)
    hu[skull & (depth > 1.5)] = _DIPLOE_HU
    if holder:
        _add_holder(hu, tissue, t_affine)
    # The CT grid: i along R, j in the tilted slice plane, k along the table (world S).
    t = math.radians(tilt_deg)
    lo = t_affine[:3, 3]
    hi = lo + (np.asarray(tissue.shape) - 1)  # 1 mm RAS grid
    n_i = int((hi[0] - lo[0]) / pixel_mm) + 1
    n_j = int((hi[1] - lo[1]) / (pixel_mm * math.cos(t))) + 1
    rise = (n_j - 1) * pixel_mm * math.sin(t)  # z climbed along a tilted slice
    n_k = int(math.ceil((hi[2] - lo[2] + abs(rise)) / slice_mm)) + 1
    affine = np.eye(4)
    affine[:3, 0] = (pixel_mm, 0.0, 0.0)
    affine[:3, 1] = (0.0, pixel_mm * math.cos(t), pixel_mm * math.sin(t))
    affine[:3, 2] = (0.0, 0.0, slice_mm)
    affine[:3, 3] = (lo[0], lo[1], lo[2] - max(0.0, rise))  # every column spans the head
    to_tissue = np.linalg.inv(t_affine) @ affine
    ii, jj = np.meshgrid(np.arange(n_i), np.arange(n_j), indexing="ij")
    ct = np.zeros((n_i, n_j, n_k), dtype=np.float32)
    label = np.zeros((n_i, n_j, n_k), dtype=np.uint8)
    classes = np.zeros((n_i, n_j, n_k), dtype=np.uint8)
    offsets = (np.arange(_SUBSAMPLES) + 0.5) / _SUBSAMPLES - 0.5
    for k in range(n_k):
        acc = np.zeros((n_i, n_j), dtype=np.float32)
        for d in offsets:  # a thick slice averages what it crosses
            ijk = np.stack([ii, jj, np.full_like(ii, 0), np.ones_like(ii)]).reshape(4, -1)
            ijk = ijk.astype(np.float64)
            ijk[2] = k + d
            idx = (to_tissue @ ijk)[:3]
            acc += ndimage.map_coordinates(hu, idx, order=0, cval=-1000.0).reshape(ii.shape)
            if d == offsets[_SUBSAMPLES // 2]:
                cls = ndimage.map_coordinates(tissue, idx, order=0, cval=0).reshape(ii.shape)
                classes[:, :, k] = cls
                label[:, :, k] = _T_LABEL[cls]
        ct[:, :, k] = acc / _SUBSAMPLES
    rng = np.random.default_rng(seed)
    ct += rng.normal(0.0, _NOISE_HU, ct.shape).astype(np.float32)
    image = np.clip(np.rint(ct), -1024, 3071).astype(np.int16)
    meta = ImageMeta(
        affine=affine,
        source=f"phantom:ct_head:{seed}",
        modality="CT",
        channel_names=("CT",),
        extra=attrs.to_dict(),
    )
    return Phantom({"CT": image}, label, meta, dict(MR_LABELS), attrs), classes


def _add_holder(hu: np.ndarray, tissue: np.ndarray, affine: np.ndarray) -> None:
    """Paint a curved holder shell (a cylinder about the S-I axis) that touches the occiput."""
    head = tissue > 0
    ys = np.nonzero(head.any(axis=(0, 2)))[0]
    zs = np.nonzero(head.any(axis=(0, 1)))[0]
    x0 = affine[0, 3] + (np.asarray(tissue.shape[0]) - 1) / 2.0
    y_back = affine[1, 3] + ys.min()
    yc = y_back + _HOLDER_RADIUS_MM  # the shell's inner surface passes through the occiput
    x = affine[0, 3] + np.arange(tissue.shape[0])[:, None, None]
    y = affine[1, 3] + np.arange(tissue.shape[1])[None, :, None]
    z = affine[2, 3] + np.arange(tissue.shape[2])[None, None, :]
    r = np.sqrt((x - x0) ** 2 + (y - yc) ** 2)
    z_mid = affine[2, 3] + 0.5 * (zs.min() + zs.max())
    shell = (
        (r >= _HOLDER_RADIUS_MM - 1.0)
        & (r <= _HOLDER_RADIUS_MM + _HOLDER_THICKNESS_MM)
        & (y < yc - 0.5 * _HOLDER_RADIUS_MM)  # the back third of the circle: a cradle
        & (z < z_mid + 20.0)
    )
    hu[shell & ~head] = HOLDER_HU


def windowed(image: np.ndarray, level: float = 40.0, width: float = 80.0) -> np.ndarray:
    """A display export of a CT: HU through a window (default brain: 0-80 HU) to uint8 0-255."""
    lo = level - width / 2.0
    scaled = (np.asarray(image, dtype=np.float32) - lo) / width * 255.0
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
