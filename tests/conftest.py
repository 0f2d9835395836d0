"""Shared pytest set-up.

This file's presence puts ``tests/`` on ``sys.path`` (pytest's default "prepend" import mode), so
test modules in sub-folders can ``from _shared import ...`` (real-data location, fixture
factories).
"""

import os
from pathlib import Path

import pytest
import torch

# precision=auto is the default of train and predict; the suite's reference numbers are fp32
# whatever the CPU (bf16 on a machine with AVX-512 BF16 would shift them), so auto is pinned to
# fp32 here and in subprocesses. tests/train/test_precision.py unpins it to test the decision.
os.environ.setdefault("UMIT_AUTO_PRECISION", "fp32")

from _orthanc import Orthanc, orthanc_paths, start_orthanc


@pytest.fixture(scope="session")
def tiny_ct_store(tmp_path_factory) -> Path:
    """PREP folder of 10 small CT phantoms (2 in the test split): phantoms -> ingest -> preprocess."""
    from umit.data.phantoms import write_phantom_collection
    from umit.ingest.run import IngestConfig
    from umit.ingest.run import run as ingest
    from umit.preprocess.run import PreprocessConfig
    from umit.preprocess.run import run as preprocess

    root = tmp_path_factory.mktemp("tiny_ct")
    write_phantom_collection(root / "src", n=8, n_test=2, modality="ct", seed=3, shape=(40, 40, 24))
    ingest(IngestConfig(src=root / "src", out=root / "raw"), progress=False)
    preprocess(
        PreprocessConfig(
            raw=root / "raw", out=root / "prep", workers=1, target_spacing=(2.0, 2.0, 3.0)
        )
    )
    return root / "prep"


@pytest.fixture
def one_thread():
    """Tiny tensors: on a shared machine OpenMP wake-ups cost more than the work."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def register_models():
    """Register stand-in models for one test and remove them afterwards, so that
    ``list_models()`` never depends on which tests ran before."""
    from umit.models.registry import register_model, unregister_model

    added: list[str] = []

    def add(*fns):
        for fn in fns:
            register_model(fn)
            added.append(fn.__name__)

    yield add
    for name in added:
        unregister_model(name)


@pytest.fixture(scope="session")
def orthanc(tmp_path_factory) -> Orthanc:
    """A real PACS for the session: Orthanc with DICOMweb on 127.0.0.1, its own user and
    password, free ports, storage in a temp folder (``tests/_orthanc.py`` has the API). Shared
    by every test of the session: use ``orthanc_empty`` to start from an empty server. Skips
    with a reason where Orthanc is not installed; stopped (SIGTERM, then SIGKILL) at the end."""
    found = orthanc_paths()
    if isinstance(found, str):
        pytest.skip(found)
    server = start_orthanc(tmp_path_factory.mktemp("orthanc"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def orthanc_empty(orthanc) -> Orthanc:
    """The session's Orthanc with every study deleted first."""
    orthanc.clear()
    return orthanc


@pytest.fixture(scope="session")
def postgres():
    """A PostgreSQL server for the session (``tests/_postgres.py``): initdb/pg_ctl in a temp
    folder on a free loopback port, stopped at the end. Skips with a reason when PostgreSQL's
    binaries are absent."""
    from _postgres import postgres_bin, start_postgres

    found = postgres_bin()
    if isinstance(found, str):
        pytest.skip(found)
    import shutil
    import tempfile

    # not under pytest's basetemp: that is 0700 and re-chmodded, and the server runs as nobody
    folder = Path(tempfile.mkdtemp(prefix="umit-postgres-"))
    try:
        server = start_postgres(folder)
        try:
            yield server
        finally:
            server.stop()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def pg_url(postgres, request) -> str:
    """A fresh, empty database on the session's PostgreSQL server, as a URL with a password."""
    import re

    name = "t_" + re.sub(r"[^a-z0-9]", "_", request.node.name.lower())[:50]
    return postgres.create_database(name)


@pytest.fixture(scope="session")
def s3():
    """moto's S3 server on loopback for the session (``tests/_s3.py``), its endpoint and fake
    credentials in the environment while it runs. Skips with a reason without moto."""
    import os

    try:
        import moto.server  # noqa: F401
        import s3fs  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"moto[server] / s3fs not installed (extra `scale`): {exc}")
    from _s3 import start_s3

    server = start_s3()
    saved = {k: os.environ.get(k) for k in server.env}
    os.environ.update(server.env)
    try:
        yield server
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def s3_bucket(s3, request) -> str:
    """``s3://<fresh bucket>`` on the session's S3 server."""
    import re
    import uuid

    import s3fs

    name = re.sub(r"[^a-z0-9]", "-", request.node.name.lower())[:40].strip("-")
    name = f"{name}-{uuid.uuid4().hex[:8]}"
    fs = s3fs.S3FileSystem()
    fs.mkdir(name)
    return f"s3://{name}"
