"""Scheduled sync: re-pull what changed for every open case, re-check, report what moved.

Each source pulls incrementally from its committed cursor. The previous gap report of the case
(kept in the case folder by ``check``) is compared with the new one, so a navigator sees which
gaps were filled and which appeared since the last run.
"""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import select

from aggregator.app import App
from aggregator.errors import AggregatorError
from aggregator.jobs.lock import CaseBusy
from aggregator.jobs.pull import pull_case
from aggregator.store.models import Case


def _gaps(report: dict[str, Any] | None) -> dict[str, str]:
    if not report:
        return {}
    return {
        str(item.get("id")): str(item.get("status"))
        for item in report.get("items", [])
        if item.get("status") in ("missing", "partial")
    }


def sync_cases(app: App, case_ids: list[str] | None = None) -> list[dict[str, Any]]:
    from aggregator.pipeline import check_case

    with app.db.session() as s:
        q = select(Case.id).where(Case.status == "open").order_by(Case.id)
        ids = [cid for cid in s.scalars(q) if not case_ids or cid in case_ids]
    results = []
    for cid in ids:
        prev_path = app.case_dir(cid) / "gap-report.json"
        previous = json.loads(prev_path.read_text(encoding="utf-8")) if prev_path.is_file() else None
        try:
            summaries = pull_case(app, cid)
        except CaseBusy as exc:
            # another process is pulling it right now; the next sync picks it up
            results.append({"case": cid, "pulls": [], "failed_sources": [], "skipped": str(exc)})
            continue
        entry: dict[str, Any] = {
            "case": cid,
            "pulls": [s.to_dict() for s in summaries],
            "failed_sources": [s.source_id for s in summaries if s.state == "failed"],
        }
        try:
            report, _ = check_case(app, cid)
        except AggregatorError as exc:
            entry["error"] = str(exc)
            results.append(entry)
            continue
        before, after = _gaps(previous), _gaps(report)
        entry["score"] = report.get("score")
        entry["filled"] = sorted(set(before) - set(after))
        entry["new_gaps"] = sorted(set(after) - set(before))
        entry["open_gaps"] = sorted(after)
        results.append(entry)
    return results


def render_sync(results: list[dict[str, Any]]) -> str:
    if not results:
        return "no open cases"
    lines = []
    for r in results:
        pulled = sum(p["items"].get("done", 0) for p in r["pulls"])
        lines.append(f"case {r['case']}: {len(r['pulls'])} source(s), {pulled} item(s) fetched")
        if r.get("skipped"):
            lines.append(f"  skipped: {r['skipped']}")
        if r.get("error"):
            lines.append(f"  error: {r['error']}")
            continue
        if r["failed_sources"]:
            lines.append(f"  failed sources: {', '.join(map(str, r['failed_sources']))}")
        lines.append(f"  newly filled: {', '.join(r['filled']) or 'none'}")
        lines.append(f"  new gaps:     {', '.join(r['new_gaps']) or 'none'}")
        lines.append(f"  open gaps:    {', '.join(r['open_gaps']) or 'none'}")
    return "\n".join(lines)
