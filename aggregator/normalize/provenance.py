"""One Provenance per source pull: which resources came from where, how and when.

The time (``recorded``) is the source's data time (the newest ``meta.lastUpdated`` it gave,
else the case date: see ``normalize.pipeline._recorded_times``), never "now" nor the pull's
clock time, so re-running normalization, or pulling the same data in another home, gives the
same bundle. The source is named three ways that the checklist and a
reader can both use: ``entity.what.identifier`` (system ``urn:aggregator:source``, value = source
id), ``policy`` (``urn:aggregator:source:<id>``) and a human label with the endpoint and method.
A resource merged from several sources is a target of each of their Provenances, and of one
more: its merge Provenance (activity ``merge``) names every pulled item it stands for, so a reader
can trace each dropped copy to the resource that replaced it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from datetime import datetime
from itertools import chain
from typing import Any

from aggregator.model import SourceInfo
from aggregator.normalize import ids
from aggregator.normalize.scratch import Scratch

PARTICIPANT = "http://terminology.hl7.org/CodeSystem/provenance-participant-type"
METHOD_SYSTEM = "urn:aggregator:pull-method"
EPOCH = "1970-01-01T00:00:00Z"


def instant(value: str | datetime | None) -> str | None:
    """An ISO time as a FHIR ``instant`` (a zone is required; naive times are taken as UTC)."""
    if value is None:
        return None
    try:
        dt = value if isinstance(value, datetime) else datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return None
    text = dt.isoformat()
    return text + "Z" if dt.tzinfo is None else text.replace("+00:00", "Z")


def source_provenance(src: SourceInfo, targets: Iterable[str], recorded: str) -> dict[str, Any] | None:
    refs = sorted(set(targets))
    if not refs:
        return None
    label = src.label or f"source {src.id}"
    where = " ".join(x for x in (src.endpoint_name, src.base_url) if x)
    method = src.method or src.kind
    display = f"{label} ({where})" if where else label
    agents: list[dict[str, Any]] = [{
        "type": {"coding": [{"system": PARTICIPANT, "code": "assembler", "display": "Assembler"}]},
        "who": {"display": "second-opinion-aggregator"},
    }]
    agents.append({
        "type": {"coding": [{"system": PARTICIPANT, "code": "custodian", "display": "Custodian"}]},
        "who": {"display": src.organization or display},
    })
    return {
        "resourceType": "Provenance",
        "id": ids.provenance_id(src.id),
        "target": [{"reference": f"urn:uuid:{r}"} for r in refs],
        "recorded": recorded,
        "policy": [f"urn:aggregator:source:{src.id}"],
        "activity": {"coding": [{"system": METHOD_SYSTEM, "code": method}], "text": f"{src.kind} pull: {method}"},
        "agent": agents,
        "entity": [{
            "role": "source",
            "what": {"identifier": {"system": "urn:aggregator:source", "value": str(src.id)},
                     "display": f"{display} via {method}"},
        }],
    }


LIFECYCLE = "http://terminology.hl7.org/CodeSystem/iso-21089-lifecycle"


def merge_provenance(survivor_id: str, items: Iterable[tuple[int, str, str]], recorded: str) -> dict[str, Any]:
    """The Provenance of a resource that stands for several pulled items: it targets the survivor
    and names each item as an entity: the source (``urn:aggregator:source:<id>``) and the item's
    ledger key, displayed as the ``Type/id`` the source wrote (ids only, never content)."""
    entities = [{"role": "source",
                 "what": {"identifier": {"system": f"urn:aggregator:source:{sid}", "value": key}, "display": ref}}
                for sid, key, ref in items]
    return {
        "resourceType": "Provenance",
        "id": ids.new_id("merge", survivor_id),
        "target": [{"reference": f"urn:uuid:{survivor_id}"}],
        "recorded": recorded,
        "activity": {"coding": [{"system": LIFECYCLE, "code": "merge", "display": "Merge Record Lifecycle Event"}],
                     "text": "copies of one resource merged by de-duplication"},
        "agent": [{"type": {"coding": [{"system": PARTICIPANT, "code": "assembler", "display": "Assembler"}]},
                   "who": {"display": "second-opinion-aggregator normalization"}}],
        "entity": entities,
    }


class MergeProvenances:
    """The merge Provenances of de-duplication's survivors (one per winner of the ``drop_`` table),
    as ``("Provenance", id, resource)`` in id order, built one at a time from the scratch database
    so that a record with many duplicates does not hold them all."""

    def __init__(self, scratch: Scratch, recorded: dict[int, str]) -> None:
        self.scratch = scratch
        self.recorded = recorded
        db = scratch.db
        db.execute("CREATE TABLE mprov(pid TEXT PRIMARY KEY, win INTEGER NOT NULL)")
        wins = db.execute("SELECT DISTINCT w.lid, w.new_id FROM drop_ d JOIN item w ON w.lid = d.win").fetchall()
        db.executemany("INSERT INTO mprov(pid, win) VALUES (?, ?)",
                       ((ids.new_id("merge", new_id), lid) for lid, new_id in wins))

    def __iter__(self) -> Iterator[tuple[str, str, dict[str, Any]]]:
        rows = self.scratch.db.execute(
            "SELECT m.pid, -1 AS o, i.sid, i.key, i.rtype, i.rid, i.new_id FROM mprov m JOIN item i ON i.lid = m.win "
            "UNION ALL SELECT m.pid, lo.ord, lo.sid, lo.key, lo.rtype, lo.rid, '' FROM mprov m "
            "JOIN drop_ d ON d.win = m.win JOIN item lo ON lo.lid = d.lid ORDER BY 1, 2")
        pid = survivor = None
        sid0 = 0
        items: list[tuple[int, str, str]] = []
        for row in chain(rows, [None]):
            if items and (row is None or row[0] != pid):
                assert pid is not None and survivor is not None
                prov = merge_provenance(survivor, items, self.recorded.get(sid0, EPOCH))
                yield "Provenance", pid, prov
                items = []
            if row is None:
                break
            pid, o, sid, key, rtype, rid, new_id = row
            if o == -1:
                survivor, sid0 = str(new_id), int(sid)
            items.append((int(sid), str(key), f"{rtype}/{rid}" if rid else str(key)))
