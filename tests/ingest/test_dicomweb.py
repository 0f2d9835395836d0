"""The DICOMweb client: URL and credential checks, the streaming multipart parser, retries,
timeouts and refused redirects (against a tiny local HTTP server), STOW-RS against a scripted
server (bodies, retries, per-instance refusals), and QIDO/WADO/STOW against a real Orthanc
(``pacs``)."""

from __future__ import annotations

import base64
import http.server
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest

from umit.ingest.dicomweb import (
    AUTH_ENV,
    AuthenticationError,
    DicomWebClient,
    DicomWebError,
    ServerUnreachable,
    StoreFailed,
    _MultipartToFiles,
    check_query,
    dicom_json_value,
    is_loopback,
    parse_url,
    read_auth,
)

from _fake_dicomweb import fake_stow, stored_reply
from _orthanc import free_port
from _shared import write_ct_series

# -- URL, credentials, query -------------------------------------------------------------------


def test_parse_url_accepts_dicomweb_and_plain_http():
    assert parse_url("dicomweb+http://127.0.0.1:8042/dicom-web/") == (
        "http://127.0.0.1:8042/dicom-web"
    )
    assert parse_url("https://pacs.example.org/wado") == "https://pacs.example.org/wado"
    assert parse_url("dicomweb+http://[::1]:8042/dw") == "http://[::1]:8042/dw"


@pytest.mark.parametrize(
    "url, words",
    [
        ("dicomweb+http://alice:s3cr3t-pw@127.0.0.1:8042/dicom-web", "credentials"),
        ("dicomweb+http://127.0.0.1:8042/dicom-web?x=1", "query"),
        ("dicomweb+ftp://127.0.0.1/dicom-web", "scheme 'ftp'"),
        ("dicomweb+http://127.0.0.1:99999/dicom-web", "port"),
        ("dicomweb+http://127.0.0.1:8042/dicom-web/studies", "the DICOMweb root"),
        ("http://127.0.0.1:8042/dicom-web/studies/1.2.3", "not a resource below it"),
    ],
)
def test_parse_url_refuses_with_a_reason_that_never_repeats_a_password(url, words):
    with pytest.raises(ValueError, match=words) as err:
        parse_url(url)
    assert "s3cr3t-pw" not in str(err.value)


def test_is_loopback():
    assert is_loopback("dicomweb+http://127.0.0.1:1/x") and is_loopback("http://localhost/x")
    assert is_loopback("http://[::1]:80/x")
    assert not is_loopback("http://10.1.2.3/x") and not is_loopback("http://pacs.example.org/x")


def test_read_auth_order_and_errors(tmp_path):
    f = tmp_path / "auth"
    f.write_text("file-user:pw:with:colons\nignored second line\n")
    f.chmod(0o600)
    env = {AUTH_ENV: "env-user:env-pw"}
    assert read_auth("cli:pw", f, env) == ("cli", "pw")
    assert read_auth(None, f, env) == ("file-user", "pw:with:colons")
    assert read_auth(None, None, env) == ("env-user", "env-pw")
    assert read_auth(None, None, {}) is None
    with pytest.raises(ValueError, match="user:password") as err:
        read_auth("no-colon-s3cr3t")
    assert "s3cr3t" not in str(err.value)
    with pytest.raises(ValueError, match="cannot read the auth file"):
        read_auth(None, tmp_path / "missing", {})


def test_check_query_refuses_unknown_keys():
    q = {"ModalitiesInStudy": "CT", "StudyDate": "20240101-20240131", "0020000D": "1.2", "limit": 5}
    assert check_query(q)["limit"] == "5"
    with pytest.raises(ValueError, match="ModalitiesInStudyy"):
        check_query({"ModalitiesInStudyy": "CT"})


def test_dicom_json_value():
    ds = {"0020000E": {"vr": "UI", "Value": ["1.2.3"]}, "00080060": {"vr": "CS"}}
    assert dicom_json_value(ds, "SeriesInstanceUID") == "1.2.3"
    assert dicom_json_value(ds, "Modality", "?") == "?"
    assert dicom_json_value(ds, "StudyDate") is None


