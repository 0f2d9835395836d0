"""Atomic file writes: write to a temporary name in the same folder, then rename.

A reader (or a resumed job after ``kill -9``) therefore sees either the old file or the complete
new one, never a half-written file. Temporary names start with ``.tmp-`` so that
:func:`remove_stale_temps` can clean up what a killed process left behind.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

TMP_PREFIX = ".tmp-"


def _temp_sibling(path: Path) -> Path:
    return path.with_name(f"{TMP_PREFIX}{uuid.uuid4().hex[:8]}-{path.name}")


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it onto ``path``.

    Works for files and for folders (e.g. a Zarr group). On error the temporary is removed and
    ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_sibling(path)
    try:
        yield tmp
        if path.is_dir() and tmp.is_dir():
            shutil.rmtree(path)  # os.replace cannot replace a non-empty directory
        os.replace(tmp, path)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (fsynced before the rename)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def remove_stale_temps(folder: str | Path, recursive: bool = True, min_age_s: float = 0.0) -> int:
    """Delete ``.tmp-*`` files/folders a killed process left in ``folder``; return how many.

    Args:
        min_age_s: Leave temporaries younger than this alone: where several processes write one
            folder at once (ingest workers sharing a PostgreSQL catalog), a young one may be
            another process's write in progress.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    pattern = f"**/{TMP_PREFIX}*" if recursive else f"{TMP_PREFIX}*"
    count = 0
    now = time.time()
    for p in sorted(folder.glob(pattern), key=lambda q: len(q.parts), reverse=True):
        try:
            if min_age_s > 0 and now - p.lstat().st_mtime < min_age_s:
                continue
        except FileNotFoundError:  # its writer renamed it meanwhile
            continue
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        elif p.exists():
            p.unlink()
        count += 1
    return count
