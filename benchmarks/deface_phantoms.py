"""What ``umit deface`` removes from phantom heads, measured against the phantom's own truth.

    python -m benchmarks.deface_phantoms [--n 10] [--brain given,estimated] [--ct] [--json OUT]

Phantom ``seed`` is acquired at MR site ``a``, ``b``, ``c`` in turn (RAS 1 mm, LPS 0.9 x 0.9 x 1.5
mm, LIA 1.3 x 1 x 1 mm), at the field of view the tests use (160 x 192 x 160 mm, a head to
scale); with ``--ct`` the same heads as head CT in HU (:func:`make_ct_head_phantom`: 5 mm
slices, 15 degree gantry tilt, head holder). Truth comes from the painter's tissue map
(:func:`umit.data.phantoms.mr_tissue_map`): eyes (vitreous), lids and brows where the phantom
paints them, nose and lips, and the labelled brain (CSF, grey and white matter, lesion). Per phantom and brain source (``given``: the labelled
brain as ``--brain-mask``; ``estimated``: the T1 heuristic), it prints the fraction of each
feature's voxels removed, the labelled brain voxels altered and the share of the head removed.
No test asserts on these numbers; they feed docs/defacing.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

SHAPE = (160, 192, 160)
SITES = ("site_a", "site_b", "site_c")


def measure(seed: int, brain_source: str, ct: bool = False) -> dict:
    from umit.data import phantoms as P
    from umit.errors import InputError
    from umit.privacy.deface import deface

    site = SITES[seed % len(SITES)]
    if ct:
        ph, tissue = P.make_ct_head_phantom(seed, SHAPE)
        img = ph.images["CT"]
    else:
        attrs = P.SubjectAttributes("FM"[seed % 2], P.AGE_BANDS[seed % 4], site, "x", "y")
        ph = P.make_mr_phantom(seed, SHAPE, attrs)
        tissue, _ = P.mr_tissue_map(seed, SHAPE, attrs)
        img = ph.images["T1"]
    classes = P.MR_TISSUE_CLASSES
    brain = P.brain_mask(ph.label)
    row: dict = {"seed": seed, "site": "ct" if ct else site, "orientation": ph.meta.orientation}
    row["brain"] = brain_source
    t0 = time.perf_counter()
    try:
        result = deface(img, ph.meta, brain if brain_source == "given" else None, check=False)
    except InputError as exc:
        row.update(status="refused", reason=exc.problem, seconds=time.perf_counter() - t0)
        return row
    row["seconds"] = round(time.perf_counter() - t0, 2)
    row["status"] = "defaced"
    removed = result.removed
    for name in ("eye", "lid", "brow", "nose_lips"):
        if name in classes and (tissue == classes[name]).any():
            row[f"{name}_removed"] = float(removed[tissue == classes[name]].mean())
    row["brain_voxels_altered"] = int((result.image[brain] != img[brain]).sum())
    row["head_removed_fraction"] = result.report["removed_head_fraction"]
    return row


def _fmt(v) -> str:
    return f"{v:.2f}" if isinstance(v, float) else str(v)


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=10, help="phantoms (seeds 0..n-1)")
    ap.add_argument("--brain", default="given,estimated", help="given, estimated or both")
    ap.add_argument("--ct", action="store_true", help="head CT phantoms in HU instead of T1")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = ap.parse_args(argv)
    rows = [measure(s, b, args.ct) for b in args.brain.split(",") for s in range(args.n)]
    keys = ["eye_removed", "lid_removed", "brow_removed", "nose_lips_removed"]
    keys = [k for k in keys if any(k in r for r in rows)]
    cols = ["brain", "seed", "orientation", "status", *keys, "brain_voxels_altered"]
    cols += ["head_removed_fraction", "seconds"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        if r["status"] == "refused":
            r = {**r, "status": f"refused: {r['reason'][:50]}"}
        print("| " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |")
    for source in args.brain.split(","):
        done = [r for r in rows if r["brain"] == source and r["status"] == "defaced"]
        print(f"\n{source}: defaced {len(done)} of {args.n}")
        for k in [*keys, "brain_voxels_altered", "head_removed_fraction"]:
            vals = [r[k] for r in done if k in r]
            if vals:
                print(
                    f"  {k}: min {min(vals):.3f} median {statistics.median(vals):.3f} "
                    f"max {max(vals):.3f}"
                )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
