"""``umit ingest``: sources -> canonical NIfTI + SQLite catalog, resumable, losing nothing.

Each source item (a DICOM series, a file, a collection case, a MedMNIST volume) is loaded,
validated, written as NIfTI (atomically: temp file then rename) and then committed to the
catalog in its own transaction. A killed run leaves at most stale ``.tmp-*`` files (removed on
the next start) and files whose rows were not committed (rewritten under the same deterministic
names), so a rerun finishes the job without duplicates. A bad item becomes a failure row with a
reason that names the file and the problem, and the run goes on.
"""

from __future__ import annotations

import logging
import os
import re
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field, field_serializer, field_validator
from tqdm import tqdm

from umit import __version__
from umit.config import save_config
from umit.data.io import write_image
from umit.data.meta import ImageMeta
from umit.deid.allowlist import COLUMN_ATTRIBUTES, safe_attributes
from umit.deid.secret import accession_pseudonym, load_or_create_secret, pseudonym, replace_uid
from umit.errors import InputError
from umit.ingest.bvecs import write_fsl_gradients
from umit.ingest.catalog import (
    Catalog,
    SeriesRecord,
    catalog_location,
    is_postgres_url,
    redact_url,
)
from umit.ingest.dicom import age_band
from umit.ingest.dicomweb import DicomWebSettings, is_remote_source
from umit.ingest.formats import (
    IngestItem,
    LoadedCase,
    SetAsideItem,
    collection_items,
    folder_items,
    medmnist_items,
)
from umit.utils.executor import check_executor, dask_client, dask_map_unordered
from umit.utils.fileio import remove_stale_temps

log = logging.getLogger(__name__)

IMAGES_DIR = "images"
LABELS_DIR = "labels"
SHARED_TEMP_AGE_S = 3600.0
"""With a PostgreSQL catalog, a ``.tmp-*`` file in RAW counts as left by a killed process only
when older than this (younger ones may be another worker's write in progress)."""
SEX_CODES = {"f": "F", "female": "F", "w": "F", "m": "M", "male": "M", "o": "O", "other": "O"}


class IngestConfig(DicomWebSettings):
    """Settings of ``umit ingest``."""

    src: Path | str
    """Source: a folder (DICOM / NIfTI / NRRD / MHA files, dataset.json collections), a MedMNIST
    .npz, or a DICOMweb service ``dicomweb+http(s)://HOST:PORT/ROOT`` (a PACS: docs/pacs.md)."""
    out: Path
    """RAW output folder: catalog.db, images/, labels/ (created; an existing one is resumed)."""
    catalog: str | None = Field(default=None, repr=False)
    """Where the catalog is: a SQLite file (default ``RAW/catalog.db``) or a PostgreSQL URL
    ``postgresql://USER@HOST:PORT/DB`` that many ingest processes, on many machines, write at
    once (password from ``~/.pgpass`` or ``$PGPASSWORD``; one in the URL is redacted in
    config.yaml and in messages)."""
    workers: int = Field(default=1, ge=1)
    """Processes that load and write items in parallel (the catalog is written by the parent);
    with executor=dask and no scheduler, the processes of the LocalCluster."""
    executor: Literal["local", "dask"] = "local"
    """Where items are loaded and written: ``local`` (a process pool of ``workers``) or ``dask``
    (one task per item on a Dask cluster; this process commits the rows)."""
    scheduler: str | None = None
    """executor=dask: address of a running Dask scheduler, e.g. ``tcp://10.0.0.5:8786`` (default:
    a LocalCluster of ``workers`` processes on this machine). RAW must be reachable by every
    worker under the same path (a shared file system)."""
    site: str | None = None
    """Site label given to every item of this source that has none (a pseudonym, not a hospital name)."""
    retry_failed: bool = False
    """Retry items recorded as failed by an earlier run (they are skipped by default)."""
    label_tolerance_mm: float = Field(default=1e-3, gt=0)
    """Largest allowed difference between image and label affines, in mm."""
    compress: bool = True
    """Write .nii.gz (True) or .nii (False)."""
    limit: int | None = Field(default=None, ge=1)
    """Ingest at most this many new items (for quick trials; of a DICOMweb source: series)."""
    burned_in: Literal["reject", "mask"] = "reject"
    """DICOM series with images that may carry burned-in text (BurnedInAnnotation=YES, secondary
    captures, ultrasound...): reject (a failure row naming the file) or mask the top rows."""
    burned_in_mask_band: float = Field(default=0.1, ge=0.0, le=1.0)
    """Fraction of each slice's rows, from the top, blanked when burned_in=mask."""
    resample_nonuniform: bool = False
    """DICOM stacks whose slice spacing changes (e.g. 4.2 mm then 7.4 mm): resample them onto
    uniform slices at their smallest spacing (linear, recorded in the catalog's ``transform``)
    instead of recording a failure."""
    split_4d: bool = True
    """A 4D DICOM series (fMRI, DWI, perfusion) becomes one 3D file per time point (True) or one
    4D file with time last and, for diffusion, FSL .bval/.bvec files beside it (False)."""
    pacs_study: list[str] = Field(default_factory=list)
    """DICOMweb source: StudyInstanceUIDs to ingest (default: every study pacs_query matches)."""
    pacs_query: dict[str, str] = Field(default_factory=dict)
    """DICOMweb source: QIDO-RS study search, DICOM keywords to values, e.g.
    ``{ModalitiesInStudy: CT, StudyDate: 20240101-20240131}`` (empty: every study)."""
    pacs_workers: int = Field(default=4, ge=1, le=64)
    """DICOMweb source: series retrieved at once (threads; also the most series waiting on disk).
    Decoding and writing run in the main process, one series at a time (``workers`` is unused)."""
    pacs_ca_file: Path | None = None
    """DICOMweb source over https: CA bundle to trust (default: the system's)."""

    @field_serializer("catalog")
    def _redacted(self, value: str | None) -> str | None:
        return redact_url(value)

    @field_validator("scheduler")
    @classmethod
    def _scheduler(cls, value: str | None, info: Any) -> str | None:
        check_executor(info.data.get("executor", "local"), value)
        return value

    @field_validator("src", mode="before")
    @classmethod
    def _url_or_path(cls, value: Any) -> Any:
        """A ``scheme://`` source stays a string (a Path would fold ``//``); others are paths."""
        if isinstance(value, str) and "://" in value:
            return value
        return Path(value) if isinstance(value, str) else value


