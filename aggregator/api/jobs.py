"""Background jobs (pulls, packages) behind one small interface.

On the embedded default the API process runs its jobs itself, on a small thread pool
(:class:`ThreadJobRunner`). A later issue adds separate workers (e.g. Procrastinate on
PostgreSQL): they only have to implement :class:`JobRunner` (submit, cancel, status, list), and
the routes do not change.

A job is never left "running" after its thread ended: the job function's own ``finally`` sets
its final state, and a watchdog marks any job whose thread is gone without one as failed. While
the thread lives the watchdog stamps its heartbeat, so a client can see that it is alive.
Cancelling is cooperative: the job's progress objects raise :class:`JobCancelled` at the
connector's next step (a ``BaseException``, so no per-item ``except Exception`` swallows it),
the pull marks its sources failed, and the case lock is freed on the way out.
"""

from __future__ import annotations

import logging
import secrets
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from aggregator.errors import AggregatorError, NotFound

log = logging.getLogger("aggregator.api.jobs")

QUEUED, RUNNING, DONE, PARTIAL, FAILED, CANCELLED = "queued", "running", "done", "partial", "failed", "cancelled"
FINAL = frozenset({DONE, PARTIAL, FAILED, CANCELLED})
WATCH_EVERY = 2.0


class JobCancelled(BaseException):
    """Raised inside a job's thread at its next progress step after :meth:`JobRunner.cancel`."""


def _now() -> datetime:
    return datetime.now(UTC)


class JobProgress:
    """A connector's :class:`connectors.base.Progress` for one source of a job; counts, no PHI."""

    def __init__(self, job: Job, label: str) -> None:
        self.job = job
        self.label = label
        self.total: int | None = None
        self.done = 0
        self.note = ""

    def _check(self) -> None:
        self.job.heartbeat_at = _now()
        if self.job.cancel_requested.is_set():
            raise JobCancelled()

    def set_total(self, total: int | None) -> None:
        self.total = total
        self._check()

    def advance(self, n: int = 1) -> None:
        self.done += n
        self._check()

    def message(self, text: str) -> None:
        self.note = text[:80]
        self._check()


@dataclass
class Job:
    id: str
    kind: str
    case_id: str
    owner: str
    state: str = QUEUED
    created_at: datetime = field(default_factory=_now)
    started_at: datetime | None = None
    heartbeat_at: datetime | None = None
    finished_at: datetime | None = None
    error: str | None = None
    result: dict[str, Any] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    progress: list[JobProgress] = field(default_factory=list)
    cancel_requested: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None
    future: Future[None] | None = None

    def progress_for(self, label: str) -> JobProgress:
        p = JobProgress(self, label)
        self.progress.append(p)
        return p

    def to_dict(self) -> dict[str, Any]:
        def iso(d: datetime | None) -> str | None:
            return d.isoformat() if d else None

        return {"id": self.id, "kind": self.kind, "case": self.case_id, "state": self.state,
                "created_at": iso(self.created_at), "started_at": iso(self.started_at),
                "heartbeat_at": iso(self.heartbeat_at), "finished_at": iso(self.finished_at),
                "error": self.error, "result": self.result, "params": self.params,
                "cancel_requested": self.cancel_requested.is_set()}


#: A job's work: runs in the job's thread, returns ``(final state, result)``.
JobFn = Callable[[Job], tuple[str, dict[str, Any]]]


class JobRunner(Protocol):
    """Where jobs run. The API needs nothing more than these four calls (and shutdown)."""

    def submit(self, kind: str, case_id: str, fn: JobFn, *, owner: str, params: dict[str, Any]) -> Job: ...

    def cancel(self, job_id: str) -> Job: ...

    def status(self, job_id: str) -> Job: ...

    def list(self, case_id: str | None = None) -> list[Job]: ...

    def shutdown(self, wait: bool = True) -> None: ...


