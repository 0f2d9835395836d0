"""A small DICOMweb client: QIDO-RS search, WADO-RS series retrieval to disk, STOW-RS store.

Built on urllib3 alone, on purpose, because what leaves the machine must be exactly what the
user asked for:

* Requests go only to the scheme, host and port of the URL the client was given. Redirects are
  refused (never followed, so credentials cannot be forwarded), URLs the server returns
  (RetrieveURL, BulkDataURI) are never used, and no proxy or ``.netrc`` is read from the
  environment (urllib3 does neither; ``requests`` does both).
* Every request has a connect and a read timeout, and a bounded number of retries with
  exponential back-off on connection errors and on HTTP 429/502/503/504 (for STOW-RS too: an
  instance stored twice keeps its UID, so the PACS keeps one copy). A series whose transfer
  breaks off mid-stream is retried from the start, as often again. Other answers are final.
* WADO-RS responses (``multipart/related``) are parsed as they stream in and each part is written
  straight to its own file: memory stays at one chunk, whatever the size of the series.
* Credentials travel only in the ``Authorization`` header; no message, log line or exception of
  this module contains them (errors name :attr:`DicomWebClient.url`, which cannot hold any).

Used by ``umit ingest dicomweb+http://...`` (:mod:`umit.ingest.pacs`), by ``umit predict
dicomweb+http://.../studies/UID/series/UID`` (:mod:`umit.inference.dicomweb_input`, which
retrieves the series to predict on) and by ``umit predict --stow`` (:mod:`umit.inference.predict`),
which stores DICOM SEG results back into the PACS (:meth:`DicomWebClient.store_instances`).
Example::

    with DicomWebClient("http://127.0.0.1:8042/dicom-web", auth=("user", "secret")) as client:
        client.check()
        for study in client.search_studies({"ModalitiesInStudy": "CT"}):
            study_uid = dicom_json_value(study, "StudyInstanceUID")
            for series in client.search_series(study_uid):
                series_uid = dicom_json_value(series, "SeriesInstanceUID")
                client.retrieve_series(study_uid, series_uid, Path("tmp") / series_uid)
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode, urlsplit, urlunsplit

import urllib3
from pydantic import Field
from urllib3.exceptions import HTTPError, MaxRetryError, ProtocolError, ReadTimeoutError
from urllib3.util import Retry, Timeout

from umit.config import UmitConfig
from umit.errors import UmitError

log = logging.getLogger(__name__)

URL_SCHEME_PREFIX = "dicomweb+"
"""``umit ingest`` takes ``dicomweb+http://HOST:PORT/ROOT`` (or ``dicomweb+https://``)."""
AUTH_ENV = "UMIT_PACS_AUTH"
"""Environment variable holding ``user:password`` when neither ``--auth`` nor a file is given."""
RETRY_STATUS = (429, 502, 503, 504)
"""HTTP statuses worth retrying (busy or restarting server); everything else fails at once."""
QIDO_PARAMETERS = {"limit", "offset", "fuzzymatching", "includefield"}
"""QIDO-RS query keys that are not attribute matches."""
SERIES_URL_FORM = (
    "a DICOMweb input must name a series or a study: "
    "dicomweb+http(s)://HOST:PORT/ROOT/studies/STUDY_UID[/series/SERIES_UID]"
)
"""What ``umit predict`` takes as a DICOMweb input (:func:`parse_series_url`; quoted in errors)."""
DICOM_MEDIA = 'multipart/related; type="application/dicom"'
FAILURE_REASONS = {
    0x0110: "processing failure",
    0x0122: "SOP class not supported",
    0x0124: "not authorized",
    0xA700: "out of resources",
    0xA900: "data set does not match SOP class",
    0xC000: "cannot understand",
    0xC122: "transfer syntax not supported",
}
"""STOW-RS Failure Reason codes (PS3.18 Table I.2-1 and PS3.4 status codes), for messages."""


class DicomWebError(UmitError):
    """A DICOMweb request failed; the message names the server URL and why (never credentials)."""


class AuthenticationError(DicomWebError):
    """The server refused the credentials (HTTP 401) or the access (HTTP 403)."""


class ServerUnreachable(DicomWebError):
    """No connection to the server after every allowed attempt."""


