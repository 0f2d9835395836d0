"""``umit preprocess``: RAW (catalog + NIfTI) -> plan.json + Zarr store, parallel and resumable.

Per case: load all channels (one grid), reorient to RAS, crop to the foreground, normalize,
resample to the target spacing, cache foreground locations per class, write the case group
atomically. Cases run in a spawn-safe process pool; the parent keeps ``index.json`` and
``failures.json`` up to date. A rerun skips complete case groups, so a run killed at any point
finishes with the same store as an uninterrupted one (processing is deterministic).
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing as mp
import os
import time
import traceback
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field, field_serializer, field_validator
from tqdm.auto import tqdm

from umit.config import RESOLVED_CONFIG_NAME, UmitConfig, config_text
from umit.data.plan import PLAN_NAME, SCHEMES, Plan
from umit.data.store import (
    CATALOG_KEYS,
    FAILURES_NAME,
    FINGERPRINT_NAME,
    INDEX_NAME,
    STORE_NAME,
    PrepDir,
    check_case_id,
    index_entry,
    init_store,
    scan_complete,
    write_case,
)
from umit.errors import GeometryError, InputError
from umit.ingest.catalog import Catalog, SeriesRecord, redact_url
from umit.preprocess.apply import apply_plan
from umit.preprocess.fingerprint import channel_names, compute_fingerprint, stable_seed
from umit.preprocess.plan import apply_overrides, plan_from_fingerprint
from umit.preprocess.resample import (
    read_nifti,
    same_geometry,
)
from umit.utils.executor import check_executor, dask_client, dask_map, dask_map_unordered
from umit.utils.fileio import remove_stale_temps

log = logging.getLogger(__name__)

INDEX_WRITE_INTERVAL_S = 1.0  # the index is rewritten at most this often while cases finish


def _default_workers() -> int:
    return min(2, os.cpu_count() or 1)


class PreprocessConfig(UmitConfig):
    """Settings of ``umit preprocess``; the plan fields left as None come from the fingerprint."""

    raw: Path
    """RAW folder written by ``umit ingest`` (holds catalog.db, images/, labels/)."""
    out: Path | str
    """PREP folder to write (plan.json, store.zarr, index.json, failures.json), or an object-store
    URL ``s3://bucket/prefix`` (credentials and endpoint from the usual AWS settings)."""
    catalog: str | None = Field(default=None, repr=False)
    """The catalog ``umit ingest`` wrote: default ``RAW/catalog.db``; a SQLite path or a
    PostgreSQL URL (password redacted in config.yaml). It also holds the lock on PREP."""
    workers: int = Field(default_factory=_default_workers)
    """Worker processes (1: in this process). Default min(2, CPUs). With executor=dask and no
    scheduler: the processes of the LocalCluster."""
    executor: Literal["local", "dask"] = "local"
    """Where cases are processed: ``local`` (a process pool of ``workers``) or ``dask`` (one task
    per case on a Dask cluster, each writing its case group atomically)."""
    scheduler: str | None = None
    """executor=dask: address of a running Dask scheduler, e.g. ``tcp://10.0.0.5:8786`` (default:
    a LocalCluster of ``workers`` processes on this machine). RAW and PREP must be reachable by
    every worker under the same path or URL."""
    max_fingerprint_cases: int = 50
    """At most this many cases are read for intensity statistics (0: all)."""
    fingerprint_voxels_per_case: int = 100_000
    """Foreground voxels sampled per case and channel for the intensity statistics."""
    seed: int = 0
    """Seed of the fingerprint sampling (cases and voxels)."""
    plan_file: Path | None = None
    """Use this plan.json (e.g. the training set's) instead of fingerprinting RAW."""
    overwrite: bool = False
    """If PREP holds a store made with a different plan, delete it and start over."""
    target_spacing: tuple[float, float, float] | None = None
    """Override of the target spacing (mm, RAS axis order)."""
    ct_window: tuple[float, float] | None = None
    """HU window (low, high) for ``ct_window`` channels; default: fingerprint [p0.5, p99.5]."""
    scheme: str | dict[str, str] | None = None
    """Intensity scheme for every channel, or channel name -> scheme (ct_window, ct_zscore,
    mri_zscore, none)."""
    crop_foreground: bool | None = None
    """Override: crop cases to their foreground bounding box."""
    foreground_threshold: float | None = None
    """Override: raw intensity above which a voxel is body (default -500 HU CT, nonzero MR)."""
    crop_margin_mm: float | None = None
    """Override: margin around the foreground bounding box in mm."""
    image_dtype: Literal["float16", "float32"] | None = None
    """Override: stored image dtype."""
    chunk_size: int | None = None
    """Override: Zarr chunk edge."""
    compression: Literal["blosc-zstd", "blosc-lz4", "zstd", "none"] | None = None
    """Override: chunk compressor."""
    compression_level: int | None = None
    """Override: compression level."""
    interpolation_order: Literal[1, 3] | None = None
    """Override: image interpolation order (1 trilinear, 3 cubic)."""

    @field_serializer("catalog")
    def _redacted(self, value: str | None) -> str | None:
        return redact_url(value)

    @field_validator("out", mode="before")
    @classmethod
    def _url_or_path(cls, value: Any) -> Any:
        """An ``s3://`` PREP stays a string (a Path would fold ``//``); others are paths."""
        if isinstance(value, str) and "://" in value:
            return value
        return Path(value) if isinstance(value, str) else value

    @field_validator("scheduler")
    @classmethod
    def _scheduler(cls, value: str | None, info: Any) -> str | None:
        check_executor(info.data.get("executor", "local"), value)
        return value

    @field_validator("workers")
    @classmethod
    def _workers(cls, v: int) -> int:
        if v < 1:
            raise ValueError(f"workers must be >= 1, got {v}")
        return v

    @field_validator("scheme")
    @classmethod
    def _scheme(cls, v: str | dict[str, str] | None) -> str | dict[str, str] | None:
        for s in [v] if isinstance(v, str) else (v or {}).values():
            if s not in SCHEMES:
                raise ValueError(f"unknown scheme {s!r}; choose from {SCHEMES}")
        return v

    def plan_overrides(self) -> dict[str, Any]:
        keys = (
            "target_spacing",
            "ct_window",
            "scheme",
            "crop_foreground",
            "foreground_threshold",
            "crop_margin_mm",
            "image_dtype",
            "chunk_size",
            "compression",
            "compression_level",
            "interpolation_order",
        )
        return {k: getattr(self, k) for k in keys}


