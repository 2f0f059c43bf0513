"""Tell each gap of a report whether it was asked for, when, and when it is due.

A consultant reading "pathology report: missing" cannot act on it without knowing whether the
records department was written to: "not yet arrived, due on 12 Jan 2027" means wait, "never asked
for" means the navigator has work to do. Each gap of an open item gets a ``request`` key: the
request that asks for it (id, institution, state, dates), or null when none does. The words for
people come from :func:`phrase`, used by the text report and the summary page alike.

Only dates are added, never today's: a stored report stays true until a request changes (the
API's cached report is keyed on the requests too).
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping
from typing import Any

from aggregator.records_requests.draft import gap_key

_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def annotate(report: MutableMapping[str, Any], requested: Mapping[str, Mapping[str, Any]]) -> None:
    """Add ``request`` (an object, or None: never asked for) to every gap of an open item."""
    for item in report.get("items", []):
        if item.get("status") not in ("missing", "partial"):
            continue
        for gap in item.get("gaps", []):
            info = requested.get(gap_key(item["id"], gap))
            gap["request"] = dict(info) if info is not None else None


def annotate_report(app: Any, case_id: str, report: MutableMapping[str, Any]) -> None:
    from aggregator.records_requests.store import gap_requests

    annotate(report, gap_requests(app, case_id))


def _day(iso: str | None) -> str:
    if not iso:
        return ""
    y, m, d = iso.split("-")
    return f"{int(d)} {_MONTHS[int(m) - 1]} {y}"


def phrase(info: Mapping[str, Any] | None) -> str:
    """"never asked for", or who was asked when and when it is due, in a reader's words."""
    if info is None:
        return "never asked for"
    who = f"{info.get('institution')} ({info.get('id')})"
    if info.get("line") in ("received", "resolved"):
        return f"marked received from {who}, but the record does not fill this gap"
    if info.get("state") == "draft":
        return f"request to {who} drafted on {_day(info.get('drafted_on'))}, not sent yet"
    return (f"requested from {who} on {_day(info.get('sent_on'))}: not yet arrived, "
            f"due on {_day(info.get('due_on'))}")


def refresh_stored(app: Any, case_id: str) -> None:
    """Re-annotate the report ``check`` left in the case folder after a request changed.

    The API serves that file while the record it was computed from is unchanged; drafting or
    sending a letter changes only the annotations, which are cheap, so the file is rewritten
    (atomically, owner-only) rather than the record checked again.
    """
    import json
    import os

    from aggregator.privacy import make_private

    path = app.case_dir(case_id) / "gap-report.json"
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # never checked (or unreadable): the next check writes it annotated
    annotate_report(app, case_id, report)
    tmp = path.with_name(path.name + ".requests.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(json.dumps(report, indent=2, sort_keys=True))
    os.replace(tmp, path)
    make_private(path)
