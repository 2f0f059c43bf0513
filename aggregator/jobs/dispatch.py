"""Who runs a queued job: one small interface, two implementations.

* :class:`InProcessDispatcher`: the embedded default (SQLite, one machine). ``aggregator
  serve`` runs jobs on a few threads of its own; a retry waits on a timer; a reaper thread
  puts back jobs whose runner died (a previous ``serve`` killed mid-pull) and, at start,
  everything still queued.
* :class:`aggregator.jobs.queue.QueueDispatcher`: PostgreSQL. Jobs are deferred to
  Procrastinate and run by ``aggregator worker`` processes on any number of machines.

Both call the same :func:`aggregator.jobs.tasks.execute`; :class:`JobService` is what the API
and the CLI use on top (create the row, hand it over, cancel, look).
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any, Protocol

from aggregator.jobs import records
from aggregator.jobs.records import Job, Timing

log = logging.getLogger(__name__)

ENGINE_ENV = "AGGREGATOR_JOB_ENGINE"
SCHEDULE_EVERY = 60.0


class Dispatcher(Protocol):
    """Hands job ids to runners. Nothing else: the job's state is in its row."""

    def enqueue(self, job: Job, delay: float = 0.0) -> None:
        """Run the job (after ``delay`` seconds). Raises CaseBusy when the case already has one waiting."""

    def cancel(self, job: Job) -> None:
        """Tell the runner side that the job's cancel flag is set (the row already says so)."""

    def shutdown(self, wait: bool = True) -> None: ...


class InProcessDispatcher:
    """Jobs on this process's threads; reaps and recovers from the job rows."""

    def __init__(self, app: Any, workers: int = 2, *, timing: Timing | None = None,
                 schedule: bool = False) -> None:
        from aggregator.jobs.tasks import worker_name

        self.app = app
        self.timing = timing or Timing.from_env()
        self.worker = worker_name("serve")
        self._pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="job")
        self._stop = threading.Event()
        self._timers: set[threading.Timer] = set()
        self._lock = threading.Lock()
        self._reaper = threading.Thread(target=self._reap_loop, name="job-reaper", daemon=True)
        self._schedule = schedule
        self._recover()
        self._reaper.start()

    def _recover(self) -> None:
        """At start: stale running jobs back to the queue, then every queued job to a thread."""
        records.reap(self.app, self.timing)
        now = datetime.now(UTC)
        for job in records.list_jobs(self.app, states=(records.QUEUED,), limit=10_000):
            delay = max(0.0, (job.run_after - now).total_seconds()) if job.run_after else 0.0
            self.enqueue(job, delay)

    def enqueue(self, job: Job, delay: float = 0.0) -> None:
        if self._stop.is_set():
            return  # stays queued in its row; the next start picks it up
        if delay > 0:
            timer = threading.Timer(delay, self._submit, args=(job.id,))
            timer.daemon = True
            with self._lock:
                self._timers.add(timer)
            timer.start()
            return
        self._submit(job.id)

    def _submit(self, job_id: str) -> None:
        with self._lock:
            self._timers = {t for t in self._timers if t.is_alive()}
        if self._stop.is_set():
            return
        try:
            self._pool.submit(self._run, job_id)
        except RuntimeError:  # the pool is shut down; the row stays queued
            log.info("job %s left queued: the runner is stopping", job_id)

    def _run(self, job_id: str) -> None:
        from aggregator.jobs.tasks import execute

        try:
            outcome = execute(self.app, job_id, self.worker, timing=self.timing, should_abort=self._stop.is_set)
        except Exception as exc:  # execute records the job's failure itself; never kill the pool thread
            log.error("job %s: runner error %s", job_id, type(exc).__name__)
            return
        if outcome.retry_in is not None and outcome.state == records.QUEUED:
            self.enqueue(records.get(self.app, job_id), outcome.retry_in)

    def _reap_loop(self) -> None:
        last_schedule = time.monotonic()
        while not self._stop.wait(self.timing.reap_every):
            try:
                for job in records.reap(self.app, self.timing):
                    log.info("job %s: its runner stopped answering; queued again", job.id)
                    self.enqueue(job)
            except Exception as exc:
                log.warning("job reaper: %s", type(exc).__name__)
            if self._schedule and time.monotonic() - last_schedule >= SCHEDULE_EVERY:
                last_schedule = time.monotonic()
                self._run_scheduled()

    def _run_scheduled(self) -> None:
        from aggregator.errors import NotImplementedYet
        from aggregator.jobs.tasks import run_scheduled

        try:
            run_scheduled(self.app)
        except NotImplementedYet as exc:
            log.info("%s", exc.message)
            self._schedule = False
        except Exception as exc:
            log.error("scheduled sync failed: %s", type(exc).__name__)

    def cancel(self, job: Job) -> None:
        """Nothing to do: the job's watcher reads the flag within a heartbeat."""

    def shutdown(self, wait: bool = True) -> None:
        """Stop taking jobs. Running ones are released to the queue at their next step unless ``wait``."""
        if not wait:
            self._stop.set()
        with self._lock:
            timers = list(self._timers)
        for t in timers:
            t.cancel()
        self._pool.shutdown(wait=wait, cancel_futures=not wait)
        self._stop.set()


