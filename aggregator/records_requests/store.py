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
from collections.abc import Callable, Mapping
from datetime import UTC, date, datetime, tzinfo
from pathlib import Path
from typing import Any

from sqlalchemy import select

from aggregator.errors import NotFound, UsageError
from aggregator.privacy import make_private, make_private_dir
from aggregator.records_requests.annotate import refresh_stored
from aggregator.records_requests.draft import Plan, formats, open_gap_keys, plan_requests
from aggregator.records_requests.letter import render_pdf, render_text
from aggregator.records_requests.rules import Rule, Rules, load_rules
from aggregator.records_requests.schedule import Point, due_on, local_today, pending_point, schedule, starts_at
from aggregator.store.models import Case, RecordsRequest, RecordsRequestItem

log = logging.getLogger(__name__)

SEND_TO_ENV = "AGGREGATOR_REQUEST_SEND_TO"
"""Where institutions send the records (the navigator's postal or e-mail address)."""
STATES = ("draft", "sent", "acknowledged", "partially-received", "received", "closed")
#: requests still waiting for records (their lines may be asked for by nobody else)
LIVE = ("draft", "sent", "acknowledged", "partially-received")
#: requests out with the institution: the due date runs and reminders come due
OUT = ("sent", "acknowledged", "partially-received")
FILLED = ("received", "resolved")
_ACSN = "ACSN"
#: how many references of what filled a line are kept (an item of all recent labs has hundreds)
FILLED_BY_MAX = 20


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


def _rules(app: Any) -> Rules:
    return load_rules(Path(app.settings.home))


def draft_requests(app: Any, case_id: str, report: Mapping[str, Any], cr: Any, *,
                   institution: str | None = None, send_to: str | None = None,
                   today: date | None = None) -> dict[str, Any]:
    """Draft one letter per institution for the open gaps no live request asks for yet.

    Each letter is held to the rule in force for its institution now (days, extension, reminder
    points), kept on the request so that its dates do not move when the rules file changes.
    """
    from aggregator.checklist import load_checklist

    track(app, case_id, report)
    plan: Plan = plan_requests(report, checklist_requests(load_checklist(cr.case.checklist)),
                               accessions(cr.record))
    rules = _rules(app)
    covered = _covered_keys(app, case_id)
    day = (today or local_today(datetime.now(UTC), rules.zone())).isoformat()
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
        rule = rules.for_institution(name)
        rid = "rq-" + uuid.uuid4().hex[:10]
        with app.db.session() as s:
            case = s.get(Case, case_id)
            if case is None:
                raise NotFound(f"unknown case {case_id}")
            text = render_text({"date": day, "institution": name, "patient_name": case.patient_name,
                                "birth_date": case.birth_date, "request_id": rid, "lines": lines,
                                "formats": formats(lines), "send_to": address.strip(), "rule": rule})
            d = folder(app, case_id)
            _write(d / f"{rid}.txt", text.encode("utf-8"))
            _write(d / f"{rid}.pdf", render_pdf(text, f"Records request {rid}"))
            row = RecordsRequest(id=rid, case_id=case_id, institution=name, state="draft",
                                 jurisdiction=rule.jurisdiction, due_days=rule.days,
                                 extension_days=rule.extension_days,
                                 reminder_days=",".join(str(d) for d in rule.reminders))
            row.items = [RecordsRequestItem(gap_keys="\n".join(ln.keys), item_id=ln.item_id, reason=ln.reason,
                                            text=ln.text, status="requested") for ln in lines]
            s.add(row)
        made.append(rid)
        log.info("drafted records request %s (%d lines)", rid, len(lines))
    if made:
        refresh_stored(app, case_id)
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


