"""A sync: re-pull a case incrementally, re-check it, and keep what changed.

Each source pulls from its committed cursor, so a sync fetches only what is new. What changed is
stored per sync (``sync_runs``) and answered by ``sync --json``, the API and the webhook:

* ``new_resources``: FHIR resources by type, ``new_documents`` (files) and ``new_instances``
  (DICOM) that the ledger did not hold at the end of the previous sync (before the first one:
  at its start). Ledger rows are upserted by (source, kind, key), so an item fetched again keeps
  its row id and only a new item gets an id above the previous sync's mark; items this sync
  fetched again are counted as ``updated``. A pull made by hand between two syncs is in the
  second one's "new", which is what a reader of successive syncs expects;
* ``filled`` and ``new_gaps``: checklist items that stopped or started being gaps since the
  previous sync of the case (before the first, since the last ``check``; with neither, every
  open gap is new), and ``open_gaps``;
* ``failed_sources``: the sources whose pull failed, with the (PHI-free) reason.

Closed cases are not synced. A case being pulled by someone else is not synced now either: the
entry says so (state ``busy``) and nothing is stored, so a scheduled run tries again later.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import func, select

from aggregator.app import App
from aggregator.errors import AggregatorError, NotFound
from aggregator.jobs.lock import CaseBusy
from aggregator.store.models import Case, LedgerItem, Source, SyncRun, utcnow
from connectors.base import KIND_BINARY, KIND_DICOM, KIND_RESOURCE

log = logging.getLogger(__name__)

OPEN, CLOSED = "open", "closed"
MANUAL, SCHEDULE = "manual", "schedule"
BUSY = "busy"


def _gaps(report: dict[str, Any] | None) -> list[str]:
    if not report:
        return []
    return sorted(str(item.get("id")) for item in report.get("items", [])
                  if item.get("status") in ("missing", "partial"))


def _iso(when: datetime | None) -> str | None:
    if when is None:
        return None
    return (when if when.tzinfo else when.replace(tzinfo=UTC)).isoformat()


@dataclass(frozen=True)
class _Previous:
    open_gaps: list[str] | None
    """Open gaps as the previous sync left them, else as the last check did; None when unknown."""
    ledger_mark: int | None


def _previous(app: App, case_id: str) -> _Previous:
    with app.db.session() as s:
        last = s.execute(select(SyncRun.state, SyncRun.changes, SyncRun.ledger_mark).where(SyncRun.case_id == case_id)
                         .order_by(SyncRun.id.desc()).limit(1)).first()
        gaps = s.scalar(select(SyncRun.changes)
                        .where(SyncRun.case_id == case_id, SyncRun.state.in_(("done", "partial")))
                        .order_by(SyncRun.id.desc()).limit(1))
    mark = int(last[2]) if last is not None else None
    if isinstance(gaps, dict) and "open_gaps" in gaps:
        return _Previous(list(gaps["open_gaps"]), mark)
    path = app.case_dir(case_id) / "gap-report.json"
    if path.is_file():
        try:
            return _Previous(_gaps(json.loads(path.read_text(encoding="utf-8"))), mark)
        except (OSError, ValueError):
            pass
    return _Previous(None, mark)


_FETCHED = (KIND_RESOURCE, KIND_BINARY, KIND_DICOM)


def _ledger_mark(app: App, case_id: str) -> int:
    """The highest ledger row id of the case's fetched items (normalization's own rows left out)."""
    with app.db.session() as s:
        ids = select(Source.id).where(Source.case_id == case_id).scalar_subquery()
        return int(s.scalar(select(func.max(LedgerItem.id)).where(LedgerItem.source_id.in_(ids),
                                                                  LedgerItem.kind.in_(_FETCHED))) or 0)


def _what_arrived(app: App, case_id: str, pull_ids: list[int], mark: int) -> dict[str, Any]:
    """Items new since ``mark`` and items this sync's pulls fetched again (see the module docstring)."""
    new_resources: dict[str, int] = {}
    new_documents = new_instances = updated = 0
    with app.db.session() as s:
        ids = select(Source.id).where(Source.case_id == case_id).scalar_subquery()
        q = (select(LedgerItem.kind, LedgerItem.meta)
             .where(LedgerItem.source_id.in_(ids), LedgerItem.id > mark, LedgerItem.state == "done",
                    LedgerItem.kind.in_(_FETCHED)))
        for kind, meta in s.execute(q):
            if kind == KIND_RESOURCE:
                rtype = str((meta or {}).get("resourceType") or "Unknown")
                new_resources[rtype] = new_resources.get(rtype, 0) + 1
            elif kind == KIND_BINARY:
                new_documents += 1
            else:
                new_instances += 1
        if pull_ids:
            updated = int(s.scalar(select(func.count()).select_from(LedgerItem).where(
                LedgerItem.source_id.in_(ids), LedgerItem.pull_id.in_(pull_ids), LedgerItem.id <= mark,
                LedgerItem.state == "done", LedgerItem.kind.in_(_FETCHED))) or 0)
    return {"new_resources": dict(sorted(new_resources.items())), "new_documents": new_documents,
            "new_instances": new_instances, "updated": updated}


