"""The gap report, as ``check --json`` prints it, served without recomputing when nothing changed.

Computing the report normalizes the whole record (minutes at 200k resources). It depends only
on the case's settings, its sources, its pulls and its ledger, so :func:`report_key` hashes
those (the ledger by its row count, highest id and latest update; the pulls likewise) with the
code's version. The report that ``check`` writes into the case folder is served as it is while
the key it was computed under still holds. One computation per case at a time: concurrent
requests wait for it and then read its result.
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import Response
from sqlalchemy import func, select

from aggregator import __version__, audit
from aggregator.api.auth import Caller, audited, guard
from aggregator.api.problems import documented
from aggregator.app import App
from aggregator.store.models import Case, LedgerItem, Pull, Source

router = APIRouter(tags=["reports"], responses=documented(403, 404, 422))
REPORT, KEY = "gap-report.json", "gap-report.key"
_locks: dict[str, threading.Lock] = {}
_locks_guard = threading.Lock()


def report_key(core: App, case_id: str) -> str:
    h = hashlib.sha256(f"v{__version__}".encode())
    with core.db.session() as s:
        case = s.get(Case, case_id)
        if case is not None:
            h.update(repr((case.checklist, case.case_date, case.patient_name, case.birth_date, case.status)).encode())
            if case.checklist.endswith((".yaml", ".yml")):
                try:
                    h.update(str(os.stat(case.checklist).st_mtime_ns).encode())
                except OSError:
                    h.update(b"checklist-missing")
        for row in s.execute(select(Source.id, Source.kind, Source.endpoint_id, Source.patient_id, Source.config)
                             .where(Source.case_id == case_id).order_by(Source.id)):
            h.update(repr(tuple(row)).encode())
        ids = select(Source.id).where(Source.case_id == case_id).scalar_subquery()
        ledger = s.execute(select(func.count(), func.max(LedgerItem.id), func.max(LedgerItem.updated_at))
                           .where(LedgerItem.source_id.in_(ids))).one()
        pulls = s.execute(select(func.count(), func.max(Pull.id), func.max(Pull.finished_at))
                          .where(Pull.source_id.in_(ids))).one()
        h.update(repr((tuple(ledger), tuple(pulls))).encode())
    return h.hexdigest()


def _lock(case_id: str) -> threading.Lock:
    with _locks_guard:
        return _locks.setdefault(case_id, threading.Lock())


def _stored(folder: Path, key: str) -> bytes | None:
    try:
        if (folder / KEY).read_text(encoding="ascii").strip() == key:
            return (folder / REPORT).read_bytes()
    except OSError:
        return None
    return None


def gap_report_bytes(core: App, case_id: str) -> tuple[bytes, bool]:
    """The report's JSON and whether it was computed now (False: served as stored)."""
    from aggregator.pipeline import check_case

    folder = core.case_dir(case_id)
    found = _stored(folder, report_key(core, case_id))
    if found is not None:
        return found, False
    with _lock(case_id):
        found = _stored(folder, report_key(core, case_id))  # computed while we waited?
        if found is not None:
            return found, False
        (folder / KEY).unlink(missing_ok=True)
        check_case(core, case_id)  # writes gap-report.json, and quarantine rows to the ledger
        key = report_key(core, case_id)  # so the key is taken after it
        tmp = folder / (KEY + ".tmp")
        tmp.write_text(key, encoding="ascii")
        os.replace(tmp, folder / KEY)
        return (folder / REPORT).read_bytes(), True


@router.get("/cases/{case}/gap-report", summary="The gap report (the JSON of `check --json`)",
            responses={200: {"content": {"application/json": {"schema": {"type": "object"}}}}})
def gap_report(request: Request, case: str, principal: Caller) -> Response:
    core = guard(request, principal, case, "gap-report", audit.READ, "gap-report")
    body, computed = gap_report_bytes(core, case)
    audited(request, principal, audit.READ, "gap-report", case_id=case)
    return Response(body, media_type="application/json",
                    headers={"X-Report-Computed": "true" if computed else "false"})