def filled_by(report: Mapping[str, Any], keys: list[str]) -> list[str]:
    """What in ``report`` now satisfies the gaps ``keys`` named: the records a clerk sent.

    A gap about a subject (the biopsy, the radiology report, the visit) is filled by what the
    subject is now linked to (the full report, the images, the note); a gap without one (recent
    labs, a receptor result) by the item's evidence. Empty when the item is not complete (it no
    longer applies, or its subject is gone): then nothing can be named.
    """
    items = {str(i.get("id")): i for i in report.get("items", [])}
    out: list[str] = []
    for key in keys:
        item_id, subject = [*key.split("|"), ""][:2]
        item = items.get(item_id)
        if item is None:
            continue
        subj = next((x for x in item.get("subjects") or [] if x.get("ref") == subject), None) if subject else None
        if subj is not None and subj.get("status") == "complete":
            refs = list(subj.get("linked") or [])
        elif item.get("status") == "complete":
            refs = list(item.get("evidence") or [])
        else:
            refs = []
        out += [r for r in refs if r not in out]
    return out[:FILLED_BY_MAX]


def _settle(r: RecordsRequest, when: datetime) -> bool:
    """Move a live request's state after its lines changed; True when it completed."""
    if r.state not in LIVE or not r.items:
        return False
    if all(it.status in FILLED for it in r.items):
        r.state, r.closed_at = "received", when
        return True
    if r.state in OUT and any(it.status in FILLED for it in r.items):
        r.state = "partially-received"
    return False


def track(app: Any, case_id: str, report: Mapping[str, Any], now: datetime | None = None) -> dict[str, int]:
    """Mark lines received whose gaps the report no longer shows, with what filled them; a
    request whose lines are all filled completes itself (state ``received``)."""
    still_open = open_gap_keys(report)
    when = now or datetime.now(UTC)
    received = closed = 0
    with app.db.session() as s:
        reqs = s.scalars(select(RecordsRequest).where(RecordsRequest.case_id == case_id,
                                                      RecordsRequest.state.in_(LIVE))).all()
        for r in reqs:
            for it in r.items:
                keys = it.gap_keys.split("\n")
                if it.status == "requested" and not set(keys) & still_open:
                    refs = filled_by(report, keys)
                    it.status = "received" if refs else "resolved"
                    it.received_at, it.received_how = when, "check"
                    it.filled_by = "\n".join(refs) or None
                    received += 1
            closed += _settle(r, when)
    if received:
        log.info("records requests of a case: %d line(s) received, %d request(s) complete", received, closed)
    return {"received": received, "completed": closed}


def rule_of(r: RecordsRequest, rules: Rules, days_override: int | None = None) -> Rule:
    """The rule a request is held to: the one kept on it, else (older rows) the one in force now."""
    if r.due_days is None:
        now = rules.for_institution(r.institution)
        rule = now
    else:
        reminders = tuple(int(d) for d in (r.reminder_days or "").split(",") if d.strip())
        rule = Rule(r.jurisdiction or "", "", "", r.due_days, r.extension_days or 0, reminders)
    if days_override is not None:
        rule = Rule(rule.jurisdiction, rule.title, rule.citation, days_override, rule.extension_days, rule.reminders)
    return rule


def _points(r: RecordsRequest, rule: Rule) -> list[Point]:
    if not r.sent_on:
        return []
    return schedule(date.fromisoformat(r.sent_on), rule.days, rule.reminders,
                    extension_days=rule.extension_days, extended=bool(r.extended_on))


def _last_contact(r: RecordsRequest) -> date | None:
    days = [date.fromisoformat(d) for d in (r.followed_up_on, r.acknowledged_on) if d]
    return max(days) if days else None


def _due_on(r: RecordsRequest, rule: Rule) -> date | None:
    if not r.sent_on:
        return None
    return due_on(date.fromisoformat(r.sent_on), rule.days, rule.extension_days, bool(r.extended_on))


def _pending(r: RecordsRequest, rule: Rule, today: date) -> Point | None:
    if r.state not in OUT or not any(it.status == "requested" for it in r.items):
        return None
    return pending_point(_points(r, rule), today, _last_contact(r))


