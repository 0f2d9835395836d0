"""CT torso phantom: anatomy drawn per subject, painted in Hounsfield units, then acquired.

Organ sizes, positions and rotations are drawn within anatomical limits (sex and age band
modulate body size, fat and bone density); contrast phase changes the enhancing organs; the
site's scanner adds a calibration offset, correlated Gaussian noise in HU and its PSF.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from umit.data.meta import ImageMeta
from umit.data.phantoms._common import _check_seed, _n, _streams, _u
from umit.data.phantoms.findings import (
    FINDING_LABELS,
    draw_findings,
    enlarge_spleen,
    paint_findings,
)
from umit.data.phantoms.scanner import (
    CT_REFERENCE_SPACING,
    Phantom,
    _Grid,
    _kernel_gain,
    _psf,
    _ras_grid_shape,
    _to_storage,
    check_shape,
)
from umit.data.phantoms.sites import _AGE_INDEX, SubjectAttributes, _resolve_attributes

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
CT_CHANNELS: tuple[str, ...] = ("CT",)


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
    findings: bool = False,
) -> Phantom:
    """A CT-like torso in Hounsfield units with organ labels (``CT_LABELS``).

    Args:
        seed: Non-negative integer; the same seed gives bit-identical arrays, and the same
            anatomy at every site.
        shape: RAS grid (x, y, z) of the field of view at ``CT_REFERENCE_SPACING``; the stored
            array follows the site's spacing and orientation (see ``site_grid_shape``).
        attributes: Subject attributes; drawn with ``sample_attributes`` from the seed if None.
        findings: Draw the subject's findings (:mod:`umit.data.phantoms.findings`: liver lesion,
            pleural effusion, splenomegaly, kidney cyst) and paint them into the image and the
            label map (labels 10-12); they are in ``meta.extra["findings"]``. False (default)
            gives the same arrays as before findings existed.

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
    drawn = draw_findings(seed) if findings else None
    if drawn is not None:
        enlarge_spleen(p, drawn)
    hu, label = _paint_ct(g, p, attrs.contrast, proto.table)
    if drawn is not None:
        paint_findings(g, p, drawn, hu, label)

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
        extra=attrs.to_dict()
        if drawn is None
        else {**attrs.to_dict(), "findings": drawn.present()},
    )
    names = dict(CT_LABELS) if drawn is None else {**CT_LABELS, **FINDING_LABELS}
    return Phantom(images, label, meta, names, attrs)
