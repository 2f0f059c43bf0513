"""The API's jobs: a :class:`~aggregator.jobs.dispatch.JobService` over the dispatcher for this database.

Job state lives in the ``jobs`` table (:mod:`aggregator.jobs.records`), so a job outlives the
request and the process: on SQLite ``aggregator serve`` runs jobs on its own threads
(:class:`~aggregator.jobs.dispatch.InProcessDispatcher`); on PostgreSQL it defers them to
Procrastinate and ``aggregator worker`` processes run them (:mod:`aggregator.jobs.queue`). The
routes only call ``submit``, ``cancel``, ``status`` and ``list``.
"""

from __future__ import annotations

from typing import Any

from aggregator.jobs.dispatch import JobService, make_dispatcher
from aggregator.jobs.records import ACTIVE, CANCELLED, DONE, FAILED, FINAL, PARTIAL, QUEUED, RUNNING, Job
from aggregator.jobs.tasks import JobCancelled

__all__ = ["ACTIVE", "CANCELLED", "DONE", "FAILED", "FINAL", "PARTIAL", "QUEUED", "RUNNING", "Job", "JobCancelled",
           "JobRunner", "JobService", "default_runner"]

#: what the routes need (kept as a name for the API's wiring)
JobRunner = JobService


def default_runner(core: Any, workers: int, engine: str | None = None) -> JobService:
    """In-process threads on SQLite; the Procrastinate queue on PostgreSQL (see ``make_dispatcher``)."""
    return JobService(core, make_dispatcher(core, workers=workers, engine=engine, schedule=True))