def _as_dict(r: RecordsRequest, today: date, rule: Rule, case_dir: Path, zone: tzinfo) -> dict[str, Any]:
    outstanding = [it for it in r.items if it.status == "requested"]
    days = (today - date.fromisoformat(r.sent_on)).days if r.sent_on else None
    due = _due_on(r, rule)
    overdue = bool(r.state in OUT and due is not None and today > due and outstanding)
    pending = _pending(r, rule, today)
    contact = _last_contact(r)
    return {
        "id": r.id, "case": r.case_id, "institution": r.institution, "state": r.state,
        "status": "overdue" if overdue else r.state,
        "sent_on": r.sent_on, "channel": r.channel, "days_since_sent": days,
        "overdue": overdue,
        "due_on": due.isoformat() if due else None,
        "drafted_on": r.created_at.date().isoformat() if r.created_at else None,
        "acknowledged_on": r.acknowledged_on, "extended_on": r.extended_on, "followed_up_on": r.followed_up_on,
        "closed_at": r.closed_at.isoformat() if r.closed_at else None,
        "rule": {"jurisdiction": rule.jurisdiction, "days": rule.days, "extension_days": rule.extension_days,
                 "reminders": list(rule.reminders)},
        "reminders": [{"kind": p.kind, "day": p.day, "on": p.on.isoformat(),
                       "answered": bool(contact and contact >= p.on)} for p in _points(r, rule)],
        "reminder_due": _point_dict(pending, zone) if pending else None,
        "outstanding": len(outstanding),
        "items": [{"item": it.item_id, "reason": it.reason, "text": it.text, "status": it.status,
                   "received_at": it.received_at.isoformat() if it.received_at else None,
                   "received_how": it.received_how,
                   "filled_by": (it.filled_by or "").split("\n") if it.filled_by else []} for it in r.items],
        "text_file": str(case_dir / "requests" / f"{r.id}.txt"),
        "pdf_file": str(case_dir / "requests" / f"{r.id}.pdf"),
    }


def _point_dict(p: Point, zone: tzinfo) -> dict[str, Any]:
    return {"kind": p.kind, "day": p.day, "on": p.on.isoformat(), "due_at": starts_at(p.on, zone).isoformat()}


def _view(app: Any, *, overdue_after: int | None, today: date | None,
          now: datetime | None) -> tuple[Rules, date, tzinfo, int | None]:
    rules = _rules(app)
    zone = rules.zone()
    day = today or local_today(now or datetime.now(UTC), zone)
    return rules, day, zone, overdue_after


def list_requests(app: Any, case_id: str, *, overdue_after: int | None = None, today: date | None = None,
                  now: datetime | None = None, due_only: bool = False) -> list[dict[str, Any]]:
    """The case's requests, oldest first; ``due_only``: those with a follow-up due today."""
    rules, day, zone, override = _view(app, overdue_after=overdue_after, today=today, now=now)
    with app.db.session() as s:
        if s.get(Case, case_id) is None:
            raise NotFound(f"unknown case {case_id}")
        rows = s.scalars(select(RecordsRequest).where(RecordsRequest.case_id == case_id)
                         .order_by(RecordsRequest.created_at, RecordsRequest.id)).all()
        out = [_as_dict(r, day, rule_of(r, rules, override), app.case_dir(case_id), zone) for r in rows]
    return [r for r in out if r["reminder_due"]] if due_only else out


