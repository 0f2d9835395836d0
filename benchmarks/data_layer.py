"""Data-layer figures: ingest and preprocess throughput, and one training crop from the store
versus MONAI's LoadImage + Spacing of the same volume (interleaved A B A B in one process).

    python -m benchmarks.data_layer [--shared ../shared/data] [--phantoms 20] [--reps 5]

Prints a table and writes ``benchmarks/results/<machine>-<date>-data_layer.json``. No test asserts
on these numbers; they feed the issue notes and docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def pipeline(src: Path, work: Path, name: str, workers: int, target_spacing=None) -> dict:
    """Ingest + preprocess ``src``; returns cases/s of each stage and the folders."""
    from umit.ingest.run import IngestConfig
    from umit.ingest.run import run as ingest
    from umit.preprocess.run import PreprocessConfig
    from umit.preprocess.run import run as preprocess

    raw, prep = work / f"{name}_raw", work / f"{name}_prep"
    ing = ingest(IngestConfig(src=src, out=raw, workers=workers), progress=False)
    pre = preprocess(
        PreprocessConfig(raw=raw, out=prep, workers=workers, target_spacing=target_spacing)
    )
    return {
        "cases": ing.ingested,
        "ingest_failed": ing.failed,
        "ingest_s": round(ing.seconds, 3),
        "ingest_cases_per_s": round(ing.ingested / ing.seconds, 3),
        "preprocess_done": pre.done,
        "preprocess_failed": pre.failed,
        "preprocess_s": round(pre.seconds, 3),
        "preprocess_cases_per_s": round(pre.done / pre.seconds, 3) if pre.seconds else None,
        "raw": str(raw),
        "prep": str(prep),
    }


def crop_vs_monai(raw: Path, prep: Path, crop: int, reps: int) -> dict:
    """Median time of one ``crop``³ training crop from the store vs MONAI load + resample."""
    from monai.transforms import Compose, LoadImage, Spacing

    from umit.data.dataset import StoreCropDataset
    from umit.data.plan import Plan
    from umit.ingest.catalog import Catalog

    plan = Plan.load(prep / "plan.json")
    with Catalog.open_raw(raw) as cat:
        rec = cat.series()[0]
    nifti = raw / rec.image_path
    monai = Compose(
        [
            LoadImage(image_only=True, ensure_channel_first=True),
            Spacing(pixdim=tuple(plan.target_spacing), mode="bilinear"),
        ]
    )
    ds = StoreCropDataset(prep, crop, foreground_prob=0.0, seed=0)
    ds[0]  # open the store once, as a DataLoader worker does
    ours, ref = [], []
    shape_ref = None
    for i in range(reps):  # interleaved: drift on a shared machine hits both alike
        ours.append(_timed(lambda i=i: ds[i % len(ds)]))
        t = time.perf_counter()
        resampled = monai(str(nifti))
        ref.append(time.perf_counter() - t)
        shape_ref = tuple(resampled.shape)
    return {
        "volume": str(rec.source),
        "raw_shape": list(rec.shape),
        "raw_spacing": list(rec.spacing),
        "target_spacing": list(plan.target_spacing),
        "monai_resampled_shape": list(shape_ref),
        "crop": crop,
        "ours_median_s": statistics.median(ours),
        "ours_min_s": min(ours),
        "ours_max_s": max(ours),
        "monai_median_s": statistics.median(ref),
        "monai_min_s": min(ref),
        "monai_max_s": max(ref),
        "speedup": statistics.median(ref) / statistics.median(ours),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument(
        "--shared", default=str(Path(__file__).resolve().parents[2] / "shared" / "data")
    )
    ap.add_argument("--phantoms", type=int, default=20)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--crop", type=int, default=96)
    args = ap.parse_args()
    torch.set_num_threads(2)
    from umit.data.phantoms.stage import PhantomsConfig
    from umit.data.phantoms.stage import run as make_phantoms

    report: dict = {
        "machine": platform.node(),
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "date": date.today().isoformat(),
    }
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        t = _timed(
            lambda: make_phantoms(
                PhantomsConfig(
                    out=work / "ph", n=args.phantoms, modality="ct", workers=args.workers
                )
            )
        )
        report["phantoms_generate_s"] = round(t, 3)
        report["phantoms"] = pipeline(work / "ph", work, "ph", args.workers)
        report["phantom_crop"] = crop_vs_monai(
            Path(report["phantoms"]["raw"]), Path(report["phantoms"]["prep"]), args.crop, args.reps
        )
        abdomen = Path(args.shared) / "abdomen_ct_dicom_tcia"
        if abdomen.is_dir():
            # the issue-5 configuration: resample to 1.5 x 1.5 x 2 mm
            report["abdomen_ct"] = pipeline(abdomen, work, "abd", 1, target_spacing=(1.5, 1.5, 2.0))
            report["abdomen_crop"] = crop_vs_monai(
                Path(report["abdomen_ct"]["raw"]),
                Path(report["abdomen_ct"]["prep"]),
                args.crop,
                args.reps,
            )
        else:
            report["abdomen_ct"] = f"skipped: {abdomen} not found"
        monai_version = __import__("monai").__version__
        report["monai"] = monai_version
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"{report['machine']}-{report['date']}-data_layer.json"
    out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(json.dumps(report, indent=2, default=str))
    print(f"written {out}")


if __name__ == "__main__":
    main()
