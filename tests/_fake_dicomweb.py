"""A tiny stand-in for a DICOMweb server's STOW-RS endpoint (http.server on 127.0.0.1).

It records every request (path, headers, the DICOM parts of the multipart body) and answers
from a script of ``(status, json_body, delay_s)`` replies, repeating the last one: for what a
real PACS will not do on demand (answer 503 twice, time out, refuse one instance of two). What
a real PACS does with the files is tested against Orthanc (``tests/_orthanc.py``).
"""

from __future__ import annotations

import email
import email.policy
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Received:
    path: str
    headers: Message  # case-insensitive, as HTTP header names are
    parts: list[tuple[str, bytes]]  # (content type, payload) of each multipart part


@dataclass
class FakeStow:
    replies: list[tuple[int, Any, float]]
    received: list[Received] = field(default_factory=list)
    url: str = ""

    def next_reply(self) -> tuple[int, Any, float]:
        n = len(self.received) - 1
        return self.replies[min(n, len(self.replies) - 1)]


def split_multipart(content_type: str, body: bytes) -> list[tuple[str, bytes]]:
    msg = email.message_from_bytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + body, policy=email.policy.HTTP
    )
    assert msg.is_multipart(), content_type
    return [(p.get_content_type(), p.get_payload(decode=True)) for p in msg.iter_parts()]


def stored_reply(sop_uids: list[str], failed: dict[str, int] | None = None) -> dict[str, Any]:
    """A PS3.18 STOW-RS answer in DICOM JSON."""

    def item(uid: str, reason: int | None = None) -> dict[str, Any]:
        d: dict[str, Any] = {"00081155": {"vr": "UI", "Value": [uid]}}
        if reason is not None:
            d["00081197"] = {"vr": "US", "Value": [reason]}
        return d

    doc: dict[str, Any] = {"00081199": {"vr": "SQ", "Value": [item(u) for u in sop_uids]}}
    if failed:
        doc["00081198"] = {"vr": "SQ", "Value": [item(u, r) for u, r in failed.items()]}
    return doc


@contextmanager
def fake_stow(*replies: tuple[int, Any, float]) -> Iterator[FakeStow]:
    """Serve on a free port of 127.0.0.1 until the block ends."""
    state = FakeStow(list(replies) or [(200, {}, 0.0)])

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 (http.server's naming)
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            parts = split_multipart(self.headers["Content-Type"], body)
            state.received.append(Received(self.path, self.headers, parts))
            status, doc, delay = state.next_reply()
            time.sleep(delay)
            payload = json.dumps(doc).encode() if doc is not None else b""
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/dicom+json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
            except (BrokenPipeError, ConnectionResetError):  # the client timed out
                pass

        def log_message(self, *args):  # keep test output clean
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}/dicom-web"
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