def due_reminders(app: Any, *, case_id: str | None = None, now: datetime | None = None,
                  today: date | None = None) -> list[dict[str, Any]]:
    """Follow-ups due now, one per request, over every open case (or one): for ``request list
    --due``, the sync job and, once they exist, webhooks.

    A reminder comes due on its day in the navigators' time zone (the rules' ``timezone``, else
    the machine's) and stays due until a follow-up or acknowledgment is recorded on or after it.
    Each entry names the case, request, institution and dates only: no patient data.
    """
    rules, day, zone, _ = _view(app, overdue_after=None, today=today, now=now)
    out: list[dict[str, Any]] = []
    with app.db.session() as s:
        q = (select(RecordsRequest).join(Case, Case.id == RecordsRequest.case_id)
             .where(RecordsRequest.state.in_(OUT), Case.status == "open")
             .order_by(RecordsRequest.case_id, RecordsRequest.sent_on, RecordsRequest.id))
        if case_id is not None:
            if s.get(Case, case_id) is None:
                raise NotFound(f"unknown case {case_id}")
            q = q.where(RecordsRequest.case_id == case_id)
        for r in s.scalars(q):
            rule = rule_of(r, rules)
            p = _pending(r, rule, day)
            if p is None:
                continue
            due = _due_on(r, rule)
            out.append({"case": r.case_id, "request": r.id, "institution": r.institution, "state": r.state,
                        **_point_dict(p, zone), "sent_on": r.sent_on, "due_on": due.isoformat() if due else None,
                        "outstanding": sum(1 for it in r.items if it.status == "requested"),
                        "items": len(r.items)})
    return out


def get_request(app: Any, request_id: str, *, overdue_after: int | None = None,
                today: date | None = None, now: datetime | None = None) -> dict[str, Any]:
    rules, day, zone, override = _view(app, overdue_after=overdue_after, today=today, now=now)
    with app.db.session() as s:
        r = s.get(RecordsRequest, request_id)
        if r is None:
            raise NotFound(f"unknown records request {request_id}")
        return _as_dict(r, day, rule_of(r, rules, override), app.case_dir(r.case_id), zone)


def case_of(app: Any, request_id: str) -> str:
    with app.db.session() as s:
        r = s.get(RecordsRequest, request_id)
        if r is None:
            raise NotFound(f"unknown records request {request_id}")
        return r.case_id


def _change(app: Any, request_id: str, allowed: tuple[str, ...], what: str,
            fn: Callable[[RecordsRequest], None]) -> dict[str, Any]:
    with app.db.session() as s:
        r = s.get(RecordsRequest, request_id)
        if r is None:
            raise NotFound(f"unknown records request {request_id}")
        if r.state not in allowed:
            raise UsageError(f"records request {request_id} is {r.state}; only a request that is "
                             f"{' or '.join(allowed)} can be {what}")
        fn(r)
        case_id = r.case_id
    refresh_stored(app, case_id)
    return get_request(app, request_id)


def _not_before_sent(r: RecordsRequest, on: date, what: str) -> None:
    if r.sent_on and on < date.fromisoformat(r.sent_on):
        raise UsageError(f"records request {r.id} was sent on {r.sent_on}: it cannot be {what} before that")


def mark_sent(app: Any, request_id: str, on: date, channel: str) -> dict[str, Any]:
    """The letter went out: the due date and the reminders count from ``on``."""
    def apply(r: RecordsRequest) -> None:
        if r.state != "draft" and r.state != "sent":
            raise UsageError(f"records request {request_id} is {r.state}; it was sent already")
        r.state, r.sent_on, r.channel = "sent", on.isoformat(), channel

    return _change(app, request_id, LIVE, "sent", apply)


def mark_acknowledged(app: Any, request_id: str, on: date, *, extended: bool = False) -> dict[str, Any]:
    """The institution confirmed it has the request; ``extended``: it also took its one extension
    (45 CFR 164.524(b)(2)(iii)), which moves the due date by the rule's extension days."""
    def apply(r: RecordsRequest) -> None:
        if not r.sent_on:
            raise UsageError(f"records request {request_id} has not been sent; record that first")
        _not_before_sent(r, on, "acknowledged")
        r.acknowledged_on = on.isoformat()
        if extended:
            r.extended_on = on.isoformat()
        if r.state == "sent":
            r.state = "acknowledged"

    return _change(app, request_id, OUT, "acknowledged", apply)