def run_to_dict(run: SyncRun) -> dict[str, Any]:
    """A stored sync as ``sync --json`` and the API show it: its ids and times, then what changed."""
    return {
        "id": run.id,
        "case": run.case_id,
        "trigger": run.trigger,
        "scheduled_for": _iso(run.scheduled_for),
        "state": run.state,
        "started_at": _iso(run.started_at),
        "finished_at": _iso(run.finished_at),
        **dict(run.changes or {}),
        "error": run.error,
        "webhooks": list((run.webhooks or {}).get("deliveries", [])),
    }


def sync_case(app: App, case_id: str, *, trigger: str = MANUAL, scheduled_for: datetime | None = None,
              actor: Any = None, webhook: Any = None) -> dict[str, Any]:
    """Sync one open case now; the stored sync as a dict (or a ``busy``/``closed`` entry, not stored).

    ``webhook`` is the case's own target (:class:`aggregator.jobs.webhooks.Target`); the global
    one from the environment is added here.
    """
    from aggregator import audit
    from aggregator.jobs.pull import pull_case
    from aggregator.pipeline import check_case

    with app.db.session() as s:
        case = s.get(Case, case_id)
        if case is None:
            raise NotFound(f"no case named {case_id!r}")
        status = case.status
    if status != OPEN:
        return {"case": case_id, "state": CLOSED, "trigger": trigger, "note": f"case is {status}: not synced"}
    who = actor or audit.os_actor()
    previous = _previous(app, case_id)
    # before a case's first sync, "new" starts from what the ledger holds now
    mark = previous.ledger_mark if previous.ledger_mark is not None else _ledger_mark(app, case_id)
    started = utcnow()
    try:
        summaries = pull_case(app, case_id, actor=who)
    except CaseBusy as exc:
        # another process is pulling it right now; nothing is stored, a later run picks it up
        return {"case": case_id, "state": BUSY, "trigger": trigger, "note": str(exc)}
    pulls = [{k: v for k, v in p.to_dict().items() if k != "skipped"} | {"skipped": len(p.skipped)}
             for p in summaries]
    changes: dict[str, Any] = {
        "pulls": pulls,
        "failed_sources": [{"source": p.source_id, "label": p.label, "error": p.error}
                           for p in summaries if p.state == "failed"],
        **_what_arrived(app, case_id, [p.pull_id for p in summaries], mark),
    }
    state, error = ("partial" if changes["failed_sources"] else "done"), None
    try:
        report, _ = check_case(app, case_id)
    except AggregatorError as exc:
        state, error = "failed", str(exc)
    else:
        after = _gaps(report)
        known = set(previous.open_gaps or [])
        changes["score"] = report.get("score")
        changes["filled"] = sorted(known - set(after))
        changes["new_gaps"] = sorted(set(after) - known)
        changes["open_gaps"] = after
    from aggregator.records_requests import due_reminders

    # follow-ups of records requests that are due: the sync surfaces them (and its webhook
    # announces them) so the navigator is told without running ``request list --due``
    changes["reminders_due"] = [{k: r[k] for k in ("request", "institution", "kind", "day", "on", "due_on",
                                                   "outstanding")}
                                for r in due_reminders(app, case_id=case_id)]
    new_mark = _ledger_mark(app, case_id)
    with app.db.session() as s:  # written once, finished: no sync is left "running" by a dead process
        run = SyncRun(case_id=case_id, trigger=trigger, scheduled_for=scheduled_for, state=state,
                      started_at=started, finished_at=utcnow(), changes=changes, error=error,
                      ledger_mark=new_mark, webhooks={})
        s.add(run)
        s.flush()
        run_id = int(run.id)
    audit.record(app.db, who, audit.EXECUTE, "sync", case_id=case_id,
                 outcome=audit.SUCCESS if state != "failed" else audit.MINOR_FAILURE,
                 detail="" if state != "failed" else "check failed", entity={"sync": str(run_id)})
    result = get_sync(app, case_id, run_id)
    deliveries = _notify(app, result, webhook)
    if deliveries:
        result["webhooks"] = deliveries
    return result