class StoreFailed(DicomWebError):
    """The server answered a STOW-RS request but refused some instances (HTTP 202 or 409 with a
    Failed SOP Sequence); :attr:`result` says which were stored and which not, and why."""

    def __init__(self, message: str, result: StoreResult):
        super().__init__(message)
        self.result = result


class _BrokenTransfer(DicomWebError):
    """A response body ended or timed out mid-stream (worth retrying from the start)."""


@dataclass
class RetrievedSeries:
    """What :meth:`DicomWebClient.retrieve_series` wrote.

    Attributes:
        folder: The folder holding one file per instance, ``00000.dcm``, ``00001.dcm``...
        n_instances: Number of files written.
        n_bytes: Bytes written (the instances' encoded size).
        seconds: Wall time of the transfer, retries included.
        attempts: Transfers started (1 unless one broke off and was retried).
    """

    folder: Path
    n_instances: int
    n_bytes: int
    seconds: float
    attempts: int = 1


@dataclass
class StoreResult:
    """What the server answered to :meth:`DicomWebClient.store_instances`.

    Attributes:
        url: Where the instances went (``<root>/studies`` or ``<root>/studies/<uid>``).
        status: The highest status answered: 200 when every request was answered 200; 202:
            stored, with warnings or some instances refused; 409: none of a request stored.
        stored: SOP Instance UIDs the server reports stored (Referenced SOP Sequence).
        failed: ``{SOP Instance UID: Failure Reason}`` of refused instances (Failed SOP
            Sequence; the reason is None when the server gave none).
        requests: STOW-RS requests (batches) sent.
        attempts: HTTP attempts in all, retries included.
        seconds: Wall time, retries included.
    """

    url: str
    status: int = 200
    stored: list[str] = field(default_factory=list)
    failed: dict[str, int | None] = field(default_factory=dict)
    requests: int = 0
    attempts: int = 0
    seconds: float = 0.0


def parse_url(url: str) -> str:
    """The base ``http(s)://host[:port]/root`` of a DICOMweb service, checked.

    Accepts ``dicomweb+http(s)://...`` as ``umit ingest`` writes it, or a plain ``http(s)://``
    URL. A URL with credentials in it (``user:pw@host``), a query or a fragment is refused: the
    URL ends up in logs and in ``config.yaml``, credentials must not (use an auth file). The
    error never repeats the URL, since it may hold a password.

    Raises:
        ValueError: not an http(s) URL, or one with credentials, a query or a fragment.
    """
    raw = url.removeprefix(URL_SCHEME_PREFIX)
    parts = urlsplit(raw)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(
            "a DICOMweb source must look like dicomweb+http://HOST:PORT/dicom-web "
            f"(or dicomweb+https://...); got scheme {parts.scheme or 'none'!r}"
        )
    if parts.username is not None or parts.password is not None:
        raise ValueError(
            "the DICOMweb URL holds credentials (user:password@host); they would be written to "
            f"logs and config.yaml: give them with --auth-file or ${AUTH_ENV} instead"
        )
    if parts.query or parts.fragment:
        raise ValueError(
            "the DICOMweb URL must not have a query or fragment; search with --query instead"
        )
    if "studies" in parts.path.split("/"):
        raise ValueError(
            "give the DICOMweb root (e.g. dicomweb+http://HOST:PORT/dicom-web), not a resource "
            "below it (.../studies...): umit builds every request from the root"
        )
    try:
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"the DICOMweb URL has an invalid port ({exc})") from None
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    netloc = f"{host}:{port}" if port else host
    return f"{parts.scheme}://{netloc}{parts.path.rstrip('/')}"


