"""The task functions, and :func:`execute`, which runs one job the same way on every path.

The in-process runner of ``aggregator serve`` (SQLite) and the Procrastinate workers of
``aggregator worker`` (PostgreSQL) both call :func:`execute` with a job id; only *who calls*
differs (:mod:`aggregator.jobs.dispatch`, :mod:`aggregator.jobs.queue`). ``execute`` claims
the job (:func:`aggregator.jobs.records.claim`), keeps its heartbeat and progress in the row
from a watcher thread, which also reads the cancel flag, runs the task function of its kind,
and writes the outcome:

* success: ``done`` or ``partial`` with the task's result;
* a retriable error of the one exception tree (:func:`aggregator.errors.is_retriable`), with
  attempts left: back to the queue after an exponential backoff (the dispatcher waits);
* a fatal error, or retries used up: ``failed`` at once with the error's (PHI-free) message;
* a cancel: ``cancelled``. The connector stops at its next progress step, and a connector with
  a ``cancel()`` of its own is told at once: DIMSE sends C-CANCEL-RQ and ends its retrieve
  cleanly, Bulk Data stops waiting for its export and deletes it on the server.

A pull that stops half way, for any reason, leaves the ledger consistent: each item's row is
written with its data, the cursor only at the end (see :mod:`aggregator.jobs.pull`), so the
next attempt resumes from the ledger and fetches nothing that is already ``done``.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from aggregator.errors import (
    AggregatorError,
    DatabaseUnavailable,
    NotImplementedYet,
    TransientConnectorError,
    is_retriable,
)
from aggregator.jobs import records
from aggregator.jobs.records import CANCELLED, DONE, FAILED, PARTIAL, Job, LeaseLost, Timing

log = logging.getLogger(__name__)

PACKAGES_FOLDER = "packages"


class JobCancelled(BaseException):
    """Raised inside a job at its next progress step after a cancel was asked.

    A ``BaseException``, so that no per-item ``except Exception`` in a connector swallows it.
    """


class WorkerStopping(BaseException):
    """The runner is shutting down: the job goes back to the queue for another runner."""


def worker_name(prefix: str) -> str:
    return f"{prefix}:{socket.gethostname()}:{os.getpid()}"


class JobProgress:
    """A connector's :class:`connectors.base.Progress` for one source of a job; counts, no PHI."""

    def __init__(self, ctx: JobContext, label: str) -> None:
        self.ctx = ctx
        self.label = label
        self.total: int | None = None
        self.done = 0
        self.note = ""
        self.stops_itself = False

    def _check(self) -> None:
        # a connector with a stop of its own (DIMSE: C-CANCEL-RQ) is left to end its operation
        # cleanly; raising in the middle of it would only abort the association
        if not self.stops_itself:
            self.ctx.check()

    def set_total(self, total: int | None) -> None:
        self.total = total
        self._check()

    def advance(self, n: int = 1) -> None:
        self.done += n
        self._check()

    def message(self, text: str) -> None:
        self.note = text[:80]
        self._check()

    def on_cancel(self, hook: Callable[[], None], *, stops_itself: bool = False) -> None:
        """Call ``hook`` (from the watcher thread) when the job is asked to stop.

        ``stops_itself``: the connector ends its pull by itself once told, so progress calls
        no longer raise (DIMSE); otherwise the hook only cuts a wait short (Bulk Data's
        polls) and the next progress call stops the pull.
        """
        self.stops_itself = stops_itself
        self.ctx.add_stop_hook(hook)


