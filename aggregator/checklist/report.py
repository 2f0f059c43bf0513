"""The gap report as a navigator reads it in a terminal: gaps first, each with what to do.

Grouped by urgency (gaps to act on, then complete, then not applicable), one line per item and
one indented line per gap with its reason and its next action. Plain ASCII so it survives any
terminal, e-mail or ticket system.
"""

from __future__ import annotations

import textwrap
from typing import Any

from aggregator.checklist.reasons import compose

_REASON_TEXT = {
    "not-found": "not found at any source",
    "access-denied": "access denied",
    "not-found-at-source": "not found at the source (404/410)",
    "retrieval-failed": "retrieval failed",
    "pending": "pending",
    "summary-only": "only a summary",
    "images-not-retrieved": "images not retrieved",
    "identity-conflict": "identity conflict",
    "outdated": "outdated: nothing recent",
}
_MARK = {"missing": "MISSING", "partial": "PARTIAL", "complete": "OK", "not-applicable": "N/A"}
WIDTH = 100
SKIPPED_SHOWN = 50


def _once(label: str, detail: str) -> tuple[str, str]:
    """The reason's label and the gap's detail, with words they share said once.

    The detail often starts with the label's words ("not found at any source"), or with its
    last part ("outdated: nothing recent" before "nothing recent at any source: ..."): the
    detail keeps them, the label drops them.
    """
    detail = compose([detail])
    if detail.startswith(label):
        return label, compose([detail[len(label):].lstrip(" :;")])
    parts = label.split(": ")
    for i in range(1, len(parts)):
        if detail.casefold().startswith(": ".join(parts[i:]).casefold()):
            return ": ".join(parts[:i]), detail
    return label, detail


def _key_text(key: str) -> str:
    """A ledger key as a navigator reads it: the file's path inside the download."""
    return key.removeprefix("file:")


def _wrap(text: str, indent: str) -> list[str]:
    return textwrap.wrap(text, WIDTH, initial_indent=indent, subsequent_indent=indent + "  ") or [indent]


def render_text(report: dict[str, Any]) -> str:
    """Human-readable gap report."""
    counts = report.get("counts") or {}
    ref = report.get("reference_date")
    basis = {"case-date": "case date", "newest-record-date": "newest date in the record"}.get(
        str(report.get("reference_date_basis")), "no dates in the record")
    lines = [
        f"Gap report for case {report.get('case')} - checklist {report.get('checklist')}"
        f" ({report.get('checklist_title', '')})",
        f"Reference date: {ref or 'none'} ({basis})",
        f"Completeness: {float(report.get('score') or 0):.0%}  -  "
        f"{counts.get('complete', 0)} complete, {counts.get('partial', 0)} partial, "
        f"{counts.get('missing', 0)} missing, {counts.get('not-applicable', 0)} not applicable; "
        f"{counts.get('gaps', 0)} gap(s)",
    ]
    items = report.get("items") or []
    todo = [i for i in items if i.get("status") in ("missing", "partial")]
    done = [i for i in items if i.get("status") == "complete"]
    na = [i for i in items if i.get("status") == "not-applicable"]
    if todo:
        lines += ["", "GAPS TO ACT ON"]
        for it in todo:
            lines.append(f"  [{_MARK[it['status']]}] {it.get('title')}  ({compose([str(it.get('detail') or '')])})")
            for g in it.get("gaps") or []:
                what = g.get("component") or g.get("subject") or g.get("resource") or ""
                label = str(_REASON_TEXT.get(g.get("reason", ""), g.get("reason")))
                detail = str(g.get("detail") or "")
                label, detail = _once(label, detail)
                head = f"- {label}" + (f" [{what}]" if what else "")
                lines += _wrap(f"{head}: {detail}" if detail else head, "      ")
                lines += _wrap(f"-> {g.get('next_action', '')}", "        ")
                if "request" in g:  # annotated by the records requests (absent in older reports)
                    from aggregator.records_requests.annotate import phrase

                    lines += _wrap(f"records request: {phrase(g['request'])}", "        ")
    else:
        lines += ["", "No gaps: every applicable item is complete."]
    if done:
        lines += ["", "COMPLETE"]
        for it in done:
            lines.append(f"  [OK] {it.get('title')}  ({it.get('detail', '')}; "
                         f"{len(it.get('evidence') or [])} reference(s))")
    if na:
        lines += ["", "NOT APPLICABLE"]
        for it in na:
            lines.append(f"  [N/A] {it.get('title')}  ({it.get('detail', '')})")
    rec = report.get("record") or {}
    if rec:
        lines += ["", f"Record: {rec.get('resources', 0)} resources, {rec.get('documents', 0)} documents, "
                      f"{rec.get('images', 0)} DICOM instances; {rec.get('quarantined', 0)} item(s) quarantined, "
                      f"{rec.get('unresolved_references', 0)} unresolved reference(s)"]
    srcs = report.get("sources") or []
    if srcs:
        lines.append("Sources: " + "; ".join(
            f"{s.get('label')} ({s.get('kind')}{', ' + s['organization'] if s.get('organization') else ''}"
            f"{', not pulled yet' if not s.get('pulled_at') else ''})" for s in srcs))
        for s in srcs:
            for problem in s.get("problems") or []:
                times = f"{problem.get('count')} x " if (problem.get("count") or 0) > 1 else ""
                lines += _wrap(f"! {s.get('label')}: {times}{problem.get('detail')} [{problem.get('status')}]", "    ")
        skipped = [(s, row) for s in srcs for row in s.get("skipped") or []]
        if skipped:
            lines += ["", f"SKIPPED AT PULL ({len(skipped)} item(s) not in the record; open or convert them by hand)"]
            for s, row in skipped[:SKIPPED_SHOWN]:
                lines += _wrap(f"- {s.get('label')}: {_key_text(str(row.get('key')))}: {row.get('reason')}", "  ")
            if len(skipped) > SKIPPED_SHOWN:
                lines.append(f"  ... and {len(skipped) - SKIPPED_SHOWN} more (all of them in the --json report)")
    return "\n".join(lines) + "\n"