def parse_series_url(url: str) -> tuple[str, str, str | None]:
    """``(root, study UID, series UID or None)`` of a DICOMweb study or series URL, as ``umit
    predict`` takes it: ``dicomweb+http(s)://HOST:PORT/ROOT/studies/STUDY_UID`` or
    ``.../studies/STUDY_UID/series/SERIES_UID`` (a trailing ``/`` allowed).

    ``root`` is checked and normalised by :func:`parse_url` (no credentials, query or fragment);
    errors never repeat the URL, since it may hold a password.

    Raises:
        ValueError: another kind of URL or resource, or a UID that is not one.
    """
    parts = urlsplit(url.removeprefix(URL_SCHEME_PREFIX))
    if parts.query or parts.fragment:
        raise ValueError("the DICOMweb input URL must not have a query or fragment")
    segments = parts.path.rstrip("/").split("/")
    if "studies" not in segments:
        raise ValueError(SERIES_URL_FORM)
    i = segments.index("studies")
    root = parse_url(urlunsplit((parts.scheme, parts.netloc, "/".join(segments[:i]), "", "")))
    rest = segments[i + 1 :]
    if len(rest) == 1:
        return root, _uid(rest[0]), None
    if len(rest) == 3 and rest[1] == "series":
        return root, _uid(rest[0]), _uid(rest[2])
    raise ValueError(f"{SERIES_URL_FORM}; got .../studies/{'/'.join(rest)}")


def is_remote_source(src: object) -> bool:
    """Whether an ingest source names a DICOMweb service (``dicomweb+http(s)://...``)."""
    return isinstance(src, str) and src.startswith(URL_SCHEME_PREFIX)


def is_loopback(url: str) -> bool:
    """Whether the URL's host is this machine (``localhost``, 127.0.0.0/8, ``::1``)."""
    host = urlsplit(url.removeprefix(URL_SCHEME_PREFIX)).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_auth(
    spec: str | None = None, file: str | Path | None = None, env: Mapping[str, str] | None = None
) -> tuple[str, str] | None:
    """Credentials ``(user, password)`` from ``spec`` (``"user:password"``), else the first line
    of ``file``, else ``$UMIT_PACS_AUTH``; None when none is given.

    Raises:
        ValueError: a value without ``:`` or an unreadable file (the message never holds the
            password).
    """
    env = os.environ if env is None else env
    where, value = None, None
    if spec is not None:
        where, value = "--auth", spec
    elif file is not None:
        path = Path(file)
        try:
            lines = path.read_text().splitlines()
        except OSError as exc:
            raise ValueError(f"{path}: cannot read the auth file ({exc.strerror})") from None
        where, value = str(path), (lines[0].strip() if lines else "")
        if path.stat().st_mode & 0o077:
            log.warning("%s: readable by other users; chmod 600 it", path)
    elif env.get(AUTH_ENV):
        where, value = f"${AUTH_ENV}", env[AUTH_ENV]
    if value is None:
        return None
    user, sep, password = value.partition(":")
    if not sep or not user:
        raise ValueError(f"{where}: credentials must be 'user:password'")
    return user, password


def dicom_json_value(dataset: Mapping[str, Any], keyword: str, default: Any = None) -> Any:
    """First value of attribute ``keyword`` (e.g. ``"SeriesInstanceUID"``) in a DICOM JSON
    dataset, as QIDO-RS returns them; ``default`` when absent or empty."""
    values = dicom_json_value_list(dataset, keyword)
    return values[0] if values else default


def dicom_json_value_list(dataset: Mapping[str, Any], keyword: str) -> list[Any]:
    """Every value of attribute ``keyword`` in a DICOM JSON dataset (the items of a sequence);
    empty when absent."""
    from pydicom.datadict import tag_for_keyword

    tag = tag_for_keyword(keyword)
    if tag is None:
        raise ValueError(f"unknown DICOM keyword {keyword!r}")
    return list((dataset.get(f"{tag:08X}") or {}).get("Value") or [])


def check_query(query: Mapping[str, str]) -> dict[str, str]:
    """QIDO-RS query keys checked: DICOM keywords, ``ggggeeee`` tags or QIDO parameters.

    Raises:
        ValueError: naming an unknown key (a typo would otherwise match everything).
    """
    from pydicom.datadict import tag_for_keyword

    out = {}
    for key, value in query.items():
        ok = (
            key in QIDO_PARAMETERS
            or tag_for_keyword(key) is not None
            or re.fullmatch(r"[0-9A-Fa-f]{8}", key) is not None
        )
        if not ok:
            raise ValueError(
                f"unknown QIDO-RS query key {key!r}: use DICOM keywords such as "
                "ModalitiesInStudy, StudyDate, StudyInstanceUID (or ggggeeee tags)"
            )
        out[key] = str(value)
    return out


