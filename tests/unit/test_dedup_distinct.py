"""Issue 11, part 2: de-duplication never merges distinct results, and records every merge.

Twin Observations (same code, time and value, different ids) that differ in an element with
clinical meaning are two results and both stay, whether they come from one server or two.
True duplicates from two servers are still merged: the merged id maps to its survivor,
references to it follow, the survivor's Provenance names every pulled item, and the quarantine
says "merged into X".
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from aggregator.ledger import LedgerSink
from aggregator.model import CaseInfo, NormalizedRecord, SourceInfo
from aggregator.normalize import normalize
from aggregator.store.models import Source
from tests.support import SinkHarness, make_sink

BASE_A = "https://a.example.org/fhir"
BASE_B = "https://b.example.org/fhir"
LOINC = "http://loinc.org"


def patient() -> dict[str, Any]:
    return {"resourceType": "Patient", "id": "p1", "identifier": [{"system": "urn:oid:1.2.3", "value": "MRN1"}],
            "name": [{"family": "Doe", "given": ["Jane"]}], "gender": "female", "birthDate": "1970-05-01"}


def hgb(oid: str, **extra: Any) -> dict[str, Any]:
    """A hemoglobin result: the same code, time and value for every twin."""
    return {"resourceType": "Observation", "id": oid, "status": "final",
            "code": {"coding": [{"system": LOINC, "code": "718-7"}]}, "subject": {"reference": "Patient/p1"},
            "effectiveDateTime": "2026-09-01T08:00:00Z",
            "valueQuantity": {"value": 12.5, "unit": "g/dL", "system": "http://unitsofmeasure.org", "code": "g/dL"},
            **extra}


#: the resources the twins point at: each pair is two different things of the same source
TARGETS: list[dict[str, Any]] = [
    {"resourceType": "Encounter", "id": "e1", "status": "finished", "class": {"code": "AMB"},
     "subject": {"reference": "Patient/p1"}, "period": {"start": "2026-09-01T07:00:00Z"}},
    {"resourceType": "Encounter", "id": "e2", "status": "finished", "class": {"code": "EMER"},
     "subject": {"reference": "Patient/p1"}, "period": {"start": "2026-09-01T07:30:00Z"}},
    {"resourceType": "Specimen", "id": "s1", "subject": {"reference": "Patient/p1"},
     "collection": {"collectedDateTime": "2026-09-01T07:10:00Z"}},
    {"resourceType": "Specimen", "id": "s2", "subject": {"reference": "Patient/p1"},
     "collection": {"collectedDateTime": "2026-09-01T07:40:00Z"}},
    {"resourceType": "Practitioner", "id": "pr1", "name": [{"family": "Nguyen"}]},
    {"resourceType": "Practitioner", "id": "pr2", "name": [{"family": "Patel"}]},
    {"resourceType": "ServiceRequest", "id": "sr1", "status": "completed", "intent": "order",
     "code": {"coding": [{"system": LOINC, "code": "718-7"}]}, "subject": {"reference": "Patient/p1"},
     "authoredOn": "2026-08-31"},
    {"resourceType": "ServiceRequest", "id": "sr2", "status": "completed", "intent": "order",
     "code": {"coding": [{"system": LOINC, "code": "718-7"}]}, "subject": {"reference": "Patient/p1"},
     "authoredOn": "2026-09-01"},
    {"resourceType": "Observation", "id": "src1", "status": "final", "subject": {"reference": "Patient/p1"},
     "code": {"coding": [{"system": LOINC, "code": "789-8"}]}, "effectiveDateTime": "2026-09-01T08:00:00Z",
     "valueQuantity": {"value": 4.1}},
    {"resourceType": "Observation", "id": "src2", "status": "final", "subject": {"reference": "Patient/p1"},
     "code": {"coding": [{"system": LOINC, "code": "789-8"}]}, "effectiveDateTime": "2026-09-01T08:00:00Z",
     "valueQuantity": {"value": 4.6}},
]

#: element -> (first twin's extra elements, second twin's): everything else is the same
DIFFERENCES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "encounter": ({"encounter": {"reference": "Encounter/e1"}}, {"encounter": {"reference": "Encounter/e2"}}),
    "specimen": ({"specimen": {"reference": "Specimen/s1"}}, {"specimen": {"reference": "Specimen/s2"}}),
    "performer": ({"performer": [{"reference": "Practitioner/pr1"}]},
                  {"performer": [{"reference": "Practitioner/pr2"}]}),
    "derivedFrom": ({"derivedFrom": [{"reference": "Observation/src1"}]},
                    {"derivedFrom": [{"reference": "Observation/src2"}]}),
    "basedOn": ({"basedOn": [{"reference": "ServiceRequest/sr1"}]},
                {"basedOn": [{"reference": "ServiceRequest/sr2"}]}),
    "status": ({"status": "final"}, {"status": "amended"}),
    "issued": ({"issued": "2026-09-01T09:00:00Z"}, {"issued": "2026-09-02T09:00:00Z"}),
}


def add_source(h: SinkHarness, label: str) -> LedgerSink:
    with h.db.session() as s:
        src = Source(case_id=h.case_id, kind="fhir", config={}, label=label)
        s.add(src)
        s.flush()
        sid = src.id
    return LedgerSink(h.db, h.blobs, sid, None)


def run(h: SinkHarness, sinks: list[tuple[LedgerSink, str]]) -> NormalizedRecord:
    for s, _ in sinks:
        s.flush()
    srcs = [SourceInfo(s.source_id, "fhir", f"ehr{i}", base_url=base, method="$everything",
                       pulled_at=f"2026-09-{10 + i}T08:00:00Z") for i, (s, base) in enumerate(sinks)]
    return normalize(CaseInfo(h.case_id, "oncology", patient_name="Jane Doe", birth_date="1970-05-01"),
                     srcs, h.entries("done"), h.blobs)


def emit(sink: LedgerSink, base: str, resources: list[dict[str, Any]]) -> None:
    for r in resources:
        sink.resource(r, meta={"base_url": base})


def twins(rec: NormalizedRecord) -> list[dict[str, Any]]:
    return [o for o in rec.resources("Observation") if o["code"]["coding"][0]["code"] == "718-7"]


@pytest.mark.parametrize("element", sorted(DIFFERENCES))
def test_twins_of_one_source_that_differ_are_both_kept(tmp_path: Path, element: str) -> None:
    h = make_sink(tmp_path, kind="fhir")
    first, second = DIFFERENCES[element]
    emit(h.sink, BASE_A, [patient(), *TARGETS, hgb("o1", **first), hgb("o2", **second)])
    rec = run(h, [(h.sink, BASE_A)])
    assert len(twins(rec)) == 2, f"{element}: a distinct result was merged away"
    assert not [q for q in rec.quarantine if q.kind == "resource" and q.key.startswith("Observation/")]
    assert not [p for p in rec.resources("Provenance") if p.get("activity", {}).get("coding", [{}])[0].get("code")
                == "merge"]


@pytest.mark.parametrize("element", sorted(DIFFERENCES))
def test_twins_from_two_servers_that_differ_are_both_kept(tmp_path: Path, element: str) -> None:
    """A copy from another server merges only when its clinical elements match: here the second
    server holds the same targets (which do merge), but its Observation differs in one element."""
    h = make_sink(tmp_path, kind="fhir")
    b = add_source(h, "fhir-b")
    first, second = DIFFERENCES[element]
    emit(h.sink, BASE_A, [patient(), *TARGETS, hgb("o1", **first)])
    emit(b, BASE_B, [patient(), *TARGETS, hgb("o1", **second)])
    rec = run(h, [(h.sink, BASE_A), (b, BASE_B)])
    assert len(twins(rec)) == 2, f"{element}: a distinct result was merged away"


def test_identical_twins_of_one_source_are_merged(tmp_path: Path) -> None:
    """Everything but id/meta/text identical: the server sent one fact twice."""
    h = make_sink(tmp_path, kind="fhir")
    emit(h.sink, BASE_A, [patient(), *TARGETS, hgb("o1", encounter={"reference": "Encounter/e1"}),
                          hgb("o2", encounter={"reference": "Encounter/e1"}, meta={"versionId": "3"},
                              text={"status": "generated", "div": "<div xmlns=\"http://www.w3.org/1999/xhtml\">x</div>"})])
    rec = run(h, [(h.sink, BASE_A)])
    (kept,) = twins(rec)
    (q,) = [q for q in rec.quarantine if q.key.startswith("Observation/o")]
    assert q.reason == f"merged into Observation/{kept['id']}" and q.survivor == f"Observation/{kept['id']}"


def test_cross_source_duplicates_merged_and_recorded(tmp_path: Path) -> None:
    """The same Encounter and Observation from two servers (own ids, own references): one of each
    survives; the merged ids map to it, references follow, Provenance names every pulled item."""
    h = make_sink(tmp_path, kind="fhir")
    b = add_source(h, "fhir-b")
    enc_a = {**TARGETS[0]}
    enc_b = {**TARGETS[0], "id": "visit-9", "subject": {"reference": "Patient/pb"}}
    emit(h.sink, BASE_A, [patient(), enc_a, hgb("o1", encounter={"reference": "Encounter/e1"})])
    report = {"resourceType": "DiagnosticReport", "id": "dr1", "status": "final",
              "code": {"coding": [{"system": LOINC, "code": "58410-2"}]}, "subject": {"reference": "Patient/pb"},
              "result": [{"reference": "Observation/lab-77"}]}
    emit(b, BASE_B, [{**patient(), "id": "pb"}, enc_b,
                     hgb("lab-77", encounter={"reference": "Encounter/visit-9"}, subject={"reference": "Patient/pb"}),
                     report])
    rec = run(h, [(h.sink, BASE_A), (b, BASE_B)])

    (obs,) = twins(rec)
    (enc,) = rec.resources("Encounter")
    merged = {q.key: q for q in rec.quarantine if q.reason.startswith("merged into ")}
    assert set(merged) == {"Observation/lab-77", "Encounter/visit-9", "Patient/pb"}
    # every merged id maps to its survivor, and the ledger reason names it
    assert merged["Observation/lab-77"].survivor == f"Observation/{obs['id']}"
    assert merged["Observation/lab-77"].reason == f"merged into Observation/{obs['id']}"
    assert merged["Encounter/visit-9"].survivor == f"Encounter/{enc['id']}"
    assert all(q.source_id == b.source_id for q in merged.values())
    # references to the merged copy now point at the survivor
    (dr,) = rec.resources("DiagnosticReport")
    assert dr["result"] == [{"reference": f"urn:uuid:{obs['id']}"}]
    assert obs["encounter"]["reference"] == f"urn:uuid:{enc['id']}"
    # the survivor's merge Provenance names both pulled items, by source and ledger key
    merges = {p["target"][0]["reference"]: p for p in rec.resources("Provenance")
              if p.get("activity", {}).get("coding", [{}])[0].get("code") == "merge"}
    prov = merges[f"urn:uuid:{obs['id']}"]
    named = {(e["what"]["identifier"]["system"], e["what"]["identifier"]["value"]) for e in prov["entity"]}
    assert named == {(f"urn:aggregator:source:{h.source_id}", "Observation/o1"),
                     (f"urn:aggregator:source:{b.source_id}", "Observation/lab-77")}
    assert f"urn:uuid:{enc['id']}" in merges
    patient_prov = merges[rec.patient_ref.replace("Patient/", "urn:uuid:")]  # type: ignore[union-attr]
    assert len(patient_prov["entity"]) == 2
    # both sources' pull Provenances still credit the survivor
    pulls = [p for p in rec.resources("Provenance") if p.get("policy")]
    assert len(pulls) == 2 and all(f"urn:uuid:{obs['id']}" in [t["reference"] for t in p["target"]] for p in pulls)
    # what the record keeps and merges adds up to what was pulled, per source
    for sink, n in ((h.sink, 3), (b, 4)):
        kept = sum(v for (sid, _k, _t), v in rec.kept.items() if sid == sink.source_id)
        gone = sum(1 for q in rec.quarantine if q.source_id == sink.source_id)
        assert kept + gone == n


def test_reports_pointing_at_distinct_twins_stay_distinct(tmp_path: Path) -> None:
    """Two reports alike but for which twin they point at: once the twins fall apart, the reports
    are judged again with the finer groups and both stay (no merge through a stale group)."""
    h = make_sink(tmp_path, kind="fhir")

    def panel(rid: str, result: str) -> dict[str, Any]:
        return {"resourceType": "DiagnosticReport", "id": rid, "status": "final",
                "code": {"coding": [{"system": LOINC, "code": "58410-2"}]}, "subject": {"reference": "Patient/p1"},
                "result": [{"reference": f"Observation/{result}"}]}

    emit(h.sink, BASE_A, [patient(), *TARGETS, hgb("o1", encounter={"reference": "Encounter/e1"}),
                          hgb("o2", encounter={"reference": "Encounter/e2"}), panel("dr1", "o1"), panel("dr2", "o2")])
    rec = run(h, [(h.sink, BASE_A)])
    assert len(twins(rec)) == 2
    reports = rec.resources("DiagnosticReport")
    assert len(reports) == 2
    assert {r["result"][0]["reference"] for r in reports} == {f"urn:uuid:{o['id']}" for o in twins(rec)}
    assert not [q for q in rec.quarantine if q.kind == "resource"]


SYNTHEA_TWINS = "fhir/synthea-r4-bundles/Fletcher_Hyatt_fe0562b5-f517-4951-8366-32fdab088930.json"


def test_synthea_lab_twins_in_two_encounters_are_all_kept(shared_data: Path, tmp_path: Path) -> None:
    """A real record: this Synthea patient had the same metabolic panel (same codes, time and
    values, other ids) recorded in two encounters. Eight of those results used to be merged away;
    every Observation now stays."""
    from tests.unit.test_normalize_shared import feed_json
    from tests.unit.test_normalize_shared import run as run_media

    path = shared_data / SYNTHEA_TWINS
    if not path.is_file():
        pytest.skip(f"{SYNTHEA_TWINS} not present")
    h = make_sink(tmp_path)
    feed_json(h, path)
    rec = run_media(h)
    n_obs = sum(1 for e in h.entries("done") if e.meta.get("resourceType") == "Observation")
    assert rec.count("Observation") == n_obs
    assert not [q for q in rec.quarantine if q.survivor.startswith("Observation/")]
