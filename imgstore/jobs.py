"""Long work in the background of a long-running process, with progress a page can show.

``imgstore serve`` fits indexes and finds duplicate groups this way: a fit over 1M images, or a
first duplicate search of a photo collection, takes minutes, far longer than a request may
wait. One job runs at a time per kind of work (two fits would only compete for the same cores
and the same write lock); a second one asked for meanwhile waits its turn.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)


@dataclass
class Job:
    """One piece of background work. ``state``: queued, running, done or failed; ``phase``,
    ``done`` and ``total`` follow the work, ``message`` says them in words; ``result`` is what it
    returned, ``error`` why it failed (one line), ``failure`` the exception itself (its type
    picks an answer's status); ``result_url``: where a client reads what the job made, if
    anywhere but ``result``."""

    id: int
    kind: str
    title: str
    state: str = "queued"
    phase: str = ""
    done: int = 0
    total: int = 0
    result: Any = None
    error: str | None = None
    created_at: float = field(default_factory=time.time)
    finished_at: float | None = None
    result_url: str | None = None
    failure: Exception | None = field(default=None, repr=False)
    #: the words for (phase, done, total) of this kind of work; None: "phase done/total"
    describe: Callable[[str, int, int], str] | None = field(default=None, repr=False)

    @property
    def finished(self) -> bool:
        return self.finished_at is not None

    @property
    def message(self) -> str:
        """What the job is doing, in one line a person reads."""
        if self.state == "queued":
            return "waiting for the job before it to finish"
        if self.state == "failed":
            return f"failed: {self.error}"
        if self.state == "done":
            return "done"
        if self.describe is not None:
            return self.describe(self.phase, self.done, self.total)
        return f"{self.phase} {self.done:,}/{self.total:,}" if self.phase else "starting"

    @property
    def fraction(self) -> float | None:
        return None if self.total <= 0 else min(1.0, self.done / self.total)

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "kind": self.kind, "title": self.title, "state": self.state, "phase": self.phase,
                "done": self.done, "total": self.total, "fraction": self.fraction, "message": self.message,
                "result": self.result, "result_url": self.result_url, "error": self.error,
                "created_at": self.created_at, "finished_at": self.finished_at}


class Jobs:
    """The jobs of one process, oldest first; each kind of work runs one job at a time."""

    def __init__(self, keep: int = 50) -> None:
        self._ids = itertools.count(1)
        self._jobs: dict[int, Job] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._mutex = threading.Lock()
        self._keep = keep

    def start(self, kind: str, title: str, work: Callable[[Callable[[str, int, int], None]], Any], *,
              describe: Callable[[str, int, int], str] | None = None, result_url: str | None = None) -> Job:
        """Run ``work(progress)`` in a thread; ``progress(phase, done, total)`` updates the job
        (``describe`` puts those in words)."""
        with self._mutex:
            job = Job(next(self._ids), kind, title, result_url=result_url, describe=describe)
            self._jobs[job.id] = job
            lock = self._locks.setdefault(kind, threading.Lock())
            finished = [j.id for j in self._jobs.values() if j.finished_at is not None]
            for old in finished[: max(0, len(self._jobs) - self._keep)]:
                del self._jobs[old]

        def progress(phase: str, done: int, total: int) -> None:
            job.phase, job.done, job.total = phase, int(done), int(total)

        def run() -> None:
            with lock:
                job.state = "running"
                try:
                    job.result = work(progress)
                    job.state = "done"
                except Exception as exc:  # noqa: BLE001 - the job reports it; the server goes on
                    log.warning("job %d (%s) failed: %s", job.id, title, exc)
                    job.error = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                    job.failure = exc
                    job.state = "failed"
                finally:
                    job.finished_at = time.time()

        threading.Thread(target=run, name=f"imgstore-job-{job.id}", daemon=True).start()
        return job

    def get(self, job_id: int) -> Job | None:
        return self._jobs.get(job_id)

    def all(self) -> list[Job]:
        with self._mutex:
            return list(self._jobs.values())

    def wait(self, job_id: int, timeout_s: float = 60.0) -> Job | None:
        """The job once finished (or as it stands after ``timeout_s``); for tests and scripts."""
        deadline = time.monotonic() + timeout_s
        job = self.get(job_id)
        while job is not None and not job.finished and time.monotonic() < deadline:
            time.sleep(0.02)
        return job