class DicomWebClient:
    """QIDO-RS / WADO-RS / STOW-RS against one DICOMweb service (thread-safe).

    Args:
        url: Base URL, e.g. ``http://127.0.0.1:8042/dicom-web`` (``dicomweb+`` prefix allowed).
        auth: ``(user, password)`` for HTTP Basic authentication, or None (a warning when
            they would travel over plain http to another machine).
        timeout_s: Connect timeout and read timeout (per socket read, not per transfer).
        retries: Retries after the first attempt, on connection errors, on HTTP
            429/502/503/504 and on a transfer that breaks off.
        backoff_s: Back-off factor: waits of 0, 2·b, 4·b... seconds between retries (at most 30).
        ca_file: CA bundle for https (default: the system's).
        max_connections: Connections kept open (one per concurrent retrieval).
        page_size: QIDO-RS results asked for per request (``limit``/``offset`` paging).
        chunk_bytes: Bytes read from the socket at a time while streaming.
    """

    def __init__(
        self,
        url: str,
        *,
        auth: tuple[str, str] | None = None,
        timeout_s: float = 30.0,
        retries: int = 3,
        backoff_s: float = 0.5,
        ca_file: str | Path | None = None,
        max_connections: int = 4,
        page_size: int = 1000,
        chunk_bytes: int = 1 << 20,
    ):
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        if retries < 0:
            raise ValueError(f"retries must be >= 0, got {retries}")
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        self.url = parse_url(url)
        """The service's base URL (no credentials, no trailing slash): the one host talked to."""
        if auth is not None and self.url.startswith("http://") and not is_loopback(self.url):
            log.warning("%s: credentials are sent unencrypted over plain http; use https", self.url)
        self.retries = retries
        self.backoff_s = backoff_s
        self.page_size = page_size
        self.chunk_bytes = chunk_bytes
        self._timeout = Timeout(connect=timeout_s, read=timeout_s)
        self._headers = {"User-Agent": "umit-dicomweb"}
        if auth is not None:
            self._headers.update(urllib3.make_headers(basic_auth=f"{auth[0]}:{auth[1]}"))
        pool_kw: dict[str, Any] = {"maxsize": max(1, max_connections), "block": False}
        if ca_file is not None:
            pool_kw["ca_certs"] = str(ca_file)
        self._pool = urllib3.PoolManager(num_pools=2, **pool_kw)

    # -- plumbing ----------------------------------------------------------------------------
    def close(self) -> None:
        self._pool.clear()

    def __enter__(self) -> DicomWebClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:  # never the headers: they hold the credentials
        return f"DicomWebClient({self.url!r})"

    def _retry(self, retry_post: bool = False) -> Retry:
        return Retry(
            total=self.retries,
            connect=self.retries,
            read=self.retries,
            status=self.retries,
            other=0,
            redirect=False,
            # read errors and statuses are retried for GET, and for POST only where sending it
            # twice does no harm (STOW-RS); connection errors, where nothing was sent, always
            allowed_methods=frozenset({"GET", "POST"} if retry_post else {"GET"}),
            status_forcelist=RETRY_STATUS,
            backoff_factor=self.backoff_s,
            backoff_max=30.0,
            raise_on_status=False,
            respect_retry_after_header=False,  # a server's "come back in an hour" would hang us
        )

    def _request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        body: bytes | None = None,
        stream: bool = False,
        retry_post: bool = False,
        answer_statuses: tuple[int, ...] = (),
    ) -> urllib3.BaseHTTPResponse:
        """One request to ``self.url + path``; raises a :class:`DicomWebError` on any failure
        but a 2xx answer or one of ``answer_statuses`` (the body is read unless ``stream``).
        ``retry_post``: a POST that is harmless to repeat, retried like a GET."""
        target = self.url + path + (f"?{urlencode(params)}" if params else "")
        try:
            response = self._pool.request(
                method,
                target,
                headers={**self._headers, **(headers or {})},
                body=body,
                retries=self._retry(retry_post),
                timeout=self._timeout,
                redirect=False,
                preload_content=not stream,
            )
        except MaxRetryError as exc:
            reason = exc.reason
            if isinstance(reason, ReadTimeoutError):
                raise DicomWebError(
                    f"{self.url}: no answer within {self._timeout.read_timeout} s to {method} "
                    f"{path} after {self.retries + 1} attempt(s)"
                ) from None
            raise ServerUnreachable(
                f"cannot reach {self.url} after {self.retries + 1} attempt(s): "
                f"{_short_reason(reason)}; is the server running and the URL right?"
            ) from None
        except ReadTimeoutError:
            raise DicomWebError(
                f"{self.url}: no answer within {self._timeout.read_timeout} s to {method} {path}"
            ) from None
        except HTTPError as exc:
            raise DicomWebError(
                f"{self.url}: {method} {path} failed: {_short_reason(exc)}"
            ) from None
        if response.status < 300 or response.status in answer_statuses:
            return response
        detail = "" if stream else _body_excerpt(response.data)
        response.release_conn()
        if response.status == 401:
            raise AuthenticationError(
                f"authentication failed for {self.url} (HTTP 401): check the user and password "
                "(--auth-file, --auth or $" + AUTH_ENV + ")"
            )
        if response.status == 403:
            raise AuthenticationError(f"access refused by {self.url} (HTTP 403) for {path}")
        if 300 <= response.status < 400:
            raise DicomWebError(
                f"{self.url}: {method} {path} was redirected (HTTP {response.status}) to "
                f"{response.headers.get('Location', '?')!r}; umit talks only to the URL it is "
                "given: use the final URL"
            )
        raise DicomWebError(
            f"{self.url}: {method} {path} failed with HTTP {response.status}"
            + (f": {detail}" if detail else "")
        )

    def _get_json(self, path: str, params: Mapping[str, Any] | None = None) -> list[dict]:
        response = self._request(
            "GET", path, params=params, headers={"Accept": "application/dicom+json"}
        )
        if response.status == 204 or not response.data:
            return []
        try:
            data = json.loads(response.data)
        except ValueError:
            raise DicomWebError(
                f"{self.url}: {path} did not answer with DICOM JSON: {_body_excerpt(response.data)}"
            ) from None
        return [data] if isinstance(data, dict) else list(data)

    def _search(self, path: str, query: Mapping[str, str] | None) -> list[dict]:
        """All QIDO-RS matches, paged with ``limit``/``offset`` unless the query sets them."""
        params = check_query(query or {})
        if "limit" in params or "offset" in params:
            return self._get_json(path, params)
        out: list[dict] = []
        while True:
            page = self._get_json(path, {**params, "limit": self.page_size, "offset": len(out)})
            out.extend(page)
            if len(page) < self.page_size:
                return out

    # -- the three services ------------------------------------------------------------------
    def check(self) -> None:
        """One cheap authenticated request (a QIDO-RS study search of one result), so that a
        wrong password or an unreachable server fails before anything is written."""
        self._get_json("/studies", {"limit": 1})

    def search_studies(self, query: Mapping[str, str] | None = None) -> list[dict]:
        """QIDO-RS ``/studies``: DICOM JSON of every matching study (all pages)."""
        return self._search("/studies", query)

    def search_series(
        self, study_uid: str | None = None, query: Mapping[str, str] | None = None
    ) -> list[dict]:
        """QIDO-RS series of one study (or of all studies when ``study_uid`` is None)."""
        path = f"/studies/{_uid(study_uid)}/series" if study_uid else "/series"
        return self._search(path, query)

    def search_instances(
        self, study_uid: str, series_uid: str, query: Mapping[str, str] | None = None
    ) -> list[dict]:
        """QIDO-RS instances of one series."""
        return self._search(
            f"/studies/{_uid(study_uid)}/series/{_uid(series_uid)}/instances", query
        )

    def retrieve_series(
        self, study_uid: str, series_uid: str, folder: str | Path, transfer_syntax: str = "*"
    ) -> RetrievedSeries:
        """WADO-RS: every instance of a series into ``folder`` (created; emptied first), one
        file per instance, streamed (memory: one chunk).

        Args:
            transfer_syntax: ``"*"`` (as stored: no transcoding on the server) or a transfer
                syntax UID to ask the server for, e.g. ``1.2.840.10008.1.2.1`` (uncompressed).

        Raises:
            DicomWebError: after ``retries`` broken transfers, or on an HTTP error.
        """
        folder = Path(folder)
        path = f"/studies/{_uid(study_uid)}/series/{_uid(series_uid)}"
        accept = f"{DICOM_MEDIA}; transfer-syntax={transfer_syntax}"
        start = time.perf_counter()
        for attempt in range(1, self.retries + 2):
            if folder.exists():
                shutil.rmtree(folder)
            folder.mkdir(parents=True, mode=0o700)
            try:
                response = self._request("GET", path, headers={"Accept": accept}, stream=True)
                try:
                    n, size = self._write_parts(response, folder, path)
                finally:
                    response.release_conn()
                return RetrievedSeries(folder, n, size, time.perf_counter() - start, attempt)
            except _BrokenTransfer as exc:
                if attempt > self.retries:
                    raise DicomWebError(f"{exc} (after {attempt} attempt(s))") from None
                wait = min(30.0, self.backoff_s * 2**attempt)
                log.warning("%s; retrying in %.1f s", exc, wait)
                time.sleep(wait)
        raise AssertionError("unreachable")

    def _write_parts(
        self, response: urllib3.BaseHTTPResponse, folder: Path, path: str
    ) -> tuple[int, int]:
        boundary = _boundary(response.headers.get("Content-Type", ""))
        if boundary is None:
            raise DicomWebError(
                f"{self.url}: {path} answered {response.headers.get('Content-Type')!r}, "
                "expected multipart/related"
            )
        parser = _MultipartToFiles(boundary, folder)
        try:
            for chunk in response.stream(self.chunk_bytes):
                parser.feed(chunk)
        except (ProtocolError, ReadTimeoutError, OSError) as exc:
            if isinstance(exc, OSError) and not isinstance(exc, ConnectionError | TimeoutError):
                raise  # a local disk error is not the network's fault
            raise _BrokenTransfer(
                f"{self.url}: transfer of {path} broke off after {parser.n_parts} instance(s): "
                f"{_short_reason(exc)}"
            ) from None
        finally:
            parser.close_file()
        if not parser.finished:
            raise _BrokenTransfer(
                f"{self.url}: transfer of {path} ended early after {parser.n_parts} instance(s) "
                "(no closing boundary)"
            )
        return parser.n_parts, parser.n_bytes

    def store_instances(
        self,
        paths: Iterable[str | Path],
        study_uid: str | None = None,
        max_request_bytes: int = 64 << 20,
    ) -> StoreResult:
        """STOW-RS (PS3.18 10.5): POST DICOM files to ``/studies`` (or ``/studies/{study_uid}``)
        as ``multipart/related; type="application/dicom"``, in requests of at most
        ``max_request_bytes`` (a single larger file goes alone).

        Each request is retried like a GET (connection errors, read timeouts, HTTP
        429/502/503/504; ``retries`` times): an instance sent twice keeps its UID. Other
        HTTP errors are final. Every batch is sent even when the server refuses instances of an
        earlier one.

        Returns:
            Where they went, the instances stored, the attempts made.

        Raises:
            StoreFailed: the server refused some instances (a Failed SOP Sequence in a 202 or
                409 answer); its ``result`` lists them with their Failure Reason.
            DicomWebError: any other failure (:class:`AuthenticationError`,
                :class:`ServerUnreachable`, an HTTP error), naming the URL and the status.
            ValueError: no files.
        """
        paths = [Path(p) for p in paths]
        if not paths:
            raise ValueError("store_instances needs at least one file")
        path = f"/studies/{_uid(study_uid)}" if study_uid else "/studies"
        result = StoreResult(url=self.url + path)
        start = time.perf_counter()
        batch: list[bytes] = []
        size = 0

        def send() -> None:
            boundary = uuid.uuid4().hex
            response = self._request(
                "POST",
                path,
                headers={
                    "Content-Type": f"{DICOM_MEDIA}; boundary={boundary}",
                    "Accept": "application/dicom+json",
                },
                body=_multipart_body(batch, boundary),
                retry_post=True,
                answer_statuses=(409,),
            )
            history = response.retries.history if response.retries is not None else ()
            result.requests += 1
            result.attempts += len(history) + 1
            stored, failed = _stow_answer(response.data)
            if response.status == 409 and not failed:
                raise DicomWebError(
                    f"{self.url}: POST {path} failed with HTTP 409: "
                    f"{_body_excerpt(response.data) or 'no reason given'}"
                )
            result.status = max(result.status, response.status)
            result.stored.extend(stored)
            result.failed.update(failed)

        for p in paths:
            data = p.read_bytes()
            if batch and size + len(data) > max_request_bytes:
                send()
                batch, size = [], 0
            batch.append(data)
            size += len(data)
        send()
        result.seconds = time.perf_counter() - start
        if result.failed:
            first, reason = next(iter(result.failed.items()))
            raise StoreFailed(
                f"{result.url}: the server refused {len(result.failed)} of {len(paths)} "
                f"instance(s) (HTTP {result.status}; first {first}: "
                f"{_failure_reason(reason)})",
                result,
            )
        return result