# -- multipart parser --------------------------------------------------------------------------
BOUNDARY = b"b0undary-42"


def _multipart(parts: list[bytes], content_length: bool) -> bytes:
    out = b"preamble to ignore\r\n"
    for p in parts:
        out += b"--" + BOUNDARY + b"  \r\nContent-Type: application/dicom\r\n"
        if content_length:
            out += f"Content-Length: {len(p)}\r\n".encode()
        out += b"\r\n" + p + b"\r\n"
    return out + b"--" + BOUNDARY + b"--\r\nepilogue"


def _feed(body: bytes, folder: Path, chunk: int) -> _MultipartToFiles:
    folder.mkdir()
    parser = _MultipartToFiles(BOUNDARY, folder)
    for i in range(0, len(body), chunk):
        parser.feed(body[i : i + chunk])
    parser.close_file()
    return parser


@pytest.mark.parametrize("content_length", [True, False])
@pytest.mark.parametrize("chunk", [1, 7, 64, 1 << 20])
def test_multipart_parts_land_in_files_whatever_the_chunking(tmp_path, content_length, chunk):
    rng = np.random.default_rng(chunk)
    parts = [
        rng.bytes(300),
        b"",  # an empty part
        b"\r\n--" + BOUNDARY[:-1] + b"x tricky near-boundary bytes\r\n--",
        rng.bytes(1000),
    ]
    parser = _feed(_multipart(parts, content_length), tmp_path / "out", chunk)
    assert parser.finished and parser.n_parts == len(parts)
    assert parser.n_bytes == sum(len(p) for p in parts)
    files = sorted((tmp_path / "out").iterdir())
    assert [f.name for f in files] == [f"{i:05d}.dcm" for i in range(len(parts))]
    assert [f.read_bytes() for f in files] == parts


def test_multipart_truncated_body_is_not_finished(tmp_path):
    body = _multipart([b"x" * 500, b"y" * 500], content_length=False)
    parser = _feed(body[:700], tmp_path / "out", 64)
    assert not parser.finished and parser.n_parts == 1


# -- HTTP behaviour against a tiny local server ------------------------------------------------
class _Handler(http.server.BaseHTTPRequestHandler):
    script: dict = {}
    hits: list = []

    def log_message(self, *args):  # keep pytest output clean
        pass

    def do_GET(self):
        _Handler.hits.append((self.path, self.headers.get("Authorization")))
        action = _Handler.script.get(self.path.split("?")[0], "404")
        if callable(action):
            action = action(len(_Handler.hits))
        if action == "redirect":
            self.send_response(302)
            self.send_header("Location", "http://10.9.9.9/elsewhere")
            self.end_headers()
        elif action == "503":
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif action == "json":
            body = b'[{"0020000D": {"vr": "UI", "Value": ["1.2.3"]}}]'
            self.send_response(200)
            self.send_header("Content-Type", "application/dicom+json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        elif action == "broken":  # promises more than it sends, then hangs up
            body = _multipart([b"z" * 5000], content_length=True)
            self.send_response(200)
            self.send_header(
                "Content-Type",
                f'multipart/related; type="application/dicom"; boundary={BOUNDARY.decode()}',
            )
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[:2000])
            self.wfile.flush()
            self.connection.shutdown(2)
        elif action == "slow":
            time.sleep(3)
        else:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()


@pytest.fixture
def fake_server() -> Iterator[tuple[str, type[_Handler]]]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    _Handler.script, _Handler.hits = {}, []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/dw", _Handler
    server.shutdown()
    server.server_close()


def test_redirects_are_refused_not_followed(fake_server):
    url, handler = fake_server
    handler.script = {"/dw/studies": "redirect"}
    client = DicomWebClient(url, auth=("u", "pw"), retries=2, backoff_s=0)
    with pytest.raises(DicomWebError, match="redirected .*10.9.9.9.*talks only to the URL"):
        client.search_studies()
    assert len(handler.hits) == 1  # no retry, no follow


