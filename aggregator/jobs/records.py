"""Job rows: the one place a job's state lives, whichever process queued it or runs it.

A job is ``queued`` until a runner *claims* it (an atomic update from ``queued`` to
``running`` that also draws a random *lease*), then ``running`` until it ends in ``done``,
``partial``, ``failed`` or ``cancelled``. While it runs, its runner writes a heartbeat (and
the per-source progress) every :attr:`Timing.beat` seconds, conditioned on its lease.

Why a lease: a runner that lost touch with the database for longer than the stale bound may
still be alive. When :func:`reap` hands its job to another runner it clears the lease, so the
old runner's next heartbeat finds nothing to update, learns that it lost the job and stops;
its late final write is refused the same way. A job therefore never has two owners that both
think they may finish it, and never stays ``running`` after its runner died: a heartbeat
older than :attr:`Timing.stale_after` puts it back in the queue (from where the pull resumes
from its ledger), or fails it after :attr:`Timing.max_attempts` claims.
"""

from __future__ import annotations

import os
import random
import secrets
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import or_, select, update

from aggregator.errors import NotFound, UsageError
from aggregator.store.models import JobRow, utcnow

QUEUED, RUNNING, DONE, PARTIAL, FAILED, CANCELLED = "queued", "running", "done", "partial", "failed", "cancelled"
ACTIVE = (QUEUED, RUNNING)
FINAL = frozenset({DONE, PARTIAL, FAILED, CANCELLED})
KINDS = ("pull", "package")

DEAD_AFTER_ENV = "AGGREGATOR_JOB_DEAD_AFTER"
MAX_ATTEMPTS_ENV = "AGGREGATOR_JOB_MAX_ATTEMPTS"
BACKOFF_ENV = "AGGREGATOR_JOB_BACKOFF"


def _env_float(name: str, default: float) -> float:
    try:
        value = float(os.environ.get(name, default))
    except ValueError:
        raise UsageError(f"{name} must be a number of seconds") from None
    if value <= 0:
        raise UsageError(f"{name} must be more than 0")
    return value


@dataclass(frozen=True)
class Timing:
    """How fast a dead runner is noticed, and how retries back off.

    ``dead_after`` is the promise: a job whose runner died is back in the queue within that
    many seconds. Heartbeats go every ``beat`` s; a heartbeat older than ``stale_after`` (half
    the bound) is stale, reapers look every ``reap_every`` s (a sixth), and a worker looks for
    work at least every ``beat`` s, so the worst case is two thirds of the bound plus a beat.
    """

    dead_after: float = 60.0
    max_attempts: int = 5
    backoff: float = 2.0
    backoff_cap: float = 300.0

    @property
    def beat(self) -> float:
        return min(2.0, self.dead_after / 6)

    @property
    def stale_after(self) -> float:
        return self.dead_after / 2

    @property
    def reap_every(self) -> float:
        return self.dead_after / 6

    def retry_in(self, attempts: int) -> float:
        """Exponential backoff with jitter after ``attempts`` claims (1, 2, ...)."""
        base = min(self.backoff_cap, self.backoff * 2 ** max(0, attempts - 1))
        return round(base * random.uniform(0.8, 1.2), 3)

    @classmethod
    def from_env(cls) -> Timing:
        attempts = int(_env_float(MAX_ATTEMPTS_ENV, 5))
        return cls(dead_after=_env_float(DEAD_AFTER_ENV, 60.0), max_attempts=max(1, attempts),
                   backoff=_env_float(BACKOFF_ENV, 2.0))


def _aware(d: datetime | None) -> datetime | None:
    """SQLite gives naive datetimes back; every time we store is UTC."""
    if d is None or d.tzinfo is not None:
        return d
    return d.replace(tzinfo=UTC)


def _iso(d: datetime | None) -> str | None:
    d = _aware(d)
    return d.isoformat() if d else None