class ThreadJobRunner:
    """Jobs on a small in-process thread pool, kept in memory (they end with the process).

    Pulls also write their rows in the ``pulls`` table, which outlives the process; a pull
    whose process died is marked failed there by :func:`aggregator.jobs.pull.reap_dead_pulls`.
    """

    def __init__(self, workers: int = 2) -> None:
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="job")
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._watchdog = threading.Thread(target=self._watch, name="job-watchdog", daemon=True)
        self._watchdog.start()

    def submit(self, kind: str, case_id: str, fn: JobFn, *, owner: str, params: dict[str, Any]) -> Job:
        job = Job(id=secrets.token_hex(8), kind=kind, case_id=case_id, owner=owner, params=params)
        with self._lock:
            self._jobs[job.id] = job
        job.future = self._pool.submit(self._run, job, fn)
        return job

    def _run(self, job: Job, fn: JobFn) -> None:
        if job.cancel_requested.is_set():
            self._finish(job, CANCELLED, None, {})
            return
        job.thread = threading.current_thread()
        job.started_at = job.heartbeat_at = _now()
        job.state = RUNNING
        state: str = FAILED
        error: str | None = "the job ended without a result"
        result: dict[str, Any] = {}
        try:
            state, result = fn(job)
            error = None
        except JobCancelled:
            state, error = CANCELLED, "cancelled on request"
        except AggregatorError as exc:
            state, error = FAILED, exc.message  # our messages are PHI-free
        except BaseException as exc:
            state, error = FAILED, f"unexpected {type(exc).__name__}"
            log.error("job %s failed: %s", job.id, type(exc).__name__)
            if not isinstance(exc, Exception):
                raise
        finally:
            self._finish(job, state, error, result)

    @staticmethod
    def _finish(job: Job, state: str, error: str | None, result: dict[str, Any]) -> None:
        job.result = result
        job.error = error
        job.finished_at = _now()
        job.state = state

    def _watch(self) -> None:
        while not self._stop.wait(WATCH_EVERY):
            self.sweep()

    def sweep(self) -> None:
        """Stamp live jobs' heartbeats; fail those whose thread is gone without a final state."""
        with self._lock:
            jobs = list(self._jobs.values())
        for job in jobs:
            if job.state != RUNNING:
                continue
            if job.thread is not None and job.thread.is_alive() and not (job.future and job.future.done()):
                job.heartbeat_at = _now()
            elif job.state == RUNNING:
                self._finish(job, FAILED, "the job's thread ended without a result", job.result)

    def cancel(self, job_id: str) -> Job:
        job = self.status(job_id)
        if job.state in FINAL:
            return job
        job.cancel_requested.set()
        if job.future is not None and job.future.cancel():  # never started
            self._finish(job, CANCELLED, "cancelled before it started", {})
        return job

    def status(self, job_id: str) -> Job:
        with self._lock:
            job = self._jobs.get(job_id)
        if job is None:
            raise NotFound(f"no job with id {job_id!r}")
        if job.state == RUNNING and job.future is not None and job.future.done():
            self._finish(job, FAILED, "the job's thread ended without a result", job.result)
        return job

    def list(self, case_id: str | None = None) -> list[Job]:
        with self._lock:
            jobs = list(self._jobs.values())
        return sorted((j for j in jobs if case_id is None or j.case_id == case_id), key=lambda j: j.created_at)

    def wait(self, job_id: str, timeout: float | None = None) -> Job:
        """Block until the job ends (tests, the CLI)."""
        job = self.status(job_id)
        if job.future is not None:
            try:
                job.future.result(timeout)
            except Exception:  # its state says what happened
                log.debug("job %s raised", job_id)
        return self.status(job_id)

    def shutdown(self, wait: bool = True) -> None:
        self._stop.set()
        with self._lock:
            jobs = list(self._jobs.values())
        if not wait:
            for job in jobs:
                job.cancel_requested.set()
        self._pool.shutdown(wait=wait, cancel_futures=not wait)