@dataclass
class PreprocessResult:
    """What a run did. ``seconds`` is the whole run; ``cases_per_s`` counts cases processed now."""

    out: Path | str
    total: int
    done: int
    skipped: int
    failed: int
    seconds: float
    process_seconds: float
    failures: dict[str, str] = field(default_factory=dict)

    @property
    def cases_per_s(self) -> float:
        return self.done / self.process_seconds if self.process_seconds > 0 else 0.0

    def summary(self) -> str:
        text = (
            f"{self.total} cases: {self.done} done, {self.skipped} skipped (already in the store), "
            f"{self.failed} failed in {self.seconds:.1f} s ({self.cases_per_s:.2f} cases/s while "
            f"processing) -> {self.out}"
        )
        if self.failed:
            text += f"\nfailures are listed in {PrepDir(self.out).name(FAILURES_NAME)}"
        return text


# -- one case ------------------------------------------------------------------------------------


def _check_label(label: np.ndarray, path: Path) -> np.ndarray:
    label = np.asarray(label)
    if not np.issubdtype(label.dtype, np.integer):
        rounded = np.rint(label)
        if not np.array_equal(rounded, label):
            raise InputError(path, "label has non-integer values")
        label = rounded
    lo, hi = (label.min(), label.max()) if label.size else (0, 0)
    if lo < 0 or hi > 255:
        raise InputError(path, f"label values must be in 0..255 (uint8), got {lo}..{hi}")
    return label.astype(np.uint8)


def _geometry_problem(shape_a, affine_a, shape_b, affine_b) -> str:
    if tuple(shape_a) != tuple(shape_b):
        return f"shape {tuple(shape_a)} != {tuple(shape_b)}"
    diff = float(np.abs(np.asarray(affine_a) - np.asarray(affine_b)).max())
    return f"affines differ by up to {diff:.4g} mm (tolerance 1e-3)"


