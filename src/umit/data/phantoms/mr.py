"""MRI head phantom: T1, T2 and FLAIR of one head with tissue labels, then acquired.

Anatomy drawn per subject (head size, a folded cortex, atrophy with age, an optional lesion with
oedema, and the face that defacing removes); the site's scanner adds its PSF, a smooth
multiplicative bias field, receiver gain and Rician noise.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from umit.data.meta import ImageMeta
from umit.data.phantoms._common import _check_seed, _n, _streams, _u
from umit.data.phantoms.scanner import (
    MR_REFERENCE_SPACING,
    Phantom,
    _Grid,
    _psf,
    _ras_grid_shape,
    _to_storage,
    check_shape,
)
from umit.data.phantoms.sites import _AGE_INDEX, SubjectAttributes, _resolve_attributes

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
MR_CHANNELS: tuple[str, ...] = ("T1", "T2", "FLAIR")

_INT16_MAX = 32767


def brain_mask(label: np.ndarray) -> np.ndarray:
    """Boolean brain mask (intracranial: CSF, grey and white matter, lesion) of an MR label map."""
    return np.isin(label, MR_BRAIN_LABELS)


# Tissue classes of the MR painter (not labels): index into the intensity tables below.
_T_AIR, _T_SCALP, _T_SKULL, _T_CSF, _T_GM, _T_WM = 0, 1, 2, 3, 4, 5
_T_LESION, _T_NECROSIS, _T_RIM, _T_EDEMA, _T_SOFT, _T_EYE, _T_NOSE = 6, 7, 8, 9, 10, 11, 12
_T_LID, _T_BROW = 13, 14  # soft tissue and skin + fat; own classes so that tests can find them
_T_CORD = 15  # the spinal cord below the skull base: not brain (labelled head), white-matter-like
MR_TISSUE_CLASSES: dict[str, int] = {
    "air": _T_AIR,
    "scalp": _T_SCALP,
    "skull": _T_SKULL,
    "csf": _T_CSF,
    "grey_matter": _T_GM,
    "white_matter": _T_WM,
    "lesion": _T_LESION,
    "necrosis": _T_NECROSIS,
    "lesion_rim": _T_RIM,
    "edema": _T_EDEMA,
    "soft_tissue": _T_SOFT,
    "eye": _T_EYE,
    "nose_lips": _T_NOSE,
    "lid": _T_LID,
    "brow": _T_BROW,
    "spinal_cord": _T_CORD,
}
"""Tissue classes of :func:`mr_tissue_map` (finer than ``MR_LABELS``: the face has its own)."""
# Label of each tissue class; oedema lies in white matter and keeps its label.
_T_LABEL = np.array([0, 1, 1, 2, 3, 4, 5, 5, 5, 4, 1, 1, 1, 1, 1, 1], dtype=np.uint8)
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
        [0.50, 0.40, 0.40],  # lids (as face soft tissue)
        [0.95, 0.62, 0.55],  # brows (as scalp: skin + fat)
        [0.85, 0.48, 0.45],  # spinal cord (as white matter)
    ],
    dtype=np.float32,
)
_N_JITTERED = 13  # classes with their own random contrast jitter; lids, brows, cord copy theirs
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
    jitter = 1.0 + rng.normal(0.0, 0.025, size=(_N_JITTERED, 3)).astype(np.float32)
    p["tissue_jitter"] = np.concatenate([jitter, jitter[[_T_SOFT, _T_SCALP, _T_WM]]])
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
    # Brain stem down to the foramen magnum (through the skull base), then the cord down the
    # vertebral canal, walled by bone: the brain meets the neck's soft tissue nowhere.
    stem = (
        ((g.x / 0.11) ** 2 + ((g.y + 0.18) / 0.12) ** 2 < 1.0) & (g.z > base - 0.12) & (g.z <= base)
    )
    t[np.broadcast_to(stem, g.n) & (rho < r_skull)] = _T_WM
    q_cord = (g.x / 0.05) ** 2 + ((g.y + 0.18) / 0.05) ** 2
    spine = np.broadcast_to(g.z <= base - 0.12, g.n) & (t != _T_AIR)
    t[spine & (q_cord < 3.0)] = _T_SKULL  # vertebral ring, ~6 mm thick
    t[spine & (q_cord < 1.0)] = _T_CORD  # the cord, ~8 mm across
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
    """Nose, eyes (with lids bulging), brows and lips on the anterior side: what defacing removes.

    The eyes sit in the orbits below the anterior cranial fossa, as in a real head: their top lies
    under the orbital roof (bone) about 6 mm or more below the intracranial cavity (on a real
    child's T1, 6-8 mm from globe to brain tissue), and the brows lie above them on the skin.
    """
    nose_len, nose_w = p["face"]["nose"]
    z_nose = -0.28
    y0 = _front_y(p, z_nose)
    sl, q = g.ellipsoid((0.0, y0 + 0.2 * nose_len, z_nose), (nose_w, nose_len, 0.16))
    t[sl][q < 1.0] = _T_NOSE
    ex = p["face"]["eyes"]
    z_eye = -0.20
    ye = _front_y(p, z_eye) - 0.02
    z_brow = z_eye + 0.14
    yb = _front_y(p, z_brow)
    # The orbit's fat (bright on T1, like the scalp's) wraps the globe; a roof of bone stays
    # between it and the cranial cavity, and the closed lids cover the globe's front.
    roof = p["skull_base"] + 0.25 * g.y - 0.03
    outside = ~np.isin(t, (_T_CSF, _T_GM, _T_WM, _T_LESION, _T_NECROSIS, _T_RIM, _T_EDEMA))
    for side in (1.0, -1.0):
        sl, q = g.ellipsoid((side * ex, yb - 0.005, z_brow), (0.12, 0.03, 0.025))
        t[sl][q < 1.0] = _T_BROW  # a ridge of skin and fat above the orbit
        sl, q = g.ellipsoid((side * ex, ye - 0.07, z_eye), (0.12, 0.12, 0.12))
        fat = (q < 1.0) & outside[sl] & (g.z[:, :, sl[2]] < roof[:, sl[1], :])
        t[sl][fat] = _T_SCALP
        sl, q = g.ellipsoid((side * ex, ye + 0.02, z_eye), (0.11, 0.06, 0.10))
        t[sl][q < 1.0] = _T_LID  # lids bulge out of the face
        sl, q = g.ellipsoid((side * ex, ye - 0.07, z_eye), (0.085, 0.085, 0.085))
        t[sl][q < 1.0] = _T_EYE
    z_lips = -0.55
    yl = _front_y(p, z_lips)
    sl, q = g.ellipsoid((0.0, yl, z_lips), (p["face"]["lips"], 0.06, 0.05))
    t[sl][q < 1.0] = _T_NOSE


def _paint_subject(seed: int, shape: tuple[int, int, int], attributes: SubjectAttributes | None):
    """Draw one subject and paint its canonical RAS tissue map; shared by the phantom and
    :func:`mr_tissue_map` so that both see the same anatomy."""
    seed = _check_seed(seed)
    shape = check_shape(shape)
    rng_attr, rng_anat, rng_acq = _streams(seed, "mr")
    attrs, proto, scanner = _resolve_attributes(attributes, rng_attr, "mr")
    p = _mr_anatomy(rng_anat, attrs)
    fov = np.asarray(shape) * np.asarray(MR_REFERENCE_SPACING)
    s = float(min(fov)) / 2
    g = _Grid(_ras_grid_shape(shape, "mr", proto), proto.spacing, (s, s, s))
    return attrs, proto, scanner, p, g, _paint_mr(g, p), rng_acq


def mr_tissue_map(
    seed: int,
    shape: tuple[int, int, int] = (80, 96, 80),
    attributes: SubjectAttributes | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The painter's tissue classes of ``make_mr_phantom(seed, shape, attributes)``.

    Finer than the labels (which fold the face into "head"): eyes, lids, brows, nose and lips
    are classes of their own (``MR_TISSUE_CLASSES``), which the defacing measurements need.

    Returns:
        ``(tissue, affine)``: the uint8 class map on the phantom's stored grid and its affine
        (equal to the phantom's).
    """
    _, proto, _, _, g, tissue, _ = _paint_subject(seed, shape, attributes)
    _, stored, affine = _to_storage({}, tissue, g.affine(proto.world_center), proto.orientation)
    return stored, affine


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
    attrs, proto, scanner, p, g, tissue, rng_acq = _paint_subject(seed, shape, attributes)
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
