"""Sync schedules (admins and navigators) and the history of syncs with what each changed (navigators).

Consultants see neither: a schedule says how a case is run, and a sync's changes are about the
record. Over the API a webhook's secret can only be named as an environment variable whose name
starts with ``AGGREGATOR_WEBHOOK_SECRET``: a caller must not be able to point the server at a
file or at another secret of the service (a database password) and use it as an HMAC key.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, Field

from aggregator import audit
from aggregator.api.auth import Caller, audited, guard, require
from aggregator.api.problems import documented
from aggregator.errors import UsageError
from aggregator.jobs.schedule import clear_schedule, get_schedule, list_schedules, set_schedule
from aggregator.jobs.sync import get_sync, list_syncs
from aggregator.jobs.webhooks import API_SECRET_PREFIX

router = APIRouter(tags=["schedules"], responses=documented(400, 403, 404, 422))


class ScheduleIn(BaseModel):
    cron: str = Field(max_length=120, description='Five-field cron expression, e.g. "0 6 * * *"')
    timezone: str = Field(default="UTC", max_length=64, description="IANA time zone the cron is read in")
    webhook_url: str | None = Field(default=None, max_length=2000,
                                    description="POST a signed summary (ids, counts, links) here after each sync")
    webhook_secret_env: str | None = Field(
        default=None, max_length=200,
        description=f"Name of the server's environment variable holding the HMAC secret ({API_SECRET_PREFIX}...)")


@router.get("/schedules", summary="Every sync schedule and when it next runs (as `schedule list --json`)")
def schedules(request: Request, principal: Caller) -> list[dict[str, Any]]:
    core = require(request, principal, "schedules", audit.READ, "schedule-list")
    return list_schedules(core)


@router.get("/cases/{case}/schedule", summary="The case's sync schedule (as `schedule show --json`)")
def show(request: Request, case: str, principal: Caller) -> dict[str, Any]:
    core = guard(request, principal, case, "schedules", audit.READ, "schedule")
    return get_schedule(core, case)


@router.put("/cases/{case}/schedule", summary="Set or replace the case's sync schedule")
def put(request: Request, case: str, body: ScheduleIn, principal: Caller) -> dict[str, Any]:
    core = guard(request, principal, case, "schedules", audit.UPDATE, "schedule")
    env = body.webhook_secret_env
    if env is not None and not env.startswith(API_SECRET_PREFIX):
        raise UsageError(f"over the API, the webhook secret's variable name must start with {API_SECRET_PREFIX}")
    data = set_schedule(core, case, body.cron, timezone=body.timezone, webhook_url=body.webhook_url,
                        webhook_secret_env=env)
    audited(request, principal, audit.UPDATE, "schedule", case_id=case)
    return data


@router.delete("/cases/{case}/schedule", summary="Remove the case's sync schedule (past syncs stay)")
def clear(request: Request, case: str, principal: Caller) -> dict[str, Any]:
    core = guard(request, principal, case, "schedules", audit.UPDATE, "schedule")
    data = clear_schedule(core, case)
    audited(request, principal, audit.UPDATE, "schedule", case_id=case)
    return data


@router.get("/cases/{case}/syncs", summary="The case's syncs, newest first, with what each changed")
def syncs(request: Request, case: str, principal: Caller,
          limit: Annotated[int, Query(ge=1, le=500)] = 50) -> list[dict[str, Any]]:
    core = guard(request, principal, case, "syncs", audit.READ, "sync-list")
    rows = list_syncs(core, case, limit=limit)
    audited(request, principal, audit.READ, "sync-list", case_id=case)
    return rows


@router.get("/cases/{case}/syncs/{sync_id}", summary="One sync and what it changed (the webhook's link)")
def sync(request: Request, case: str, sync_id: int, principal: Caller) -> dict[str, Any]:
    core = guard(request, principal, case, "syncs", audit.READ, "sync")
    data = get_sync(core, case, sync_id)
    audited(request, principal, audit.READ, "sync", case_id=case, entity={"sync": str(sync_id)})
    return data
