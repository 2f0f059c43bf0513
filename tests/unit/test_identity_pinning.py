"""Who the case's patient is when nothing was typed: pinned by a source's --patient-id, or nobody."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from aggregator.model import CaseInfo, SourceInfo
from aggregator.normalize import normalize
from tests.support import make_sink


def _patient(pid: str, family: str, birth: str, mrn: str) -> dict[str, Any]:
    return {"resourceType": "Patient", "id": pid, "identifier": [{"system": "urn:oid:1.2.3", "value": mrn}],
            "name": [{"family": family, "given": ["Sam"]}], "birthDate": birth}


def _obs(oid: str, pid: str) -> dict[str, Any]:
    return {"resourceType": "Observation", "id": oid, "status": "final",
            "code": {"coding": [{"system": "http://loinc.org", "code": "718-7"}]},
            "subject": {"reference": f"Patient/{pid}"}, "effectiveDateTime": "2026-09-01"}


def _run(tmp_path: Path, pin: str | None) -> Any:
    h = make_sink(tmp_path, kind="fhir")
    h.sink.resource(_patient("p1", "Able", "1970-05-01", "A1"), key="Patient/p1")
    h.sink.resource(_patient("p2", "Baker", "1980-06-02", "B2"), key="Patient/p2")
    h.sink.resource(_obs("o1", "p1"), key="Observation/o1")
    for i in range(3):  # the other person has more resources: that must not make them the patient
        h.sink.resource(_obs(f"x{i}", "p2"), key=f"Observation/x{i}")
    h.sink.flush()
    src = SourceInfo(h.source_id, "fhir", "ehr", base_url="https://ehr.example.org/fhir", patient_id=pin)
    return normalize(CaseInfo(h.case_id, "general"), [src], h.entries("done"), h.blobs)


def test_a_source_patient_id_pins_the_patient(tmp_path: Path) -> None:
    rec = _run(tmp_path, "p1")
    assert rec.identity["chosen"] and rec.identity["pinned"] and not rec.identity["several"]
    (p,) = rec.resources("Patient")
    assert p["name"][0]["family"] == "Able"
    assert len(rec.resources("Observation")) == 1
    assert {q.key: q.reason for q in rec.quarantine}["Observation/x0"] == "another patient"


def test_without_a_pin_two_people_mean_nobody_is_chosen(tmp_path: Path) -> None:
    rec = _run(tmp_path, None)
    assert not rec.identity["chosen"]
    listed = sorted((m["resource"], m["count"]) for g in rec.identity["several"] for m in g)
    assert listed == [("Patient/p1", 1), ("Patient/p2", 3)]
    assert not rec.resources("Observation")
    assert all(q.reason.startswith("several patients") for q in rec.quarantine)
