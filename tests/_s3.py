"""An S3-compatible server for tests: moto's standalone server on 127.0.0.1 (a free port).

:func:`start_s3` starts ``moto.server.ThreadedMotoServer`` in this process and returns the
settings a client needs (endpoint, fake credentials, region) as environment variables; s3fs and
botocore read ``AWS_ENDPOINT_URL`` and the keys from the environment, as they would for AWS,
MinIO or Ceph. In tests use the ``s3`` fixture of ``tests/conftest.py`` (session scope, marker
``s3``; skips with a reason when moto is not installed) and ``s3_bucket`` (a fresh bucket URL).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class S3Server:
    server: Any
    endpoint: str

    @property
    def env(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": "umit-test",
            "AWS_SECRET_ACCESS_KEY": "umit-test-secret",
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def stop(self) -> None:
        self.server.stop()


def start_s3() -> S3Server:
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    return S3Server(server, f"http://{host}:{port}")
