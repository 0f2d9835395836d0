"""Cost as the collection grows (docs/scale.md): ingest, preprocess and one epoch of crop reads
for N phantom series, local executor vs Dask LocalCluster, SQLite vs PostgreSQL catalog; and crop
reads from S3 (moto's server, a separate process) vs local disk, with and without a local chunk
cache, interleaved in one run.

    python -m benchmarks.scale grow --n 100 1000 [--configs local-sqlite dask-sqlite ...]
    python -m benchmarks.scale crops --n 100 [--reps 3]
    python -m benchmarks.scale real [--shared ../shared/data]   # one real CT: the per-voxel cost

Each configuration runs in a fresh process (``one``), which samples the RSS of its whole process
tree (pool / Dask workers included) every 0.1 s for the peak. The PostgreSQL server is started
by the driver (tests/_postgres.py: initdb/pg_ctl in a temp folder), one fresh database per
configuration; its password reaches the child through $PGPASSWORD, never the command line.
Writes ``runs/scale/<mode>-<date>.json`` and prints a table. Not tests: no asserts on speed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "runs" / "scale"
CONFIGS = ("local-sqlite", "dask-sqlite", "local-postgres", "dask-postgres")
SHAPE = (32, 32, 24)  # small phantoms: the per-case overheads, not the voxels, are under test


class PeakRss:
    """Peak summed RSS (bytes) of this process and its descendants, sampled in a thread."""

    def __init__(self, interval: float = 0.1):
        import psutil

        self._proc, self.interval, self.peak, self.peak_self = psutil.Process(), interval, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            try:
                own = self._proc.memory_info().rss
                total = own
                for child in self._proc.children(recursive=True):
                    with contextlib.suppress(psutil.Error):
                        total += child.memory_info().rss
                self.peak, self.peak_self = max(self.peak, total), max(self.peak_self, own)
            except psutil.Error:
                pass
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def _du(path: Path) -> tuple[int, int]:
    files = [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files), len(files)


def phantoms(n: int) -> Path:
    from umit.data.phantoms import write_phantom_collection

    src = RUNS / f"src_{n}"
    write_phantom_collection(src, n=n, modality="ct", seed=17, shape=SHAPE, workers=2)
    return src


def one(args: argparse.Namespace) -> dict:
    """One configuration in this (fresh) process: ingest, preprocess, one epoch of crops."""
    from umit.data.dataset import StoreCropDataset
    from umit.ingest.catalog import Catalog
    from umit.ingest.run import IngestConfig
    from umit.ingest.run import run as ingest
    from umit.preprocess.run import PreprocessConfig
    from umit.preprocess.run import run as preprocess

    executor, backend = args.config.split("-")
    work = Path(args.work)
    raw, prep = work / "raw", work / "prep"
    catalog = args.catalog_url if backend == "postgres" else None
    out: dict = {"config": args.config, "n": args.n}
    with PeakRss() as mem:
        t = time.perf_counter()
        ing = ingest(
            IngestConfig(
                src=Path(args.src), out=raw, workers=2, executor=executor, catalog=catalog
            ),
            progress=False,
        )
        out["ingest_s"] = time.perf_counter() - t
        t = time.perf_counter()
        pre = preprocess(
            PreprocessConfig(raw=raw, out=prep, workers=2, executor=executor, catalog=catalog)
        )
        out["preprocess_s"] = time.perf_counter() - t
        ds = StoreCropDataset(prep, 16, foreground_prob=0.33, seed=0)
        t = time.perf_counter()
        for i in range(len(ds)):
            ds[i]
        out["epoch_s"] = time.perf_counter() - t
        out["crops"] = len(ds)
    with Catalog(catalog or raw / "catalog.db") as cat:
        out["catalog_bytes"] = cat.size_bytes()
    out["ingested"], out["ingest_failed"] = ing.ingested, ing.failed
    out["preprocessed"], out["preprocess_failed"] = pre.done, pre.failed
    out["store_bytes"], out["store_files"] = _du(prep / "store.zarr")
    out["raw_bytes"], _ = _du(raw / "images")
    out["peak_rss_tree_mb"] = mem.peak / 2**20
    out["peak_rss_main_mb"] = mem.peak_self / 2**20
    for stage in ("ingest", "preprocess", "epoch"):
        out[f"{stage}_ms_per_case"] = 1000 * out[f"{stage}_s"] / args.n
    return out


def grow(args: argparse.Namespace) -> list[dict]:
    sys.path.insert(0, str(ROOT / "tests"))
    from _postgres import start_postgres

    pg = None
    results = []
    tmp = Path(tempfile.mkdtemp(prefix="umit-scale-pg-"))
    try:
        if any(c.endswith("postgres") for c in args.configs):
            pg = start_postgres(tmp)
        for n in args.n:
            src = phantoms(n)
            for config in args.configs:
                work = RUNS / f"grow_{n}_{config}"
                shutil.rmtree(work, ignore_errors=True)
                env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
                url = ""
                if config.endswith("postgres"):
                    name = f"scale_{n}_{config.replace('-', '_')}"
                    pg.create_database(name)
                    url = pg.url(name, password=False)
                    env["PGPASSWORD"] = pg.password
                    empty = _pg_size(pg, name)
                cmd = [
                    sys.executable,
                    "-m",
                    "benchmarks.scale",
                    "one",
                    "--config",
                    config,
                    "--n",
                    str(n),
                    "--src",
                    str(src),
                    "--work",
                    str(work),
                    "--catalog-url",
                    url,
                ]
                t = time.perf_counter()
                proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
                if proc.returncode != 0:
                    print(proc.stdout[-2000:], proc.stderr[-4000:])
                    raise SystemExit(f"{config} n={n} failed")
                row = json.loads(proc.stdout.strip().splitlines()[-1])
                row["wall_s"] = time.perf_counter() - t
                if config.endswith("postgres"):
                    row["catalog_bytes_over_empty"] = row["catalog_bytes"] - empty
                results.append(row)
                print(_line(row), flush=True)
                shutil.rmtree(work / "raw" / "images", ignore_errors=True)  # keep disk use low
    finally:
        if pg is not None:
            pg.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    return results


def _pg_size(pg, name: str) -> int:
    import psycopg

    with psycopg.connect(pg.url(name)) as con:
        return con.execute("SELECT pg_database_size(current_database())").fetchone()[0]


def _line(r: dict) -> str:
    cat = r.get("catalog_bytes_over_empty", r["catalog_bytes"])
    return (
        f"n={r['n']:>5} {r['config']:<15} ingest {r['ingest_ms_per_case']:6.1f} ms/case  "
        f"preprocess {r['preprocess_ms_per_case']:6.1f} ms/case  epoch {r['epoch_ms_per_case']:5.1f} "
        f"ms/crop  peak RSS tree {r['peak_rss_tree_mb']:6.0f} MB (main {r['peak_rss_main_mb']:4.0f})"
        f"  catalog {cat / 1e3:7.0f} kB  store {r['store_bytes'] / 1e6:6.1f} MB "
        f"({r['store_files']} files)  ok {r['ingested']}/{r['preprocessed']}"
    )


def crops(args: argparse.Namespace) -> dict:
    """Crops/s from local disk vs S3 (no cache, cold cache, warm cache), interleaved."""
    from umit.data.dataset import StoreCropDataset
    from umit.ingest.run import IngestConfig
    from umit.ingest.run import run as ingest
    from umit.preprocess.run import PreprocessConfig
    from umit.preprocess.run import run as preprocess

    n = args.n[0]
    sys.path.insert(0, str(ROOT / "tests"))
    from _postgres import free_port

    port = free_port()
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    os.environ.update(
        AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}",
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_DEFAULT_REGION="us-east-1",
    )
    try:
        import s3fs

        for _ in range(100):
            try:
                s3fs.S3FileSystem(skip_instance_cache=True).mkdir("bench")
                break
            except Exception:
                time.sleep(0.1)
        src = phantoms(n)
        work = RUNS / f"crops_{n}"
        shutil.rmtree(work, ignore_errors=True)
        ingest(IngestConfig(src=src, out=work / "raw", workers=2), progress=False)
        t = time.perf_counter()
        preprocess(PreprocessConfig(raw=work / "raw", out=work / "prep", workers=2))
        local_s = time.perf_counter() - t
        t = time.perf_counter()
        preprocess(PreprocessConfig(raw=work / "raw", out="s3://bench/prep", workers=2))
        s3_s = time.perf_counter() - t
        arms: dict[str, list[float]] = {
            "local": [],
            "s3": [],
            "s3_cache_cold": [],
            "s3_cache_warm": [],
        }

        def epoch(ds) -> float:
            t = time.perf_counter()
            for i in range(len(ds)):
                ds[i]
            return len(ds) / (time.perf_counter() - t)

        for rep in range(args.reps):  # interleaved: drift on a shared machine hits all arms
            cache = work / f"cache_{rep}"
            arms["local"].append(epoch(StoreCropDataset(work / "prep", 16, seed=rep)))
            arms["s3"].append(epoch(StoreCropDataset("s3://bench/prep", 16, seed=rep)))
            arms["s3_cache_cold"].append(
                epoch(StoreCropDataset("s3://bench/prep", 16, seed=rep, chunk_cache=cache))
            )
            arms["s3_cache_warm"].append(
                epoch(StoreCropDataset("s3://bench/prep", 16, seed=rep, chunk_cache=cache))
            )
        out = {
            "n": n,
            "reps": args.reps,
            "crops_per_epoch": n,
            "preprocess_local_s": local_s,
            "preprocess_s3_s": s3_s,
            "crops_per_s": {
                k: {"median": statistics.median(v), "min": min(v), "max": max(v), "all": v}
                for k, v in arms.items()
            },
        }
        for k, v in out["crops_per_s"].items():
            print(f"{k:<15} {v['median']:8.1f} crops/s (min {v['min']:.1f}, max {v['max']:.1f})")
        print(f"preprocess {n} cases: local {local_s:.1f} s, to S3 {s3_s:.1f} s")
        return out
    finally:
        server.terminate()
        server.wait()


def real(args: argparse.Namespace) -> dict:
    """Ingest + preprocess one real abdomen CT (512² x 134, DICOM), 1 worker: the per-case cost
    of a clinical series that the phantom figures lack (the basis of the 100,000-series sums)."""
    from umit.ingest.run import IngestConfig
    from umit.ingest.run import run as ingest
    from umit.preprocess.run import PreprocessConfig
    from umit.preprocess.run import run as preprocess

    src = Path(args.shared) / "abdomen_ct_dicom_tcia"
    work = RUNS / "real_ct"
    shutil.rmtree(work, ignore_errors=True)
    out: dict = {"series": str(src.name)}
    with PeakRss() as mem:
        ing = ingest(IngestConfig(src=src, out=work / "raw"), progress=False)
        pre = preprocess(
            PreprocessConfig(
                raw=work / "raw", out=work / "prep", workers=1, target_spacing=(1.5, 1.5, 2.0)
            )
        )
    out.update(
        ingest_s=ing.seconds,
        preprocess_s=pre.seconds,
        dicom_bytes=_du(src)[0],
        raw_bytes=_du(work / "raw" / "images")[0],
        store_bytes=_du(work / "prep" / "store.zarr")[0],
        store_files=_du(work / "prep" / "store.zarr")[1],
        index_bytes=(work / "prep" / "index.json").stat().st_size,
        peak_rss_mb=mem.peak / 2**20,
    )
    print(json.dumps(out, indent=1))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="mode", required=True)
    g = sub.add_parser("grow")
    g.add_argument("--n", type=int, nargs="+", default=[100, 1000])
    g.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    c = sub.add_parser("crops")
    c.add_argument("--n", type=int, nargs=1, default=[100])
    c.add_argument("--reps", type=int, default=3)
    r = sub.add_parser("real")
    r.add_argument("--shared", default=str(ROOT.parent / "shared" / "data"))
    r.add_argument("--n", type=int, nargs=1, default=[1])
    o = sub.add_parser("one")
    o.add_argument("--config", choices=CONFIGS, required=True)
    o.add_argument("--n", type=int, required=True)
    o.add_argument("--src", required=True)
    o.add_argument("--work", required=True)
    o.add_argument("--catalog-url", default="")
    args = p.parse_args()
    if args.mode == "one":
        print(json.dumps(one(args)))
        return
    RUNS.mkdir(parents=True, exist_ok=True)
    result = {"grow": grow, "crops": crops, "real": real}[args.mode](args)
    meta = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "date": date.today().isoformat(),
        "omp_threads": os.environ.get("OMP_NUM_THREADS"),
        "shape": SHAPE,
    }
    name = f"{args.mode}-{'-'.join(map(str, args.n))}-{date.today().isoformat()}.json"
    (RUNS / name).write_text(json.dumps({"meta": meta, "result": result}, indent=2))
    print(f"-> {RUNS / name}")


if __name__ == "__main__":
    main()