def _notify(app: App, result: dict[str, Any], case_target: Any) -> list[dict[str, Any]]:
    from aggregator.jobs import webhooks

    try:
        targets = [t for t in (case_target, webhooks.global_target()) if t is not None]
    except AggregatorError as exc:  # a malformed global URL: said on the sync, not raised
        return [{"target": "global", "delivered": False, "error": str(exc)}]
    if not targets:
        return []
    body = webhooks.payload(result)
    deliveries = [webhooks.deliver(t, body) for t in targets]
    with app.db.session() as s:
        run = s.get(SyncRun, result["id"])
        if run is not None:
            run.webhooks = {"deliveries": deliveries}
    return deliveries


def sync_cases(app: App, case_ids: list[str] | None = None, *, actor: Any = None) -> list[dict[str, Any]]:
    """Sync every open case (or the ones named: a closed one is reported, not skipped silently)."""
    from aggregator.jobs.schedule import case_webhook

    with app.db.session() as s:
        if case_ids:
            known = set(s.scalars(select(Case.id).where(Case.id.in_(case_ids))))
            missing = [c for c in case_ids if c not in known]
            if missing:
                raise NotFound(f"no case named {missing[0]!r}")
            ids = sorted(set(case_ids))
        else:
            ids = list(s.scalars(select(Case.id).where(Case.status == OPEN).order_by(Case.id)))
    return [sync_case(app, cid, trigger=MANUAL, actor=actor, webhook=case_webhook(app, cid)) for cid in ids]


def get_sync(app: App, case_id: str, sync_id: int) -> dict[str, Any]:
    with app.db.session() as s:
        run = s.get(SyncRun, sync_id)
        if run is None or run.case_id != case_id:
            raise NotFound(f"case {case_id!r} has no sync with id {sync_id}")
        return run_to_dict(run)


def list_syncs(app: App, case_id: str | None = None, *, limit: int = 50) -> list[dict[str, Any]]:
    """Stored syncs, newest first (of one case, or of all)."""
    with app.db.session() as s:
        if case_id is not None and s.get(Case, case_id) is None:
            raise NotFound(f"no case named {case_id!r}")
        q = select(SyncRun).order_by(SyncRun.id.desc()).limit(max(1, limit))
        if case_id is not None:
            q = q.where(SyncRun.case_id == case_id)
        return [run_to_dict(r) for r in s.scalars(q)]


def has_failures(results: list[dict[str, Any]]) -> bool:
    return any(r.get("failed_sources") or r.get("state") == "failed" for r in results)


def render_sync(results: list[dict[str, Any]]) -> str:
    if not results:
        return "no open cases to sync"
    lines = []
    for r in results:
        if r["state"] in (BUSY, CLOSED):
            lines.append(f"case {r['case']}: not synced ({r['note']})")
            continue
        pulled = sum(p["items"].get("done", 0) for p in r.get("pulls", []))
        lines.append(f"case {r['case']}: sync {r['id']} {r['state']}; {len(r.get('pulls', []))} source(s), "
                     f"{pulled} item(s) fetched")
        new = ", ".join(f"{t} {n}" for t, n in r.get("new_resources", {}).items())
        extra = [f"{r[k]} {label}" for k, label in (("new_documents", "document(s)"),
                                                    ("new_instances", "DICOM instance(s)")) if r.get(k)]
        lines.append(f"  new:          {', '.join(x for x in [new, *extra] if x) or 'nothing'}")
        for f in r.get("failed_sources", []):
            lines.append(f"  failed source [{f['source']}] {f['label']}: {f['error']}")
        if r.get("error"):
            lines.append(f"  error: {r['error']}")
            continue
        lines.append(f"  newly filled: {', '.join(r.get('filled', [])) or 'none'}")
        lines.append(f"  new gaps:     {', '.join(r.get('new_gaps', [])) or 'none'}")
        lines.append(f"  open gaps:    {', '.join(r.get('open_gaps', [])) or 'none'}")
        for d in r.get("webhooks", []):
            lines.append(f"  webhook ({d['target']}): " + ("delivered" if d.get("delivered") else
                                                          f"NOT delivered: {d.get('error')}"))
    return "\n".join(lines)