def mark_followed_up(app: Any, request_id: str, on: date) -> dict[str, Any]:
    """The navigator called or wrote again: every reminder up to ``on`` is answered."""
    def apply(r: RecordsRequest) -> None:
        _not_before_sent(r, on, "followed up")
        r.followed_up_on = on.isoformat()

    return _change(app, request_id, OUT, "followed up", apply)


def mark_received(app: Any, request_id: str, now: datetime | None = None) -> dict[str, Any]:
    """The navigator says the records came (on paper, say, or under another name): every
    outstanding line is received by hand, and the request completes."""
    when = now or datetime.now(UTC)

    def apply(r: RecordsRequest) -> None:
        for it in r.items:
            if it.status == "requested":
                it.status, it.received_at, it.received_how = "received", when, "navigator"
        _settle(r, when)

    return _change(app, request_id, LIVE, "marked received", apply)


def close(app: Any, request_id: str) -> dict[str, Any]:
    """Closed by the navigator (answered otherwise, withdrawn): its open gaps can be asked for again."""
    def apply(r: RecordsRequest) -> None:
        r.state, r.closed_at = "closed", datetime.now(UTC)

    return _change(app, request_id, STATES, "closed", apply)


def gap_requests(app: Any, case_id: str) -> dict[str, dict[str, Any]]:
    """Gap key -> the request that asks for it, for the gap report and the summary page.

    Only requests still waiting (or marked received by hand while the gap stays open) count: a
    request closed by hand no longer asks for anything. Dates only, no clock: the report says
    "due on", the reader knows today.
    """
    rules = _rules(app)
    out: dict[str, dict[str, Any]] = {}
    with app.db.session() as s:
        rows = s.scalars(select(RecordsRequest).where(RecordsRequest.case_id == case_id,
                                                      RecordsRequest.state != "closed")
                         .order_by(RecordsRequest.created_at, RecordsRequest.id)).all()
        for r in rows:
            due = _due_on(r, rule_of(r, rules))
            for it in r.items:
                info = {"id": r.id, "institution": r.institution, "state": r.state,
                        "drafted_on": r.created_at.date().isoformat() if r.created_at else None,
                        "sent_on": r.sent_on, "due_on": due.isoformat() if due else None,
                        "line": it.status}
                for key in it.gap_keys.split("\n"):
                    out[key] = info
    return out


def _outstanding_lines(app: Any, case_id: str) -> int | None:
    """Lines still asked for by the case's live requests; None when it has none."""
    from sqlalchemy import func

    with app.db.session() as s:
        live = s.scalar(select(func.count()).select_from(RecordsRequest)
                        .where(RecordsRequest.case_id == case_id, RecordsRequest.state.in_(LIVE)))
        if not live:
            return None
        return int(s.scalar(select(func.count()).select_from(RecordsRequestItem).join(RecordsRequest)
                            .where(RecordsRequest.case_id == case_id, RecordsRequest.state.in_(LIVE),
                                   RecordsRequestItem.status == "requested")) or 0)


def track_after_pull(app: Any, case_id: str,
                     check: Callable[[Any, str], Any] | None = None) -> int | None:
    """After a pull or an upload: check the case if a live request waits on it, so that what just
    arrived marks its lines received (and completes the request) without anyone asking.

    Returns how many lines were received, or None when no request waits (no check is run: a
    case without letters pays nothing). ``check`` is how the caller checks (the API's keeps its
    cached report current); the default is :func:`aggregator.pipeline.check_case`.
    """
    before = _outstanding_lines(app, case_id)
    if before is None:
        return None
    if check is None:
        from aggregator.pipeline import check_case

        check = check_case
    check(app, case_id)
    return before - (_outstanding_lines(app, case_id) or 0)