@dataclass
class Job:
    """A job row as read; what the API, the CLI and the task functions see."""

    id: str
    kind: str
    case_id: str
    owner: str
    state: str
    params: dict[str, Any] = field(default_factory=dict)
    actor: dict[str, Any] = field(default_factory=dict)
    result: dict[str, Any] = field(default_factory=dict)
    progress: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    attempts: int = 0
    created_at: datetime | None = None
    started_at: datetime | None = None
    heartbeat_at: datetime | None = None
    finished_at: datetime | None = None
    run_after: datetime | None = None
    worker: str | None = None
    lease: str | None = None
    cancel_requested: bool = False
    queue_job_id: int | None = None

    @classmethod
    def of(cls, row: JobRow) -> Job:
        return cls(id=row.id, kind=row.kind, case_id=row.case_id, owner=row.owner, state=row.state,
                   params=dict(row.params or {}), actor=dict(row.actor or {}), result=dict(row.result or {}),
                   progress=dict(row.progress or {}), error=row.error, attempts=row.attempts,
                   created_at=_aware(row.created_at), started_at=_aware(row.started_at),
                   heartbeat_at=_aware(row.heartbeat_at), finished_at=_aware(row.finished_at),
                   run_after=_aware(row.run_after), worker=row.worker, lease=row.lease,
                   cancel_requested=bool(row.cancel_requested), queue_job_id=row.queue_job_id)

    @property
    def final(self) -> bool:
        return self.state in FINAL

    def to_dict(self) -> dict[str, Any]:
        """The job's JSON (API and ``job show --json``): no actor, no lease."""
        return {"id": self.id, "kind": self.kind, "case": self.case_id, "state": self.state,
                "created_at": _iso(self.created_at), "started_at": _iso(self.started_at),
                "heartbeat_at": _iso(self.heartbeat_at), "finished_at": _iso(self.finished_at),
                "error": self.error, "result": self.result, "params": self.params,
                "cancel_requested": self.cancel_requested, "attempts": self.attempts,
                "worker": self.worker, "run_after": _iso(self.run_after), "progress": self.progress}


def _naive_if_sqlite(app: Any, d: datetime) -> datetime:
    return d.replace(tzinfo=None) if app.db.engine.dialect.name == "sqlite" else d


def create(app: Any, kind: str, case_id: str, *, owner: str, params: dict[str, Any] | None = None,
           actor: Any = None) -> Job:
    """A new queued job (the caller hands it to a dispatcher)."""
    if kind not in KINDS:
        raise UsageError(f"unknown job kind {kind!r}")
    who = asdict(actor) if actor is not None and hasattr(actor, "__dataclass_fields__") else dict(actor or {})
    row = JobRow(id=secrets.token_hex(8), kind=kind, case_id=case_id, owner=owner, state=QUEUED,
                 params=dict(params or {}), actor=who, result={}, progress={}, attempts=0,
                 created_at=utcnow(), cancel_requested=False)
    with app.db.session() as s:
        s.add(row)
        s.flush()
        return Job.of(row)


def get(app: Any, job_id: str) -> Job:
    with app.db.session() as s:
        row = s.get(JobRow, job_id)
        if row is None:
            raise NotFound(f"no job with id {job_id!r}")
        return Job.of(row)


def list_jobs(app: Any, case_id: str | None = None, *, states: tuple[str, ...] | None = None,
              limit: int = 500) -> list[Job]:
    """Jobs, oldest first (the newest ``limit``)."""
    with app.db.session() as s:
        q = select(JobRow)
        if case_id is not None:
            q = q.where(JobRow.case_id == case_id)
        if states:
            q = q.where(JobRow.state.in_(states))
        rows = list(s.scalars(q.order_by(JobRow.created_at.desc(), JobRow.id).limit(limit)))
        return [Job.of(r) for r in reversed(rows)]


def active(app: Any, case_id: str, kind: str) -> Job | None:
    """The case's queued or running job of this kind, if any."""
    jobs = list_jobs(app, case_id, states=ACTIVE, limit=10)
    return next((j for j in jobs if j.kind == kind), None)


def set_queue_id(app: Any, job_id: str, queue_job_id: int) -> None:
    with app.db.session() as s:
        s.execute(update(JobRow).where(JobRow.id == job_id).values(queue_job_id=queue_job_id))


def claim(app: Any, job_id: str, worker: str) -> str | None:
    """Take a queued job for this runner: its new lease, or None when it is not ours to run."""
    lease = secrets.token_hex(8)
    now = utcnow()
    with app.db.session() as s:
        res = s.execute(update(JobRow).where(JobRow.id == job_id, JobRow.state == QUEUED,
                                             JobRow.cancel_requested.is_(False))
                        .values(state=RUNNING, lease=lease, worker=worker[:200], heartbeat_at=now,
                                attempts=JobRow.attempts + 1, run_after=None))
        if not getattr(res, "rowcount", 0):
            return None
        # the first start is kept: a resumed job shows when it really began
        s.execute(update(JobRow).where(JobRow.id == job_id, JobRow.started_at.is_(None)).values(started_at=now))
    return lease


class LeaseLost(BaseException):
    """This runner no longer owns the job (it was reaped and handed to another runner).

    A ``BaseException``, like a cancel, so that no per-item ``except Exception`` swallows it.
    """


