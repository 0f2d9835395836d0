"""``umit ingest dicomweb+http://HOST:PORT/ROOT``: series from a PACS over DICOMweb into RAW.

The run, in order:

1. Credentials (``auth``, else ``pacs_auth_file``, else ``$UMIT_PACS_AUTH``) are checked with
   one request, and the series are listed (QIDO-RS: the studies of ``pacs_study`` or matching
   ``pacs_query``, then their series). A wrong password, an unreachable server or a bad query
   fails here, before anything is written.
2. Up to ``pacs_workers`` series are retrieved at once (WADO-RS, threads), each streamed into
   ``RAW/.tmp-dicomweb/<pseudonymised series UID>/`` (mode 0700), one file per instance.
3. Each retrieved folder goes through the pipeline local folders use
   (:func:`umit.ingest.run.ingest_found` on :func:`~umit.ingest.formats.folder_items`):
   discovery, geometry checks, burned-in policy, attribute allowlist, pseudonyms. A series
   ingests to the same keys, case ids and rows as the same files on a local disk would; its
   ``source`` is ``dicomweb:<pseudonymised series UID> [N slices]``.
4. Its row in the catalog's ``remote_series`` table is committed, then the folder deleted: at
   most ``pacs_workers`` series wait on disk, the only place identifiable DICOM ever lies.

Resume: a series whose pseudonymised UID has a ``remote_series`` row is not retrieved again
(with ``retry_failed``, unless some of it failed).
After a kill, a series whose images were committed but not its row is retrieved again and its
items are skipped (their keys are done), so a rerun ends with what an uninterrupted run writes,
without duplicates. Temporary folders of a killed run are removed at the next start.

Failures: a series that cannot be retrieved (an HTTP error, a transfer that keeps breaking off)
becomes a failure row at stage ``retrieve``, retried by the next run; one that fails to load
becomes a failure row like a local one. Losing the server (unreachable after the retries) or
the credentials (HTTP 401/403) mid-run stops the run; a rerun resumes it.
"""

from __future__ import annotations

import logging
import shutil
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from umit import __version__
from umit.deid.secret import load_or_create_secret, replace_uid
from umit.errors import InputError
from umit.ingest.catalog import Catalog, catalog_location
from umit.ingest.dicomweb import (
    AuthenticationError,
    DicomWebClient,
    DicomWebError,
    RetrievedSeries,
    ServerUnreachable,
    dicom_json_value,
    parse_url,
    read_auth,
)
from umit.ingest.formats import folder_items, source_key
from umit.ingest.run import IngestConfig, IngestResult, failure_line, ingest_found, prepare_out

log = logging.getLogger(__name__)

TMP_DIR = ".tmp-dicomweb"
"""Folder in RAW where retrieved series wait to be ingested (removed at the end and at start)."""


@dataclass
class RemoteSeries:
    """A series listed by QIDO-RS. The real UIDs are identifying: never logged or stored."""

    study_uid: str = field(repr=False)
    series_uid: str = field(repr=False)
    modality: str | None
    n_instances: int | None
    deid_study_uid: str = ""
    deid_series_uid: str = ""

    @property
    def source(self) -> str:
        """How the catalog names it: by pseudonymised UID."""
        return f"dicomweb:{self.deid_series_uid}"

    @property
    def retrieve_key(self) -> str:
        """Source key of a failed retrieval of this series (a ``failures`` row)."""
        return source_key("dicomweb", self.deid_series_uid)


def client_for(cfg: IngestConfig, auth: tuple[str, str] | None = None) -> DicomWebClient:
    """The DICOMweb client an ingest of ``cfg`` uses (credentials: ``auth``, else
    ``cfg.pacs_auth_file``, else ``$UMIT_PACS_AUTH``)."""
    try:
        url = parse_url(str(cfg.src))
        if auth is None:
            auth = read_auth(file=cfg.pacs_auth_file)
    except ValueError as exc:
        raise InputError(None, str(exc)) from None
    return DicomWebClient(
        url,
        auth=auth,
        timeout_s=cfg.pacs_timeout_s,
        retries=cfg.pacs_retries,
        backoff_s=cfg.pacs_backoff_s,
        ca_file=cfg.pacs_ca_file,
        max_connections=cfg.pacs_workers,
    )


def list_series(client: DicomWebClient, cfg: IngestConfig) -> list[RemoteSeries]:
    """QIDO-RS: the series of the studies ``cfg`` asks for, in study then SeriesNumber order."""
    if cfg.pacs_study:
        studies = []
        for uid in cfg.pacs_study:
            found = client.search_studies({**cfg.pacs_query, "StudyInstanceUID": uid})
            if not found:
                log.warning(
                    "%s: a requested study is not on the server (or not matched)", client.url
                )
            studies.extend(found)
    else:
        studies = client.search_studies(cfg.pacs_query)
    out: list[RemoteSeries] = []
    seen: set[str] = set()
    for study in studies:
        study_uid = dicom_json_value(study, "StudyInstanceUID")
        if not study_uid or study_uid in seen:
            continue
        seen.add(study_uid)
        rows = []
        for series in client.search_series(study_uid):
            series_uid = dicom_json_value(series, "SeriesInstanceUID")
            if not series_uid:
                continue
            number = dicom_json_value(series, "SeriesNumber")
            n = dicom_json_value(series, "NumberOfSeriesRelatedInstances")
            rows.append(
                (
                    int(number) if number is not None else 1 << 62,
                    series_uid,
                    RemoteSeries(
                        study_uid=study_uid,
                        series_uid=series_uid,
                        modality=dicom_json_value(series, "Modality"),
                        n_instances=int(n) if n is not None else None,
                    ),
                )
            )
        out.extend(r[2] for r in sorted(rows, key=lambda r: r[:2]))
    return out