# -- helpers -----------------------------------------------------------------------------------
def _uid(uid: str) -> str:
    if not re.fullmatch(r"[0-9.]{1,64}", uid):
        raise ValueError(f"not a DICOM UID: {uid!r}")
    return quote(uid)


def _short_reason(exc: BaseException | None) -> str:
    """The last, most specific line of a urllib3 error, without object addresses."""
    text = str(exc) if exc is not None else "unknown error"
    text = re.sub(r"<[^>]* at 0x[0-9a-f]+>: ?", "", text)
    return text.strip().rstrip(")") or type(exc).__name__


def _body_excerpt(data: bytes, limit: int = 300) -> str:
    text = data[:limit].decode("utf-8", "replace")
    return " ".join(text.split())


def _boundary(content_type: str) -> bytes | None:
    media, *params = [p.strip() for p in content_type.split(";")]
    if media.lower() != "multipart/related":
        return None
    for param in params:
        key, _, value = param.partition("=")
        if key.strip().lower() == "boundary" and value:
            return value.strip().strip('"').encode()
    return None


def _stow_answer(data: bytes) -> tuple[list[str], dict[str, int | None]]:
    """Stored SOP Instance UIDs and ``{refused UID: Failure Reason}`` of a STOW-RS answer
    (PS3.18 DICOM JSON; nothing when the body is empty or not DICOM JSON)."""
    try:
        doc = json.loads(data) if data.strip() else {}
    except ValueError:
        return [], {}
    if isinstance(doc, list):  # some servers wrap the one dataset in a list
        doc = doc[0] if doc else {}
    if not isinstance(doc, dict):
        return [], {}
    stored = [
        str(dicom_json_value(item, "ReferencedSOPInstanceUID"))
        for item in dicom_json_value_list(doc, "ReferencedSOPSequence")
    ]
    failed = {
        str(dicom_json_value(item, "ReferencedSOPInstanceUID")): dicom_json_value(
            item, "FailureReason"
        )
        for item in dicom_json_value_list(doc, "FailedSOPSequence")
    }
    return stored, failed


