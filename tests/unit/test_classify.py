"""Classification by the code tables, on the public sample data and on small hand-made resources."""

from __future__ import annotations

import json
from collections import Counter
from importlib.resources import files
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from aggregator.checklist import evaluate, list_checklists, load_checklist
from aggregator.model import CaseInfo, NormalizedRecord, SourceInfo
from aggregator.normalize.classify import classify


def _walk(node: dict[str, Any]) -> list[dict[str, Any]]:
    if node.get("resourceType") == "Bundle":
        out = []
        for e in node.get("entry") or []:
            if isinstance(e.get("resource"), dict):
                out += _walk(e["resource"])
        return out
    return [node]


def _load(shared: Path, rel: str) -> list[dict[str, Any]]:
    return _walk(json.loads((shared / "fhir" / rel).read_text(encoding="utf-8")))


def test_ips_pathology_observation(shared_data: Path) -> None:
    (obs,) = _load(shared_data, "ips-examples/Observation-pathology-cancer.json")
    assert {"lab-result", "biomarker:er"} <= classify(obs)


def test_sdc_pathology_bundles(shared_data: Path) -> None:
    for name in ("BreastResBundleEx", "LungResBundleEx", "ColorectalTransactionBundle", "MelanomaBundleEx"):
        res = _load(shared_data, f"cancer-pathology-sdc-connectathon/{name}.json")
        reports = [r for r in res if r["resourceType"] == "DiagnosticReport"]
        assert reports and all("pathology-report" in classify(r) for r in reports)
        assert all("lab-report" not in classify(r) for r in reports)
        for sp in (r for r in res if r["resourceType"] == "Specimen"):
            assert "specimen:tissue" in classify(sp)


def test_mcode_bundle(shared_data: Path) -> None:
    res = {r["id"]: classify(r) for r in _load(shared_data, "mcode-examples/Bundle-mcode-patient-bundle-jenny-m.json")}
    assert {"cancer", "cancer:breast", "problem"} <= res["primary-cancer-condition-jenny-m"]
    assert "pathology-report" in res["us-core-diagnosticreport-lab-jenny-m"]  # 22637-3 filed as LAB
    assert "lab-report" not in res["us-core-diagnosticreport-lab-jenny-m"]
    assert "procedure:biopsy" in res["us-core-procedure-biopsy-jenny-m"]
    assert "procedure:resection" in res["cancer-related-surgical-procedure-jenny-m"]
    assert "biomarker:er" in res["tumor-marker-test-er-jenny-m"]
    assert "biomarker:pr" in res["tumor-marker-test-pr-jenny-m"]
    assert "biomarker:her2" in res["tumor-marker-test-her2-jenny-m"]
    assert "staging" in res["tnm-clinical-stage-group-jenny-m"]
    assert "procedure:biopsy" not in res["us-core-procedure-mammogram-jenny-m"]
    lung = _load(shared_data, "mcode-examples/Condition-primary-cancer-condition-nsclc.json")[0]
    assert "cancer:lung" in classify(lung)
    breast = _load(shared_data, "mcode-examples/Condition-primary-cancer-condition-breast.json")[0]
    assert {"cancer:breast", "staging"} <= classify(breast)  # site from bodySite, stage element


def test_synthea_labs_and_procedures(shared_data: Path) -> None:
    path = next((shared_data / "fhir/synthea-r4-bundles").glob("Chadwick_Von_*.json"))
    res = _walk(json.loads(path.read_text(encoding="utf-8")))
    counts: Counter[str] = Counter()
    for r in res:
        for c in classify(r):
            counts[c] += 1
    labs = [r for r in res if r["resourceType"] == "Observation"
            and any(c.get("coding", [{}])[0].get("code") == "laboratory" for c in r.get("category", []))]
    assert labs and all("lab-result" in classify(r) for r in labs)
    panels = [r for r in res if r["resourceType"] == "DiagnosticReport"]
    assert panels and all("lab-report" in classify(r) for r in panels)
    assert counts["encounter"] and counts["medication"] and counts["problem"]
    assert counts["pathology-report"] == 0 and counts["note"] == 0  # this Synthea version has none


def test_synthea_notes(shared_data: Path) -> None:
    path = next((shared_data / "fhir/synthea-r4-bundles-with-notes").glob("*.json"))
    res = _walk(json.loads(path.read_text(encoding="utf-8")))
    docs = [r for r in res if r["resourceType"] == "DocumentReference"]
    notes = [r for r in res if r["resourceType"] == "DiagnosticReport" and r.get("presentedForm")]
    assert docs and notes
    assert all({"note", "note:hp"} <= classify(r) for r in docs + notes)
    assert not any("pathology-report" in classify(r) for r in docs + notes)