def run_dicomweb(
    cfg: IngestConfig, progress: bool = True, auth: tuple[str, str] | None = None
) -> IngestResult:
    """Ingest the series of a DICOMweb source ``cfg.src`` into ``cfg.out`` (module docstring).

    Raises:
        InputError: a malformed URL or credentials.
        DicomWebError: wrong credentials (:class:`AuthenticationError`), an unreachable server
            (:class:`ServerUnreachable`), a refused query. Before anything is written when it
            happens while listing; mid-run, what was committed stays and a rerun resumes.
    """
    start = time.perf_counter()
    with client_for(cfg, auth) as client:
        client.check()
        remote = list_series(client, cfg)
        log.info("%s: %d series in %d study(ies)", client.url, len(remote), _n_studies(remote))
        out = prepare_out(cfg)
        secret = load_or_create_secret(out)
        for s in remote:
            s.deid_study_uid = replace_uid(secret, s.study_uid)
            s.deid_series_uid = replace_uid(secret, s.series_uid)
        tmp_root = out / TMP_DIR
        if tmp_root.exists():
            log.info("removed series left half-retrieved by an interrupted run")
            shutil.rmtree(tmp_root)
        tmp_root.mkdir(mode=0o700)
        result = IngestResult(out=out, catalog=catalog_location(cfg.catalog, out))
        try:
            with Catalog(result.catalog) as catalog:
                catalog.set_info("umit_version", __version__)
                done = {
                    r["deid_series_uid"]
                    for r in catalog.remote_series()
                    if not (cfg.retry_failed and r["n_failed"])
                }
                todo = [s for s in remote if s.deid_series_uid not in done]
                result.skipped += len(remote) - len(todo)
                result.found += len(remote) - len(todo)
                if cfg.limit is not None:
                    todo = todo[: cfg.limit]
                _retrieve_and_ingest(todo, client, cfg, secret, catalog, result, tmp_root, progress)
                result.failures = catalog.failures()
                result.failed = len(result.failures)
                result.set_aside = catalog.set_aside()
        finally:
            shutil.rmtree(tmp_root, ignore_errors=True)
    result.seconds = time.perf_counter() - start
    return result


def _n_studies(remote: list[RemoteSeries]) -> int:
    return len({s.study_uid for s in remote})


def _retrieve_and_ingest(
    todo: list[RemoteSeries],
    client: DicomWebClient,
    cfg: IngestConfig,
    secret: bytes,
    catalog: Catalog,
    result: IngestResult,
    tmp_root: Path,
    progress: bool,
) -> None:
    """Retrieve ``pacs_workers`` series at a time; ingest each, in this thread, as it lands."""
    bar = tqdm(total=len(todo), desc="retrieve+ingest", unit="series", disable=not progress)
    queue = iter(todo)
    pending: dict[Future[RetrievedSeries], RemoteSeries] = {}
    pool = ThreadPoolExecutor(max_workers=cfg.pacs_workers, thread_name_prefix="wado-rs")

    def submit() -> None:
        s = next(queue, None)
        if s is not None:
            fut = pool.submit(
                client.retrieve_series,
                s.study_uid,
                s.series_uid,
                tmp_root / s.deid_series_uid,
                cfg.pacs_transfer_syntax,
            )
            pending[fut] = s

    try:
        for _ in range(cfg.pacs_workers):
            submit()
        while pending:
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in finished:
                s = pending.pop(fut)
                try:
                    got = fut.result()
                except (AuthenticationError, ServerUnreachable):
                    raise  # the whole run is lost, not this series: stop; a rerun resumes
                except DicomWebError as exc:
                    reason = failure_line(s.source, str(exc))
                    catalog.add_failure(s.retrieve_key, s.source, reason, stage="retrieve")
                    log.warning("failed: %s", reason)
                else:
                    _ingest_series(s, got, cfg, secret, catalog, result)
                submit()
                bar.update(1)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        bar.close()


def _ingest_series(
    s: RemoteSeries,
    got: RetrievedSeries,
    cfg: IngestConfig,
    secret: bytes,
    catalog: Catalog,
    result: IngestResult,
) -> None:
    """A retrieved series folder through the local-folder pipeline, then marked done."""
    if s.n_instances is not None and got.n_instances != s.n_instances:
        log.warning(
            "%s: retrieved %d instance(s), QIDO-RS listed %d",
            s.source,
            got.n_instances,
            s.n_instances,
        )
    found = folder_items(got.folder, source_prefix=s.source)
    keys = {it.key for it in found[0]} | {f[0] for f in found[1]}
    # workers=1: loader processes forked beside the retrieval threads could inherit held locks
    ingest_found(found, cfg, secret, catalog, result, progress=False, workers=1)
    n_failed = len(keys & {f["source_key"] for f in catalog.failures()})
    catalog.add_remote_series(
        s.deid_series_uid,
        s.deid_study_uid,
        modality=s.modality,
        n_instances=got.n_instances,
        n_bytes=got.n_bytes,
        n_items=len(keys),
        n_failed=n_failed,
        clear_failure=s.retrieve_key,
    )
    shutil.rmtree(got.folder, ignore_errors=True)
    result.retrieved += 1
    result.retrieved_bytes += got.n_bytes