def _failure_reason(code: Any) -> str:
    if code is None:
        return "no reason given"
    if not isinstance(code, int):  # a server that does not follow PS3.18
        return f"FailureReason {code!r}"
    return f"FailureReason 0x{code:04X} {FAILURE_REASONS.get(code, '')}".rstrip()


def _multipart_body(parts: Sequence[bytes], boundary: str) -> bytes:
    out = bytearray()
    for data in parts:
        out += f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        out += data
        out += b"\r\n"
    out += f"--{boundary}--\r\n".encode()
    return bytes(out)


class _MultipartToFiles:
    """Incremental ``multipart/related`` parser writing part ``i`` to ``folder/{i:05d}.dcm``.

    Holds at most one chunk plus a delimiter's length in memory. A part with a
    ``Content-Length`` header is copied by count; otherwise its end is found by scanning for the
    delimiter ``CRLF--boundary``.
    """

    _MAX_HEADER = 64 << 10

    def __init__(self, boundary: bytes, folder: Path):
        self.delimiter = b"\r\n--" + boundary
        self.folder = folder
        self.buf = bytearray(b"\r\n")  # so the first boundary matches the delimiter too
        self.state = "preamble"  # -> headers -> body -> after -> ... -> done
        self.remaining: int | None = None
        self.file: Any = None
        self.n_parts = 0
        self.n_bytes = 0

    @property
    def finished(self) -> bool:
        return self.state == "done"

    def close_file(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None

    def feed(self, chunk: bytes) -> None:
        self.buf += chunk
        while self._step():
            pass

    def _step(self) -> bool:
        """Consume what the buffer allows; True when called again may make progress."""
        buf, d = self.buf, self.delimiter
        if self.state == "preamble":
            i = buf.find(d)
            if i < 0:
                del buf[: max(0, len(buf) - len(d))]
                return False
            del buf[: i + len(d)]
            self.state = "after"
            return True
        if self.state == "after":  # just past a delimiter: "--" ends, CRLF starts a part
            if len(buf) < 2:
                return False
            if buf[:2] == b"--":
                self.state = "done"
                buf.clear()
                return False
            i = buf.find(b"\r\n")
            if i < 0:
                return False
            del buf[: i + 2]  # transport padding + CRLF
            self.state = "headers"
            return True
        if self.state == "headers":
            i = buf.find(b"\r\n\r\n")
            if i < 0:
                if buf.startswith(b"\r\n"):  # a part without headers
                    i = -2
                elif len(buf) > self._MAX_HEADER:
                    raise _BrokenTransfer("multipart part headers too long")
                else:
                    return False
            headers = bytes(buf[: max(i, 0)]).decode("latin-1")
            del buf[: i + 4]
            length = re.search(r"(?im)^content-length:\s*(\d+)\s*$", headers)
            self.remaining = int(length.group(1)) if length else None
            self.file = open(self.folder / f"{self.n_parts:05d}.dcm", "wb")  # noqa: SIM115
            self.state = "body"
            return True
        if self.state == "body":
            if self.remaining is not None:
                take = min(self.remaining, len(buf))
                self._write(buf[:take])
                del buf[:take]
                self.remaining -= take
                if self.remaining:
                    return False
                self.remaining = None
                self.state = "end-of-part"
                return True
            i = buf.find(d)
            if i < 0:
                keep = len(d) - 1
                if len(buf) > keep:
                    self._write(buf[: len(buf) - keep])
                    del buf[: len(buf) - keep]
                return False
            self._write(buf[:i])
            del buf[: i + len(d)]
            self._end_part()
            self.state = "after"
            return True
        if self.state == "end-of-part":  # counted body done: the delimiter must follow
            if len(buf) < len(d):
                return False
            if buf[: len(d)] != d:
                raise _BrokenTransfer("multipart part longer than its Content-Length")
            del buf[: len(d)]
            self._end_part()
            self.state = "after"
            return True
        return False  # done: ignore the epilogue

    def _write(self, data: bytes | bytearray) -> None:
        self.file.write(data)
        self.n_bytes += len(data)

    def _end_part(self) -> None:
        self.close_file()
        self.n_parts += 1


class DicomWebSettings(UmitConfig):
    """Settings of a DICOMweb source, shared by ``umit ingest`` and ``umit predict``."""

    pacs_auth_file: Path | None = None
    """DICOMweb source: file whose first line is ``user:password`` (chmod 600), else
    ``$UMIT_PACS_AUTH``. Only this path is recorded; the credentials never reach outputs or logs."""
    pacs_timeout_s: float = Field(default=30.0, gt=0)
    """DICOMweb source: connect timeout and read timeout (seconds without data) of each request."""
    pacs_retries: int = Field(default=3, ge=0, le=20)
    """DICOMweb source: retries after the first attempt, on connection errors, HTTP
    429/502/503/504 and broken transfers (back-off 0, 2, 4... x pacs_backoff_s, at most 30 s)."""
    pacs_backoff_s: float = Field(default=0.5, ge=0)
    """DICOMweb source: back-off factor between retries, in seconds."""
    pacs_transfer_syntax: str = "*"
    """DICOMweb source: transfer syntax asked for: ``*`` as stored (the PACS's files, byte for
    byte, no transcoding on the server), or a UID, e.g. ``1.2.840.10008.1.2.1`` to have the
    server decompress."""