def beat(app: Any, job_id: str, lease: str, progress: dict[str, Any]) -> bool:
    """Heartbeat plus progress; True when a cancel was asked. Raises :class:`LeaseLost`."""
    with app.db.session() as s:
        res = s.execute(update(JobRow).where(JobRow.id == job_id, JobRow.lease == lease, JobRow.state == RUNNING)
                        .values(heartbeat_at=utcnow(), progress=progress))
        if not getattr(res, "rowcount", 0):
            raise LeaseLost()
        return bool(s.scalar(select(JobRow.cancel_requested).where(JobRow.id == job_id)))


def finish(app: Any, job_id: str, lease: str, state: str, *, error: str | None, result: dict[str, Any],
           progress: dict[str, Any]) -> bool:
    """The final state, written only under the runner's lease; False when it was lost."""
    assert state in FINAL
    with app.db.session() as s:
        res = s.execute(update(JobRow).where(JobRow.id == job_id, JobRow.lease == lease, JobRow.state == RUNNING)
                        .values(state=state, error=error, result=result, progress=progress,
                                finished_at=utcnow(), heartbeat_at=utcnow(), lease=None))
        return bool(getattr(res, "rowcount", 0))


def retry_later(app: Any, job_id: str, lease: str, *, error: str, delay: float, result: dict[str, Any],
                progress: dict[str, Any]) -> bool:
    """Back to the queue after a retriable error, to run again after ``delay`` seconds."""
    now = utcnow()
    with app.db.session() as s:
        res = s.execute(update(JobRow).where(JobRow.id == job_id, JobRow.lease == lease, JobRow.state == RUNNING)
                        .values(state=QUEUED, error=error, result=result, progress=progress, lease=None,
                                worker=None, heartbeat_at=now, run_after=now + timedelta(seconds=delay)))
        return bool(getattr(res, "rowcount", 0))


def release(app: Any, job_id: str, lease: str, reason: str) -> bool:
    """Give a running job back to the queue at once (its runner is shutting down)."""
    with app.db.session() as s:
        res = s.execute(update(JobRow).where(JobRow.id == job_id, JobRow.lease == lease, JobRow.state == RUNNING)
                        .values(state=QUEUED, error=reason, lease=None, worker=None, run_after=None))
        return bool(getattr(res, "rowcount", 0))


def request_cancel(app: Any, job_id: str) -> Job:
    """Ask a job to stop: a queued one is cancelled now, a running one at its next step."""
    now = utcnow()
    with app.db.session() as s:
        s.execute(update(JobRow).where(JobRow.id == job_id, JobRow.state == QUEUED)
                  .values(state=CANCELLED, cancel_requested=True, finished_at=now, error="cancelled before it started"))
        s.execute(update(JobRow).where(JobRow.id == job_id, JobRow.state == RUNNING).values(cancel_requested=True))
    return get(app, job_id)


def reap(app: Any, timing: Timing, *, now: datetime | None = None) -> list[Job]:
    """Running jobs whose heartbeat is stale: back to the queue (or failed, or cancelled).

    Returns the jobs put back in the queue, for the caller's dispatcher to run again. Safe to
    call from several processes at once: each update is conditioned on the lease it read.
    """
    now = now or utcnow()
    cutoff = _naive_if_sqlite(app, now - timedelta(seconds=timing.stale_after))
    with app.db.session() as s:
        stale = [(r.id, r.lease, r.attempts, r.cancel_requested) for r in s.scalars(
            select(JobRow).where(JobRow.state == RUNNING,
                                 or_(JobRow.heartbeat_at.is_(None), JobRow.heartbeat_at < cutoff)))]
    requeued: list[str] = []
    for job_id, lease, attempts, cancelled in stale:
        where = (JobRow.id == job_id, JobRow.state == RUNNING, JobRow.lease == lease)
        if cancelled:
            values: dict[str, Any] = {"state": CANCELLED, "finished_at": now, "lease": None,
                                      "error": "cancelled on request; its worker stopped answering"}
        elif attempts >= timing.max_attempts:
            values = {"state": FAILED, "finished_at": now, "lease": None,
                      "error": f"its worker stopped answering {attempts} times; not tried again"}
        else:
            values = {"state": QUEUED, "lease": None, "worker": None, "run_after": None,
                      "error": "its worker stopped answering; resumed from the ledger"}
        with app.db.session() as s:
            res = s.execute(update(JobRow).where(*where).values(**values))
            if getattr(res, "rowcount", 0) and values["state"] == QUEUED:
                requeued.append(job_id)
    return [get(app, j) for j in requeued]
