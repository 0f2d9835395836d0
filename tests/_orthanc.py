"""A real PACS for tests: Orthanc (Debian ``orthanc`` + ``orthanc-dicomweb``) on loopback.

:func:`start_orthanc` runs ``Orthanc CONFIG.json`` in the foreground with its own config: HTTP
and DICOM ports chosen free at run time, storage in a given folder, the DICOMweb plugin on
``/dicom-web/``, remote access refused, authentication on with a user and password made per
run. It returns an :class:`Orthanc` handle once ``GET /system`` answers; :meth:`Orthanc.stop`
(SIGTERM, wait, then SIGKILL) leaves nothing running.

In tests use the fixtures of ``tests/conftest.py``:

* ``orthanc`` (session scope): one server for the whole session, shared; tests mark
  themselves ``@pytest.mark.pacs``; it skips with a reason when Orthanc is not installed.
* ``orthanc_empty`` (function scope): the same server, emptied before the test.

Example::

    @pytest.mark.pacs
    def test_something(orthanc_empty, tmp_path):
        orthanc_empty.upload(folder_of_dicom)          # POST /instances, file by file
        studies = orthanc_empty.rest("/studies")        # Orthanc's REST API, JSON
        client = orthanc_empty.client()                 # umit.ingest.dicomweb.DicomWebClient
        url = orthanc_empty.ingest_url                  # "dicomweb+http://127.0.0.1:PORT/dicom-web"

Outside pytest (a benchmark, a manual session) the same works as a context manager::

    with start_orthanc(Path("/tmp/orthanc")) as server: ...

``$UMIT_ORTHANC`` and ``$UMIT_ORTHANC_DICOMWEB`` point at another Orthanc binary / plugin.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ORTHANC_BINARY = "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
INSTALL_HINT = "run .ci/system-packages as root, or apt-get install orthanc orthanc-dicomweb"


def orthanc_paths() -> tuple[str, str] | str:
    """``(binary, plugin)`` or the reason Orthanc cannot be used here (a skip message)."""
    binary = os.environ.get("UMIT_ORTHANC") or shutil.which("Orthanc") or ORTHANC_BINARY
    plugin = os.environ.get("UMIT_ORTHANC_DICOMWEB", DICOMWEB_PLUGIN)
    if not os.access(binary, os.X_OK):
        return f"Orthanc not found at {binary} ({INSTALL_HINT})"
    if not Path(plugin).is_file():
        return f"Orthanc's DICOMweb plugin not found at {plugin} ({INSTALL_HINT})"
    return binary, plugin


def _has_preamble(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(132)[128:] == b"DICM"


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Orthanc:
    """A running Orthanc: where it listens, how to log in, and helpers for tests.

    Attributes:
        url: REST root, ``http://127.0.0.1:PORT``.
        dicomweb_url: DICOMweb root, ``http://127.0.0.1:PORT/dicom-web``.
        auth: ``(user, password)``, made for this run.
        http_port: The HTTP port.
        dicom_port: The DICOM (DIMSE) port; AE title :attr:`aet`.
        aet: Orthanc's AE title.
        workdir: Config, storage and ``orthanc.log`` of this server.
    """

    url: str
    dicomweb_url: str
    auth: tuple[str, str]
    http_port: int
    dicom_port: int
    aet: str
    workdir: Path
    process: subprocess.Popen = field(repr=False)

    @property
    def ingest_url(self) -> str:
        """The source ``umit ingest`` takes: ``dicomweb+http://127.0.0.1:PORT/dicom-web``."""
        return f"dicomweb+{self.dicomweb_url}"

    @property
    def log_path(self) -> Path:
        return self.workdir / "orthanc.log"

    def write_auth_file(self, path: Path) -> Path:
        """``user:password`` into ``path`` (mode 0600), as ``--auth-file`` reads it."""
        path.write_text(f"{self.auth[0]}:{self.auth[1]}\n")
        path.chmod(0o600)
        return path

    def client(self, **kw: Any) -> Any:
        """A :class:`umit.ingest.dicomweb.DicomWebClient` logged in to this server."""
        from umit.ingest.dicomweb import DicomWebClient

        return DicomWebClient(self.dicomweb_url, auth=self.auth, **kw)

    def rest(self, path: str, method: str = "GET", body: bytes | None = None) -> Any:
        """One call to Orthanc's REST API; returns the decoded JSON (None when empty)."""
        token = base64.b64encode(f"{self.auth[0]}:{self.auth[1]}".encode()).decode()
        request = urllib.request.Request(
            self.url + path, data=body, method=method, headers={"Authorization": f"Basic {token}"}
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            data = response.read()
        return json.loads(data) if data else None

    def upload(self, path: str | Path) -> list[str]:
        """POST a DICOM file, or every DICOM file under a folder (those with the ``DICM``
        preamble; README, LICENSE... are left out), to ``/instances``; returns the Orthanc ids
        of the stored instances. A file Orthanc refuses raises HTTPError."""
        path = Path(path)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and _has_preamble(p))
        else:
            files = [path]
        return [self.rest("/instances", "POST", f.read_bytes())["ID"] for f in files]

    def clear(self) -> None:
        """Delete every patient (and so every study, series and instance)."""
        for patient in self.rest("/patients"):
            self.rest(f"/patients/{patient}", "DELETE")

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout_s: float = 20.0) -> None:
        """SIGTERM, wait up to ``timeout_s``, then SIGKILL; returns once the process is gone."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self) -> Orthanc:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_orthanc(workdir: Path, *, ready_timeout_s: float = 60.0, attempts: int = 3) -> Orthanc:
    """Start Orthanc in the foreground under ``workdir`` and wait until it answers.

    A start that fails (e.g. a port taken between choosing and binding it) is tried again with
    new ports, ``attempts`` times in all.

    Raises:
        RuntimeError: Orthanc is not installed, exited, or did not answer in time (its log is
            quoted); the process is stopped first.
    """
    for attempt in range(1, attempts + 1):
        try:
            return _start(Path(workdir) / f"run{attempt}", ready_timeout_s)
        except RuntimeError:
            if attempt == attempts or isinstance(orthanc_paths(), str):
                raise
    raise AssertionError("unreachable")


def _start(workdir: Path, ready_timeout_s: float) -> Orthanc:
    found = orthanc_paths()
    if isinstance(found, str):
        raise RuntimeError(found)
    binary, plugin = found
    workdir.mkdir(parents=True, exist_ok=True)
    user, password = "umit-test", secrets.token_urlsafe(16)
    http_port, dicom_port = free_port(), free_port()
    while dicom_port == http_port:
        dicom_port = free_port()
    storage = workdir / "storage"
    config = {
        "Name": "umit-test-pacs",
        "StorageDirectory": str(storage),
        "IndexDirectory": str(storage),
        "HttpPort": http_port,
        "DicomPort": dicom_port,
        "DicomAet": "UMITTESTPACS",
        "RemoteAccessAllowed": False,  # Orthanc 1.10 cannot bind to loopback only: refuse others
        "AuthenticationEnabled": True,
        "RegisteredUsers": {user: password},
        "Plugins": [plugin],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False},
        # the DICOM port only answers modalities registered here: none, by default
        "DicomAlwaysAllowEcho": False,
        "DicomAlwaysAllowStore": False,
        "DicomAlwaysAllowFind": False,
        "DicomAlwaysAllowMove": False,
        "DicomAlwaysAllowGet": False,
        "DicomCheckModalityHost": True,
        "StorageCompression": False,
        "HttpCompressionEnabled": False,
        "ExecuteLuaEnabled": False,
        "RestApiWriteToFileSystemEnabled": False,
    }
    config_path = workdir / "orthanc.json"
    config_path.write_text(json.dumps(config, indent=2))
    config_path.chmod(0o600)  # it holds the password
    log = open(workdir / "orthanc.log", "wb")  # noqa: SIM115 (the child writes to it)
    process = subprocess.Popen(
        [binary, str(config_path)],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        cwd=workdir,
        start_new_session=True,  # a Ctrl-C in the terminal reaches pytest, not Orthanc first
    )
    log.close()
    server = Orthanc(
        url=f"http://127.0.0.1:{http_port}",
        dicomweb_url=f"http://127.0.0.1:{http_port}/dicom-web",
        auth=(user, password),
        http_port=http_port,
        dicom_port=dicom_port,
        aet="UMITTESTPACS",
        workdir=workdir,
        process=process,
    )
    deadline = time.monotonic() + ready_timeout_s
    while True:
        if process.poll() is not None:
            break
        try:
            if server.rest("/system").get("Version"):
                return server
        except (urllib.error.URLError, ConnectionError, OSError, ValueError):
            pass
        if time.monotonic() > deadline:
            break
        time.sleep(0.1)
    server.stop()
    tail = server.log_path.read_text(errors="replace")[-2000:]
    raise RuntimeError(
        f"Orthanc did not start (exit status {process.returncode}) within {ready_timeout_s} s; "
        f"log {server.log_path}:\n{tail}"
    )
