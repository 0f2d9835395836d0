"""STOW-RS: send DICOM files to a PACS over DICOMweb (PS3.18 10.5), with bounded retries.

:func:`stow_rs` POSTs the files as one ``multipart/related; type="application/dicom"`` request to
``<url>/studies`` (or to ``url`` itself when it already ends in ``/studies`` or
``/studies/<uid>``) and reads the PS3.18 response: HTTP 200 all stored; 202 stored with warnings
or some failed (the Failed SOP Sequence says which); 409 none stored. Connection errors,
timeouts and HTTP 408/429/5xx are retried up to ``retries`` times with exponential backoff; any
other answer is final. Standard library only (urllib), so it runs anywhere umit runs.

Credentials are never part of the URL (it is logged and saved with the prediction config):
``auth`` is a ``(user, password)`` pair for HTTP Basic or a bearer token string; ``umit
predict --stow`` reads them from ``UMIT_STOW_USER``/``UMIT_STOW_PASSWORD`` or
``UMIT_STOW_TOKEN`` (:func:`auth_from_env`).
"""

from __future__ import annotations

import base64
import http.client
import json
import logging
import os
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from umit.errors import UmitError

log = logging.getLogger(__name__)

RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
"""HTTP answers worth another try: timeouts, rate limits and server-side trouble."""

_FAILED_SOP_SEQUENCE = "00081198"
_REFERENCED_SOP_SEQUENCE = "00081199"
_REFERENCED_SOP_INSTANCE_UID = "00081155"
_FAILURE_REASON = "00081197"

Auth = tuple[str, str] | str | None


class StowError(UmitError):
    """A STOW-RS request failed for good (after its retries, or with a final HTTP answer)."""


@dataclass
class StowResult:
    """The outcome of one STOW-RS request.

    Attributes:
        status: The final HTTP status.
        stored: SOP Instance UIDs the server reports stored (Referenced SOP Sequence).
        failed: ``{SOP Instance UID: failure reason code}`` (Failed SOP Sequence).
        attempts: Requests sent (1 + retries used).
        url: Where the files went.
    """

    status: int
    stored: list[str] = field(default_factory=list)
    failed: dict[str, int | None] = field(default_factory=dict)
    attempts: int = 1
    url: str = ""


def studies_url(url: str) -> str:
    """The STOW-RS target of a DICOMweb root (``.../dicom-web`` -> ``.../dicom-web/studies``).

    Raises:
        ValueError: not an http(s) URL, or one carrying credentials.
    """
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"STOW-RS URL must be http(s)://host[:port]/path, got {url!r}")
    if parts.username is not None or parts.password is not None:
        raise ValueError(
            "STOW-RS URL carries credentials: give them in UMIT_STOW_USER/UMIT_STOW_PASSWORD "
            "(or UMIT_STOW_TOKEN), never in the URL, which is logged and saved"
        )
    path = parts.path.rstrip("/")
    segments = path.split("/")
    if segments[-1] != "studies" and (len(segments) < 2 or segments[-2] != "studies"):
        path = f"{path}/studies"
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, path, parts.query, ""))


def auth_from_env(env: Mapping[str, str] | None = None) -> Auth:
    """``(UMIT_STOW_USER, UMIT_STOW_PASSWORD)``, else ``UMIT_STOW_TOKEN``, else None."""
    env = os.environ if env is None else env
    if env.get("UMIT_STOW_USER"):
        return env["UMIT_STOW_USER"], env.get("UMIT_STOW_PASSWORD", "")
    return env.get("UMIT_STOW_TOKEN") or None


def multipart_body(paths: Sequence[str | Path], boundary: str) -> bytes:
    """The ``multipart/related`` body: one ``application/dicom`` part per file."""
    parts = []
    for path in paths:
        parts.append(
            f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
            + Path(path).read_bytes()
            + b"\r\n"
        )
    return b"".join(parts) + f"--{boundary}--\r\n".encode()


def _headers(boundary: str, auth: Auth) -> dict[str, str]:
    headers = {
        "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
        "Accept": "application/dicom+json",
    }
    if isinstance(auth, tuple):
        token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        headers["Authorization"] = f"Basic {token}"
    elif auth:
        headers["Authorization"] = f"Bearer {auth}"
    return headers


