"""Where the per-case work of ``umit ingest`` and ``umit preprocess`` runs: here or on Dask.

``executor=local`` (the default) keeps the process pool of one machine. ``executor=dask`` makes
every case a task of a Dask cluster (``distributed``): ``scheduler=tcp://HOST:8786`` for one that
is already running (``dask scheduler`` / ``dask worker``, dask-jobqueue, Kubernetes...), or, with
no scheduler, a ``LocalCluster`` of ``workers`` processes on this machine. Tasks are the same
functions the local pool runs: they write their case atomically and return a small result (a
catalog row, an index row or a failure reason), which the calling process records; a worker that
dies takes no half-written case with it, and Dask reruns its tasks elsewhere.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from umit.errors import InputError

EXECUTORS = ("local", "dask")
CONNECT_TIMEOUT_S = 30.0
"""How long to wait for a Dask scheduler given by address before giving up."""


def check_executor(executor: str, scheduler: str | None) -> None:
    """Up-front check of the two settings (a ValueError naming the bad value)."""
    if executor not in EXECUTORS:
        raise ValueError(f"executor must be one of {EXECUTORS}, got {executor!r}")
    if scheduler and executor != "dask":
        raise ValueError(f"scheduler={scheduler!r} needs executor=dask (got executor={executor})")


@contextmanager
def dask_client(scheduler: str | None, workers: int) -> Iterator[Any]:
    """A ``distributed.Client``: to ``scheduler``, or to a LocalCluster of ``workers``
    single-threaded processes started (and closed) here."""
    try:
        from distributed import Client, LocalCluster
    except ImportError as exc:  # pragma: no cover - the `scale` extra
        raise InputError(
            None, "executor=dask needs dask.distributed: pip install 'umit[scale]'"
        ) from exc
    cluster = None
    if scheduler:
        try:
            client = Client(scheduler, timeout=f"{CONNECT_TIMEOUT_S}s")
        except (OSError, TimeoutError) as exc:
            raise InputError(None, f"cannot reach the Dask scheduler {scheduler}: {exc}") from None
    else:
        cluster = LocalCluster(
            n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None
        )
        client = Client(cluster)
    try:
        yield client
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def dask_map_unordered(
    client: Any, fn: Callable[[Any], Any], jobs: Iterable[Any], name: Callable[[Any], str]
) -> Iterator[tuple[Any, Any, BaseException | None]]:
    """Run ``fn(job)`` as one task per job; yield ``(job, result, None)`` or ``(job, None,
    exception)`` as tasks finish. ``name(job)`` names the task (shown by Dask's dashboard)."""
    from distributed import as_completed

    run_id = uuid.uuid4().hex[:8]
    futures = {}
    for job in jobs:
        fut = client.submit(fn, job, key=f"umit-{name(job)}-{run_id}", retries=0)
        futures[fut] = job
    for fut in as_completed(list(futures)):
        job = futures.pop(fut)
        try:
            yield job, fut.result(), None
        except Exception as exc:  # e.g. KilledWorker: the task took down workers repeatedly
            yield job, None, exc
        finally:
            fut.release()


def dask_map(client: Any, fn: Callable[[Any], Any], jobs: Iterable[Any]) -> list[Any]:
    """``list(map(fn, jobs))`` on the cluster, in order (e.g. the fingerprint's reads)."""
    return client.gather(client.map(fn, list(jobs), pure=False))
