"""A real PostgreSQL server for tests: Debian ``postgresql``'s initdb/pg_ctl in a temp folder.

:func:`start_postgres` makes a cluster in a given folder (``initdb`` with a superuser ``umit``
and a password made per run, scram-sha-256 on TCP), starts it on a free 127.0.0.1 port with
its socket in that folder and returns a :class:`Postgres` handle; :meth:`Postgres.stop`
(``pg_ctl stop -m fast``) leaves nothing running. PostgreSQL refuses to run as root, so as root
the cluster belongs to ``nobody`` and the commands run through ``runuser``.

In tests use the fixtures of ``tests/conftest.py``: ``postgres`` (session scope, marker
``postgres``; skips with a reason when the binaries are absent) and ``pg_url`` (a fresh,
empty database per test, as a URL with the password in it).
"""

from __future__ import annotations

import glob
import os
import secrets
import shutil
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

INSTALL_HINT = "run .ci/system-packages as root, or apt-get install postgresql"
UNPRIVILEGED = "nobody"


def postgres_bin() -> Path | str:
    """The folder of ``initdb``/``pg_ctl`` or the reason there is none (a skip message)."""
    env = os.environ.get("UMIT_PG_BIN")
    candidates = [env] if env else sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)
    if shutil.which("initdb") and shutil.which("pg_ctl"):
        candidates.append(str(Path(shutil.which("initdb")).parent))
    for c in candidates:
        if c and os.access(Path(c) / "initdb", os.X_OK) and os.access(Path(c) / "pg_ctl", os.X_OK):
            return Path(c)
    return f"PostgreSQL's initdb/pg_ctl not found ({INSTALL_HINT})"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Postgres:
    bin: Path
    data: Path
    port: int
    password: str
    as_user: str | None

    def url(self, db: str = "postgres", password: bool = True) -> str:
        auth = f"umit:{self.password}" if password else "umit"
        return f"postgresql://{auth}@127.0.0.1:{self.port}/{db}"

    def create_database(self, name: str) -> str:
        import psycopg

        with psycopg.connect(self.url(), autocommit=True) as con:
            con.execute(f'DROP DATABASE IF EXISTS "{name}"')
            con.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        _run(self, [str(self.bin / "pg_ctl"), "stop", "-D", str(self.data), "-m", "fast", "-w"])


def _run(pg_or_user, cmd: list[str]) -> subprocess.CompletedProcess:
    user = pg_or_user.as_user if isinstance(pg_or_user, Postgres) else pg_or_user
    if user:
        cmd = ["runuser", "-u", user, "--", *cmd]
    try:  # cwd "/": the unprivileged user may not be able to enter ours
        return subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=120, cwd="/")
    except subprocess.CalledProcessError as exc:
        raise RuntimeError(f"{' '.join(cmd)} failed: {exc.stderr.strip()}") from exc


def start_postgres(folder: Path) -> Postgres:
    """initdb + pg_ctl start in ``folder`` (created); raises RuntimeError with the log if the
    server does not come up."""
    found = postgres_bin()
    if isinstance(found, str):
        raise RuntimeError(found)
    as_user = UNPRIVILEGED if os.geteuid() == 0 else None
    folder.mkdir(parents=True, exist_ok=True)
    data, pwfile = folder / "data", folder / "pw"
    password = secrets.token_urlsafe(16)
    pwfile.write_text(password + "\n")
    if as_user:
        shutil.chown(folder, user=as_user)
        shutil.chown(pwfile, user=as_user)
        folder.chmod(0o700)
        for parent in folder.parents:
            if parent.stat().st_mode & 0o001 == 0:
                raise RuntimeError(f"{folder}: {as_user} cannot reach it ({parent} is not o+x)")
    _run(
        as_user,
        [
            str(found / "initdb"),
            "-D",
            str(data),
            "-U",
            "umit",
            f"--pwfile={pwfile}",
            "--auth=scram-sha-256",
            "-E",
            "UTF8",
            "--no-sync",
        ],
    )
    port = free_port()
    pg = Postgres(found, data, port, password, as_user)
    options = (
        f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=50"
    )
    try:
        _run(
            as_user,
            [
                str(found / "pg_ctl"),
                "start",
                "-D",
                str(data),
                "-w",
                "-t",
                "60",
                "-l",
                str(folder / "log"),
                "-o",
                options,
            ],
        )
    except RuntimeError as exc:
        log = (folder / "log").read_text() if (folder / "log").exists() else ""
        raise RuntimeError(f"PostgreSQL did not start: {exc}\n{log[-2000:]}") from exc
    return pg