@dataclass
class JobContext:
    """What a task function gets: the app, its job row as claimed, and the stop signals."""

    app: Any
    job: Job
    lease: str
    timing: Timing
    stop_reason: str | None = None
    """None while the job may go on; "cancelled", "lost" or "shutdown" once it must stop."""
    sources: list[JobProgress] = field(default_factory=list)
    _hooks: list[Callable[[], None]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    should_abort: Callable[[], bool] | None = None
    """The dispatcher's own stop signal (Procrastinate's abort on worker shutdown)."""

    def progress_for(self, label: str) -> JobProgress:
        p = JobProgress(self, label)
        with self._lock:
            self.sources.append(p)
        return p

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {p.label: {"done": p.done, "expected": p.total, "note": p.note} for p in self.sources}

    def add_stop_hook(self, hook: Callable[[], None]) -> None:
        with self._lock:
            self._hooks.append(hook)
            fire = self.stop_reason is not None
        if fire:
            hook()

    def stop(self, reason: str) -> None:
        with self._lock:
            if self.stop_reason is not None:
                return
            self.stop_reason = reason
            hooks = list(self._hooks)
        for hook in hooks:
            try:
                hook()
            except Exception:  # a connector that cannot be told still stops at its next step
                log.warning("a stop hook of job %s failed", self.job.id)

    def check(self) -> None:
        """Raise the stop signal at a connector's step; called from every progress call."""
        reason = self.stop_reason
        if reason == "cancelled":
            raise JobCancelled()
        if reason == "lost":
            raise LeaseLost()
        if reason == "shutdown":
            raise WorkerStopping()

    def actor(self) -> Any:
        from aggregator import audit

        data = self.job.actor
        if not data:
            return audit.Actor("system", kind="system")
        return audit.Actor(name=str(data.get("name") or "unknown"), kind=str(data.get("kind") or "user"),
                           token_id=data.get("token_id"), address=data.get("address"), role=data.get("role"))


class _Watcher(threading.Thread):
    """Heartbeat and progress into the job's row; the cancel flag and a lost lease out of it."""

    def __init__(self, ctx: JobContext) -> None:
        super().__init__(daemon=True, name=f"job-watch-{ctx.job.id}")
        self.ctx = ctx
        self.halt = threading.Event()

    def run(self) -> None:
        ctx = self.ctx
        last_ok = time.monotonic()
        while not self.halt.wait(ctx.timing.beat):
            if ctx.should_abort is not None and ctx.should_abort():
                ctx.stop("shutdown")
            try:
                if records.beat(ctx.app, ctx.job.id, ctx.lease, ctx.snapshot()):
                    ctx.stop("cancelled")
                last_ok = time.monotonic()
            except LeaseLost:
                log.warning("job %s was handed to another runner; stopping here", ctx.job.id)
                ctx.stop("lost")
                return
            except Exception as exc:
                # the database is unreachable: once the job may have been reaped, stop, so that
                # two runners never pull one case
                log.warning("heartbeat of job %s failed (%s)", ctx.job.id, type(exc).__name__)
                if time.monotonic() - last_ok > ctx.timing.stale_after:
                    ctx.stop("lost")
                    return


class RetrySources(TransientConnectorError):
    """Some sources of a pull failed with retriable errors: try those again later.

    ``final`` is the job's outcome if no attempt is left: the pull's own partial result.
    """

    def __init__(self, sources: list[int], final: tuple[str, dict[str, Any]]) -> None:
        super().__init__(f"{len(sources)} source(s) failed with a retriable error")
        self.sources = sources
        self.final = final


TaskFn = Callable[[JobContext], tuple[str, dict[str, Any]]]


def pull_task(ctx: JobContext) -> tuple[str, dict[str, Any]]:
    """Pull the case's sources (or the job's), under the case lock; resumes from the ledger."""
    from aggregator import audit
    from aggregator.jobs.pull import pull_case

    app, job = ctx.app, ctx.job
    who = ctx.actor()
    wanted = [int(s) for s in job.params.get("sources") or []]
    retry = [int(s) for s in job.result.get("retry_sources") or []]
    earlier = {int(p["source"]): p for p in job.result.get("pulls", [])}
    outcome, detail = audit.SERIOUS_FAILURE, "not finished"
    try:
        summaries = pull_case(app, job.case_id, source_ids=retry or wanted or None, progress_for=ctx.progress_for,
                              wait=0.0, actor=who, job_id=job.id, worker=job.worker)
        ctx.check()  # a DIMSE pull told to cancel ends "failed"; the job is cancelled, not retried
        pulls = {**earlier, **{s.source_id: s.to_dict() for s in summaries}}
        states = {p["state"] for p in pulls.values()}
        state = FAILED if states == {"failed"} else PARTIAL if states & {"failed", "partial"} else DONE
        result: dict[str, Any] = {"pulls": [pulls[k] for k in sorted(pulls)]}
        outcome, detail = (audit.SUCCESS, "") if state != FAILED else (audit.MINOR_FAILURE, "every source failed")
        again = [s.source_id for s in summaries if s.state == "failed" and s.retriable]
        if again:
            raise RetrySources(again, (state, result))
        if state != FAILED:
            from aggregator.records_requests.store import track_after_pull

            # what arrived fills the lines of records requests, as after a CLI pull
            received = track_after_pull(app, job.case_id)
            if received is not None:
                result["requests_received"] = received
        return state, result
    except BaseException as exc:
        if not isinstance(exc, RetrySources):
            detail = type(exc).__name__
        raise
    finally:
        audit.record(app.db, who, audit.EXECUTE, "pull", case_id=job.case_id, outcome=outcome, detail=detail,
                     entity={"job": job.id})


def package_task(ctx: JobContext) -> tuple[str, dict[str, Any]]:
    """Build the consultant package as ``<case folder>/packages/<id>.zip`` plus its ``.json``."""
    import hashlib
    import json
    import secrets

    from aggregator import audit
    from aggregator.pipeline import package_case

    app, case, who = ctx.app, ctx.job.case_id, ctx.actor()
    package_id = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(3)
    folder = app.case_dir(case) / PACKAGES_FOLDER
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        path, report = package_case(app, case, folder / f"{package_id}.zip", as_zip=True)
    except BaseException as exc:
        audit.record(app.db, who, audit.CREATE, "package", case_id=case, outcome=audit.MINOR_FAILURE,
                     detail=type(exc).__name__, entity={"job": ctx.job.id})
        raise
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    meta = {"id": package_id, "case": case, "size": path.stat().st_size, "sha256": digest.hexdigest(),
            "created_at": datetime.now(UTC).isoformat(), "completeness": report.get("score"),
            "links": {"download": f"/cases/{case}/packages/{package_id}",
                      "summary": f"/cases/{case}/packages/{package_id}/summary"}}
    (folder / f"{package_id}.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
    audit.record(app.db, who, audit.CREATE, "package", case_id=case, entity={"package": package_id, "job": ctx.job.id})
    return DONE, {"package": meta}


TASKS: dict[str, TaskFn] = {"pull": pull_task, "package": package_task}


def warm_up() -> None:
    """Import what the task functions import lazily, before a worker takes its first job.

    The pull path (normalization, pydicom, the connectors) takes about 2 s of CPU to import.
    Imported inside the first job, that time was counted as the job's, and with several
    workers starting at once on a small machine their imports competed with the jobs of the
    others (bench/bench_jobs.py measured 4 workers slower than 1 on 20-file pulls).
    """
    from aggregator import audit, pipeline  # noqa: F401
    from aggregator.jobs import pull  # noqa: F401
    from connectors.base import available_kinds, load_connector_class

    for kind in available_kinds():
        try:
            load_connector_class(kind)
        except Exception as exc:  # a broken plugin fails its own pulls, not the worker
            log.warning("connector %s could not be loaded: %s", kind, type(exc).__name__)


@dataclass(frozen=True)
class Outcome:
    """What :func:`execute` did: the state it left the job in, and when to run it again."""

    state: str
    retry_in: float | None = None


def execute(app: Any, job_id: str, worker: str, *, timing: Timing | None = None,
            should_abort: Callable[[], bool] | None = None) -> Outcome:
    """Run one job to an outcome (see the module docstring). Never leaves it ``running``.

    Returns ``Outcome("skipped")`` when the job is not queued (already taken, cancelled, ended).
    """
    timing = timing or Timing.from_env()
    lease = records.claim(app, job_id, worker)
    if lease is None:
        return Outcome("skipped")
    job = records.get(app, job_id)
    ctx = JobContext(app, job, lease, timing, should_abort=should_abort)
    watcher = _Watcher(ctx)
    watcher.start()
    try:
        return _run(ctx)
    finally:
        watcher.halt.set()


def _run(ctx: JobContext) -> Outcome:
    app, job, lease, timing = ctx.app, ctx.job, ctx.lease, ctx.timing
    fn = TASKS.get(job.kind)
    result: dict[str, Any] = {}
    try:
        if fn is None:
            raise NotImplementedYet(f"no task function for jobs of kind {job.kind!r}")
        state, result = fn(ctx)
        if ctx.stop_reason == "cancelled":
            raise JobCancelled()
        ended = records.finish(app, job.id, lease, state, error=None, result=result, progress=ctx.snapshot())
        return Outcome(state if ended else "lost")
    except JobCancelled:
        records.finish(app, job.id, lease, CANCELLED, error="cancelled on request", result=result,
                       progress=ctx.snapshot())
        return Outcome(CANCELLED)
    except LeaseLost:
        return Outcome("lost")  # another runner has it now; nothing of ours may be written
    except WorkerStopping:
        records.release(app, job.id, lease, "its worker shut down; resumed from the ledger")
        return Outcome("released", retry_in=0.0)
    except BaseException as raised:
        exc = _translated(raised)
        if ctx.stop_reason == "cancelled":
            records.finish(app, job.id, lease, CANCELLED, error="cancelled on request", result=result,
                           progress=ctx.snapshot())
            return Outcome(CANCELLED)
        if ctx.stop_reason == "lost":
            return Outcome("lost")
        if isinstance(exc, AggregatorError):
            message = exc.message  # our messages are PHI-free
        else:
            message = f"unexpected {type(exc).__name__}"
            log.error("job %s failed: %s", job.id, message)
        final: tuple[str, dict[str, Any]] | None = getattr(exc, "final", None)
        if is_retriable(exc) and job.attempts < timing.max_attempts:
            delay = timing.retry_in(job.attempts)
            kept = dict(final[1]) if final else dict(result)
            if isinstance(exc, RetrySources):
                kept["retry_sources"] = exc.sources
            records.retry_later(app, job.id, lease, error=f"{message} (attempt {job.attempts}; trying again)",
                                delay=delay, result=kept, progress=ctx.snapshot())
            return Outcome("queued", retry_in=delay)
        if final is not None:
            records.finish(app, job.id, lease, final[0], error=message, result=final[1], progress=ctx.snapshot())
            return Outcome(final[0])
        records.finish(app, job.id, lease, FAILED, error=message, result=result, progress=ctx.snapshot())
        if not isinstance(exc, Exception):
            raise
        return Outcome(FAILED)


def _translated(exc: BaseException) -> BaseException:
    """A lost database connection as our retriable :class:`DatabaseUnavailable`; anything else as is.

    The driver's error is not ours to classify elsewhere, but a job must not fail for good
    because the database restarted under it: the next attempt resumes from the ledger.
    """
    from sqlalchemy.exc import DBAPIError, DisconnectionError, InterfaceError, OperationalError

    seen: BaseException | None = exc
    for _ in range(5):  # the error raised while handling the first one carries it as its context
        if seen is None:
            break
        if isinstance(seen, DisconnectionError | OperationalError | InterfaceError) or (
                isinstance(seen, DBAPIError) and seen.connection_invalidated):
            return DatabaseUnavailable("the database connection was lost during the job")
        seen = seen.__cause__ or seen.__context__
    return exc


def run_scheduled(app: Any) -> Any:
    """Every due scheduled sync, once (the periodic task of the workers and of ``serve``).

    Imported when the task runs: the schedules pull in croniter, which a process that never
    runs the periodic task need not load.
    """
    from aggregator.jobs import schedule

    return schedule.run_due(app)