@dataclass
class IngestResult:
    """What one ``umit ingest`` run did."""

    out: Path
    catalog: str | Path | None = None
    """Where the catalog is (a SQLite path or a PostgreSQL URL)."""
    found: int = 0
    ingested: int = 0
    skipped: int = 0
    failed: int = 0
    seconds: float = 0.0
    failures: list[dict[str, str]] = field(default_factory=list)
    set_aside: list[dict[str, Any]] = field(default_factory=list)
    """Rows of the catalog's ``set_aside`` table: localizers left out on purpose, not failures."""
    retrieved: int = 0
    """DICOMweb source: series retrieved by this run."""
    retrieved_bytes: int = 0
    """DICOMweb source: bytes of DICOM retrieved by this run."""

    @property
    def items_per_second(self) -> float:
        return self.ingested / self.seconds if self.seconds > 0 else 0.0


def discover(
    src: Path,
) -> tuple[list[IngestItem], list[tuple[str, str, str]], list[SetAsideItem]]:
    """Work items for ``src``, failures found while looking (unreadable files) and what was set
    aside on purpose (DICOM localizers)."""
    if not src.exists():
        raise InputError(src, "source does not exist")
    if src.is_file():
        if src.name.endswith(".npz"):
            return medmnist_items(src), [], []
        if src.name == "dataset.json":
            return collection_items(src), [], []
        raise InputError(src, "a single source file must be a MedMNIST .npz or a dataset.json")
    if (src / "dataset.json").is_file():
        return collection_items(src / "dataset.json"), [], []
    return folder_items(src)


