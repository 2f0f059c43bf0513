"""study_hints over real FHIR resources (HL7/US Core/Synthea examples) stored through a real ledger."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from aggregator.jobs.hints import study_hints
from aggregator.ledger import entries_for_case
from connectors.base import KIND_RESOURCE, PatientRef
from connectors.dicom_stream import StudyHint, StudyMatch, own_studies, parse_hints, select_hinted
from tests.support import make_sink

FILES = [
    "hl7-r4-spec-examples/DiagnosticReport-f201.json",  # RAD category, CT head-neck, no identifiers
    "hl7-r4-spec-examples/DiagnosticReport-ultrasound.json",  # RAD, abdominal ultrasound
    "us-core-examples/DiagnosticReport-chest-xray-report.json",  # LOINC Radiology, XR chest
    "us-core-examples/diagnosticreport-cbc.json",  # laboratory: no hint
    "hl7-r4-spec-examples/ImagingStudy-example-xr.json",  # urn:dicom:uid + ACSN
    "hl7-r4-spec-examples/ImagingStudy-example.json",  # urn:dicom:uid, CT series
]


def _hints(tmp_path: Path, resources: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    h = make_sink(tmp_path, kind="fhir")
    for r in resources:
        h.sink.resource(r)
    h.sink.failed(KIND_RESOURCE, "DiagnosticReport/broken", "invalid JSON")  # not done: ignored
    h.sink.flush()
    return {x["ref"]: x for x in study_hints(entries_for_case(h.db, h.case_id), h.blobs)}


def test_hints_from_public_examples(shared_data: Path, tmp_path: Path) -> None:
    resources = [json.loads((shared_data / "fhir" / f).read_text()) for f in FILES]
    hints = _hints(tmp_path, resources)
    assert set(hints) == {"DiagnosticReport/f201", "DiagnosticReport/ultrasound",
                          "DiagnosticReport/chest-xray-report", "ImagingStudy/example-xr", "ImagingStudy/example"}
    assert hints["ImagingStudy/example-xr"] == {
        "ref": "ImagingStudy/example-xr", "study_uid": "2.16.124.113543.6003.1154777499.30246.19789.3503430046",
        "accession": "W12342398", "date": "20170101", "modality": "DX"}
    assert hints["ImagingStudy/example"]["modality"] == "CT"
    assert hints["DiagnosticReport/f201"]["modality"] == "CT"
    assert hints["DiagnosticReport/f201"]["date"] == "20121201"
    assert hints["DiagnosticReport/ultrasound"]["modality"] == "US"
    assert hints["DiagnosticReport/chest-xray-report"]["modality"] == "DX"
    assert hints["DiagnosticReport/chest-xray-report"]["date"] == "20190203"


def test_synthea_imaging_study_uid_from_urn_oid(shared_data: Path, tmp_path: Path) -> None:
    bundles = sorted((shared_data / "fhir" / "synthea-r4-bundles").glob("*.json"))
    studies = []
    for path in bundles:
        bundle = json.loads(path.read_text())
        studies += [e["resource"] for e in bundle.get("entry", []) if e["resource"]["resourceType"] == "ImagingStudy"]
        if len(studies) >= 3:
            break
    if not studies:
        pytest.skip("no Synthea ImagingStudy in the shared data")
    hints = _hints(tmp_path, studies)
    for s in studies:
        hint = hints[f"ImagingStudy/{s['id']}"]
        assert "urn:oid:" + (hint["study_uid"] or "") == s["identifier"][0]["value"]
        assert hint["modality"] == s["series"][0]["modality"]["code"]


def test_report_borrows_the_linked_imaging_study(shared_data: Path, tmp_path: Path) -> None:
    study = json.loads((shared_data / "fhir/hl7-r4-spec-examples/ImagingStudy-example-xr.json").read_text())
    report = json.loads((shared_data / "fhir/us-core-examples/DiagnosticReport-chest-xray-report.json").read_text())
    report = {**report, "category": [], "imagingStudy": [{"reference": "ImagingStudy/example-xr"}]}
    hints = _hints(tmp_path, [study, report])
    got = hints["DiagnosticReport/chest-xray-report"]
    assert got["study_uid"] == "2.16.124.113543.6003.1154777499.30246.19789.3503430046"
    assert got["accession"] == "W12342398"
    assert got["date"] == "20190203"  # the report's own date wins


def test_hostile_hint_values_are_not_used_as_query_keys() -> None:
    (h,) = parse_hints([{"ref": "DiagnosticReport/x", "study_uid": "1.2.3\\4.5", "accession": "A*",
                         "date": "2020-13", "modality": "C T"}])
    assert (h.study_uid, h.accession, h.date, h.modality) == (None, None, None, None)
    assert h.criterion("PID") is None


def _match(**kw: Any) -> StudyMatch:
    return StudyMatch(**{"study_uid": "1.2.3", "accession": "A1", "patient_id": "P1", **kw})


def test_rule_other_patient_id_needs_exact_match_and_no_contradiction() -> None:
    hint = StudyHint("DiagnosticReport/r", accession="A1")
    me = PatientRef(id="P9", name="Jürgen Müller", birth_date="1955-04-12")
    same = _match(name="MULLER^JURGEN", birth_date="19550412")
    assert select_hinted(hint, "accession", [same], me)[0] == [same]
    other = _match(name="Tanaka^Robin", birth_date="19881120")
    assert select_hinted(hint, "accession", [other], me)[2] == "other-patient"
    two = [_match(patient_id="X1"), _match(patient_id="X2", study_uid="1.2.4")]
    assert select_hinted(hint, "accession", two, PatientRef())[2] == "ambiguous"
    own = _match(patient_id="P9", study_uid="1.2.5")
    assert select_hinted(hint, "accession", [*two, own], me)[0] == [own]
    wildcard_answer = _match(accession="A10")  # an archive that prefix-matched
    assert select_hinted(hint, "accession", [wildcard_answer], me)[2] == "not-found"
    by_date = StudyHint("DiagnosticReport/d", date="20260804", modality="MG")
    foreign = _match(date="20260804", modalities=frozenset({"MG"}))
    assert select_hinted(by_date, "date+modality", [foreign], me)[2] == "not-found"


@pytest.mark.parametrize(("found", "patient", "taken", "statuses"), [
    # one person (same issuer, or no issuer and one birth date): everything is taken
    ([StudyMatch("1", issuer="A", birth_date="19610305"), StudyMatch("2", issuer="A")], PatientRef(id="p"),
     ["1", "2"], []),
    ([StudyMatch("1", birth_date="19610305"), StudyMatch("2", birth_date="1961-03-05")], PatientRef(id="p"),
     ["1", "2"], []),
    # two issuers, nothing to tell them apart: nothing is taken
    ([StudyMatch("1", issuer="A"), StudyMatch("2", issuer="B")], PatientRef(id="p", birth_date="1961-03-05"),
     [], ["ambiguous", "ambiguous"]),
    # the case's birth date tells them apart
    ([StudyMatch("1", issuer="A", birth_date="19610305"), StudyMatch("2", issuer="B", birth_date="19881120")],
     PatientRef(id="p", birth_date="1961-03-05"), ["1"], ["other-patient"]),
    # a configured issuer is trusted: the query already asked for it
    ([StudyMatch("1", issuer="A"), StudyMatch("2", issuer="B")], PatientRef(id="p", issuer="A"), ["1", "2"], []),
])
def test_own_studies(tmp_path: Path, found: list[StudyMatch], patient: PatientRef, taken: list[str],
                     statuses: list[str]) -> None:
    h = make_sink(tmp_path, kind="dimse")
    assert [m.study_uid for m in own_studies(found, patient, h.sink)] == taken
    assert sorted(e.status or "" for e in h.entries("failed")) == statuses
