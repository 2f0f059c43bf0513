"""Records requests of a case: draft, list, show, download the letter, and track them.

Navigators (and admins) only: a letter names the patient, their birth date and every record
asked for, so a consultant, who sees the gap report and the package, never sees requests. Every
read of a letter is in the audit trail with the request id; changes too, refusals too. Answers
carry links instead of the server's file paths.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import date
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, Response
from pydantic import BaseModel, Field

from aggregator import audit
from aggregator.accounts import Principal
from aggregator.api.auth import Caller, audited, guard
from aggregator.api.problems import documented
from aggregator.app import App
from aggregator.errors import AggregatorError, NotFound
from aggregator.records_requests import store
from aggregator.records_requests.rules import load_rules

router = APIRouter(tags=["records requests"], responses=documented(400, 403, 404, 422))
PERMISSION = "requests"
WHAT = "records-request"


class DraftIn(BaseModel):
    institution: str | None = Field(default=None, max_length=300,
                                    description="Only the letter to this institution (as the gap report names it)")
    send_to: str | None = Field(default=None, max_length=500,
                                description="Where the records go (default: $AGGREGATOR_REQUEST_SEND_TO of the server)")


class SentIn(BaseModel):
    on: date | None = Field(default=None, description="The day it was sent (default: today in the navigators' zone)")
    channel: str = Field(default="mail", min_length=1, max_length=40, description="mail, fax, e-mail, portal...")


class AcknowledgedIn(BaseModel):
    on: date | None = Field(default=None, description="The day the institution answered (default: today)")
    extended: bool = Field(default=False, description="It takes its one extension: the due date moves")


class FollowUpIn(BaseModel):
    on: date | None = Field(default=None, description="The day of the follow-up call or letter (default: today)")


def _public(core: App, r: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in r.items() if k not in ("text_file", "pdf_file")}
    base = f"/cases/{r['case']}/requests/{r['id']}"
    out["links"] = {"self": base, "text": base + "/letter.txt", "pdf": base + "/letter.pdf"}
    return out


def _owned(core: App, case: str, request_id: str) -> None:
    """A request of another case is answered like a missing one."""
    try:
        owner = store.case_of(core, request_id)
    except NotFound:
        owner = None
    if owner != case:
        raise NotFound(f"case {case!r} has no records request {request_id!r}")


def _today(core: App) -> date:
    from datetime import UTC, datetime

    from aggregator.records_requests.schedule import local_today

    return local_today(datetime.now(UTC), load_rules(core.settings.home).zone())


def _act(request: Request, principal: Principal, case: str, action: str, what: str,
         run: Callable[[App], Any], entity: dict[str, str] | None = None) -> Any:
    """Check the caller, run the core call, and audit it: done, or failed with the error's type."""
    core = guard(request, principal, case, PERMISSION, action, what)
    try:
        out = run(core)
    except AggregatorError as exc:
        audited(request, principal, action, what, case_id=case, outcome=audit.MINOR_FAILURE,
                detail=type(exc).__name__, entity=entity)
        raise
    audited(request, principal, action, what, case_id=case, entity=entity)
    return out


@router.get("/cases/{case}/requests", summary="The case's records requests (as `request list --json`)")
def requests(request: Request, case: str, principal: Caller, due: bool = False) -> list[dict[str, Any]]:
    def run(core: App) -> list[dict[str, Any]]:
        return [_public(core, r) for r in store.list_requests(core, case, due_only=due)]

    return _act(request, principal, case, audit.READ, WHAT + "-list", run)  # type: ignore[no-any-return]


@router.post("/cases/{case}/requests", summary="Check the case and draft one letter per institution for the "
                                              "open gaps not yet requested (as `request draft --json`)")
def draft(request: Request, case: str, principal: Caller, body: DraftIn | None = None) -> dict[str, Any]:
    want = body or DraftIn()

    def run(core: App) -> dict[str, Any]:
        from aggregator.pipeline import checked_case

        report, cr = checked_case(core, case)  # the kept record and report when nothing changed
        out = store.draft_requests(core, case, report, cr, institution=want.institution, send_to=want.send_to)
        return {**out, "drafted": [_public(core, r) for r in out["drafted"]]}

    return _act(request, principal, case, audit.CREATE, WHAT, run)  # type: ignore[no-any-return]


