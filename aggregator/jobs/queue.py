"""Jobs on PostgreSQL: Procrastinate defers them, ``aggregator worker`` processes run them.

Procrastinate (a well-kept PostgreSQL task queue) gives what a home-made queue would get
wrong: ``FOR UPDATE SKIP LOCKED`` pickup with LISTEN/NOTIFY, locks, retries and periodic tasks
that fire once across all workers. What it runs is :func:`aggregator.jobs.tasks.execute`, the
same function the in-process runner calls; our ``jobs`` row stays the record of the job.

* One case, one pull: a pull is deferred with ``lock`` and ``queueing_lock`` both set to the
  case, so Procrastinate never starts two at once and keeps at most one waiting (a second
  request gets ``AlreadyEnqueued``, which becomes :class:`~aggregator.jobs.lock.CaseBusy`). The
  case's own pull lock (:mod:`aggregator.jobs.lock`) still guards against a CLI ``pull``.
* Retries: :func:`execute` decides (retriable errors only, exponential backoff) and raises
  :class:`RetryLater`; :class:`_Retry` turns exactly that into Procrastinate's retry.
* A dead worker: every worker runs a reaper thread (:func:`aggregator.jobs.records.reap`) and
  puts a stale job's Procrastinate job back to ``todo`` (``retry_job_by_id``), where another
  worker picks it up and the pull resumes from the ledger.
* Scheduled sync: a periodic task (every minute by default, ``AGGREGATOR_SYNC_CRON``) with a
  queueing lock, so it fires once per period however many workers run.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from datetime import UTC, datetime
from typing import Any

from aggregator.errors import ConfigError
from aggregator.jobs import records
from aggregator.jobs.lock import CaseBusy
from aggregator.jobs.records import Job, Timing

log = logging.getLogger(__name__)

TASK = "aggregator.run_job"
SYNC_TASK = "aggregator.sync_due"
QUEUE = "aggregator"
SYNC_CRON_ENV = "AGGREGATOR_SYNC_CRON"
DEFAULT_SYNC_CRON = "* * * * *"


def conninfo(url: str) -> str:
    """A libpq URL from our database URL (SQLAlchemy's ``+psycopg`` dialect suffix removed)."""
    for prefix in ("postgresql+psycopg://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql://" + url[len(prefix):]
    if not url.startswith("postgresql://"):
        raise ConfigError("workers need PostgreSQL: set AGGREGATOR_DATABASE_URL to a postgresql:// URL "
                          "(on SQLite, `aggregator serve` runs jobs in its own process)")
    return url


def ensure_schema(url: str) -> None:
    """Install Procrastinate's tables once per database (under a lock: workers start together)."""
    import psycopg
    from procrastinate.schema import SchemaManager

    key = int.from_bytes(hashlib.sha256(b"aggregator-procrastinate-schema").digest()[:8], "big", signed=True)
    with psycopg.connect(conninfo(url), autocommit=True, connect_timeout=10) as conn:
        if conn.execute("SELECT to_regclass('procrastinate_jobs')").fetchone() != (None,):
            return
        conn.execute("SELECT pg_advisory_lock(%s)", (key,))
        try:
            if conn.execute("SELECT to_regclass('procrastinate_jobs')").fetchone() == (None,):
                conn.execute(SchemaManager.get_schema())  # type: ignore[arg-type]
                log.info("installed the Procrastinate schema")
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (key,))


def client_app(url: str) -> Any:
    """A Procrastinate app for deferring and managing jobs from synchronous code (API, CLI, reaper)."""
    import procrastinate

    ensure_schema(url)
    app = procrastinate.App(connector=procrastinate.SyncPsycopgConnector(
        conninfo=conninfo(url), min_size=1, max_size=4, kwargs={"connect_timeout": 10}))
    app.open()
    return app


class RetryLater(Exception):
    """Raised by the worker's task when :func:`execute` put the job back for a retry."""

    def __init__(self, delay: float) -> None:
        super().__init__(f"retry in {delay:.1f} s")
        self.delay = delay


def _retry_strategy() -> Any:
    from procrastinate.retry import BaseRetryStrategy, RetryDecision

    class _Retry(BaseRetryStrategy):
        """Retry only what :func:`execute` decided to retry, after the delay it chose."""

        def get_retry_decision(self, *, exception: BaseException, job: Any) -> RetryDecision | None:
            if isinstance(exception, RetryLater):
                return RetryDecision(retry_in={"seconds": max(0, round(exception.delay))})
            return None

    return _Retry()


def _defer_options(job: Job, delay: float) -> dict[str, Any]:
    opts: dict[str, Any] = {"queue": QUEUE}
    if job.kind == "pull":
        opts["lock"] = opts["queueing_lock"] = f"pull:{job.case_id}"
    if delay > 0:
        opts["schedule_in"] = {"seconds": max(1, round(delay))}
    return opts


class QueueDispatcher:
    """Defers jobs to Procrastinate; runs nothing itself."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.queue = client_app(app.db.url)
        self._lock = threading.Lock()

    def enqueue(self, job: Job, delay: float = 0.0) -> None:
        from procrastinate.exceptions import AlreadyEnqueued

        try:
            with self._lock:
                queue_id = self.queue.configure_task(TASK, **_defer_options(job, delay)).defer(job_id=job.id)
        except AlreadyEnqueued:
            raise CaseBusy(f"case {job.case_id!r} already has a pull waiting; follow or cancel that job") from None
        records.set_queue_id(self.app, job.id, queue_id)

    def requeue(self, job: Job) -> None:
        """Run a reaped job again: its Procrastinate job back to ``todo`` (or a new one)."""
        if job.queue_job_id is not None:
            try:
                with self._lock:
                    self.queue.job_manager.retry_job_by_id(job.queue_job_id, retry_at=datetime.now(UTC))
                return
            except Exception as exc:  # not doing/failed any more (e.g. its worker finished it as failed)
                log.info("job %s: queue job %s not retried (%s); deferring anew", job.id, job.queue_job_id,
                         type(exc).__name__)
        self.enqueue(job)

    def cancel(self, job: Job) -> None:
        """A waiting job leaves the queue; a running one stops through its row's flag."""
        if job.queue_job_id is not None:
            with self._lock:
                self.queue.job_manager.cancel_job_by_id(job.queue_job_id, abort=True)

    def reap(self, timing: Timing) -> list[Job]:
        jobs = records.reap(self.app, timing)
        for job in jobs:
            log.info("job %s: its worker stopped answering; queued again", job.id)
            self.requeue(job)
        return jobs

    def shutdown(self, wait: bool = True) -> None:
        self.queue.close()


def _reaper(dispatcher: QueueDispatcher, timing: Timing, stop: threading.Event) -> None:
    while not stop.wait(timing.reap_every):
        try:
            dispatcher.reap(timing)
        except Exception as exc:  # the database may be briefly away; the next round tries again
            log.warning("job reaper: %s", type(exc).__name__)


def worker_app(core: Any, name: str, timing: Timing) -> Any:
    """The Procrastinate app of a worker process: the job task and the periodic sync task."""
    import procrastinate

    papp = procrastinate.App(connector=procrastinate.PsycopgConnector(
        conninfo=conninfo(core.db.url), kwargs={"connect_timeout": 10}))

    @papp.task(name=TASK, queue=QUEUE, pass_context=True, retry=_retry_strategy())
    def run_job(context: Any, job_id: str) -> str:
        from procrastinate.job_context import AbortReason

        from aggregator.jobs.tasks import execute

        def stopping() -> bool:  # a cancel arrives through our row; only a shutdown is read here
            return bool(context.abort_reason() == AbortReason.SHUTDOWN)

        outcome = execute(core, job_id, name, timing=timing, should_abort=stopping)
        if outcome.retry_in is not None:
            raise RetryLater(outcome.retry_in)
        return outcome.state

    cron = os.environ.get(SYNC_CRON_ENV, DEFAULT_SYNC_CRON)

    @papp.periodic(cron=cron, periodic_id="due", queueing_lock=SYNC_TASK)
    @papp.task(name=SYNC_TASK, queue=QUEUE)
    def sync_due(timestamp: int) -> None:
        from aggregator.jobs.tasks import run_scheduled

        log.info("scheduled sync for period %s", timestamp)
        run_scheduled(core)

    return papp


def run_worker(core: Any, *, concurrency: int = 2, timing: Timing | None = None) -> None:
    """``aggregator worker``: run jobs until SIGINT/SIGTERM (running jobs go back to the queue)."""
    from aggregator.jobs.tasks import warm_up, worker_name

    if core.db.engine.dialect.name != "postgresql":
        raise ConfigError("workers need PostgreSQL: set AGGREGATOR_DATABASE_URL to a postgresql:// URL "
                          "(on SQLite, `aggregator serve` runs jobs in its own process)")
    timing = timing or Timing.from_env()
    name = worker_name("worker")
    dispatcher = QueueDispatcher(core)
    stop = threading.Event()
    reaper = threading.Thread(target=_reaper, args=(dispatcher, timing, stop), name="job-reaper", daemon=True)
    try:
        warm_up()  # before the worker registers: its first job does not pay for the imports
        dispatcher.reap(timing)
        reaper.start()
        papp = worker_app(core, name, timing)
        log.info("worker %s: concurrency %d, dead-worker bound %.0f s", name, concurrency, timing.dead_after)
        papp.run_worker(queues=[QUEUE], concurrency=max(1, concurrency), name=name,
                        update_heartbeat_interval=timing.beat, stalled_worker_timeout=timing.stale_after,
                        fetch_job_polling_interval=timing.beat, abort_job_polling_interval=timing.beat,
                        shutdown_graceful_timeout=2 * timing.beat)
    finally:
        stop.set()
        dispatcher.shutdown()