def run(
    cfg: IngestConfig, progress: bool = True, *, auth: tuple[str, str] | None = None
) -> IngestResult:
    """Ingest ``cfg.src`` into ``cfg.out``; returns counts (failures are rows, not exceptions).

    Args:
        auth: DICOMweb source only: ``(user, password)``; default: ``cfg.pacs_auth_file``, else
            ``$UMIT_PACS_AUTH``, else none.
    """
    if is_remote_source(cfg.src):
        from umit.ingest.pacs import run_dicomweb  # imports this module: import it on use

        if cfg.executor != "local":
            raise InputError(
                None,
                "executor=dask is for folder and file sources; a DICOMweb source is retrieved "
                "by pacs_workers threads and ingested here (run one ingest per study list instead)",
            )

        return run_dicomweb(cfg, progress=progress, auth=auth)
    if isinstance(cfg.src, str):  # a URL of another kind (not echoed: it may hold a password)
        raise InputError(
            None,
            f"unsupported source URL scheme {cfg.src.split('://')[0]!r}: a PACS is read over "
            "DICOMweb as dicomweb+http(s)://HOST:PORT/ROOT",
        )
    if cfg.pacs_study or cfg.pacs_query:
        raise InputError(cfg.src, "pacs_study / pacs_query need a dicomweb+http(s):// source")
    start = time.perf_counter()
    out = prepare_out(cfg)
    secret = load_or_create_secret(out)
    result = IngestResult(out=out, catalog=catalog_location(cfg.catalog, out))
    with Catalog(result.catalog) as catalog:
        catalog.set_info("umit_version", __version__)
        found = discover(cfg.src)
        ingest_found(found, cfg, secret, catalog, result, progress, limit=cfg.limit)
        result.failures = catalog.failures()
        result.failed = len(result.failures)
        result.set_aside = catalog.set_aside()
    result.seconds = time.perf_counter() - start
    return result


def prepare_out(cfg: IngestConfig) -> Path:
    """Create the RAW folder (or take up an existing one): its sub-folders, stale temp files of
    a killed run removed, the resolved config written."""
    out = cfg.out
    out.mkdir(parents=True, exist_ok=True)
    # With a shared (PostgreSQL) catalog other processes may be writing RAW right now.
    min_age_s = SHARED_TEMP_AGE_S if is_postgres_url(cfg.catalog) else 0.0
    for sub in (IMAGES_DIR, LABELS_DIR):
        (out / sub).mkdir(exist_ok=True)
        removed = remove_stale_temps(out / sub, min_age_s=min_age_s)
        if removed:
            log.info("removed %d half-written file(s) left by an interrupted run", removed)
    save_config(cfg, out)
    return out


Found = tuple[list[IngestItem], list[tuple[str, str, str]], list[SetAsideItem]]
"""What :func:`discover` (or :func:`~umit.ingest.formats.folder_items`) found: work items,
``(key, source, reason)`` of unreadable files, and the localizers set aside."""


def ingest_found(
    found: Found,
    cfg: IngestConfig,
    secret: bytes,
    catalog: Catalog,
    result: IngestResult,
    progress: bool,
    *,
    limit: int | None = None,
    workers: int | None = None,
) -> None:
    """The ingest pipeline for what one source holds: record what was set aside and what could
    not be read, skip what the catalog has, then load, check, write and commit the rest.

    A local folder goes through here once; a DICOMweb source once per retrieved series folder,
    so that both are ingested alike (same keys, case ids, checks and pseudonyms).

    Args:
        limit: Process at most this many new items.
        workers: Loader processes (default ``cfg.workers``).
    """
    items, discovery_failures, set_aside = found
    _record_set_aside(set_aside, catalog, secret)
    result.found += len(items) + len(discovery_failures)
    label_names = next((it.payload["labels"] for it in items if it.payload.get("labels")), None)
    if label_names:  # the collection's label dictionary, for the plan and reports
        catalog.set_info("labels", label_names)
    done = catalog.done_keys()
    if cfg.retry_failed:
        done -= {f["source_key"] for f in catalog.failures()}
    for key, source, reason in discovery_failures:
        if key not in done:
            reason = failure_line(source, reason)
            catalog.add_failure(key, source, reason)
            log.warning("failed: %s", reason)
    todo = [it for it in items if it.key not in done]
    result.skipped += len(items) - len(todo)
    if limit is not None:
        todo = todo[:limit]
    todo = _assign_case_ids(todo, catalog, secret)
    _process(
        todo, cfg, secret, catalog, result, progress, cfg.workers if workers is None else workers
    )


def _record_set_aside(found: list[SetAsideItem], catalog: Catalog, secret: bytes) -> None:
    """Report localizers: a ``set_aside`` row each (not a failure) and a log line."""
    for entry in found:
        s = entry.set_aside
        uid = None if s.series_uid.startswith("no-series-uid:") else s.series_uid
        row = dict(
            source=entry.source,
            reason=s.reason,
            n_images=len(s.files),
            modality=s.modality,
            series_number=s.series_number,
            deid_series_uid=replace_uid(secret, uid) if uid else None,
        )
        catalog.add_set_aside(entry.key, **row)
        log.info("set aside: %s", set_aside_line(row))


