"""DICOM SEG cost next to the NIfTI mask: write time and file size on real series.

    python -m benchmarks.dicom_seg [--shared ../shared/data] [--reps 3]

Series (from ../shared/data): the 20-slice JPEG 2000 CT with TotalSegmentator's own 42-label map
of it (a copy whose blanked Study/Series UIDs are filled, pixels untouched), the 134-slice TCIA
abdomen CT with a 2-label threshold mask (body, bone), and the 192-slice oblique head MR with a
2-label threshold mask. For each: the NIfTI mask (``write_image``, uint8 .nii.gz), the BINARY SEG
and the LABELMAP SEG (``write_dicom_seg``, which also reads the source headers and matches the
geometry), median of ``--reps`` runs. Prints a table and writes
``benchmarks/results/<machine>-<date>-dicom_seg.json``; no test asserts on these numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"


def _median_time(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _totalsegmentator_ct(shared: Path, work: Path) -> tuple[Path, np.ndarray, dict[str, int]]:
    import nibabel as nib
    import pydicom

    from umit.ingest.read import read_volume
    from umit.preprocess.resample import reorient_to_ras

    src = shared / "totalsegmentator" / "example_ct_dicom"
    copy = work / "ts_ct"
    copy.mkdir()
    for p in sorted(src.iterdir()):
        ds = pydicom.dcmread(p)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = "2.25.1" + "0" * 30, "2.25.2" + "0" * 30
        ds.save_as(copy / p.name)
    labels = nib.load(shared / "totalsegmentator" / "example_seg_dicom.nii.gz")
    _, meta = read_volume(copy)
    lab, lab_affine = reorient_to_ras(np.asarray(labels.dataobj), labels.affine)
    _, ref_affine = reorient_to_ras(np.zeros(labels.shape), meta.affine)
    assert np.allclose(lab_affine, ref_affine, atol=1e-3), "labels not on the series' grid"
    mask = np.flip(lab, axis=(0, 1)).astype(np.uint8)  # RAS -> the series' stored LPS order
    names = {"spleen": 1, "kidney_right": 2, "kidney_left": 3, "gallbladder": 4, "liver": 5}
    return copy, mask, names


def _threshold(series: Path, low_pct: float, high_pct: float, names: tuple[str, str]):
    from umit.ingest.read import read_volume

    image, _ = read_volume(series)
    mask = np.zeros(image.shape, np.uint8)
    mask[image > np.percentile(image, low_pct)] = 1
    mask[image > np.percentile(image, high_pct)] = 2
    return series, mask, {names[0]: 1, names[1]: 2}


def measure(name: str, series: Path, mask: np.ndarray, names: dict, work: Path, reps: int) -> dict:
    from umit.data.io import write_image
    from umit.inference.dicom_seg import Algorithm, write_dicom_seg
    from umit.ingest.read import read_volume

    _, meta = read_volume(series)
    algo = Algorithm("benchmark", "0", "0" * 64)
    nii = work / f"{name}.nii.gz"
    row = {
        "series": name,
        "shape": list(mask.shape),
        "segments_present": int(len(np.unique(mask)) - 1),
        "nifti_s": _median_time(lambda: write_image(nii, mask, meta, dtype=np.uint8), reps),
        "nifti_bytes": nii.stat().st_size,
    }
    for seg_type in ("binary", "labelmap"):
        out = work / f"{name}.{seg_type}.dcm"
        written = {}

        def write(seg_type=seg_type, out=out, written=written):
            w = write_dicom_seg(
                mask, series, out, affine=meta.affine, label_names=names, algorithm=algo,
                seg_type=seg_type,
            )  # fmt: skip
            written.update(frames=w.n_frames, segments=len(w.segments))

        row[f"{seg_type}_s"] = _median_time(write, reps)
        row[f"{seg_type}_bytes"] = out.stat().st_size
        row[f"{seg_type}_frames"] = written["frames"]
        row["segments_described"] = written["segments"]
    return row


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = Path(__file__).resolve().parents[2] / "shared" / "data"
    ap.add_argument("--shared", type=Path, default=default)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        cases = [
            ("totalsegmentator_ct_j2k", *_totalsegmentator_ct(args.shared, work)),
            (
                "tcia_abdomen_ct",
                *_threshold(args.shared / "abdomen_ct_dicom_tcia", 40, 95, ("body", "bone")),
            ),
            (
                "head_mr_oblique",
                *_threshold(args.shared / "head_mr_dicom_sag_anon", 70, 99.5, ("head", "lesion")),
            ),
        ]
        for name, series, mask, names in cases:
            rows.append(measure(name, series, mask, names, work, args.reps))
            r = rows[-1]
            print(
                f"{name:26s} {tuple(r['shape'])}: NIfTI {r['nifti_s']:.2f} s "
                f"{r['nifti_bytes'] / 1e3:.0f} kB | BINARY {r['binary_s']:.2f} s "
                f"{r['binary_bytes'] / 1e3:.0f} kB ({r['binary_frames']} frames) | LABELMAP "
                f"{r['labelmap_s']:.2f} s {r['labelmap_bytes'] / 1e3:.0f} kB"
            )
    machine = {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "load_avg_1m": os.getloadavg()[0],
        "python": platform.python_version(),
    }
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"{platform.node()}-{date.today()}-dicom_seg.json"
    out.write_text(json.dumps({"machine": machine, "reps": args.reps, "rows": rows}, indent=2))
    print(f"machine: {machine} -> {out}")


if __name__ == "__main__":
    main()
