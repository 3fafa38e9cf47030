"""Ingest on a Dask cluster: the workers read, decode and extract; PostgreSQL takes their writes.

The client walks the roots and finds what changed exactly as a local ingest does
(:meth:`Ingester.plan`), then submits partitions of files (:data:`PARTITION` each) to a
``distributed`` scheduler. Each worker process keeps one extractor and one store connection
pool for its whole life (:func:`_worker_extractor`, :func:`_worker_store`), so tasks after the
first pay neither the model load nor the connection set-up.

- **PostgreSQL**: a worker writes its batches itself, in the same transactions as a local ingest
  (:meth:`Ingester.write_results`): images, features, codes for every index of the space, paths
  and errors, with the shared bucket rows and index generations last, in a fixed order, so
  concurrent workers neither deadlock nor queue for a whole batch.
- **SQLite** (one writer, and the workers may not see the client's file): a worker returns its
  features and image facts, and the client writes them.

Faults: Dask reruns the task of a worker that died; a rerun skips the files a previous attempt
already stored (same path, size and mtime), so an image is never stored twice. A client or
scheduler that is lost leaves every finished batch stored; the same command run again does the
rest. Dask is imported only here, only when ``--cluster`` is given.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select
from sqlalchemy.engine import make_url

from .context import StoreContext, is_disconnect, open_context
from .decode import DecodedImage
from .errors import ClusterError, ConfigError, DatabaseError, DecodeError, ImgStoreError
from .features import get_extractor
from .features.pipeline import StreamResult, extract_stream
from .ingest import Ingester, IngestProgress, IngestSummary, Plan, Task
from .models import Feature, ImagePath
from .paths import to_stored

log = logging.getLogger(__name__)

#: Files per task: a few hundred, so a task is seconds of work (the scheduler's overhead is
#: milliseconds) and a lost worker costs little to redo. ``IMGSTORE_CLUSTER_PARTITION`` sets it.
PARTITION = int(os.environ.get("IMGSTORE_CLUSTER_PARTITION", "256") or 256)


@dataclass(frozen=True)
class StoreSpec:
    """Where workers find the store. Its repr hides the password: Dask shows task arguments
    in its dashboard, logs and errors."""

    url: str

    def __repr__(self) -> str:
        return f"StoreSpec({make_url(self.url).render_as_string(hide_password=True)!r})"


@dataclass
class PartitionResult:
    """What one task did: counts and errors, and (SQLite) the extracted rows for the client."""

    added: int = 0
    duplicates: int = 0
    unchanged: int = 0
    retries: int = 0
    errors: list[tuple[str, str]] = field(default_factory=list)
    extracted: list[tuple[Task, Any, Any, str | None]] | None = None  # (task, facts, features, error reason)
    worker: str = ""
    seconds: float = 0.0


# --- the worker side -----------------------------------------------------------------------------

_lock = threading.Lock()
_stores: dict[str, StoreContext] = {}
_extractors: dict[tuple[str, tuple[tuple[str, Any], ...]], Any] = {}


def _worker_store(url: str) -> StoreContext:
    """This worker process's store for ``url`` (its context: engine, transactions), opened
    once, its schema checked as ``ImageStore`` checks it."""
    with _lock:
        if url not in _stores:
            _stores[url] = open_context(url)
        return _stores[url]


def _worker_extractor(name: str, options: dict[str, Any]) -> Any:
    """This worker process's extractor, loaded once and reused by every task."""
    key = (name, tuple(sorted(options.items())))
    with _lock:
        if key not in _extractors:
            _extractors[key] = get_extractor(name, **options)
        return _extractors[key]


#: Times a worker runs its partition when the database server ends its connections mid-way.
DISCONNECT_ATTEMPTS = 5


