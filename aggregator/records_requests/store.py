"""Records requests with the case: rows in the database, letter files in the case folder.

``draft_requests`` writes one letter per institution for the open gaps no live request already
asks for (so each gap is in exactly one letter), ``track`` marks lines received when a check no
longer shows their gaps and closes a request whose lines are all filled, ``list_requests`` says
what is outstanding and for how long. Letters hold patient data: the folder is 0700, the files
0600, and nothing here logs more than request ids and counts.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Mapping
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select

from aggregator.errors import NotFound, UsageError
from aggregator.privacy import make_private, make_private_dir
from aggregator.records_requests.draft import Plan, formats, open_gap_keys, plan_requests
from aggregator.records_requests.letter import render_pdf, render_text
from aggregator.store.models import Case, RecordsRequest, RecordsRequestItem

log = logging.getLogger(__name__)

SEND_TO_ENV = "AGGREGATOR_REQUEST_SEND_TO"
"""Where institutions send the records (the navigator's postal or e-mail address)."""
OVERDUE_DAYS_ENV = "AGGREGATOR_REQUEST_OVERDUE_DAYS"
DEFAULT_OVERDUE_DAYS = 30
"""45 CFR 164.524(b)(2): 30 days to act on a request (one 30-day extension is allowed)."""
LIVE = ("draft", "sent")
STATES = ("draft", "sent", "received", "closed")
_ACSN = "ACSN"


def overdue_days(value: int | None = None) -> int:
    if value is not None:
        return value
    raw = os.environ.get(OVERDUE_DAYS_ENV, "")
    if raw.strip().isdigit():
        return int(raw)
    return DEFAULT_OVERDUE_DAYS


def folder(app: Any, case_id: str) -> Path:
    return make_private_dir(app.case_dir(case_id) / "requests")


def checklist_requests(checklist: Any) -> dict[str, str]:
    """Item id (and ``id:component``) -> what the checklist says to ask for."""
    out: dict[str, str] = {}
    for item in checklist.items:
        if item.request:
            out[item.id] = item.request
        for comp in item.components:
            if comp.request and comp.label:
                out[f"{item.id}:{comp.label}"] = comp.request
    return out


def accessions(record: Any) -> dict[str, str]:
    """Resource ref -> accession number (Specimen.accessionIdentifier, ACSN identifiers)."""
    out: dict[str, str] = {}
    for entry in record.entries(types={"Specimen", "DiagnosticReport", "ImagingStudy"}):
        res = entry.get("resource") or {}
        ref = f"{res.get('resourceType')}/{res.get('id')}"
        acc = res.get("accessionIdentifier")
        if isinstance(acc, Mapping) and acc.get("value"):
            out[ref] = str(acc["value"])
            continue
        for ident in res.get("identifier") or []:
            codes = [c.get("code") for c in ((ident.get("type") or {}).get("coding") or [])]
            if _ACSN in codes and ident.get("value"):
                out[ref] = str(ident["value"])
                break
    return out


def draft_requests(app: Any, case_id: str, report: Mapping[str, Any], cr: Any, *,
                   institution: str | None = None, send_to: str | None = None,
                   today: date | None = None) -> dict[str, Any]:
    """Draft one letter per institution for the open gaps no live request asks for yet."""
    from aggregator.checklist import load_checklist

    track(app, case_id, report)
    plan: Plan = plan_requests(report, checklist_requests(load_checklist(cr.case.checklist)),
                               accessions(cr.record))
    covered = _covered_keys(app, case_id)
    day = (today or date.today()).isoformat()
    address = send_to or os.environ.get(SEND_TO_ENV) or ""
    if not address.strip():
        raise UsageError(f"where should the records be sent? give --send-to or set {SEND_TO_ENV}")
    made: list[str] = []
    already = 0
    names = list(plan.by_institution)
    if institution is not None:
        names = [n for n in names if n.casefold() == institution.casefold()]
        if not names:
            raise NotFound(f"no open gap is held by that institution; holders: {len(plan.by_institution)}")
    for name in names:
        lines = [ln for ln in plan.by_institution[name] if not set(ln.keys) <= covered]
        already += len(plan.by_institution[name]) - len(lines)
        if not lines:
            continue
        rid = "rq-" + uuid.uuid4().hex[:10]
        with app.db.session() as s:
            case = s.get(Case, case_id)
            if case is None:
                raise NotFound(f"unknown case {case_id}")
            text = render_text({"date": day, "institution": name, "patient_name": case.patient_name,
                                "birth_date": case.birth_date, "request_id": rid, "lines": lines,
                                "formats": formats(lines), "send_to": address.strip()})
            d = folder(app, case_id)
            _write(d / f"{rid}.txt", text.encode("utf-8"))
            _write(d / f"{rid}.pdf", render_pdf(text, f"Records request {rid}"))
            row = RecordsRequest(id=rid, case_id=case_id, institution=name, state="draft")
            row.items = [RecordsRequestItem(gap_keys="\n".join(ln.keys), item_id=ln.item_id, reason=ln.reason,
                                            text=ln.text, status="requested") for ln in lines]
            s.add(row)
        made.append(rid)
        log.info("drafted records request %s (%d lines)", rid, len(lines))
    return {"case": case_id, "drafted": [get_request(app, r) for r in made], "already_requested": already,
            "not_requestable": plan.not_requestable}


def _write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
    make_private(path)


def _covered_keys(app: Any, case_id: str) -> set[str]:
    with app.db.session() as s:
        rows = s.scalars(select(RecordsRequestItem.gap_keys).join(RecordsRequest)
                         .where(RecordsRequest.case_id == case_id, RecordsRequest.state.in_(LIVE),
                                RecordsRequestItem.status == "requested")).all()
    return {k for r in rows for k in r.split("\n")}


def track(app: Any, case_id: str, report: Mapping[str, Any], now: datetime | None = None) -> dict[str, int]:
    """Mark lines received whose gaps the report no longer shows; close fully received requests."""
    still_open = open_gap_keys(report)
    when = now or datetime.now(UTC)
    received = closed = 0
    with app.db.session() as s:
        reqs = s.scalars(select(RecordsRequest).where(RecordsRequest.case_id == case_id,
                                                      RecordsRequest.state.in_(LIVE))).all()
        for r in reqs:
            for it in r.items:
                if it.status == "requested" and not set(it.gap_keys.split("\n")) & still_open:
                    it.status, it.received_at = "received", when
                    received += 1
            if r.items and all(it.status == "received" for it in r.items):
                r.state, r.closed_at = "received", when
                closed += 1
    if received:
        log.info("records requests of a case: %d line(s) received, %d request(s) complete", received, closed)
    return {"received": received, "completed": closed}


def _as_dict(r: RecordsRequest, today: date, limit: int, case_dir: Path) -> dict[str, Any]:
    outstanding = [it for it in r.items if it.status == "requested"]
    days = (today - date.fromisoformat(r.sent_on)).days if r.sent_on else None
    return {
        "id": r.id, "case": r.case_id, "institution": r.institution, "state": r.state,
        "sent_on": r.sent_on, "channel": r.channel, "days_since_sent": days,
        "overdue": bool(r.state == "sent" and days is not None and days > limit),
        "due_on": (date.fromordinal(date.fromisoformat(r.sent_on).toordinal() + limit).isoformat()
                   if r.sent_on else None),
        "outstanding": len(outstanding),
        "items": [{"item": it.item_id, "reason": it.reason, "text": it.text, "status": it.status,
                   "received_at": it.received_at.isoformat() if it.received_at else None} for it in r.items],
        "text_file": str(case_dir / "requests" / f"{r.id}.txt"),
        "pdf_file": str(case_dir / "requests" / f"{r.id}.pdf"),
    }


def list_requests(app: Any, case_id: str, *, overdue_after: int | None = None,
                  today: date | None = None) -> list[dict[str, Any]]:
    limit = overdue_days(overdue_after)
    day = today or date.today()
    with app.db.session() as s:
        if s.get(Case, case_id) is None:
            raise NotFound(f"unknown case {case_id}")
        rows = s.scalars(select(RecordsRequest).where(RecordsRequest.case_id == case_id)
                         .order_by(RecordsRequest.created_at, RecordsRequest.id)).all()
        return [_as_dict(r, day, limit, app.case_dir(case_id)) for r in rows]


def get_request(app: Any, request_id: str, *, overdue_after: int | None = None,
                today: date | None = None) -> dict[str, Any]:
    with app.db.session() as s:
        r = s.get(RecordsRequest, request_id)
        if r is None:
            raise NotFound(f"unknown records request {request_id}")
        return _as_dict(r, today or date.today(), overdue_days(overdue_after), app.case_dir(r.case_id))


def case_of(app: Any, request_id: str) -> str:
    with app.db.session() as s:
        r = s.get(RecordsRequest, request_id)
        if r is None:
            raise NotFound(f"unknown records request {request_id}")
        return r.case_id


def mark_sent(app: Any, request_id: str, on: date, channel: str) -> dict[str, Any]:
    with app.db.session() as s:
        r = s.get(RecordsRequest, request_id)
        if r is None:
            raise NotFound(f"unknown records request {request_id}")
        if r.state not in LIVE:
            raise UsageError(f"records request {request_id} is {r.state}; only a draft or sent one can be sent")
        r.state, r.sent_on, r.channel = "sent", on.isoformat(), channel
    return get_request(app, request_id)


def close(app: Any, request_id: str) -> dict[str, Any]:
    with app.db.session() as s:
        r = s.get(RecordsRequest, request_id)
        if r is None:
            raise NotFound(f"unknown records request {request_id}")
        r.state, r.closed_at = "closed", datetime.now(UTC)
    return get_request(app, request_id)