def set_aside_line(row: dict[str, Any]) -> str:
    """One console/log line for a ``set_aside`` row: where, which series, why.

    The series is named as the catalog names it: modality, SeriesNumber and the UID ``umit deid``
    would give it (SeriesDescription is removed by the Basic Profile, so it is not shown).
    """
    number = f" series number {row['series_number']}" if row["series_number"] is not None else ""
    uid = f" (deid UID {row['deid_series_uid']})" if row["deid_series_uid"] else ""
    return f"{row['source']}: {row['modality'] or 'unknown'}{number}{uid}: {row['reason']}"


def failure_line(source: str, reason: str) -> str:
    """``reason`` as a line that names what failed: prefixed with ``source`` (the path relative
    to SRC) unless it names that path already, as readers' errors do.

    A DICOM series' source ends in its slice count (``"head [26 slices]"``); its path is the part
    before that.
    """
    path = re.sub(r" \[[^\]]*\]$", "", source)
    named = path not in ("", ".") and (reason.startswith(path) or f"{os.sep}{path}" in reason)
    return reason if named else f"{source}: {reason}"


def _assign_case_ids(todo: list[IngestItem], catalog: Catalog, secret: bytes) -> list[IngestItem]:
    """Fix each item's case id up front; an id already owned by another source is a failure.

    Checked before anything is written, so a clash can never overwrite another case's files.
    """
    claims = []
    for item in todo:
        item.case_id = item.case_hint or f"{item.fmt}_{pseudonym(secret, item.key)}"
        claims.append((item.case_id, item.key, item.source))
    owner = catalog.claim_cases(claims)  # atomic: concurrent ingest processes cannot both win
    keep = []
    for item in todo:
        key, source = owner[item.case_id]
        if key != item.key:
            catalog.add_failure(
                item.key,
                item.source,
                f"{item.source}: case id {item.case_id!r} was already ingested from another source "
                f"({source}); case ids must be unique within a RAW folder",
            )
            continue
        keep.append(item)
    return keep


def _process(
    todo: list[IngestItem],
    cfg: IngestConfig,
    secret: bytes,
    catalog: Catalog,
    result: IngestResult,
    progress: bool,
    workers: int,
) -> None:
    bar = tqdm(total=len(todo), desc="ingest", unit="item", disable=not progress)

    def commit(item: IngestItem, outcome: list[SeriesRecord] | str) -> None:
        if isinstance(outcome, str):
            reason = failure_line(item.source, outcome)
            catalog.add_failure(item.key, item.source, reason)
            log.warning("failed: %s", reason)
        else:
            try:
                catalog.add_series(outcome)
                result.ingested += 1
                transform = next((r.transform for r in outcome if r.transform), None)
                if transform:  # never silently: also in the catalog's transform column
                    log.info("%s: %s", item.source, transform)
            except InputError as exc:  # defensive: _assign_case_ids should prevent clashes
                catalog.add_failure(item.key, item.source, str(exc))
        bar.update(1)

    if cfg.executor == "dask" and todo:
        with dask_client(cfg.scheduler, workers) as client:
            fn = partial(ingest_item, cfg=cfg, secret=secret)
            for item, outcome, exc in dask_map_unordered(
                client, fn, todo, name=lambda it: f"ingest-{it.key}"
            ):
                if exc is not None:
                    outcome = f"{item.source}: worker failed: {type(exc).__name__}: {exc}"
                commit(item, outcome)
    elif workers == 1 or len(todo) < 2:
        for item in todo:
            commit(item, ingest_item(item, cfg, secret))
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            pending: dict[Any, IngestItem] = {}
            queue = iter(todo)
            for item in queue:  # keep a bounded number of items in flight
                pending[pool.submit(ingest_item, item, cfg, secret)] = item
                if len(pending) >= 2 * workers:
                    break
            while pending:
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                for fut in finished:
                    commit(pending.pop(fut), fut.result())
                    nxt = next(queue, None)
                    if nxt is not None:
                        pending[pool.submit(ingest_item, nxt, cfg, secret)] = nxt
    bar.close()