def test_busy_server_is_retried_a_bounded_number_of_times(fake_server):
    url, handler = fake_server
    handler.script = {"/dw/studies": lambda n: "503" if n < 3 else "json"}
    client = DicomWebClient(url, retries=3, backoff_s=0)
    assert dicom_json_value(client.search_studies({"limit": 1})[0], "StudyInstanceUID") == "1.2.3"
    assert len(handler.hits) == 3
    handler.script, handler.hits[:] = {"/dw/studies": "503"}, []
    with pytest.raises(DicomWebError, match="HTTP 503"):
        DicomWebClient(url, retries=2, backoff_s=0).search_studies({"limit": 1})
    assert len(handler.hits) == 3  # first attempt + 2 retries


def test_broken_transfer_is_retried_from_the_start_then_reported(fake_server, tmp_path):
    url, handler = fake_server
    handler.script = {"/dw/studies/1.2/series/3.4": "broken"}
    client = DicomWebClient(url, retries=1, backoff_s=0)
    with pytest.raises(DicomWebError, match=r"transfer of .* (broke off|ended early).*2 attempt"):
        client.retrieve_series("1.2", "3.4", tmp_path / "s")
    assert len(handler.hits) == 2


def test_read_timeout_is_bounded(fake_server):
    url, handler = fake_server
    handler.script = {"/dw/studies": "slow"}
    client = DicomWebClient(url, timeout_s=0.3, retries=1, backoff_s=0)
    t = time.perf_counter()
    with pytest.raises(DicomWebError, match="no answer within 0.3 s"):
        client.search_studies({"limit": 1})
    assert time.perf_counter() - t < 2.5


def test_server_down_fails_fast_with_a_clear_message():
    url = f"http://127.0.0.1:{free_port()}/dicom-web"
    t = time.perf_counter()
    with pytest.raises(ServerUnreachable, match=r"cannot reach .* after 3 attempt\(s\)"):
        DicomWebClient(url, auth=("u", "pw"), retries=2, backoff_s=0.01).check()
    assert time.perf_counter() - t < 5


def test_credentials_only_in_the_authorization_header(fake_server):
    url, handler = fake_server
    handler.script = {"/dw/studies": "json"}
    client = DicomWebClient(url, auth=("alice", "s3cr3t-pw"))
    client.search_studies({"limit": 1})
    path, authorization = handler.hits[0]
    assert authorization.startswith("Basic ") and "s3cr3t" not in path
    assert "s3cr3t" not in repr(client)


