"""STOW-RS client against a local fake DICOMweb server: the multipart body carries each file
byte for byte, credentials go in the header, transient failures are retried a bounded number of
times and final ones are not, and the server's per-instance answer is read."""

from __future__ import annotations

import base64
import socket

import pytest
from _fake_dicomweb import fake_stow, stored_reply

from umit.inference.stow import StowError, auth_from_env, stow_rs, studies_url


@pytest.fixture
def files(tmp_path):
    paths = []
    for n, size in enumerate((1000, 4097)):  # binary content with CRLFs and a boundary-like run
        data = bytes(range(256)) * (size // 256) + b"\r\n--umit-\r\n" + bytes([n]) * (size % 256)
        (tmp_path / f"f{n}.dcm").write_bytes(data)
        paths.append(tmp_path / f"f{n}.dcm")
    return paths


def test_files_go_byte_for_byte_as_application_dicom_parts(files):
    with fake_stow((200, stored_reply(["1.2.3", "1.2.4"]), 0)) as server:
        result = stow_rs(files, server.url, ("user", "pa:ss"), timeout=10, retries=0)
    (req,) = server.received
    assert req.path == "/dicom-web/studies"
    assert req.headers["Content-Type"].startswith('multipart/related; type="application/dicom"')
    assert req.headers["Accept"] == "application/dicom+json"
    assert req.headers["Authorization"] == "Basic " + base64.b64encode(b"user:pa:ss").decode()
    assert req.parts == [("application/dicom", p.read_bytes()) for p in files]
    assert (result.status, result.stored, result.failed, result.attempts) == (
        200, ["1.2.3", "1.2.4"], {}, 1,
    )  # fmt: skip


def test_transient_failures_are_retried_a_bounded_number_of_times(files):
    with fake_stow((503, None, 0), (429, None, 0), (200, stored_reply(["1"]), 0)) as server:
        result = stow_rs(files[:1], server.url + "/studies", "tok", retries=3, backoff=0)
    assert result.attempts == 3 and len(server.received) == 3
    assert server.received[0].headers["Authorization"] == "Bearer tok"
    assert all(r.path == "/dicom-web/studies" for r in server.received)

    with fake_stow((502, None, 0)) as server, pytest.raises(StowError, match="after 3 attempt"):
        stow_rs(files[:1], server.url, retries=2, backoff=0)
    assert len(server.received) == 3


@pytest.mark.parametrize("status", [400, 401, 403, 404, 413])
def test_final_http_errors_are_not_retried(files, status):
    refused = pytest.raises(StowError, match=f"refused: HTTP {status}")
    with fake_stow((status, {"error": "no"}, 0)) as server, refused:
        stow_rs(files, server.url, retries=3, backoff=0)
    assert len(server.received) == 1


def test_partial_and_total_refusals_name_the_failed_instances(files):
    reply = stored_reply(["1.1"], failed={"1.2": 0xA700})
    with fake_stow((202, reply, 0)) as server:
        result = stow_rs(files, server.url, retries=0)
    assert result.status == 202 and result.stored == ["1.1"] and result.failed == {"1.2": 0xA700}
    refused = pytest.raises(StowError, match=r"HTTP 409 .*'1.2': 49152")
    with fake_stow((409, stored_reply([], failed={"1.2": 0xC000}), 0)) as server, refused:
        stow_rs(files, server.url, retries=3, backoff=0)
    assert len(server.received) == 1


def test_timeouts_and_refused_connections_are_retried_then_reported(files):
    with fake_stow((200, {}, 1.5)) as server, pytest.raises(StowError, match="2 attempt"):
        stow_rs(files[:1], server.url, timeout=0.3, retries=1, backoff=0)
    assert len(server.received) == 2
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(StowError, match="failed after 2 attempt.*Connection"):
        stow_rs(files[:1], f"http://127.0.0.1:{port}/dicom-web", retries=1, backoff=0)


def test_urls_arguments_and_credentials_from_the_environment(files):
    assert studies_url("http://pacs:8042/dicom-web/") == "http://pacs:8042/dicom-web/studies"
    assert studies_url("https://pacs/dw/studies") == "https://pacs/dw/studies"
    assert studies_url("https://pacs/dw/studies/1.2.3") == "https://pacs/dw/studies/1.2.3"
    with pytest.raises(ValueError, match="carries credentials"):
        studies_url("http://user:secret@pacs/dicom-web")
    with pytest.raises(ValueError, match="must be http"):
        studies_url("ftp://pacs/dicom-web")
    with pytest.raises(ValueError, match="at least one file"):
        stow_rs([], "http://pacs/dw")
    with pytest.raises(ValueError, match="retries must be >= 0"):
        stow_rs(files, "http://pacs/dw", retries=-1)
    assert auth_from_env({"UMIT_STOW_USER": "u", "UMIT_STOW_PASSWORD": "p"}) == ("u", "p")
    assert auth_from_env({"UMIT_STOW_TOKEN": "t"}) == "t"
    assert auth_from_env({}) is None