def ingest_item(item: IngestItem, cfg: IngestConfig, secret: bytes) -> list[SeriesRecord] | str:
    """Load, check and write one item; returns its catalog rows or the failure reason."""
    try:
        burned_in = _burned_in_gate(item, cfg)
        if item.fmt == "dicom":
            item.payload["resample_nonuniform"] = cfg.resample_nonuniform
        case = item.load(split_4d=cfg.split_4d)
        if burned_in:
            case = _mask_top_rows(case, cfg.burned_in_mask_band)
        return _write_case(item, case, cfg, secret)
    except InputError as exc:
        return str(exc)
    except MemoryError:
        return f"{item.source}: out of memory while loading"
    except Exception as exc:  # a reader's own exception on a corrupt file: record it, go on
        log.debug("unexpected error on %s", item.source, exc_info=True)
        return f"{item.source}: {type(exc).__name__}: {exc}"


def _burned_in_gate(item: IngestItem, cfg: IngestConfig) -> bool:
    """Apply the burned-in policy to a DICOM item: raise (reject) or return True (mask)."""
    series = item.payload.get("series") if item.fmt == "dicom" else None
    if series is None or not series.burned_in:
        return False
    path, reason = series.burned_in[0]
    if cfg.burned_in == "reject":
        more = (
            f" (and {len(series.burned_in) - 1} more file(s))" if len(series.burned_in) > 1 else ""
        )
        raise InputError(
            path,
            f"may carry burned-in text ({reason}){more}; rejected by burned_in=reject "
            "(set burned_in=mask to blank the top rows instead)",
        )
    log.info("%s: burned-in risk (%s); masking the top rows", path, reason)
    return True


def _mask_top_rows(case: LoadedCase, band: float) -> LoadedCase:
    """Blank the top ``band`` of rows (array axis j) of every channel with its minimum."""
    channels = []
    for name, array, meta in case.channels:
        array = np.array(array, copy=True)
        n = max(1, int(np.ceil(array.shape[1] * band))) if band > 0 else 0
        array[:, :n] = array.min()
        channels.append((name, array, meta))
    case.channels = channels
    return case


def validate_volume(array: np.ndarray, source: str, what: str = "image") -> None:
    """Reject 2D data and non-finite voxels with a clear reason."""
    if array.ndim != 3:
        raise InputError(source, f"{what} has shape {array.shape}; expected a 3D volume")
    if min(array.shape) < 2:
        raise InputError(
            source, f"{what} has shape {array.shape}: a 2D image, expected a 3D volume"
        )
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        n_bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
        raise InputError(source, f"{what} contains {n_bad} NaN/Inf voxel(s)")


def validate_label(
    label: np.ndarray, lmeta: ImageMeta, image: np.ndarray, imeta: ImageMeta, tol: float
) -> np.ndarray:
    """Label must share the image grid and hold non-negative integers; returns it as uint8/16."""
    if label.ndim == 4 and label.shape[3] == 1:
        label = label[..., 0]
    if label.shape != image.shape:
        raise InputError(
            lmeta.source,
            f"label shape {label.shape} does not match image shape {image.shape} ({imeta.source})",
        )
    diff = float(np.abs(lmeta.affine - imeta.affine).max())
    if diff > tol:
        raise InputError(
            lmeta.source,
            f"label geometry does not match its image {imeta.source}: affines differ by {diff:.4g} mm",
        )
    if np.issubdtype(label.dtype, np.floating):
        if not np.isfinite(label).all():
            raise InputError(lmeta.source, "label contains NaN/Inf")
        if not np.array_equal(label, np.round(label)):
            raise InputError(
                lmeta.source, "label has non-integer values (is it an image, not a label map?)"
            )
    if label.min() < 0:
        raise InputError(lmeta.source, f"label has negative values (min {label.min()})")
    return label.astype(np.uint8 if label.max() < 256 else np.uint16)