def prepare_case(
    case_id: str, records: list[SeriesRecord], raw: str | Path, plan: Plan
) -> tuple[np.ndarray, np.ndarray | None, dict[int, np.ndarray], dict[str, Any]]:
    """Apply the plan to one case; returns ``(image, label, class locations, attributes)``.

    ``image`` is (C, X, Y, Z) in ``plan.image_dtype`` on the store grid, ``label`` (X, Y, Z)
    uint8 or None. Raises :class:`InputError` (naming the file) for unusable input.
    """
    raw = Path(raw)
    first_path = raw / records[0].image_path
    names = channel_names(records)
    if names != plan.channel_names:
        raise InputError(
            first_path,
            f"case {case_id} has channels {names}; the plan expects {plan.channel_names}",
        )
    # 1. read: all channels share one grid; the label shares it too
    arrays, orig_affine, orig_shape = [], None, None
    for rec in records:
        path = raw / rec.image_path
        arr, affine, shape = read_nifti(path, dtype=np.float32)
        if orig_affine is None:
            orig_affine, orig_shape = affine, shape
        elif not same_geometry(shape, affine, orig_shape, orig_affine):
            raise GeometryError(
                path,
                f"geometry differs from channel 0 {first_path}: {_geometry_problem(shape, affine, orig_shape, orig_affine)}",
            )
        arrays.append(arr)
    label_rel = next((r.label_path for r in records if r.label_path), None)
    label = None
    if label_rel:
        label_path = raw / label_rel
        lab, laff, lshape = read_nifti(label_path)
        if not same_geometry(lshape, laff, orig_shape, orig_affine):
            raise GeometryError(
                label_path,
                f"label geometry differs from its image {first_path}: {_geometry_problem(lshape, laff, orig_shape, orig_affine)}",
            )
        label = _check_label(lab, label_path)
    # 2-5. reorient, crop, normalize, resample: shared with ``umit predict``
    image, label, geometry = apply_plan(arrays, orig_affine, plan, label=label, source=first_path)
    del arrays
    # 6. foreground locations per class, for foreground-weighted crops
    locations: dict[int, np.ndarray] = {}
    if label is not None:
        counts = np.bincount(label.ravel(), minlength=256)
        rng = np.random.default_rng(stable_seed("locations", case_id))
        flat = label.ravel()
        for cls in np.flatnonzero(counts[1:]) + 1:
            idx = np.flatnonzero(flat == cls)
            if idx.size > plan.max_class_locations:
                idx = np.sort(rng.choice(idx, size=plan.max_class_locations, replace=False))
            locations[int(cls)] = np.stack(np.unravel_index(idx, label.shape), axis=1).astype(
                np.int32
            )
    first = records[0]
    catalog = {k: getattr(first, k, None) for k in CATALOG_KEYS}
    attrs = {
        "format": "umit-case",
        "format_version": 1,
        "case_id": case_id,
        **geometry,
        "has_label": label is not None,
        "label_classes": sorted(locations),
        "class_locations": {str(c): int(len(v)) for c, v in sorted(locations.items())},
        "source_images": [r.image_path for r in records],
        "source_label": label_rel,
        "catalog": catalog,
        "plan_hash": plan.processing_hash(),
        "processed_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    return image, label, locations, attrs


def process_case(
    case_id: str, records: list[SeriesRecord], raw: str | Path, plan: Plan, prep_dir: str | Path
) -> dict[str, Any]:
    """Prepare and write one case; returns its index row."""
    check_case_id(case_id)
    image, label, locations, attrs = prepare_case(case_id, records, raw, plan)
    write_case(prep_dir, case_id, plan, image, label, locations, attrs)
    return index_entry(attrs)


def _process_case_job(job: tuple) -> tuple[str, dict | None, str | None]:
    """Pool entry point: never raises, so one bad case cannot stop the run."""
    case_id, records, raw, plan, prep_dir = job
    try:
        return case_id, process_case(case_id, records, raw, plan, prep_dir), None
    except InputError as exc:
        return case_id, None, str(exc)
    except MemoryError:
        return case_id, None, f"out of memory while processing {records[0].image_path}"
    except Exception as exc:  # a bug or an unexpected file problem: record it, keep going
        log.debug("case %s failed:\n%s", case_id, traceback.format_exc())
        return case_id, None, f"{records[0].image_path}: unexpected {type(exc).__name__}: {exc}"


# -- the run -------------------------------------------------------------------------------------


@contextmanager
def _pool(workers: int) -> Iterator[ProcessPoolExecutor | None]:
    if workers <= 1:
        yield None
        return
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"))
    try:
        yield pool
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _labels_from_info(info: dict[str, Any]) -> dict[str, int] | None:
    """Label name -> value from the catalog info (accepts nnU-Net v2 and MSD conventions)."""
    labels = info.get("labels")
    if not isinstance(labels, dict) or not labels:
        return None
    try:
        if all(isinstance(v, int) for v in labels.values()):
            return {str(k): int(v) for k, v in labels.items()}
        return {str(v): int(k) for k, v in labels.items()}  # MSD: {"0": "background", ...}
    except (TypeError, ValueError):
        return None


def _catalog_hash(cases: dict[str, list[SeriesRecord]], cfg: PreprocessConfig) -> str:
    rows = [
        [
            cid,
            [
                [
                    r.channel,
                    r.channel_name,
                    r.modality,
                    r.image_path,
                    r.label_path,
                    list(r.shape),
                    list(r.spacing),
                ]
                for r in recs
            ],
        ]
        for cid, recs in sorted(cases.items())
    ]
    key = [
        rows,
        cfg.max_fingerprint_cases,
        cfg.fingerprint_voxels_per_case,
        cfg.seed,
        cfg.foreground_threshold,
    ]
    return hashlib.sha256(json.dumps(key, default=str).encode()).hexdigest()


def _fingerprint(cfg: PreprocessConfig, cases, map_fn) -> dict[str, Any]:
    """The fingerprint, reused from PREP/fingerprint.json when the catalog and settings match."""
    prep = PrepDir(cfg.out)
    key = _catalog_hash(cases, cfg)
    text = prep.read_text(FINGERPRINT_NAME)
    if text is not None:
        try:
            cached = json.loads(text)
            if cached.get("catalog_hash") == key:
                return cached
        except ValueError:
            pass
    fp = compute_fingerprint(
        cfg.raw,
        cases,
        max_cases=cfg.max_fingerprint_cases,
        voxels_per_case=cfg.fingerprint_voxels_per_case,
        seed=cfg.seed,
        threshold=cfg.foreground_threshold,
        map_fn=map_fn,
    )
    fp["catalog_hash"] = key
    prep.write_text(_json_text(fp), FINGERPRINT_NAME)
    return json.loads(json.dumps(fp))  # the same JSON view as a cached one


def resolve_plan(
    cfg: PreprocessConfig, cases: dict[str, list[SeriesRecord]], info: dict[str, Any], map_fn=map
) -> Plan:
    """The plan this run applies: ``plan_file`` (+ overrides) or fingerprint + overrides."""
    overrides = cfg.plan_overrides()
    if cfg.plan_file is not None:
        plan = apply_overrides(Plan.load(cfg.plan_file), **overrides)
        names = channel_names(cases[sorted(cases)[0]])
        if names != plan.channel_names:
            raise InputError(
                cfg.plan_file,
                f"plan channels {plan.channel_names} do not match the catalog's {names}",
            )
        return plan
    fp = _fingerprint(cfg, cases, map_fn)
    return plan_from_fingerprint(fp, labels=_labels_from_info(info), **overrides)


def _clear_outputs(prep: PrepDir) -> None:
    for name in (STORE_NAME, INDEX_NAME, FAILURES_NAME, PLAN_NAME):
        prep.remove(name)


def _json_text(obj: Any) -> str:
    """JSON as :func:`~umit.utils.fileio.atomic_write_json` writes it."""
    return json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class _Ledger:
    """index.json and failures.json, rewritten atomically (at most once per interval while busy)."""

    def __init__(self, out: PrepDir, plan: Plan, index: dict, failures: dict):
        self.out, self.plan_hash = out, plan.processing_hash()
        self.index, self.failures = index, failures
        self._last = 0.0

    def write(self, force: bool = True) -> None:
        now = time.monotonic()
        if not force and now - self._last < INDEX_WRITE_INTERVAL_S:
            return
        self._last = now
        self.out.write_text(
            _json_text(
                {
                    "format": "umit-prep-index",
                    "plan_hash": self.plan_hash,
                    "n_cases": len(self.index),
                    "updated_at": _now(),
                    "cases": self.index,
                }
            ),
            INDEX_NAME,
        )
        self.out.write_text(
            _json_text(
                {"n_failed": len(self.failures), "updated_at": _now(), "cases": self.failures}
            ),
            FAILURES_NAME,
        )


def _old_failures(out: PrepDir) -> dict[str, Any]:
    try:
        return dict(json.loads(out.read_text(FAILURES_NAME) or "{}").get("cases", {}))
    except (OSError, ValueError, AttributeError):
        return {}


def run(cfg: PreprocessConfig) -> PreprocessResult:
    """Preprocess every case of ``cfg.raw`` into ``cfg.out`` (see the module docstring).

    Raises:
        InputError: another ``umit preprocess`` is writing the same PREP (the catalog holds
            the lock; one left by a killed process of this host is taken over).
    """
    t0 = time.perf_counter()
    raw, out = Path(cfg.raw), cfg.out
    with Catalog.open_raw(raw, cfg.catalog) as catalog:
        cases, info = catalog.cases(), catalog.info()
        if not cases:
            raise InputError(raw, "the catalog lists no series; nothing to preprocess")
        with catalog.lock(lock_name(out)):
            return _run_locked(cfg, cases, info, t0)


def lock_name(out: str | Path) -> str:
    """The name under which a run holds PREP in the catalog's locks table."""
    prep = PrepDir(out)
    return str(prep.location) if prep.remote else str(prep.location.resolve())


def _run_locked(
    cfg: PreprocessConfig, cases: dict[str, list[SeriesRecord]], info: dict[str, Any], t0: float
) -> PreprocessResult:
    raw, out = Path(cfg.raw), PrepDir(cfg.out)
    out.mkdir()
    if not out.remote:
        remove_stale_temps(out.location, recursive=False)
    dask = cfg.executor == "dask"
    with _pool(1 if dask else cfg.workers) as pool, _dask(cfg) as client:
        map_fn = map if pool is None else pool.map
        if client is not None:  # the fingerprint's reads too run where the data is
            map_fn = partial(_dask_map, client)
        plan = resolve_plan(cfg, cases, info, map_fn=map_fn)
        plan_path = out.name(PLAN_NAME)
        old_text = out.read_text(PLAN_NAME)
        if old_text is not None:
            old = Plan.from_json(old_text, plan_path)
            diffs = old.differences(plan)
            if diffs and not cfg.overwrite:
                raise InputError(
                    plan_path,
                    f"the store was made with a different plan (differs in {', '.join(diffs)}); rerun with "
                    f"overwrite=true to delete the store and start over, or plan_file={plan_path} to keep it",
                )
            if diffs:
                log.warning("plan changed (%s): deleting the old store", ", ".join(diffs))
                _clear_outputs(out)
                out.write_text(_json_text(plan.model_dump(mode="json")), PLAN_NAME)
            else:
                plan = old  # keep the provenance of the plan the store was made with
        else:
            out.write_text(_json_text(plan.model_dump(mode="json")), PLAN_NAME)
        out.write_text(config_text(cfg), RESOLVED_CONFIG_NAME)
        init_store(out)

        ids = sorted(cases)
        # cases already written with this plan are done (a group from another plan is redone)
        index = scan_complete(out, plan_hash=plan.processing_hash())
        todo = [cid for cid in ids if cid not in index]
        todo_set = set(todo)
        failures = {cid: f for cid, f in _old_failures(out).items() if cid in todo_set}
        ledger = _Ledger(out, plan, index, failures)
        ledger.write()
        t1 = time.perf_counter()
        done = 0
        jobs = [(cid, cases[cid], str(raw), plan, str(out.location)) for cid in todo]
        with tqdm(total=len(jobs), desc="preprocess", unit="case", disable=None) as bar:
            for cid, entry, reason in _results(jobs, pool, client):
                if entry is not None:
                    index[cid] = entry
                    failures.pop(cid, None)
                    done += 1
                else:
                    failures[cid] = {"reason": reason}
                    log.warning("case %s failed: %s", cid, reason)
                bar.update(1)
                ledger.write(force=False)
        ledger.write()
    t2 = time.perf_counter()
    return PreprocessResult(
        out=out.location,
        total=len(ids),
        done=done,
        skipped=len(ids) - len(todo),
        failed=len(failures),
        seconds=t2 - t0,
        process_seconds=t2 - t1,
        failures={cid: f["reason"] for cid, f in sorted(failures.items())},
    )


@contextmanager
def _dask(cfg: PreprocessConfig) -> Iterator[Any]:
    if cfg.executor != "dask":
        yield None
        return
    with dask_client(cfg.scheduler, cfg.workers) as client:
        yield client


def _dask_map(client: Any, fn: Any, items: Any) -> list[Any]:
    return dask_map(client, fn, items)


def _results(
    jobs: list[tuple], pool: ProcessPoolExecutor | None, client: Any = None
) -> Iterator[tuple[str, dict | None, str | None]]:
    if client is not None:
        for job, res, exc in dask_map_unordered(
            client, _process_case_job, jobs, name=lambda j: f"preprocess-{j[0]}"
        ):
            if exc is None:
                yield res
            else:  # e.g. KilledWorker: the case took down workers repeatedly (out of memory?)
                yield job[0], None, f"worker failed: {type(exc).__name__}: {exc}"
        return
    if pool is None:
        yield from map(_process_case_job, jobs)
        return
    futures = {pool.submit(_process_case_job, job): job[0] for job in jobs}
    for fut in as_completed(futures):
        try:
            yield fut.result()
        except Exception as exc:  # e.g. BrokenProcessPool: a worker was killed (out of memory?)
            yield futures[fut], None, f"worker process failed: {type(exc).__name__}: {exc}"