def make_dispatcher(app: Any, *, workers: int = 2, engine: str | None = None, schedule: bool = False) -> Dispatcher:
    """The dispatcher for this database: in-process on SQLite, Procrastinate on PostgreSQL.

    ``engine`` (or ``AGGREGATOR_JOB_ENGINE``) forces one: ``inprocess`` or ``queue``.
    """
    import os

    from aggregator.errors import ConfigError

    choice = (engine or os.environ.get(ENGINE_ENV) or "auto").lower()
    is_pg = app.db.engine.dialect.name == "postgresql"
    if choice == "auto":
        choice = "queue" if is_pg else "inprocess"
    if choice == "inprocess":
        return InProcessDispatcher(app, workers, schedule=schedule)
    if choice == "queue":
        if not is_pg:
            raise ConfigError("the job queue (Procrastinate) needs PostgreSQL: set AGGREGATOR_DATABASE_URL "
                              "to a postgresql:// URL, or run jobs in-process (AGGREGATOR_JOB_ENGINE=inprocess)")
        from aggregator.jobs.queue import QueueDispatcher

        return QueueDispatcher(app)
    raise ConfigError(f"{ENGINE_ENV} must be auto, inprocess or queue, not {choice!r}")


class JobService:
    """Jobs for the API and the CLI: create and dispatch, cancel, look, wait."""

    def __init__(self, app: Any, dispatcher: Dispatcher) -> None:
        self.app = app
        self.dispatcher = dispatcher

    def submit(self, kind: str, case_id: str, *, owner: str, params: dict[str, Any], actor: Any = None) -> Job:
        job = records.create(self.app, kind, case_id, owner=owner, params=params, actor=actor)
        try:
            self.dispatcher.enqueue(job)
        except BaseException:
            # not handed over (the queue's lock refused it, the database went away): not a job
            records.request_cancel(self.app, job.id)
            raise
        return records.get(self.app, job.id)

    def cancel(self, job_id: str) -> Job:
        job = records.request_cancel(self.app, job_id)
        if job.cancel_requested:
            self.dispatcher.cancel(job)
        return job

    def status(self, job_id: str) -> Job:
        return records.get(self.app, job_id)

    def list(self, case_id: str | None = None) -> list[Job]:
        return records.list_jobs(self.app, case_id)

    def wait(self, job_id: str, timeout: float | None = None, poll: float = 0.05) -> Job:
        """Block until the job ends or ``timeout`` passes (tests, the CLI); the job as it then is."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = records.get(self.app, job_id)
            if job.final or (deadline is not None and time.monotonic() >= deadline):
                return job
            time.sleep(poll)

    def shutdown(self, wait: bool = True) -> None:
        self.dispatcher.shutdown(wait)
