"""How fast ``umit ingest dicomweb+http://...`` pulls series from a real Orthanc on this machine.

Starts Orthanc (``tests/_orthanc.py``: loopback, auth on, temp storage), uploads ``--copies``
copies of the real abdomen CT series (``../shared/data/abdomen_ct_dicom_tcia``: 134 slices of
512 x 512, 70.6 MB; each copy with new Study/Series/SOP UIDs), then measures

* **retrieve**: WADO-RS of every series to disk only (:meth:`DicomWebClient.retrieve_series`,
  ``--pacs-workers`` threads), and
* **ingest**: the whole ``umit ingest`` (retrieve + decode + checks + NIfTI .nii.gz write +
  catalog), once per ``--pacs-workers`` value, and once with ``compress=False``,
* **local**: ``umit ingest`` of the same files from a local folder (what the PACS adds),

as series/s and MB/s of DICOM. Orthanc is stopped at the end.

Run: ``.venv/bin/python benchmarks/pacs_ingest.py [--copies 6] [--pacs-workers 1 4]``.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import date
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the Orthanc launcher the tests use

from umit.ingest.dicomweb import dicom_json_value  # noqa: E402
from umit.ingest.run import IngestConfig, run  # noqa: E402

from _orthanc import start_orthanc  # noqa: E402
from _shared import require_shared  # noqa: E402


def write_copies(src: Path, dest: Path, copies: int) -> int:
    """``copies`` copies of the series under ``src`` with fresh UIDs; returns bytes per copy."""
    files = sorted(p for p in src.glob("*.dcm"))
    size = sum(p.stat().st_size for p in files)
    for c in range(copies):
        study, series = generate_uid(), generate_uid()
        for i, path in enumerate(files):
            ds = pydicom.dcmread(path)
            ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
            ds.SOPInstanceUID = generate_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            out = dest / f"copy{c}" / f"{i:04d}.dcm"
            out.parent.mkdir(parents=True, exist_ok=True)
            ds.save_as(out)
    return size


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--copies", type=int, default=6)
    ap.add_argument("--pacs-workers", type=int, nargs="+", default=[1, 4])
    args = ap.parse_args(argv)
    src = require_shared("abdomen_ct_dicom_tcia")
    work = Path(tempfile.mkdtemp(prefix="umit-pacs-bench-"))
    try:
        size = write_copies(src, work / "copies", args.copies)
        with start_orthanc(work / "orthanc") as server:
            t = time.perf_counter()
            server.upload(work / "copies")
            upload_s = time.perf_counter() - t
            local = run(IngestConfig(src=work / "copies", out=work / "local"), progress=False)
            assert local.ingested == args.copies and local.failed == 0
            shutil.rmtree(work / "copies")
            shutil.rmtree(work / "local")
            client = server.client(max_connections=max(args.pacs_workers))
            series = [
                (dicom_json_value(s, "StudyInstanceUID"), dicom_json_value(s, "SeriesInstanceUID"))
                for s in client.search_series()
            ]
            print(
                f"# {date.today()} {platform.node()}: {os.cpu_count()} CPU(s) "
                f"({platform.processor() or platform.machine()}), load average "
                f"{os.getloadavg()[0]:.1f}; Orthanc upload of {len(series)} series "
                f"took {upload_s:.1f} s"
            )
            print("| what | pacs_workers | series | MB | s | series/s | MB/s |")
            print("|---|---|---|---|---|---|---|")

            def row(what: str, workers: object, n: int, nbytes: int, seconds: float) -> None:
                mb = nbytes / 1e6
                print(
                    f"| {what} | {workers} | {n} | {mb:.0f} | {seconds:.1f} | "
                    f"{n / seconds:.2f} | {mb / seconds:.0f} |"
                )

            row("umit ingest from a local folder (.nii.gz)", "-", args.copies,
                args.copies * size, local.seconds)  # fmt: skip
            for workers in args.pacs_workers:
                dest = work / f"retrieve{workers}"
                t = time.perf_counter()
                with ThreadPoolExecutor(workers) as pool:
                    got = list(
                        pool.map(
                            lambda s, d=dest: client.retrieve_series(s[0], s[1], d / s[1]), series
                        )
                    )
                row("retrieve (WADO-RS to disk)", workers, len(got),
                    sum(g.n_bytes for g in got), time.perf_counter() - t)  # fmt: skip
                shutil.rmtree(dest)
            runs = [(w, True) for w in args.pacs_workers] + [(max(args.pacs_workers), False)]
            for workers, compress in runs:
                out = work / f"raw{workers}{compress}"
                cfg = IngestConfig(
                    src=server.ingest_url, out=out, pacs_workers=workers, compress=compress
                )
                result = run(cfg, progress=False, auth=server.auth)
                assert result.ingested == len(series) and result.failed == 0
                what = "umit ingest (.nii.gz)" if compress else "umit ingest (.nii)"
                row(what, workers, result.retrieved, result.retrieved_bytes, result.seconds)
                shutil.rmtree(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
