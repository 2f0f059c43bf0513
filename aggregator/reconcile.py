"""Reconciliation: what became of every item a case pulled, per source and resource type.

Why: a consultant can only trust a record that loses nothing silently. For each source and
type, ``pulled = kept + merged + quarantined`` must hold exactly: ``pulled`` counts the ledger's
``done`` rows, ``kept`` what the normalized record kept (counted from the outcome, see
:attr:`NormalizedRecord.kept`), ``merged`` and ``quarantined`` the record's quarantine (merged
items with the resource that replaced them, the others with their reason). An item with no fate,
or with two, shows as a line that does not add up. DICOM instances and documents are counted
the same way, under the types ``DICOM instance`` and ``document``.

One function, :func:`reconcile`, serves the CLI and the API alike; its dict is the ``--json``
output (a contract: add names, never rename them). It holds ids, keys and reasons only.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from aggregator.app import App
from aggregator.ledger import DONE, entries_for_case
from aggregator.model import NormalizedRecord, Quarantined, SourceInfo
from connectors.base import KIND_BINARY, KIND_DICOM, KIND_RESOURCE

#: the type a non-resource item is counted under
TYPE_OF_KIND = {KIND_DICOM: "DICOM instance", KIND_BINARY: "document"}
MERGED_INTO = "merged into "


@dataclass
class Line:
    """One source and type: the counts, and which items were merged or quarantined."""

    source_id: int
    kind: str
    type: str
    pulled: int = 0
    kept: int = 0
    merged: list[dict[str, str]] = field(default_factory=list)
    quarantined: Counter[str] = field(default_factory=Counter)

    @property
    def balanced(self) -> bool:
        return self.pulled == self.kept + len(self.merged) + sum(self.quarantined.values())

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type, "kind": self.kind, "pulled": self.pulled, "kept": self.kept,
                "merged": len(self.merged), "quarantined": sum(self.quarantined.values()),
                "balanced": self.balanced, "merges": self.merged,
                "reasons": dict(sorted(self.quarantined.items()))}


def _type_of(kind: str, rtype: str) -> str:
    return TYPE_OF_KIND.get(kind, rtype or kind)


def lines_of(record: NormalizedRecord, done: Any) -> dict[tuple[int, str, str], Line]:
    """The reconciliation lines of one normalized record and the ``done`` ledger rows it was
    built from (any iterable of :class:`~aggregator.ledger.LedgerEntry`, streamed once)."""
    lines: dict[tuple[int, str, str], Line] = {}

    def line(sid: int, kind: str, rtype: str) -> Line:
        key = (sid, kind, _type_of(kind, rtype))
        got = lines.get(key)
        if got is None:
            got = lines[key] = Line(sid, kind, key[2])
        return got

    # the quarantined items' types come from their ledger rows: look up only those keys
    wanted: dict[tuple[int, str, str], list[Quarantined]] = {}
    for q in record.quarantine:
        wanted.setdefault((q.source_id, q.kind, q.key), []).append(q)
    for e in done:
        if e.state != DONE or e.kind not in (KIND_RESOURCE, KIND_DICOM, KIND_BINARY):
            continue
        rtype = str((e.meta or {}).get("resourceType") or e.key.split("/", 1)[0]) if e.kind == KIND_RESOURCE else ""
        line(e.source_id, e.kind, rtype).pulled += 1
        for q in wanted.pop((e.source_id, e.kind, e.key), ()):
            _count(line(e.source_id, e.kind, rtype), q)
    for (sid, kind, _key), qs in wanted.items():  # quarantined, but never pulled: cannot add up
        for q in qs:
            _count(line(sid, kind, "(not in the ledger)"), q)
    for (sid, kind, rtype), n in record.kept.items():
        line(sid, kind, rtype).kept += n
    return lines


def _count(ln: Line, q: Quarantined) -> None:
    if q.survivor or q.reason.startswith(MERGED_INTO):
        ln.merged.append({"item": q.key, "into": q.survivor or q.reason[len(MERGED_INTO):].split(" ", 1)[0]})
    else:
        ln.quarantined[q.reason] += 1


def report(case_id: str, sources: list[SourceInfo], lines: dict[tuple[int, str, str], Line]) -> dict[str, Any]:
    """The ``reconcile --json`` document: per source, one entry per type, and the totals."""
    by_source: dict[int, list[Line]] = {}
    for key in sorted(lines):
        by_source.setdefault(key[0], []).append(lines[key])
    labels = {s.id: s for s in sources}
    out_sources = []
    for sid in sorted(set(by_source) | set(labels)):
        src = labels.get(sid)
        ls = by_source.get(sid, [])
        out_sources.append({"id": sid, "label": src.label if src else "", "kind": src.kind if src else "",
                            "balanced": all(ln.balanced for ln in ls), "types": [ln.to_dict() for ln in ls]})
    every = list(lines.values())
    totals = {"pulled": sum(ln.pulled for ln in every), "kept": sum(ln.kept for ln in every),
              "merged": sum(len(ln.merged) for ln in every),
              "quarantined": sum(sum(ln.quarantined.values()) for ln in every)}
    return {"case": case_id, "balanced": all(ln.balanced for ln in every), "totals": totals, "sources": out_sources}


def reconcile(app: App, case_id: str) -> dict[str, Any]:
    """Normalize the case (as ``check`` does, writing its quarantine rows to the ledger) and
    reconcile every pulled item against the outcome."""
    from aggregator.pipeline import build_record

    cr = build_record(app, case_id)
    try:
        lines = lines_of(cr.record, entries_for_case(app.db, case_id, state=DONE))
        return report(case_id, cr.sources, lines)
    finally:
        cr.record.close()


def render_text(data: dict[str, Any], *, limit: int = 20) -> str:
    """The text form: one line per source and type, its merges and quarantine reasons below it."""
    out = [f"case {data['case']}: " + ("every pulled item accounted for" if data["balanced"]
                                       else "COUNTS DO NOT ADD UP")]
    for src in data["sources"]:
        out.append(f"source {src['id']} ({src['kind']}, {src['label']})")
        for t in src["types"]:
            mark = "" if t["balanced"] else "   <- does not add up"
            out.append(f"  {t['type']}: pulled {t['pulled']} = kept {t['kept']} + merged {t['merged']} "
                       f"+ quarantined {t['quarantined']}{mark}")
            for m in t["merges"][:limit]:
                out.append(f"    merged {m['item']} into {m['into']}")
            if len(t["merges"]) > limit:
                out.append(f"    ... {len(t['merges']) - limit} more merges (--json lists them all)")
            for reason, n in t["reasons"].items():
                out.append(f"    quarantined {n}: {reason}")
    tot = data["totals"]
    out.append(f"total: pulled {tot['pulled']} = kept {tot['kept']} + merged {tot['merged']} "
               f"+ quarantined {tot['quarantined']}")
    return "\n".join(out)
