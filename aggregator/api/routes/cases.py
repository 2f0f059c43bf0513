"""Cases: create, list, show, delete (navigators), and assignment to a consultant.

Patient demographics go in request bodies only; case ids, which appear in URLs, are chosen by
the navigator and must not be PHI (the README says so; they are opaque to the service).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from aggregator import audit
from aggregator.accounts import assign_case, visible_cases
from aggregator.api.auth import Caller, audited, guard, require
from aggregator.api.problems import documented
from aggregator.cases import case_summary, create_case, delete_case, list_cases
from aggregator.jobs import lock as case_lock
from aggregator.jobs.lock import CaseBusy

router = APIRouter(tags=["cases"], responses=documented(400, 403, 404, 409, 422))


class CaseIn(BaseModel):
    case: str = Field(max_length=100, description="An opaque case id (it appears in URLs: no PHI)")
    checklist: str = Field(max_length=200, description="A built-in checklist name")
    patient_name: str | None = Field(default=None, max_length=200)
    birth_date: str | None = Field(default=None, max_length=10, description="YYYY-MM-DD")
    case_date: str | None = Field(default=None, max_length=10, description="YYYY-MM-DD")
    question: str | None = Field(default=None, max_length=4000,
                                 description="The case question for the consultant, shown first on the summary page")


class AssignmentIn(BaseModel):
    user: str = Field(max_length=100)


@router.get("/cases", summary="Cases the caller may see (same JSON as `case list --json`)")
def cases(request: Request, principal: Caller) -> list[dict[str, Any]]:
    core = require(request, principal, "cases:list", audit.READ, "case-list")
    visible = visible_cases(core.db, principal)
    rows = [r for r in list_cases(core) if visible is None or r["case"] in visible]
    audited(request, principal, audit.READ, "case-list")
    return rows


@router.post("/cases", status_code=201, summary="Open a case")
def create(request: Request, body: CaseIn, principal: Caller) -> JSONResponse:
    core = require(request, principal, "cases:write", audit.CREATE, "case")
    if body.checklist.endswith((".yaml", ".yml")) or "/" in body.checklist:
        from aggregator.errors import UsageError

        raise UsageError("over the API, give a built-in checklist name")  # no server paths from clients
    data = create_case(core, body.case, body.checklist, patient_name=body.patient_name,
                       birth_date=body.birth_date, case_date=body.case_date,
                       question=body.question)
    audited(request, principal, audit.CREATE, "case", case_id=body.case)
    return JSONResponse(data, status_code=201, headers={"Location": f"/cases/{body.case}"})


@router.get("/cases/{case}", summary="A case, its sources and their last pulls (as `case show --json`)")
def show(request: Request, case: str, principal: Caller) -> dict[str, Any]:
    core = guard(request, principal, case, "cases:read", audit.READ, "case")
    from aggregator.jobs.pull import reap_dead_pulls, reap_stale_pulls

    reap_dead_pulls(core)
    reap_stale_pulls(core)
    data = case_summary(core, case)
    audited(request, principal, audit.READ, "case", case_id=case)
    return data


@router.delete("/cases/{case}", summary="Delete a case, its ledger and its raw records")
def delete(request: Request, case: str, principal: Caller) -> dict[str, Any]:
    core = guard(request, principal, case, "cases:write", audit.DELETE, "case")
    lock = case_lock.try_lock(core, case)
    if lock is None:
        raise CaseBusy(f"case {case!r} is being pulled; cancel or wait for the pull first")
    try:
        delete_case(core, case)
    finally:
        lock.release()
    audited(request, principal, audit.DELETE, "case", case_id=case)
    return {"case": case, "deleted": True}


@router.post("/cases/{case}/assignments", status_code=201, summary="Let a consultant see the case")
def assign(request: Request, case: str, body: AssignmentIn, principal: Caller) -> dict[str, Any]:
    core = require(request, principal, "assign", audit.UPDATE, "assignment")
    try:
        data = assign_case(core.db, case, body.user)
    except Exception as exc:
        audited(request, principal, audit.UPDATE, "assignment", case_id=case, outcome=audit.DENIED,
                detail=type(exc).__name__, access_change=True)
        raise
    audited(request, principal, audit.UPDATE, "assignment", case_id=case, access_change=True,
            entity={"user": data["user"]})
    return data
