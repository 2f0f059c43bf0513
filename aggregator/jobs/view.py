"""What a job looks like to a person: per-source progress from its pulls' ledger rows and its heartbeat.

Shared by the API (which caches it for pollers) and ``aggregator job show``.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select

from aggregator.jobs.records import Job
from aggregator.store.models import LedgerItem, Pull, Source


def merge_progress(rows: list[dict[str, Any]], progress: dict[str, Any]) -> list[dict[str, Any]]:
    """Ledger counts per source plus the connector's live numbers from the job's last heartbeat."""
    out = []
    for row in rows:
        prog = progress.get(row["label"]) or {}
        out.append({**row, "done": max(row["done"], int(prog.get("done") or 0)),
                    "expected": prog.get("expected"), "note": prog.get("note") or ""})
    return out


def read_sources(core: Any, job: Job) -> list[dict[str, Any]]:
    """The pulls this job started, per source, with their ledger counts (no cache: the CLI)."""
    with core.db.session() as s:
        q = (select(Pull.id, Pull.source_id, Pull.state, Source.label).join(Source, Source.id == Pull.source_id)
             .where(Source.case_id == job.case_id, Pull.job_id == job.id).order_by(Pull.id))
        pulls = list(s.execute(q))
        ledger: dict[int, dict[str, int]] = {}
        if pulls:
            rows = s.execute(select(LedgerItem.pull_id, LedgerItem.state, func.count())
                             # source_id is indexed (pull_id is not): without it, a scan of every case's rows
                             .where(LedgerItem.source_id.in_({p[1] for p in pulls}),
                                    LedgerItem.pull_id.in_([p[0] for p in pulls]))
                             .group_by(LedgerItem.pull_id, LedgerItem.state))
            for pid, state, n in rows:
                if pid is not None:
                    ledger.setdefault(int(pid), {})[str(state)] = int(n)
    # a resumed job has several pulls of one source: the newest gives the state, all give counts
    by_source: dict[int, dict[str, Any]] = {}
    for pid, sid, state, label in pulls:
        counts = ledger.get(int(pid), {})
        row = by_source.setdefault(int(sid), {"source": int(sid), "label": label, "pull": int(pid), "state": state,
                                              "done": 0, "failed": 0, "skipped": 0, "attempts": 0})
        row.update(pull=int(pid), state=state, attempts=row["attempts"] + 1)
        for k in ("done", "failed", "skipped"):
            row[k] += counts.get(k, 0)
    return list(by_source.values())


def job_detail(core: Any, job: Job) -> dict[str, Any]:
    """The job's JSON plus ``sources``: per source, items done, failed, skipped and expected."""
    data = job.to_dict()
    data["sources"] = merge_progress(read_sources(core, job), job.progress) if job.kind == "pull" else []
    return data