def test_us_core_and_spec_examples(shared_data: Path) -> None:
    f = shared_data / "fhir"
    one = lambda rel: classify(_load(shared_data, rel)[0])  # noqa: E731
    assert "note:discharge" in one("us-core-examples/documentreference-discharge-summary.json")
    assert "pathology-report" not in one("us-core-examples/documentreference-discharge-summary.json")
    assert {"radiology-report", "modality:XR"} <= one("us-core-examples/DiagnosticReport-chest-xray-report.json")
    assert {"cardiology-report", "ecg"} <= one("us-core-examples/DiagnosticReport-cardiology-report.json")
    assert "pathology-report" in one("hl7-r4-spec-examples/DiagnosticReport-gingival-mass.json")  # v2-0074 PAT
    assert "pathology-report:cytology" in one("hl7-r4-spec-examples/DiagnosticReport-pap.json")
    assert {"radiology-report", "modality:CT"} <= one("hl7-r4-spec-examples/DiagnosticReport-f201.json")
    assert {"imaging-study", "modality:XR"} <= one("hl7-r4-spec-examples/ImagingStudy-example-xr.json")
    assert "specimen:tissue" not in one("hl7-r4-spec-examples/Specimen-101.json")  # venous blood
    assert f.is_dir()


@pytest.mark.parametrize(("resource", "expected"), [
    ({"resourceType": "DocumentReference", "type": {"coding": [{"system": "http://loinc.org", "code": "11526-1"}]}},
     {"pathology-report", "pathology-report:surgical"}),
    ({"resourceType": "DiagnosticReport", "code": {"text": "Surgical pathology report, left breast"}},
     {"pathology-report"}),
    ({"resourceType": "DocumentReference", "type": {"coding": [{"system": "http://loinc.org", "code": "11504-8"}]}},
     {"note", "note:operative"}),
    ({"resourceType": "DocumentReference", "type": {"coding": [{"system": "http://loinc.org", "code": "11488-4"}]}},
     {"note", "note:consult"}),
    ({"resourceType": "Procedure", "code": {"text": "Core needle biopsy of liver"}}, {"procedure:biopsy"}),
    ({"resourceType": "Procedure", "code": {"text": "Vasectomy"}}, {"procedure"}),
    ({"resourceType": "Condition", "code": {"coding": [{"system": "http://hl7.org/fhir/sid/icd-10-cm",
                                                        "code": "C61"}]}}, {"cancer:prostate"}),
    ({"resourceType": "Condition", "code": {"text": "Suspected lung cancer"}}, {"problem"}),
    ({"resourceType": "Observation", "code": {"coding": [{"system": "http://loinc.org", "code": "2857-1",
                                                          "display": "PSA"}]}}, {"lab:psa"}),
    ({"resourceType": "Observation", "code": {"text": "Alkaline phosphatase"}}, {"observation"}),
    ({"resourceType": "Encounter", "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode",
                                             "code": "IMP"}}, {"encounter", "encounter:inpatient"}),
    ({"resourceType": "AllergyIntolerance"}, {"allergy"}),
    ({"resourceType": "Basic"}, set()),
])
def test_hand_made(resource: dict[str, Any], expected: set[str]) -> None:
    got = classify(resource)
    assert expected <= got if expected else got == frozenset()
    if resource.get("code", {}).get("text") == "Alkaline phosphatase":
        assert "biomarker:alk" not in got
    if resource.get("code", {}).get("text") == "Suspected lung cancer":
        assert "cancer" not in got


SAMPLES = [
    "mcode-examples/Bundle-mcode-patient-bundle-jenny-m.json",
    "ips-examples/Bundle-IPS-examples-Bundle-01.json",
    "cancer-pathology-sdc-connectathon/BreastResBundleEx.json",
    "synthea-r4-bundles-with-notes",
    "synthea-r4-bundles",
]


def test_shared_patients_through_every_checklist(shared_data: Path) -> None:
    """Each public patient bundle, taken as a record, gives a schema-valid report on every checklist."""
    schema = json.loads(files("schemas").joinpath("gap-report.schema.json").read_text())
    paths: list[Path] = []
    for rel in SAMPLES:
        p = shared_data / "fhir" / rel
        paths += sorted(p.glob("*.json"))[:2] if p.is_dir() else [p]
    src = SourceInfo(1, "media", "download", organization="Sample Hospital", pulled_at="2026-01-01T00:00:00Z")
    for path in paths:
        bundle = json.loads(path.read_text(encoding="utf-8"))
        record = NormalizedRecord(bundle={"resourceType": "Bundle", "type": "collection",
                                          "entry": bundle.get("entry") or []})
        # who to ask: the institution the data names for the item, else the configured one
        orgs = {"Sample Hospital"} | {str(e["resource"]["name"]) for e in bundle.get("entry") or []
                                      if e.get("resource", {}).get("resourceType") == "Organization"
                                      and e["resource"].get("name")}
        for name in list_checklists():
            report = evaluate(load_checklist(name), record, [], CaseInfo("c", name), [src])
            jsonschema.validate(report, schema)
            assert 0.0 <= report["score"] <= 1.0
            for it in report["items"]:
                for g in it["gaps"]:
                    assert any(o in g["next_action"] for o in orgs) or g["reason"] == "identity-conflict", g