@router.get("/cases/{case}/requests/{request_id}", summary="One request: lines, dates, reminders")
def show(request: Request, case: str, request_id: str, principal: Caller) -> dict[str, Any]:
    def run(core: App) -> dict[str, Any]:
        _owned(core, case, request_id)
        return _public(core, store.get_request(core, request_id))

    return _act(request, principal, case, audit.READ, WHAT, run,  # type: ignore[no-any-return]
                {WHAT: request_id})


def _letter(request: Request, case: str, request_id: str, principal: Principal, kind: str) -> FileResponse:
    def run(core: App) -> FileResponse:
        _owned(core, case, request_id)
        r = store.get_request(core, request_id)
        path = Path(r["pdf_file"] if kind == "pdf" else r["text_file"])
        if not path.is_file():
            raise NotFound(f"the letter of {request_id} is missing from the case folder")
        media = "application/pdf" if kind == "pdf" else "text/plain; charset=utf-8"
        return FileResponse(path, media_type=media, filename=f"{request_id}.{kind}",
                            headers={"Cache-Control": "no-store"}, stat_result=path.stat())

    # the letter holds the patient's name, birth date and what is asked for: a read of PHI
    return _act(request, principal, case, audit.READ, WHAT + "-letter", run,  # type: ignore[no-any-return]
                {WHAT: request_id, "format": kind})


@router.get("/cases/{case}/requests/{request_id}/letter.pdf", summary="The letter as PDF",
            responses={200: {"content": {"application/pdf": {"schema": {"type": "string", "format": "binary"}}}}})
def letter_pdf(request: Request, case: str, request_id: str, principal: Caller) -> Response:
    return _letter(request, case, request_id, principal, "pdf")


@router.get("/cases/{case}/requests/{request_id}/letter.txt", summary="The letter as plain text",
            responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}})
def letter_text(request: Request, case: str, request_id: str, principal: Caller) -> Response:
    return _letter(request, case, request_id, principal, "txt")


def _change(request: Request, case: str, request_id: str, principal: Principal,
            fn: Callable[[App], dict[str, Any]]) -> dict[str, Any]:
    def run(core: App) -> dict[str, Any]:
        _owned(core, case, request_id)
        return _public(core, fn(core))

    return _act(request, principal, case, audit.UPDATE, WHAT, run,  # type: ignore[no-any-return]
                {WHAT: request_id})


@router.post("/cases/{case}/requests/{request_id}/sent", summary="The letter went out: due date and reminders start")
def sent(request: Request, case: str, request_id: str, principal: Caller, body: SentIn | None = None) -> dict[str, Any]:
    b = body or SentIn()
    return _change(request, case, request_id, principal,
                   lambda core: store.mark_sent(core, request_id, b.on or _today(core), b.channel))


@router.post("/cases/{case}/requests/{request_id}/acknowledged",
             summary="The institution acknowledged it (and may have taken its extension)")
def acknowledged(request: Request, case: str, request_id: str, principal: Caller,
                 body: AcknowledgedIn | None = None) -> dict[str, Any]:
    b = body or AcknowledgedIn()
    return _change(request, case, request_id, principal,
                   lambda core: store.mark_acknowledged(core, request_id, b.on or _today(core), extended=b.extended))


@router.post("/cases/{case}/requests/{request_id}/follow-ups",
             summary="A follow-up call or letter: the reminders due until then are answered")
def followed_up(request: Request, case: str, request_id: str, principal: Caller,
                body: FollowUpIn | None = None) -> dict[str, Any]:
    b = body or FollowUpIn()
    return _change(request, case, request_id, principal,
                   lambda core: store.mark_followed_up(core, request_id, b.on or _today(core)))


@router.post("/cases/{case}/requests/{request_id}/received",
             summary="Every outstanding line received by hand (records that came outside the tool)")
def received(request: Request, case: str, request_id: str, principal: Caller) -> dict[str, Any]:
    return _change(request, case, request_id, principal, lambda core: store.mark_received(core, request_id))


@router.post("/cases/{case}/requests/{request_id}/closed",
             summary="Close it by hand (answered otherwise, withdrawn): its gaps can be asked for again")
def closed(request: Request, case: str, request_id: str, principal: Caller) -> dict[str, Any]:
    return _change(request, case, request_id, principal, lambda core: store.close(core, request_id))
