"""DICOMweb series as inputs of ``umit predict``: named by URL, retrieved to a temporary folder,
predicted on like the same files on disk.

``dicomweb+http(s)://HOST:PORT/ROOT/studies/STUDY_UID/series/SERIES_UID`` names one series;
``.../studies/STUDY_UID`` every series of the study that holds images (SEG, SR, PR, KO,
RTSTRUCT... series are left out, so a study that already holds umit's SEG is predicted on again
without it). The run, in order:

1. :func:`open_client`: the URL is checked (:func:`umit.ingest.dicomweb.parse_series_url`) and
   the credentials read as ``umit ingest`` reads them (``auth``, else the auth file, else
   ``$UMIT_PACS_AUTH``).
2. :func:`list_series`: one request checks the credentials, then QIDO-RS lists the series. A
   wrong password, an unreachable server, or a study or series the server does not have fails
   here, before anything is written.
3. :func:`retrieve_each`: each series in turn is retrieved (WADO-RS, transfer syntax ``*``: the
   files as the PACS stores them) into ``OUT/.tmp-dicomweb/<SERIES_UID>/`` (mode 0700), handed
   to the caller, which predicts on it as on a folder on disk (so the mask and the SEG are those
   of the same files on disk, and the SEG references the UIDs the PACS holds), then deleted;
   ``.tmp-dicomweb`` goes at the end, also when the run fails. At most one series lies on disk.

Outputs are named by series UID (the folder's name: ``OUT/<SERIES_UID>.nii.gz``, ``.seg.dcm``),
so the series of a study do not collide; rows and ``failures.json`` name each series by its URL.
A series that cannot be retrieved is a failure row; after refused credentials or a lost server
the remaining series are not tried (each would wait through the same retries).
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from umit.errors import InputError
from umit.ingest.dicomweb import (
    URL_SCHEME_PREFIX,
    AuthenticationError,
    DicomWebClient,
    DicomWebError,
    ServerUnreachable,
    dicom_json_value,
    parse_series_url,
    read_auth,
)

log = logging.getLogger(__name__)

TMP_DIR = ".tmp-dicomweb"
"""Folder in OUT where a retrieved series waits while it is predicted on (removed after)."""
NON_IMAGE_MODALITIES = frozenset(
    {"SEG", "SR", "PR", "KO", "DOC", "RTSTRUCT", "RTPLAN", "RTRECORD", "REG", "FID", "PLAN"}
)
"""Modalities of series without images to predict on: left out of a whole study."""


@dataclass(frozen=True)
class RemoteSeries:
    """One series to predict on, as QIDO-RS listed it.

    Attributes:
        url: ``dicomweb+ROOT/studies/STUDY_UID/series/SERIES_UID``: how rows and
            ``failures.json`` name it.
        study_uid: Its StudyInstanceUID.
        series_uid: Its SeriesInstanceUID (also the name of its outputs).
        modality: Modality, when the server says.
        n_instances: NumberOfSeriesRelatedInstances, when the server says.
    """

    url: str
    study_uid: str
    series_uid: str
    modality: str | None = None
    n_instances: int | None = None


def open_client(
    url: str,
    *,
    auth: tuple[str, str] | None = None,
    auth_file: str | Path | None = None,
    timeout_s: float = 30.0,
    retries: int = 3,
    backoff_s: float = 0.5,
) -> tuple[DicomWebClient, str, str | None]:
    """The client for a DICOMweb input URL, and the study UID and series UID (None: the whole
    study) it names. Nothing is sent yet.

    Args:
        auth: ``(user, password)``; default: the first line of ``auth_file``, else
            ``$UMIT_PACS_AUTH``, else none.
        timeout_s, retries, backoff_s: As :class:`~umit.ingest.dicomweb.DicomWebClient` takes
            them.

    Raises:
        InputError: a malformed URL or auth file (the message never repeats the URL).
    """
    try:
        root, study_uid, series_uid = parse_series_url(url)
        if auth is None:
            auth = read_auth(file=auth_file)
    except ValueError as exc:
        raise InputError(None, str(exc)) from None
    client = DicomWebClient(
        root,
        auth=auth,
        timeout_s=timeout_s,
        retries=retries,
        backoff_s=backoff_s,
        max_connections=1,  # one series at a time
    )
    return client, study_uid, series_uid


def list_series(
    client: DicomWebClient, study_uid: str, series_uid: str | None = None
) -> list[RemoteSeries]:
    """Check the credentials, then list (QIDO-RS) series ``series_uid`` of study ``study_uid``,
    or every image series of the study in SeriesNumber order.

    Raises:
        DicomWebError: the series or study is not on the server (the message names its UID), the
            study holds no image series, or a request failed (:class:`AuthenticationError`,
            :class:`ServerUnreachable`...).
    """
    client.check()
    query = {"SeriesInstanceUID": series_uid} if series_uid else {}
    rows = []
    for ds in client.search_series(study_uid, query):
        uid = dicom_json_value(ds, "SeriesInstanceUID")
        if not uid or (series_uid and uid != series_uid):  # a server that ignored the match
            continue
        modality = dicom_json_value(ds, "Modality")
        if series_uid is None and modality in NON_IMAGE_MODALITIES:
            log.info("%s: series %s is %s, not images: left out", client.url, uid, modality)
            continue
        number = dicom_json_value(ds, "SeriesNumber")
        n = dicom_json_value(ds, "NumberOfSeriesRelatedInstances")
        url = f"{URL_SCHEME_PREFIX}{client.url}/studies/{study_uid}/series/{uid}"
        series = RemoteSeries(url, study_uid, uid, modality, int(n) if n is not None else None)
        rows.append((int(number) if number is not None else 1 << 62, uid, series))
    if not rows and series_uid:
        raise DicomWebError(
            f"{client.url}: series {series_uid} not found in study {study_uid} "
            "(QIDO-RS lists no such series: check both UIDs)"
        )
    if not rows:
        raise DicomWebError(
            f"{client.url}: study {study_uid} not found, or it holds no image series "
            f"(QIDO-RS lists none but {', '.join(sorted(NON_IMAGE_MODALITIES))} series)"
        )
    return [r[2] for r in sorted(rows, key=lambda r: r[:2])]


def retrieve_each(
    client: DicomWebClient,
    series: list[RemoteSeries],
    tmp_root: Path,
    failures: dict[str, str],
    transfer_syntax: str = "*",
) -> Iterator[tuple[str, Path]]:
    """Retrieve each series into ``tmp_root/<SERIES_UID>`` and yield its URL and folder; the
    folder is deleted when the next one is asked for, ``tmp_root`` (emptied first: a killed
    run's leftovers) at the end. Use it under :func:`contextlib.closing`, so that both also
    happen when the caller stops early.

    A series that cannot be retrieved is recorded in ``failures[url]`` and not yielded; after
    refused credentials or an unreachable server the remaining ones are recorded as not tried.
    """
    if tmp_root.exists():
        shutil.rmtree(tmp_root)
    tmp_root.mkdir(parents=True, mode=0o700)
    fatal = None
    try:
        for s in series:
            if fatal is not None:
                failures[s.url] = f"retrieve: not tried, {fatal}"
                continue
            try:
                got = client.retrieve_series(
                    s.study_uid, s.series_uid, tmp_root / s.series_uid, transfer_syntax
                )
            except DicomWebError as exc:
                failures[s.url] = f"retrieve: {exc}"
                log.error("predict: WADO-RS of %s failed: %s", s.url, exc)
                if isinstance(exc, AuthenticationError | ServerUnreachable):
                    fatal = str(exc)
                continue
            log.info(
                "%s: retrieved %d instance(s), %.1f MB in %.2f s",
                s.url,
                got.n_instances,
                got.n_bytes / 1e6,
                got.seconds,
            )
            if s.n_instances is not None and got.n_instances != s.n_instances:
                log.warning(
                    "%s: retrieved %d instance(s), QIDO-RS listed %d",
                    s.url,
                    got.n_instances,
                    s.n_instances,
                )
            try:
                yield s.url, got.folder
            finally:
                shutil.rmtree(got.folder, ignore_errors=True)
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)