# -- STOW-RS against a scripted server ---------------------------------------------------------
@pytest.fixture
def files(tmp_path) -> list[Path]:
    """Two 'DICOM files' of binary content with CRLFs and a boundary-like run."""
    paths = []
    for n, size in enumerate((1000, 4097)):
        data = bytes(range(256)) * (size // 256) + b"\r\n--umit-\r\n" + bytes([n]) * (size % 256)
        (tmp_path / f"f{n}.dcm").write_bytes(data)
        paths.append(tmp_path / f"f{n}.dcm")
    return paths


def test_stow_sends_each_file_byte_for_byte_as_an_application_dicom_part(files):
    with fake_stow((200, stored_reply(["1.2.3", "1.2.4"]), 0)) as server:
        client = DicomWebClient(server.url, auth=("user", "pa:ss"), retries=0)
        result = client.store_instances(files)
        client.store_instances(files[:1], study_uid="1.2.9")
    first, second = server.received
    assert first.path == "/dicom-web/studies" and second.path == "/dicom-web/studies/1.2.9"
    assert first.headers["Content-Type"].startswith('multipart/related; type="application/dicom"')
    assert first.headers["Accept"] == "application/dicom+json"
    assert first.headers["Authorization"] == "Basic " + base64.b64encode(b"user:pa:ss").decode()
    assert first.parts == [("application/dicom", p.read_bytes()) for p in files]
    assert (result.url, result.status, result.stored, result.failed) == (
        server.url + "/studies", 200, ["1.2.3", "1.2.4"], {},
    )  # fmt: skip
    assert (result.requests, result.attempts) == (1, 1)
    with pytest.raises(ValueError, match="at least one file"):
        client.store_instances([])


def test_stow_retries_busy_answers_a_bounded_number_of_times(files):
    with fake_stow((503, None, 0), (429, None, 0), (200, stored_reply(["1"]), 0)) as server:
        result = DicomWebClient(server.url, retries=3, backoff_s=0).store_instances(files[:1])
    assert (result.status, result.attempts, len(server.received)) == (200, 3, 3)
    with fake_stow((502, None, 0)) as server, pytest.raises(DicomWebError, match="HTTP 502"):
        DicomWebClient(server.url, retries=2, backoff_s=0).store_instances(files[:1])
    assert len(server.received) == 3  # first attempt + 2 retries


@pytest.mark.parametrize("status", [400, 401, 403, 404, 413])
def test_stow_final_http_errors_are_not_retried(files, status):
    error = AuthenticationError if status in (401, 403) else DicomWebError
    with fake_stow((status, {"error": "no"}, 0)) as server, pytest.raises(error) as err:
        DicomWebClient(server.url, auth=("u", "s3cr3t-pw"), retries=3, backoff_s=0).store_instances(
            files
        )
    assert f"HTTP {status}" in str(err.value) and "s3cr3t" not in str(err.value)
    assert len(server.received) == 1


def test_stow_refused_instances_are_reported_one_by_one(files):
    reply = stored_reply(["1.1"], failed={"1.2": 0xA700})
    with fake_stow((202, reply, 0)) as server, pytest.raises(StoreFailed) as err:
        DicomWebClient(server.url, retries=0).store_instances(files)
    result = err.value.result
    assert (result.status, result.stored, result.failed) == (202, ["1.1"], {"1.2": 0xA700})
    assert "refused 1 of 2 instance(s) (HTTP 202; first 1.2: FailureReason 0xA700 out of" in str(
        err.value
    )
    # 409: none stored, reasons given; a final answer (not retried)
    refused = pytest.raises(StoreFailed, match="HTTP 409; first 1.2: .*0xC000 cannot understand")
    with fake_stow((409, stored_reply([], failed={"1.2": 0xC000}), 0)) as server, refused:
        DicomWebClient(server.url, retries=3, backoff_s=0).store_instances(files)
    assert len(server.received) == 1
    with fake_stow((409, None, 0)) as server, pytest.raises(DicomWebError, match="HTTP 409"):
        DicomWebClient(server.url, retries=3, backoff_s=0).store_instances(files)
    # batches: every batch is sent, the refusals of all are gathered
    replies = [(202, stored_reply([], failed={"a": 0xA900}), 0), (200, stored_reply(["b"]), 0)]
    with fake_stow(*replies) as server, pytest.raises(StoreFailed) as err:
        DicomWebClient(server.url, retries=0).store_instances(files, max_request_bytes=1500)
    assert len(server.received) == 2
    assert (err.value.result.stored, err.value.result.failed) == (["b"], {"a": 0xA900})


def test_stow_timeouts_and_refused_connections_are_retried_then_reported(files):
    with fake_stow((200, {}, 1.5)) as server:
        client = DicomWebClient(server.url, timeout_s=0.3, retries=1, backoff_s=0)
        with pytest.raises(DicomWebError, match=r"no answer within 0.3 s .*2 attempt\(s\)"):
            client.store_instances(files[:1])
    assert len(server.received) == 2
    url = f"http://127.0.0.1:{free_port()}/dicom-web"  # nobody listens there
    refused = pytest.raises(ServerUnreachable, match=r"after 2 attempt\(s\).*Connection refused")
    with refused:
        DicomWebClient(url, retries=1, backoff_s=0).store_instances(files[:1])


# -- against a real Orthanc --------------------------------------------------------------------
def _two_studies(tmp_path: Path) -> dict[str, list[Path]]:
    rng = np.random.default_rng(0)
    ct = write_ct_series(tmp_path / "ct", rng.integers(0, 900, (16, 12, 5)).astype(np.int16))
    mr = write_ct_series(
        tmp_path / "mr",
        rng.integers(0, 900, (10, 10, 4)).astype(np.int16),
        modality="MR",
        extra={"PatientID": "OTHER-1"},
    )
    return {"CT": ct, "MR": mr}


@pytest.mark.pacs
def test_stow_qido_wado_round_trip(orthanc_empty, tmp_path):
    files = _two_studies(tmp_path)
    client = orthanc_empty.client(page_size=1)  # page_size=1: paging must gather both
    sent = client.store_instances([*files["CT"], *files["MR"]], max_request_bytes=3000)
    assert sent.requests > 1  # split into several STOW-RS requests
    assert (sent.status, sent.attempts, sent.failed) == (200, sent.requests, {})
    assert sorted(sent.stored) == sorted(
        pydicom.dcmread(p).SOPInstanceUID for p in [*files["CT"], *files["MR"]]
    )
    studies = client.search_studies()
    assert len(studies) == 2
    mr = client.search_studies({"ModalitiesInStudy": "MR"})
    assert [dicom_json_value(s, "ModalitiesInStudy") for s in mr] == ["MR"]
    ct_ds = pydicom.dcmread(files["CT"][0])
    series = client.search_series(ct_ds.StudyInstanceUID)
    assert [dicom_json_value(s, "SeriesInstanceUID") for s in series] == [ct_ds.SeriesInstanceUID]
    got = client.retrieve_series(ct_ds.StudyInstanceUID, ct_ds.SeriesInstanceUID, tmp_path / "got")
    assert got.n_instances == 5 and got.attempts == 1
    sent = {pydicom.dcmread(p).SOPInstanceUID: pydicom.dcmread(p) for p in files["CT"]}
    for path in sorted(got.folder.iterdir()):
        ds = pydicom.dcmread(path)
        assert np.array_equal(ds.pixel_array, sent[ds.SOPInstanceUID].pixel_array)
    assert len(client.search_instances(ct_ds.StudyInstanceUID, ct_ds.SeriesInstanceUID)) == 5


@pytest.mark.pacs
def test_wrong_password_is_an_authentication_error(orthanc):
    client = DicomWebClient(orthanc.dicomweb_url, auth=(orthanc.auth[0], "wrong"))
    with pytest.raises(AuthenticationError, match="authentication failed for http://127.0.0.1"):
        client.check()
    with pytest.raises(AuthenticationError):
        DicomWebClient(orthanc.dicomweb_url).check()  # no credentials at all


# -- the Orthanc launcher itself ---------------------------------------------------------------
def test_orthanc_paths_gives_a_skip_reason_when_not_installed(monkeypatch, tmp_path):
    from _orthanc import orthanc_paths

    monkeypatch.setenv("UMIT_ORTHANC", str(tmp_path / "no-orthanc"))
    reason = orthanc_paths()
    assert isinstance(reason, str) and "Orthanc not found" in reason and "apt-get" in reason


@pytest.mark.pacs
def test_orthanc_launcher_refuses_strangers_and_leaves_nothing_running(orthanc, tmp_path):
    import socket

    from _orthanc import start_orthanc

    server = start_orthanc(tmp_path / "second")  # a second one: the session's keeps running
    with server:
        assert server.rest("/system")["Version"]
        config = json.loads((server.workdir / "orthanc.json").read_text())
        assert config["RemoteAccessAllowed"] is False and config["AuthenticationEnabled"]
        assert server.auth[1] != orthanc.auth[1]  # a password per run
        with pytest.raises(AuthenticationError):
            DicomWebClient(server.dicomweb_url, auth=(server.auth[0], "x")).check()
    assert server.process.poll() is not None
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", server.http_port), 1):
        pass
