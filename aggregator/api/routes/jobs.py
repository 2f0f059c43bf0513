"""Pulls (``POST /cases/{case}/pulls`` -> 202 + job) and jobs: state, progress, cancel.

A job's view adds, per source, the items done, failed and expected (live numbers from the
connector's progress and the pull's ledger rows) and a ledger summary of the case (counts by
state, refreshed at most every couple of seconds so that polling stays cheap).
"""

from __future__ import annotations

import threading
import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from sqlalchemy import func, select

from aggregator import audit
from aggregator.accounts import Principal
from aggregator.api.auth import Caller, actor, audited, guard, require
from aggregator.api.jobs import Job
from aggregator.api.problems import documented
from aggregator.app import App
from aggregator.errors import NotFound
from aggregator.jobs import lock as case_lock
from aggregator.jobs import records
from aggregator.jobs.lock import CaseBusy
from aggregator.jobs.view import merge_progress, read_sources
from aggregator.store.models import LedgerItem, Source

router = APIRouter(tags=["jobs"], responses=documented(400, 403, 404, 409, 422))
LEDGER_EVERY = 2.0
SOURCES_EVERY = 0.5
_ledger_cache: dict[tuple[str, str], tuple[float, dict[str, Any]]] = {}
_ledger_lock = threading.Lock()


class PullIn(BaseModel):
    sources: list[int] = Field(default_factory=list, max_length=1000,
                               description="Only these source ids (default: all of the case's sources)")


@router.post("/cases/{case}/pulls", status_code=202, summary="Pull the case's sources (or some) as a job")
def pull(request: Request, case: str, principal: Caller, body: PullIn | None = None) -> JSONResponse:
    core = guard(request, principal, case, "pulls", audit.EXECUTE, "pull")
    wanted = list(dict.fromkeys((body or PullIn()).sources))
    if wanted:
        with core.db.session() as s:
            have = set(s.scalars(select(Source.id).where(Source.case_id == case)))
        missing = [sid for sid in wanted if sid not in have]
        if missing:
            raise NotFound(f"case {case!r} has no source with id {missing[0]}")
    runner = request.app.state.runner
    if records.active(core, case, "pull") is not None or case_lock.is_held(core, case):
        raise CaseBusy(f"case {case!r} is already being pulled; follow or cancel that job")
    who = actor(request, principal)
    job = runner.submit("pull", case, owner=principal.name, params={"sources": wanted}, actor=who)
    # the request now; the pull's own entry (and one per DICOM study) when it ends
    audit.record(core.db, who, audit.EXECUTE, "pull-request", case_id=case, entity={"job": job.id})
    return JSONResponse(job_view(core, job), status_code=202, headers={"Location": f"/jobs/{job.id}"})


def _ledger_summary(core: App, job: Job) -> dict[str, Any]:
    """Counts by state of the case's ledger: once for a finished job, every few seconds before."""
    now = time.monotonic()
    final = job.finished_at is not None
    key = (job.id, "final" if final else "live")
    case = job.case_id
    with _ledger_lock:
        hit = _ledger_cache.get(key)
    if hit and (final or now - hit[0] < LEDGER_EVERY):
        return hit[1]
    counts: dict[str, int] = {}
    with core.db.session() as s:
        q = (select(LedgerItem.kind, LedgerItem.state, func.count()).join(Source, Source.id == LedgerItem.source_id)
             .where(Source.case_id == case).group_by(LedgerItem.kind, LedgerItem.state))
        for kind, state, n in s.execute(q):
            name = "quarantined" if kind == "quarantine" else str(state)
            counts[name] = counts.get(name, 0) + int(n)
    with _ledger_lock:
        _ledger_cache.pop((job.id, "live"), None)
        _ledger_cache[key] = (now, counts)
    return counts


_source_cache: dict[tuple[str, str], tuple[float, list[dict[str, Any]]]] = {}


def _per_source(core: App, job: Job) -> list[dict[str, Any]]:
    """Per-source numbers: read from the database at most every ``SOURCES_EVERY`` s per job.

    Browsers poll every second and many may watch one job; the live counts of the connector's
    progress are added on every call, so the answer still moves between two reads.
    """
    if job.kind != "pull" or job.started_at is None:
        return []
    now = time.monotonic()
    key = (job.id, "final" if job.finished_at is not None else "live")
    with _ledger_lock:
        hit = _source_cache.get(key)
    if hit is not None and (key[1] == "final" or now - hit[0] < SOURCES_EVERY):
        rows = hit[1]
    else:
        rows = read_sources(core, job)
        with _ledger_lock:
            _source_cache.pop((job.id, "live"), None)
            _source_cache[key] = (now, rows)
    return merge_progress(rows, job.progress)


def job_view(core: App, job: Job) -> dict[str, Any]:
    data = job.to_dict()
    data["sources"] = _per_source(core, job)
    data["ledger"] = _ledger_summary(core, job)
    data["links"] = {"self": f"/jobs/{job.id}", "case": f"/cases/{job.case_id}"}
    return data


def _job_for(request: Request, principal: Principal, job_id: str) -> tuple[App, Job]:
    core = require(request, principal, "jobs", audit.READ, "job")
    job = request.app.state.runner.status(job_id)
    guard(request, principal, job.case_id, "jobs", audit.READ, "job")
    return core, job


@router.get("/jobs/{job_id}", summary="A job's state, per-source progress, ledger summary and errors")
def status(request: Request, job_id: str, principal: Caller) -> dict[str, Any]:
    core, job = _job_for(request, principal, job_id)
    return job_view(core, job)


@router.post("/jobs/{job_id}/cancel", status_code=202, summary="Ask a job to stop at its next step")
def cancel(request: Request, job_id: str, principal: Caller) -> dict[str, Any]:
    core, job = _job_for(request, principal, job_id)
    job = request.app.state.runner.cancel(job_id)
    audited(request, principal, audit.EXECUTE, "job-cancel", case_id=job.case_id, entity={"job": job.id})
    return job_view(core, job)


@router.get("/cases/{case}/jobs", summary="The case's jobs, oldest first")
def case_jobs(request: Request, case: str, principal: Caller) -> list[dict[str, Any]]:
    guard(request, principal, case, "jobs", audit.READ, "job-list")
    return [j.to_dict() for j in request.app.state.runner.list(case)]
