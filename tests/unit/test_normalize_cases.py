"""normalize() on generated cases: re-exports, conflicts, amended reports, invalid input."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import orjson

from aggregator.ledger import LedgerSink
from aggregator.model import CaseInfo, NormalizedRecord, SourceInfo
from aggregator.normalize import normalize
from tests.support import SinkHarness, make_sink

BASE = "https://ehr.example.org/fhir"


def patient(pid: str = "p1", birth: str = "1970-05-01", family: str = "Doe", given: str = "Jane") -> dict[str, Any]:
    return {"resourceType": "Patient", "id": pid, "identifier": [{"system": "urn:oid:1.2.3", "value": "MRN1"}],
            "name": [{"family": family, "given": [given]}], "gender": "female", "birthDate": birth}


def obs(oid: str, value: float, updated: str, version: str) -> dict[str, Any]:
    return {"resourceType": "Observation", "id": oid, "meta": {"versionId": version, "lastUpdated": updated},
            "status": "final", "code": {"coding": [{"system": "http://loinc.org", "code": "718-7"}]},
            "subject": {"reference": "Patient/p1"}, "effectiveDateTime": "2026-09-01",
            "valueQuantity": {"value": value, "unit": "g/dL", "system": "http://unitsofmeasure.org", "code": "g/dL"}}


def report(rid: str, status: str, text: str) -> dict[str, Any]:
    return {"resourceType": "DiagnosticReport", "id": rid, "status": status,
            "identifier": [{"system": "urn:oid:1.2.3.5", "value": "S26-100"}],
            "code": {"coding": [{"system": "http://loinc.org", "code": "22637-3"}]},
            "subject": {"reference": "Patient/p1"},
            "presentedForm": [{"contentType": "text/plain", "data": base64.b64encode(text.encode()).decode()}]}


def second_source(h: SinkHarness) -> LedgerSink:
    from aggregator.store.models import Source

    with h.db.session() as s:
        src = Source(case_id=h.case_id, kind="fhir", config={}, label="fhir2")
        s.add(src)
        s.flush()
        sid = src.id
    return LedgerSink(h.db, h.blobs, sid, None)


def run(h: SinkHarness, sinks: list[LedgerSink], case: CaseInfo | None = None) -> NormalizedRecord:
    for s in sinks:
        s.flush()
    srcs = [SourceInfo(s.source_id, "fhir", f"ehr{i}", base_url=BASE, method="$everything",
                       pulled_at=f"2026-09-{10 + i}T08:00:00Z") for i, s in enumerate(sinks)]
    return normalize(case or CaseInfo(h.case_id, "oncology", patient_name="Jane Doe", birth_date="1970-05-01"),
                     srcs, h.entries("done"), h.blobs)


def test_two_exports_newer_version_wins_without_duplicates(tmp_path: Path) -> None:
    h = make_sink(tmp_path, kind="fhir")
    old, new = h.sink, second_source(h)
    old.resource(patient(), meta={"base_url": BASE})
    old.resource(obs("o1", 11.0, "2026-09-01T00:00:00Z", "1"), meta={"base_url": BASE})
    new.resource(patient(), meta={"base_url": BASE})
    new.resource(obs("o1", 12.5, "2026-09-20T00:00:00Z", "2"), meta={"base_url": BASE})
    rec = run(h, [old, new])
    (o,) = rec.resources("Observation")
    assert o["valueQuantity"]["value"] == 12.5
    assert len(rec.resources("Patient")) == 1 and rec.conflicts == []
    reasons = {(q.source_id, q.reason) for q in rec.quarantine}
    assert (old.source_id, f"merged into Observation/{o['id']} (older version)") in reasons
    # both pulls are credited: the merged resources are targets of both Provenances
    provs = [p for p in rec.resources("Provenance") if p.get("policy")]
    assert len(provs) == 2 and all(f"urn:uuid:{o['id']}" in [t["reference"] for t in p["target"]] for p in provs)


def test_conflicting_demographics_reported_not_merged_silently(tmp_path: Path) -> None:
    h = make_sink(tmp_path, kind="fhir")
    a, b = h.sink, second_source(h)
    a.resource(patient())
    b.resource(patient(birth="1971-05-01"))
    b.resource(patient("x9", family="Roe", given="Richard") | {"identifier": [], "birthDate": "1950-01-01"})
    b.resource(obs("o2", 9.0, "2026-09-01T00:00:00Z", "1") | {"subject": {"reference": "Patient/x9"}})
    rec = run(h, [a, b])
    (p,) = rec.resources("Patient")
    assert p["birthDate"] == "1970-05-01"
    (c,) = [c for c in rec.conflicts if c["field"] == "birthDate"]
    assert c["values"] == ["1970-05-01", "1971-05-01"] and c["sources"] == [a.source_id, b.source_id]
    another = {q.key for q in rec.quarantine if q.reason == "another patient"}
    assert another == {"Patient/x9", "Observation/o2"}
    assert rec.resources("Observation") == []


def test_amended_report_wins_final_kept_and_traceable(tmp_path: Path) -> None:
    h = make_sink(tmp_path, kind="fhir")
    h.sink.resource(patient())
    h.sink.resource(report("r-final", "final", "Invasive ductal carcinoma, grade 2."))
    h.sink.resource(report("r-amended", "amended", "Invasive ductal carcinoma, grade 3 (amended)."))
    rec = run(h, [h.sink])
    reports = {r["status"]: r for r in rec.resources("DiagnosticReport")}
    assert set(reports) == {"final", "amended"}  # the older text is never dropped
    links = [p for p in rec.resources("Provenance") if p.get("entity", [{}])[0].get("role") == "revision"]
    assert len(links) == 1
    assert links[0]["target"] == [{"reference": f"urn:uuid:{reports['amended']['id']}"}]
    assert links[0]["entity"][0]["what"] == {"reference": f"urn:uuid:{reports['final']['id']}"}


def test_superseded_document_reference_uses_relates_to(tmp_path: Path) -> None:
    h = make_sink(tmp_path, kind="fhir")
    h.sink.resource(patient())
    for rid, status, text in (("d1", "preliminary", "draft"), ("d2", "final", "signed")):
        h.sink.resource({"resourceType": "DocumentReference", "id": rid, "status": "current", "docStatus": status,
                         "identifier": [{"system": "urn:oid:1.2.9", "value": "NOTE-1"}],
                         "content": [{"attachment": {"contentType": "text/plain",
                                                     "data": base64.b64encode(text.encode()).decode()}}]})
    rec = run(h, [h.sink])
    docs = {d["docStatus"]: d for d in rec.resources("DocumentReference")}
    assert docs["preliminary"]["status"] == "superseded"
    assert docs["final"]["relatesTo"] == [{"code": "replaces",
                                           "target": {"reference": f"urn:uuid:{docs['preliminary']['id']}"}}]
    assert len(rec.documents) == 2  # different bytes: two files


def test_invalid_resource_quarantined_rest_kept_and_deterministic(tmp_path: Path) -> None:
    h = make_sink(tmp_path, kind="fhir")
    h.sink.resource(patient())
    h.sink.resource({"resourceType": "Observation", "id": "bad", "status": "final",
                     "subject": {"reference": "Patient/p1"}, "valueQuantity": {"value": "Jane Doe secret"}})
    h.sink.resource({"resourceType": "ImagingSelection", "id": "r5only", "status": "available"})
    h.sink.resource(obs("o1", 11.0, "2026-09-01T00:00:00Z", "1"))
    h.sink.resource(obs("o1-copy", 11.0, "2026-09-02T00:00:00Z", "1"))  # same code/time/value: one fact
    rec = run(h, [h.sink])
    q = {x.key: x.reason for x in rec.quarantine}
    assert q["Observation/bad"].startswith("invalid FHIR R4: ") and "secret" not in q["Observation/bad"]
    assert q["ImagingSelection/r5only"] == "unsupported type"
    (o,) = rec.resources("Observation")
    assert q["Observation/o1"] == f"merged into Observation/{o['id']}"
    assert o["subject"]["reference"] == f"urn:uuid:{rec.patient_ref.split('/')[1]}"  # type: ignore[union-attr]
    assert orjson.dumps(run(h, [h.sink]).bundle) == orjson.dumps(rec.bundle)