def _parse_response(status: int, body: bytes) -> StowResult:
    """Stored and failed instances from the PS3.18 DICOM JSON answer (empty when not JSON)."""
    result = StowResult(status)
    try:
        doc = json.loads(body.decode("utf-8")) if body.strip() else {}
    except (UnicodeDecodeError, json.JSONDecodeError):
        return result
    if isinstance(doc, list):  # some servers wrap the one dataset in a list
        doc = doc[0] if doc else {}
    if not isinstance(doc, dict):
        return result

    def items(tag: str) -> list[dict]:
        return list((doc.get(tag) or {}).get("Value") or [])

    def value(item: dict, tag: str):
        v = (item.get(tag) or {}).get("Value") or [None]
        return v[0]

    result.stored = [
        str(value(i, _REFERENCED_SOP_INSTANCE_UID)) for i in items(_REFERENCED_SOP_SEQUENCE)
    ]
    for i in items(_FAILED_SOP_SEQUENCE):
        reason = value(i, _FAILURE_REASON)
        result.failed[str(value(i, _REFERENCED_SOP_INSTANCE_UID))] = (
            int(reason) if reason is not None else None
        )
    return result


def stow_rs(
    paths: Sequence[str | Path],
    url: str,
    auth: Auth = None,
    timeout: float = 60.0,
    retries: int = 3,
    *,
    backoff: float = 1.0,
) -> StowResult:
    """Send DICOM files to a DICOMweb server in one STOW-RS request.

    Args:
        paths: DICOM Part 10 files.
        url: The DICOMweb root (``http://pacs:8042/dicom-web``) or its ``/studies`` endpoint.
        auth: ``(user, password)`` for HTTP Basic, a bearer token, or None.
        timeout: Seconds to wait for each attempt's connection and answer.
        retries: Further attempts after a connection error, timeout or HTTP 408/429/5xx.
        backoff: Wait before retry ``n`` is ``backoff * 2**(n-1)`` seconds.

    Returns:
        The server's answer for HTTP 200 and 202 (``failed`` lists refused instances for 202).

    Raises:
        ValueError: no files, a bad URL, negative ``retries`` or non-positive ``timeout``.
        StowError: every attempt failed, or a final HTTP error (400, 401, 403, 409, ...).
    """
    if not paths:
        raise ValueError("stow_rs needs at least one file")
    if retries < 0:
        raise ValueError(f"retries must be >= 0, got {retries}")
    if not timeout > 0:
        raise ValueError(f"timeout must be > 0, got {timeout}")
    target = studies_url(url)
    boundary = f"umit-{uuid.uuid4().hex}"
    body = multipart_body(paths, boundary)
    headers = _headers(boundary, auth)
    last = ""
    for attempt in range(1, retries + 2):
        if attempt > 1:
            time.sleep(backoff * 2 ** (attempt - 2))
        request = urllib.request.Request(target, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as answer:
                result = _parse_response(answer.status, answer.read())
        except urllib.error.HTTPError as exc:
            answer_body = exc.read()
            detail = answer_body[:300].decode("utf-8", "replace").strip()
            last = f"HTTP {exc.code} {exc.reason}" + (f": {detail}" if detail else "")
            if exc.code not in RETRY_STATUS:
                failed = _parse_response(exc.code, answer_body).failed
                if failed:
                    last = f"HTTP {exc.code} {exc.reason}; failed instances {failed}"
                raise StowError(f"STOW-RS to {target} refused: {last}") from exc
        except (
            urllib.error.URLError,
            TimeoutError,
            ConnectionError,
            http.client.HTTPException,
        ) as exc:
            reason = getattr(exc, "reason", exc)
            last = f"{type(reason).__name__}: {reason}"
        else:
            result.attempts, result.url = attempt, target
            if result.failed:
                log.warning("STOW-RS to %s: %d instance(s) failed", target, len(result.failed))
            return result
        if attempt <= retries:
            log.warning("STOW-RS to %s, attempt %d failed (%s): retrying", target, attempt, last)
    raise StowError(f"STOW-RS to {target} failed after {retries + 1} attempt(s): {last}")
