"""The gap report, as ``check --json`` prints it, served without recomputing when nothing changed.

Computing the report normalizes the whole record (minutes at 200k resources). The report that
``check`` keeps (:mod:`aggregator.record_state`, under a key of everything it is computed from)
is served as it is while that key still holds. One computation per case at a time: concurrent
requests wait for it and then read its result.
"""

from __future__ import annotations

import threading

from fastapi import APIRouter, Request
from fastapi.responses import Response

from aggregator import audit, record_state
from aggregator.api.auth import Caller, audited, guard
from aggregator.api.problems import documented
from aggregator.app import App

router = APIRouter(tags=["reports"], responses=documented(403, 404, 422))
_locks: dict[str, threading.Lock] = {}
_locks_guard = threading.Lock()


def _lock(case_id: str) -> threading.Lock:
    with _locks_guard:
        return _locks.setdefault(case_id, threading.Lock())


def gap_report_bytes(core: App, case_id: str) -> tuple[bytes, bool]:
    """The report's JSON and whether it was computed now (False: served as kept)."""
    from aggregator.pipeline import check_case

    found = record_state.report_bytes(core, case_id)
    if found is not None:
        return found, False
    with _lock(case_id):
        found = record_state.report_bytes(core, case_id)  # computed while we waited?
        if found is not None:
            return found, False
        check_case(core, case_id)  # keeps the record and report under the key of its inputs
        found = record_state.report_bytes(core, case_id)
        if found is None:  # the case changed while it was computed: serve what was computed
            found = (core.case_dir(case_id) / "gap-report.json").read_bytes()
        return found, True


@router.get("/cases/{case}/gap-report", summary="The gap report (the JSON of `check --json`)",
            responses={200: {"content": {"application/json": {"schema": {"type": "object"}}}}})
def gap_report(request: Request, case: str, principal: Caller) -> Response:
    core = guard(request, principal, case, "gap-report", audit.READ, "gap-report")
    body, computed = gap_report_bytes(core, case)
    audited(request, principal, audit.READ, "gap-report", case_id=case)
    return Response(body, media_type="application/json",
                    headers={"X-Report-Computed": "true" if computed else "false"})