def ingest_partition(store: StoreSpec | None, space_id: int, extractor: str, options: dict[str, Any], tasks: list[Task],
                     metadata: dict[str, Any], batch_size: int, threads: int | None, max_pixels: int) -> PartitionResult:
    """A worker's task: read, hash, decode and extract ``tasks``; with ``store`` (PostgreSQL)
    write them there, else return what the client needs to write them. ``max_pixels``: the
    client's store's limit (a worker's own environment may say otherwise)."""
    started = time.perf_counter()
    ex = _worker_extractor(extractor, options)
    result = PartitionResult(worker=f"{os.uname().nodename}:{os.getpid()}")
    if store is not None:
        db = _worker_store(store.url)
        for attempt in range(1, DISCONNECT_ATTEMPTS + 1):
            summary = IngestSummary()  # what this attempt committed, kept if a later statement fails
            try:
                todo, unchanged = _not_yet_stored(db, space_id, tasks)
                if attempt == 1:
                    result.unchanged = unchanged
                job = Ingester(db, ex, space_id, batch_size=batch_size, workers=threads, metadata=metadata,
                               preload_known=False, write_size=len(todo),  # one transaction: a rerun redoes it anyway
                               max_pixels=max_pixels)
                job.process(todo, summary, started)
            except DatabaseError as exc:
                # the server ended the connections (a restart): what was committed stays, and the
                # partition is run again on fresh connections, skipping it (counted as a retry)
                if attempt == DISCONNECT_ATTEMPTS or not is_disconnect(exc):
                    raise
                log.info("partition: %s; again (%d)", exc, attempt)
                db.engine.dispose()
                summary.retries += 1
                time.sleep(0.5 * attempt)
            else:
                attempt = 0
            result.added += summary.added
            result.duplicates += summary.duplicates
            result.errors += summary.errors
            result.retries += summary.retries
            if attempt == 0:
                break
    else:
        job = Ingester(None, ex, space_id, batch_size=batch_size, workers=threads, metadata=metadata,  # type: ignore[arg-type]
                       max_pixels=max_pixels)
        result.extracted = []
        for batch in extract_stream(tasks, job.load, ex, batch_size, threads):
            for r in batch:
                d = r.decoded
                facts = None if d is None else (d.width, d.height, d.format, d.captured_at)
                reason = None if r.error is None else getattr(r.error, "reason", None) or str(r.error)
                result.extracted.append((r.item, facts, r.features, reason))
    result.seconds = time.perf_counter() - started
    return result


def _not_yet_stored(ctx: StoreContext, space_id: int, tasks: list[Task]) -> tuple[list[Task], int]:
    """Drop the files an earlier attempt of this task already stored (same path, size and mtime,
    with features in the space): a rerun after a lost worker redoes only the rest."""
    stored = [to_stored(t.path) for t in tasks if t.path is not None]
    if not stored:
        return tasks, 0
    with ctx.read("look up stored paths") as conn:
        done = {
            (p, int(s), int(m)) for p, s, m in conn.execute(
                select(ImagePath.path, ImagePath.file_size, ImagePath.mtime_ns)
                .join(Feature, (Feature.image_id == ImagePath.image_id) & (Feature.space_id == space_id))
                .where(ImagePath.path.in_(stored), ImagePath.is_current.is_(True))
            )
        }
    left = [t for t in tasks if t.path is None or (to_stored(t.path), t.size, t.mtime_ns) not in done]
    return left, len(tasks) - len(left)


# --- the client side -----------------------------------------------------------------------------


def check_cluster(cluster: Any) -> None:
    """Refuse a malformed ``--cluster`` value before any work."""
    if not isinstance(cluster, str):
        return
    spec = cluster.strip()
    if spec == "local" or spec.startswith("local:"):
        count = spec.partition(":")[2]
        if spec != "local" and (not count.isdigit() or int(count) < 1):
            raise ConfigError(f"--cluster {spec}: write local:N with N >= 1 the number of worker processes")
    elif "://" not in spec:
        raise ConfigError(f"--cluster {spec!r}: give a scheduler address (tcp://host:8786) or local[:N]")