def _write_case(
    item: IngestItem, case: LoadedCase, cfg: IngestConfig, secret: bytes
) -> list[SeriesRecord]:
    if not case.channels:
        raise InputError(item.source, "no image data")
    ref_array, ref_meta = case.channels[0][1], case.channels[0][2]
    for name, array, meta in case.channels:
        for volume in np.moveaxis(array, -1, 0) if case.time_last else [array]:
            validate_volume(volume, meta.source or item.source, f"channel {name}")
        if (
            array.shape != ref_array.shape
            or np.abs(meta.affine - ref_meta.affine).max() > cfg.label_tolerance_mm
        ):
            raise InputError(
                meta.source,
                f"channel {name} is not on the same grid as channel {case.channels[0][0]}",
            )
    case_id = item.case_id or item.case_hint or f"{item.fmt}_{pseudonym(secret, item.key)}"
    subject = pseudonym(secret, case.subject_key) if case.subject_key else None
    ext = ".nii.gz" if cfg.compress else ".nii"
    label_rel = None
    if case.label is not None:
        label = validate_label(
            case.label[0], case.label[1], ref_array, ref_meta, cfg.label_tolerance_mm
        )
        label_rel = f"{LABELS_DIR}/{case_id}{ext}"
        write_image(cfg.out / label_rel, label, ref_meta.with_affine(ref_meta.affine))
    attrs = _normalise_attributes(case.attributes, cfg)
    records = []
    for ch, (name, array, meta) in enumerate(case.channels):
        rel = f"{IMAGES_DIR}/{case_id}_{ch:04d}{ext}"
        clean_meta = ImageMeta(affine=meta.affine, source="", modality=meta.modality)
        write_image(cfg.out / rel, array, clean_meta)
        extra = {k: v for k, v in attrs.items() if k not in _COLUMN_ATTRS}
        if item.fmt == "dicom":  # UIDs as `umit deid` writes them with this secret
            extra.update(_deid_uids(item.payload["series"], secret))
        if array.ndim == 4 and attrs.get("b_values"):  # a 4D diffusion series: FSL files
            extra.update(_gradient_files(cfg.out, rel, attrs, meta.affine))
        records.append(
            SeriesRecord(
                series_id=f"{case_id}_{ch:04d}",
                source_key=item.key,
                case_id=case_id,
                subject_id=subject,
                channel=ch,
                channel_name=name,
                image_path=rel,
                label_path=label_rel,
                source=item.source,
                source_format=item.fmt,
                modality=attrs.get("modality") or meta.modality,
                body_part=attrs.get("body_part"),
                shape=tuple(int(s) for s in array.shape),
                spacing=tuple(round(s, 6) for s in meta.spacing),
                orientation=meta.orientation,
                dtype=str(array.dtype),
                manufacturer=attrs.get("manufacturer"),
                model=attrs.get("model"),
                site=attrs.get("site"),
                sex=attrs.get("sex"),
                age_band=attrs.get("age_band"),
                contrast=attrs.get("contrast"),
                split=case.split,
                target=case.target,
                extra=extra,
                transform=meta.extra.get("transform"),
            )
        )
    return records


def _gradient_files(
    out: Path, rel: str, attrs: dict[str, Any], affine: np.ndarray
) -> dict[str, str]:
    """Write ``.bval``/``.bvec`` beside the image ``rel``; their paths (relative to ``out``)."""
    written = write_fsl_gradients(
        out / rel, attrs["b_values"], attrs.get("gradient_directions"), affine
    )
    return {f"{kind}_path": str(path.relative_to(out)) for kind, path in written.items()}


def _deid_uids(series: Any, secret: bytes) -> dict[str, str]:
    """UIDs as ``umit deid`` writes them, and the keyed pseudonym of the AccessionNumber (what
    ``umit labels from-reports key=accession`` joins reports on)."""
    out = {
        f"deid_{name}_uid": replace_uid(secret, uid)
        for name, uid in (("study", series.study_uid), ("series", series.series_uid))
        if uid and not uid.startswith("no-series-uid:")
    }
    accession = getattr(series, "accession_key", None)
    if accession:
        out["accession_pseudonym"] = accession_pseudonym(secret, accession)
    return out


_COLUMN_ATTRS = COLUMN_ATTRIBUTES
"""Allowlisted attributes that are catalog columns (:mod:`umit.deid.allowlist`); others go to extra."""


def _normalise_attributes(raw: dict[str, Any], cfg: IngestConfig) -> dict[str, Any]:
    """Harmonise attribute spellings (sex codes, age -> band) and drop anything not allowlisted."""

    attrs = dict(raw)
    if "age" in attrs and "age_years" not in attrs:
        try:
            attrs["age_years"] = float(attrs.pop("age"))
        except (TypeError, ValueError):
            attrs.pop("age")
    if attrs.get("age_band") in (None, "") and attrs.get("age_years") is not None:
        attrs["age_band"] = age_band(float(attrs["age_years"]))
    if attrs.get("sex"):
        attrs["sex"] = SEX_CODES.get(str(attrs["sex"]).strip().lower())
    if attrs.get("body_part"):
        attrs["body_part"] = str(attrs["body_part"]).upper()
    if not attrs.get("site") and cfg.site:
        attrs["site"] = cfg.site
    attrs = safe_attributes(attrs)
    attrs.pop("age_years", None)  # exact age is quasi-identifying: only the band is kept
    return attrs
