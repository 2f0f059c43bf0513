"""One Provenance per source pull: which resources came from where, how and when.

The time (``recorded``) is the source's data time (the newest ``meta.lastUpdated`` it gave,
else the case date: see ``normalize.pipeline._recorded_times``), never "now" nor the pull's
clock time, so re-running normalization, or pulling the same data in another home, gives the
same bundle. The source is named three ways that the checklist and a
reader can both use: ``entity.what.identifier`` (system ``urn:aggregator:source``, value = source
id), ``policy`` (``urn:aggregator:source:<id>``) and a human label with the endpoint and method.
A resource merged from several sources is a target of each of their Provenances.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

from aggregator.model import SourceInfo
from aggregator.normalize import ids

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