def connect(cluster: Any) -> tuple[Any, Callable[[], None], int | None]:
    """A ``distributed.Client`` for ``cluster``: ``"local"`` / ``"local:N"`` (a LocalCluster of N
    worker processes here), a scheduler address (``tcp://host:8786``), or a Client.
    Returns the client, what closes what this call opened, and threads per local worker."""
    try:
        from distributed import Client, LocalCluster
    except ImportError as exc:
        raise ConfigError("--cluster needs Dask's distributed: pip install 'imgstore[cluster]'") from exc
    if not isinstance(cluster, str):
        return cluster, lambda: None, None
    check_cluster(cluster)
    spec = cluster.strip()
    if spec == "local" or spec.startswith("local:"):
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        n = int(spec.partition(":")[2] or cores)
        threads = max(1, cores // n)
        local = LocalCluster(  # type: ignore[no-untyped-call]  # distributed's API is not annotated
            n_workers=n, threads_per_worker=1, processes=True, dashboard_address=None, env={"IMGSTORE_NUM_THREADS": str(threads)})
        client = Client(local)  # type: ignore[no-untyped-call]  # distributed's API is not annotated

        def close() -> None:
            client.close()  # type: ignore[no-untyped-call]  # distributed's API is not annotated
            local.close()

        return client, close, threads
    try:
        client = Client(spec, timeout="20s")  # type: ignore[no-untyped-call]  # distributed's API is not annotated
    except (OSError, TimeoutError) as exc:
        raise ConfigError(f"cannot reach the Dask scheduler at {spec}: {exc}; is `dask scheduler` running there?") from None
    return client, client.close, None


def _workers_are_local(client: Any) -> bool:
    """Every worker listens on a loopback address: they run on this machine."""
    workers = client.scheduler_info().get("workers", {})
    hosts = [addr.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]") for addr in workers]
    return bool(hosts) and all(h.startswith("127.") or h in ("localhost", "::1") for h in hosts)


def worker_url(client_url: Any, worker_db: str | None, local: bool) -> str:
    """The database URL the workers use: ``worker_db``, else the client's. A loopback host is
    refused for workers on other machines: there it would name each worker's own machine."""
    url = make_url(worker_db) if worker_db else client_url
    loopback = url.host in (None, "", "localhost") or str(url.host).startswith("127.")
    if not local and url.get_backend_name() == "postgresql" and loopback:
        raise ConfigError(
            f"the workers would connect to their own {url.host or 'local socket'}: give --worker-db with a host "
            "they can reach (e.g. postgresql://user@dbhost/db)"
        )
    return url.render_as_string(hide_password=False)


def _completed(futures: Any, client: Any, cluster: Any) -> Iterator[tuple[Any, Any]]:
    """(future, its result) as they finish, the result fetched once, here; a lost scheduler (its
    connection closed, the futures cancelled with it) becomes one :class:`ClusterError` that says
    to rerun. Fetching the result a second time outside would talk to the scheduler again, and a
    scheduler lost just then raised a bare connection error (seen in CI under load)."""
    where = cluster if isinstance(cluster, str) else getattr(client, "scheduler", None) and client.scheduler.address
    try:
        for future in futures:
            result = future.result()  # here, so that a lost connection surfaces inside this try
            yield future, result
    except ImgStoreError:
        raise
    except (Exception, asyncio.CancelledError) as exc:
        if not _scheduler_lost(client, exc):
            raise
        raise ClusterError(f"lost the Dask scheduler at {where} mid-run ({type(exc).__name__}); the batches the "
                           "workers finished are stored: start the scheduler and workers again and rerun the "
                           "same command to do the rest") from None


def _scheduler_lost(client: Any, exc: BaseException) -> bool:
    from distributed.comm.core import CommClosedError

    if isinstance(exc, (CommClosedError, OSError, TimeoutError)) or "Cancelled" in type(exc).__name__:
        return True
    return getattr(client, "status", "running") != "running"


class ClusterIngest:
    """One ingest run through a Dask cluster (built by :meth:`ImageStore.ingest`)."""

    def __init__(self, job: Ingester, extractor: str, options: dict[str, Any], cluster: Any, *,
                 worker_db: str | None = None, partition: int | None = None) -> None:
        self.job = job
        self.extractor = extractor
        self.options = dict(options)
        self.cluster = cluster
        self.worker_db = worker_db
        self.partition = partition or PARTITION

    def run(self, roots: Sequence[str | os.PathLike[str]], *, recursive: bool = True, follow_symlinks: bool = False,
            dry_run: bool = False) -> IngestSummary:
        from distributed import as_completed

        started = time.perf_counter()
        check_cluster(self.cluster)  # a mistyped address is an error even when nothing is left to do
        job = self.job
        plan: Plan = job.plan(roots, recursive=recursive, follow_symlinks=follow_symlinks, dry_run=dry_run)
        summary = plan.summary
        if dry_run or not plan.tasks:
            return job.finish(plan, summary, started) if not dry_run else summary
        sqlite = job.ctx.url.get_backend_name() == "sqlite"
        client, close, threads = connect(self.cluster)
        # a lost scheduler is reported once, by _completed; the client's own reconnect attempts
        # would print tracebacks meanwhile
        quiet = logging.getLogger("distributed.client")
        level = quiet.level
        quiet.setLevel(logging.CRITICAL)
        try:
            spec = None if sqlite else StoreSpec(worker_url(job.ctx.url, self.worker_db, _workers_are_local(client)))
            parts = [plan.tasks[i : i + self.partition] for i in range(0, len(plan.tasks), self.partition)]
            futures = [
                client.submit(ingest_partition, spec, job.space_id, self.extractor, self.options, part, job.metadata,
                              job.batch_size, threads, job.max_pixels,
                              key=f"imgstore-ingest-{i}-{os.getpid()}-{int(started * 1000)}", pure=False)
                for i, part in enumerate(parts)
            ]
            log.info("ingest: %d files in %d tasks on %s", len(plan.tasks), len(parts), client)
            done = 0
            for future, part in _completed(as_completed(futures), client, self.cluster):  # type: ignore[no-untyped-call]  # distributed's API is not annotated
                future.release()
                done += part.added + part.duplicates + part.unchanged + len(part.errors)
                if part.extracted is not None:
                    summary = job.write_results([self._rebuild(part.extracted)], len(plan.tasks), summary, started,
                                                report=False)
                    done += len(part.extracted)
                else:
                    summary.added += part.added
                    summary.duplicates += part.duplicates
                    summary.unchanged += part.unchanged
                    summary.retries += part.retries
                    summary.failed += len(part.errors)
                    summary.errors.extend(part.errors)
                if job.progress is not None:
                    job.progress(IngestProgress(min(done, len(plan.tasks)), len(plan.tasks), summary.added, summary.failed,
                                                time.perf_counter() - started))
        finally:
            try:
                close()
            except (OSError, TimeoutError) as exc:  # a scheduler already gone: nothing left to close
                log.info("closing the Dask client: %s", exc)
            finally:
                quiet.setLevel(level)
        return job.finish(plan, summary, started)

    @staticmethod
    def _rebuild(extracted: list[tuple[Task, Any, Any, str | None]]) -> list[StreamResult[Task]]:
        """A worker's returned rows as the results a local extraction gives (no pixels needed)."""
        out: list[StreamResult[Task]] = []
        for task, facts, features, reason in extracted:
            if reason is not None:
                out.append(StreamResult(task, None, DecodeError(task.path, reason), None))
            elif facts is None:
                out.append(StreamResult(task, None, None, None))  # a duplicate the worker skipped
            else:
                width, height, fmt, captured = facts
                out.append(StreamResult(task, DecodedImage(None, width, height, fmt, captured), None, features))  # type: ignore[arg-type]
        return out
