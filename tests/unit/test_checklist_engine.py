"""Gap detection: each gap type next to its complete twin, with the reason the ledger/data give.

Records are built by hand as FHIR dicts (input data, shaped as the normalizer writes them:
``urn:uuid`` fullUrls and references). The same builder makes the complete twin, so every gap
test also proves that the complete record has no false gap.
"""

from __future__ import annotations

import copy
import json
from datetime import datetime
from importlib.resources import files
from typing import Any

import jsonschema
import pytest

from aggregator.checklist import evaluate, load_checklist, render_text
from aggregator.ledger import LedgerEntry
from aggregator.model import CaseInfo, DocumentFile, ImageRef, NormalizedRecord, SourceInfo

STUDY = "1.2.826.0.1.3680043.8.498.1"
SERIES = "1.2.826.0.1.3680043.8.498.1.1"
SOPS = ["1.2.826.0.1.3680043.8.498.1.1.1", "1.2.826.0.1.3680043.8.498.1.1.2"]
HOSPITAL = SourceInfo(1, "fhir", "hospital-fhir", organization="Good Hospital", pulled_at="2026-03-09T10:00:00Z")
PACS = SourceInfo(2, "dicomweb", "hospital-pacs", organization="Good Hospital Radiology",
                  pulled_at="2026-03-09T10:00:00Z")
CASE = CaseInfo("case-1", "general", case_date="2026-03-10")
GAP_SCHEMA = json.loads(files("schemas").joinpath("gap-report.schema.json").read_text())


def u(name: str) -> str:
    return f"urn:uuid:{name}"


def cc(system: str, code: str, display: str = "") -> dict[str, Any]:
    return {"coding": [{"system": system, "code": code, "display": display}], "text": display or code}


LOINC = "http://loinc.org"
SCT = "http://snomed.info/sct"


def complete_resources() -> dict[str, dict[str, Any]]:
    """A small complete oncology-ish record (keys are the resource ids)."""
    pat = {"resourceType": "Patient", "id": "p1"}
    subj = {"reference": u("p1")}
    res = [
        pat,
        {"resourceType": "Encounter", "id": "enc1", "status": "finished", "subject": subj,
         "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
         "period": {"start": "2026-03-02T09:00:00Z"}},
        {"resourceType": "Procedure", "id": "bx1", "status": "completed", "subject": subj,
         "code": cc(SCT, "122548005", "Biopsy of breast"), "performedDateTime": "2026-03-02",
         "encounter": {"reference": u("enc1")}},
        {"resourceType": "Specimen", "id": "sp1", "subject": subj,
         "type": cc("http://terminology.hl7.org/CodeSystem/v2-0487", "TISS", "Tissue"),
         "collection": {"collectedDateTime": "2026-03-02"}},
        {"resourceType": "DiagnosticReport", "id": "path1", "status": "final", "subject": subj,
         "category": [cc("http://terminology.hl7.org/CodeSystem/v2-0074", "SP", "Surgical Pathology")],
         "code": cc(LOINC, "11526-1", "Pathology study"), "effectiveDateTime": "2026-03-05",
         "specimen": [{"reference": u("sp1")}], "conclusion": "Invasive ductal carcinoma.",
         "presentedForm": [{"contentType": "application/pdf", "url": "documents/DOC0001.PDF", "size": 2048}]},
        {"resourceType": "DiagnosticReport", "id": "rad1", "status": "final", "subject": subj,
         "category": [cc("http://terminology.hl7.org/CodeSystem/v2-0074", "RAD", "Radiology")],
         "code": cc(LOINC, "24627-2", "CT Chest"), "effectiveDateTime": "2026-02-20",
         "imagingStudy": [{"reference": u("is1")}], "conclusion": "No metastases.",
         "presentedForm": [{"contentType": "text/plain", "data": "Q1QgY2hlc3Q6IG5vcm1hbC4="}]},
        {"resourceType": "ImagingStudy", "id": "is1", "status": "available", "subject": subj,
         "identifier": [{"system": "urn:dicom:uid", "value": f"urn:oid:{STUDY}"}],
         "started": "2026-02-20T08:00:00Z", "numberOfSeries": 1, "numberOfInstances": 2,
         "modality": [{"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "CT"}],
         "series": [{"uid": SERIES, "numberOfInstances": 2,
                     "modality": {"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "CT"},
                     "instance": [{"uid": s, "sopClass": {"code": "1.2.840.10008.5.1.4.1.1.2"}} for s in SOPS]}]},
        {"resourceType": "Observation", "id": "lab1", "status": "final", "subject": subj,
         "category": [cc("http://terminology.hl7.org/CodeSystem/observation-category", "laboratory")],
         "code": cc(LOINC, "718-7", "Hemoglobin"), "effectiveDateTime": "2026-03-01",
         "valueQuantity": {"value": 13.1, "unit": "g/dL"}},
        {"resourceType": "DocumentReference", "id": "note1", "status": "current", "subject": subj,
         "type": cc(LOINC, "11506-3", "Progress note"),
         "category": [cc("http://hl7.org/fhir/us/core/CodeSystem/us-core-documentreference-category",
                         "clinical-note")],
         "date": "2026-03-02T12:00:00Z", "context": {"encounter": [{"reference": u("enc1")}]},
         "content": [{"attachment": {"contentType": "text/plain", "data": "UGF0aWVudCBzZWVuLg=="}}]},
        {"resourceType": "Condition", "id": "cond1", "subject": subj,
         "category": [cc("http://terminology.hl7.org/CodeSystem/condition-category", "problem-list-item")],
         "code": cc(SCT, "254837009", "Malignant neoplasm of breast"), "onsetDateTime": "2026-03-05",
         "stage": [{"summary": cc(SCT, "1222806003", "Stage IIIC")}]},
        {"resourceType": "MedicationRequest", "id": "med1", "status": "active", "intent": "order",
         "subject": subj, "authoredOn": "2026-03-06",
         "medicationCodeableConcept": cc("http://www.nlm.nih.gov/research/umls/rxnorm", "1", "tamoxifen")},
        _marker("er", "85337-4", "Estrogen receptor Ag [Presence] in Breast cancer specimen"),
        _marker("pr", "85339-0", "Progesterone receptor Ag [Presence] in Breast cancer specimen"),
        _marker("her2", "48676-1", "HER2 [Interpretation] in Tissue"),
    ]
    return {r["id"]: r for r in res}


def images(n: int = 2) -> list[ImageRef]:
    return [ImageRef(s, "1.2.840.10008.5.1.4.1.1.2", STUDY, SERIES, "1.2.840.10008.1.2.1", "0" * 64, 1000, "CT",
                     source_id=2) for s in SOPS[:n]]


def record(res: dict[str, dict[str, Any]], imgs: list[ImageRef] | None = None,
           conflicts: list[dict[str, Any]] | None = None) -> NormalizedRecord:
    entries = [{"fullUrl": u(k), "resource": v} for k, v in sorted(res.items())]
    prov = {"resourceType": "Provenance", "id": "prov1", "recorded": "2026-03-09T10:00:00Z",
            "target": [{"reference": u(k)} for k in sorted(res)],
            "agent": [{"who": {"display": "hospital-fhir"}}],
            "entity": [{"role": "source", "what": {"identifier": {"system": "urn:aggregator:source", "value": "1"}}}]}
    entries.append({"fullUrl": u("prov1"), "resource": prov})
    docs = [DocumentFile("documents/DOC0001.PDF", "a" * 64, 2048, "application/pdf",
                         resource_ref="DiagnosticReport/path1")]
    return NormalizedRecord(
        bundle={"resourceType": "Bundle", "type": "collection", "entry": entries},
        documents=docs if "documents/" in json.dumps(res.get("path1", {})) else [],
        images=images() if imgs is None else imgs,
        conflicts=conflicts or [],
        patient_ref="Patient/p1",
    )


def failed(key: str, status: str, reason: str, *, kind: str = "binary", source: int = 1,
           meta: dict[str, Any] | None = None) -> LedgerEntry:
    return LedgerEntry(source, kind, key, "failed", reason, status, 1, None, None, None, meta or {},
                       datetime(2026, 3, 9))


def run(rec: NormalizedRecord, checklist: str = "general", ledger: list[LedgerEntry] | None = None,
        sources: list[SourceInfo] | None = None, case: CaseInfo = CASE) -> dict[str, Any]:
    report = evaluate(load_checklist(checklist), rec, ledger or [], case, sources or [HOSPITAL, PACS])
    jsonschema.validate(report, GAP_SCHEMA)
    return report


def gaps(report: dict[str, Any]) -> dict[str, list[str]]:
    """item id -> reasons of its gaps (only items with gaps)."""
    return {i["id"]: [g["reason"] for g in i["gaps"]] for i in report["items"] if i["gaps"]}


def item(report: dict[str, Any], item_id: str) -> dict[str, Any]:
    return next(i for i in report["items"] if i["id"] == item_id)


# --- the complete twin -----------------------------------------------------------------------


@pytest.mark.parametrize("checklist", ["general", "oncology"])
def test_complete_record_has_no_gap(checklist: str) -> None:
    report = run(record(complete_resources()), checklist)
    assert gaps(report) == {}
    assert report["score"] == 1.0 and report["complete"] is True
    path = item(report, "pathology-report")
    assert path["status"] == "complete"
    assert {"Procedure/bx1", "Specimen/sp1", "DiagnosticReport/path1"} <= set(path["evidence"])
    assert item(report, "radiology-images")["evidence"] == ["DiagnosticReport/rad1", "ImagingStudy/is1"]


def test_report_is_deterministic_and_renders() -> None:
    a = run(record(complete_resources()))
    b = run(record(complete_resources()))
    assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)
    text = render_text(a)
    assert "No gaps" in text and "Completeness: 100%" in text


# --- one gap at a time --------------------------------------------------------------------


def test_pathology_text_removed_is_summary_only() -> None:
    res = complete_resources()
    del res["path1"]["presentedForm"]
    report = run(record(res))
    assert gaps(report) == {"pathology-report": ["summary-only", "summary-only"]}
    g = item(report, "pathology-report")["gaps"][0]
    assert g["resource"] == "DiagnosticReport/path1"
    assert "Good Hospital" in g["next_action"] and "2026-03-02" in g["next_action"]
    assert "pathology report" in g["next_action"]


def test_pathology_report_absent_is_not_found() -> None:
    res = complete_resources()
    del res["path1"]
    report = run(record(res))
    assert gaps(report) == {"pathology-report": ["not-found", "not-found"]}
    assert item(report, "pathology-report")["status"] == "missing"


def test_discharge_summary_does_not_satisfy_pathology() -> None:
    res = complete_resources()
    del res["path1"]
    res["dis1"] = {"resourceType": "DocumentReference", "id": "dis1", "status": "current",
                   "type": cc(LOINC, "18842-5", "Discharge summary"), "date": "2026-03-06",
                   "content": [{"attachment": {"contentType": "text/plain", "data": "U3VtbWFyeQ=="}}]}
    report = run(record(res))
    assert gaps(report) == {"pathology-report": ["summary-only", "summary-only"]}


def test_conclusion_only_report_is_summary_only() -> None:
    res = complete_resources()
    res["path1"].pop("presentedForm")
    res["path1"]["result"] = []
    report = run(record(res))
    assert set(gaps(report)["pathology-report"]) == {"summary-only"}
    assert "conclusion" in item(report, "pathology-report")["gaps"][0]["detail"]


def test_metadata_only_document_reference_does_not_count() -> None:
    res = complete_resources()
    res["note1"]["content"] = [{"attachment": {"contentType": "application/pdf", "title": "note"}}]
    report = run(record(res))
    assert gaps(report) == {"clinical-notes": ["summary-only"]}


@pytest.mark.parametrize(("status", "reason"), [
    ("403", "access-denied"), ("401", "access-denied"), ("404", "not-found-at-source"),
    ("410", "not-found-at-source"), ("500", "retrieval-failed"),
])
def test_pathology_bytes_failed_in_ledger(status: str, reason: str) -> None:
    res = complete_resources()
    res["path1"]["presentedForm"] = [{"contentType": "application/pdf", "url": "Binary/77"}]
    ledger = [failed("https://fhir.good-hospital.example/R4/Binary/77", status, f"HTTP {status}")]
    report = run(record(res), ledger=ledger)
    assert gaps(report) == {"pathology-report": [reason, reason]}
    g = item(report, "pathology-report")["gaps"][0]
    assert g["source"] == "hospital-fhir"
    assert "Good Hospital" in g["next_action"]


def test_preliminary_pathology_report_is_pending() -> None:
    res = complete_resources()
    res["path1"]["status"] = "preliminary"
    report = run(record(res))
    assert gaps(report) == {"pathology-report": ["pending", "pending"]}


def test_radiology_images_not_retrieved() -> None:
    report = run(record(complete_resources(), imgs=[]))
    assert gaps(report) == {"radiology-images": ["images-not-retrieved"]}
    g = item(report, "radiology-images")["gaps"][0]
    assert g["subject"] == "DiagnosticReport/rad1" and g["resource"] == "ImagingStudy/is1"


def test_radiology_report_without_any_study_is_images_not_retrieved() -> None:
    res = complete_resources()
    del res["is1"]
    del res["rad1"]["imagingStudy"]
    report = run(record(res, imgs=[]))
    assert gaps(report) == {"radiology-images": ["images-not-retrieved"]}
    assert "Good Hospital" in item(report, "radiology-images")["gaps"][0]["next_action"]


def test_radiology_images_incomplete_counts() -> None:
    report = run(record(complete_resources(), imgs=images(1)))
    assert gaps(report) == {"radiology-images": ["images-not-retrieved"]}
    assert "1 of 2 instances" in item(report, "radiology-images")["gaps"][0]["detail"]


def test_radiology_images_failed_with_dimse_status() -> None:
    ledger = [failed(SOPS[1], "0xA702", "the archive reported this instance failed in C-GET", kind="dicom",
                     source=2, meta={"study_uid": STUDY})]
    report = run(record(complete_resources(), imgs=images(1)), ledger=ledger)
    assert gaps(report) == {"radiology-images": ["retrieval-failed"]}
    g = item(report, "radiology-images")["gaps"][0]
    assert "0xA702" in g["detail"] and g["source"] == "hospital-pacs"


def test_radiology_linked_by_accession_number_and_by_date() -> None:
    res = complete_resources()
    del res["rad1"]["imagingStudy"]
    acsn = {"type": cc("http://terminology.hl7.org/CodeSystem/v2-0203", "ACSN"), "value": "A123"}
    res["rad1"]["identifier"] = [acsn]
    res["is1"]["identifier"].append(acsn)
    assert gaps(run(record(res))) == {}
    res["rad1"].pop("identifier")
    assert gaps(run(record(res))) == {}  # same date and modality


def test_old_labs_are_not_recent() -> None:
    res = complete_resources()
    res["lab1"]["effectiveDateTime"] = "2025-06-01"
    report = run(record(res))
    assert gaps(report) == {"lab-results": ["outdated"]}
    gap = item(report, "lab-results")["gaps"][0]
    assert "the newest is from 2025-06-01" in gap["detail"]
    assert "90 days before the case date 2026-03-10" in gap["detail"]
    assert gap["next_action"].startswith("Ask Good Hospital for recent results")


def test_labs_after_the_case_date_only_count_within_the_grace() -> None:
    res = complete_resources()
    res["lab1"]["effectiveDateTime"] = "2026-03-17"  # the case date + 7 days: the general checklist's grace
    assert gaps(run(record(res))) == {}
    res["lab1"]["effectiveDateTime"] = "2028-11-02"
    report = run(record(res))
    assert gaps(report) == {"lab-results": ["not-found"]}
    assert item(report, "lab-results")["gaps"][0]["detail"] == (
        "nothing in the window 2025-12-10 to 2026-03-17 (90 days before the case date 2026-03-10, up to 7 days "
        "after): the only ones are dated after the case date, beyond the 7-day grace period, the earliest "
        "from 2028-11-02")


def test_old_and_later_labs_are_outdated_and_undated_ones_are_named() -> None:
    res = complete_resources()
    res["lab1"]["effectiveDateTime"] = "2025-06-01"
    res["lab2"] = {**copy.deepcopy(res["lab1"]), "id": "lab2", "effectiveDateTime": "2027-01-05"}
    report = run(record(res))
    assert gaps(report) == {"lab-results": ["outdated"]}
    detail = item(report, "lab-results")["gaps"][0]["detail"]
    assert "the newest is from 2025-06-01" in detail and "1 later one(s), from 2027-01-05" in detail
    del res["lab2"], res["lab1"]["effectiveDateTime"]
    report = run(record(res))
    assert gaps(report) == {"lab-results": ["not-found"]}
    assert "1 undated one(s) cannot be placed in it (Observation/lab1)" in item(report, "lab-results")["gaps"][0][
        "detail"]


def test_missing_labs_with_denied_query() -> None:
    res = complete_resources()
    del res["lab1"]
    ledger = [failed("query:Observation?category=laboratory", "403", "forbidden", kind="query")]
    report = run(record(res), ledger=ledger)
    assert gaps(report) == {"lab-results": ["access-denied"]}


def test_missing_labs_with_unpulled_source_is_pending() -> None:
    res = complete_resources()
    del res["lab1"]
    lab = SourceInfo(3, "fhir", "lab-portal", organization="City Lab")
    report = run(record(res), sources=[HOSPITAL, PACS, lab])
    assert gaps(report) == {"lab-results": ["pending"]}
    assert "lab-portal" in item(report, "lab-results")["gaps"][0]["next_action"]


def test_visit_without_note() -> None:
    res = complete_resources()
    del res["note1"]
    report = run(record(res))
    assert gaps(report) == {"clinical-notes": ["not-found"]}
    assert item(report, "clinical-notes")["gaps"][0]["subject"] == "Encounter/enc1"


def test_note_of_another_visit_is_not_borrowed() -> None:
    res = complete_resources()
    res["enc2"] = {"resourceType": "Encounter", "id": "enc2", "status": "finished",
                   "period": {"start": "2026-03-03T09:00:00Z"}}
    report = run(record(res))
    assert gaps(report) == {"clinical-notes": ["not-found"]}
    assert item(report, "clinical-notes")["gaps"][0]["subject"] == "Encounter/enc2"


def test_identity_conflict_is_a_gap() -> None:
    conflicts = [{"field": "birthDate", "values": ["1970-01-01", "1971-01-01"], "sources": [1, 2]}]
    report = run(record(complete_resources(), conflicts=conflicts))
    assert gaps(report) == {"identity": ["identity-conflict"]}
    g = item(report, "identity")["gaps"][0]
    assert "birthDate" in g["detail"] and "Good Hospital" in g["next_action"]
    assert report["score"] < 1.0


def test_second_biopsy_without_report_is_found() -> None:
    res = complete_resources()
    res["bx2"] = {"resourceType": "Procedure", "id": "bx2", "status": "completed",
                  "code": cc(SCT, "65575008", "Biopsy of prostate"), "performedDateTime": "2026-03-04"}
    report = run(record(res))
    # the report references the specimen of the first biopsy: the second one has none
    assert gaps(report) == {"pathology-report": ["not-found"]}
    assert item(report, "pathology-report")["gaps"][0]["subject"] == "Procedure/bx2"
    assert item(report, "pathology-report")["status"] == "partial"


# --- oncology specifics ---------------------------------------------------------------------


def _marker(rid: str, code: str, display: str) -> dict[str, Any]:
    return {"resourceType": "Observation", "id": rid, "status": "final",
            "category": [cc("http://terminology.hl7.org/CodeSystem/observation-category", "laboratory")],
            "code": cc(LOINC, code, display), "effectiveDateTime": "2026-03-05",
            "valueCodeableConcept": cc(SCT, "10828004", "Positive")}


def test_breast_receptors_partial_and_other_sites_not_applicable() -> None:
    res = complete_resources()
    her2 = res.pop("her2")
    report = run(record(res), "oncology")
    assert gaps(report) == {"breast-receptors": ["not-found"]}
    g = item(report, "breast-receptors")["gaps"][0]
    assert g["component"] == "HER2" and "HER2" in g["next_action"]
    assert item(report, "breast-receptors")["status"] == "partial"
    for other in ("lung-biomarkers", "colorectal-biomarkers", "prostate-results"):
        assert item(report, other)["status"] == "not-applicable"
    res["her2"] = her2
    assert gaps(run(record(res), "oncology")) == {}


def test_staging_missing_for_cancer() -> None:
    res = complete_resources()
    del res["cond1"]["stage"]
    assert gaps(run(record(res), "oncology")) == {"staging": ["not-found"]}


def test_text_rendering_is_actionable() -> None:
    res = complete_resources()
    res["path1"]["presentedForm"] = [{"contentType": "application/pdf", "url": "Binary/77"}]
    report = run(record(res, imgs=[]), ledger=[failed("Binary/77", "403", "forbidden")])
    text = render_text(report)
    assert "GAPS TO ACT ON" in text and "[MISSING] Pathology report" in text
    assert "access denied" in text and "-> Ask Good Hospital to grant access" in text
    assert "images not retrieved" in text
    assert "1970" not in text  # no demographics


def test_no_case_date_uses_newest_record_date() -> None:
    case = CaseInfo("case-2", "general")
    report = run(record(complete_resources()), case=case)
    assert report["reference_date"] == "2026-03-06" and report["reference_date_basis"] == "newest-record-date"
    assert gaps(report) == {}


def test_custom_checklist_without_identity_item_gets_one(tmp_path: Any) -> None:
    p = tmp_path / "mine.yaml"
    p.write_text("name: mine\ntitle: Mine\nitems:\n  - id: meds\n    title: Meds\n    rule: presence\n"
                 "    target: {classes_any: [medication]}\n")
    rec = record(complete_resources(), conflicts=[{"field": "gender", "values": ["female", "male"],
                                                   "sources": [1, 2]}])
    report = evaluate(load_checklist(str(p)), rec, [], CASE, [HOSPITAL, PACS])
    jsonschema.validate(report, GAP_SCHEMA)
    assert gaps(report) == {"identity": ["identity-conflict"]}


def test_unchanged_input_is_not_mutated() -> None:
    rec = record(complete_resources())
    before = copy.deepcopy(rec.bundle)
    run(rec, "oncology")
    assert rec.bundle == before


def test_report_linked_to_its_study_does_not_borrow_a_nearby_one() -> None:
    """rad1 names is1, whose images are missing; is2 (same modality, same day) has its images."""
    res = complete_resources()
    other_study, other_series = STUDY + ".9", SERIES + ".9"
    other_sops = [s + ".9" for s in SOPS]
    is2 = copy.deepcopy(res["is1"])
    is2.update(id="is2", started="2026-02-20T15:00:00Z",
               identifier=[{"system": "urn:dicom:uid", "value": f"urn:oid:{other_study}"}])
    is2["series"][0]["uid"] = other_series
    is2["series"][0]["instance"] = [{"uid": s, "sopClass": {"code": "1.2.840.10008.5.1.4.1.1.2"}}
                                    for s in other_sops]
    res["is2"] = is2
    imgs = [ImageRef(s, "1.2.840.10008.5.1.4.1.1.2", other_study, other_series, "1.2.840.10008.1.2.1",
                     "0" * 64, 1000, "CT", source_id=2) for s in other_sops]
    report = run(record(res, imgs=imgs))
    assert gaps(report) == {"radiology-images": ["images-not-retrieved"]}
    assert item(report, "radiology-images")["gaps"][0]["resource"] == "ImagingStudy/is1"


# --- what the index keeps ----------------------------------------------------------------------


def _index(rec: NormalizedRecord, checklist: str = "oncology", reference: Any = None) -> Any:
    from aggregator.checklist.index import RecordIndex
    from aggregator.checklist.loader import Item
    from aggregator.checklist.needs import Needs

    items = [*load_checklist(checklist).items, Item(id="identity", title="identity", rule="identity")]
    return RecordIndex(rec, [HOSPITAL, PACS], Needs(items), reference=reference)


def test_billing_and_unasked_resources_are_counted_not_kept() -> None:
    res = complete_resources()
    res["claim1"] = {"resourceType": "Claim", "id": "claim1", "status": "active", "created": "2026-03-02"}
    res["eob1"] = {"resourceType": "ExplanationOfBenefit", "id": "eob1", "status": "active"}
    res["hr1"] = {"resourceType": "Observation", "id": "hr1", "status": "final",
                  "category": [cc("http://terminology.hl7.org/CodeSystem/observation-category", "vital-signs")],
                  "code": cc(LOINC, "8867-4", "Heart rate"), "effectiveDateTime": "2026-03-09"}
    rec = record(res)
    idx = _index(rec)
    kept = {r.ref for r in idx.items}
    assert not kept & {"Claim/claim1", "ExplanationOfBenefit/eob1", "Observation/hr1"}
    assert {"DiagnosticReport/path1", "Procedure/bx1", "Encounter/enc1", "Observation/lab1"} <= kept
    assert not any(hasattr(r, "data") or hasattr(r, "__dict__") for r in idx.items)
    # the report still counts every resource, and the newest date of any of them is the reference
    report = run(rec, "oncology", case=CaseInfo("case-1", "oncology"))
    assert report["record"]["resources"] == len(res)
    assert report["reference_date"] == "2026-03-09"
    assert gaps(report) == {}


def test_sources_come_from_the_provenance_bytes_and_from_parsed_targets() -> None:
    from aggregator.checklist.stream import entries

    rec = record(complete_resources())
    provs = [(e, t) for e, t in entries(rec) if e["resource"]["resourceType"] == "Provenance"]
    assert len(provs) == 1 and provs[0][1] is not None and "target" not in provs[0][0]["resource"]
    assert {r.ref: r.sources for r in _index(rec).items}["DiagnosticReport/path1"] == {1}
    # a target that is not a plain reference: the Provenance is parsed whole, with the same result
    bundle = rec.bundle
    bundle["entry"][-1]["resource"]["target"][0]["display"] = "shown"
    rec2 = NormalizedRecord(bundle=bundle, documents=rec.documents, images=rec.images, patient_ref="Patient/p1")
    provs = [(e, t) for e, t in entries(rec2) if e["resource"]["resourceType"] == "Provenance"]
    assert provs[0][1] is None and len(provs[0][0]["resource"]["target"]) == len(complete_resources())
    assert {r.ref: r.sources for r in _index(rec2).items}["DiagnosticReport/path1"] == {1}


@pytest.mark.parametrize("with_order", [True, False])
def test_shared_basedon_spelled_two_ways_names_the_same_order(with_order: bool) -> None:
    """The biopsy and its report share an order that the checklist never keeps: the two spellings
    of its reference match only when the ServiceRequest is in the record."""
    res = complete_resources()
    res["path1"].pop("specimen")
    res["path1"]["effectiveDateTime"] = "2026-06-30"  # beyond the date window of the biopsy
    res["bx1"]["basedOn"] = [{"reference": u("sr1")}]
    res["path1"]["basedOn"] = [{"reference": "ServiceRequest/sr1"}]
    if with_order:
        res["sr1"] = {"resourceType": "ServiceRequest", "id": "sr1", "status": "completed", "intent": "order"}
    report = run(record(res), "oncology", case=CaseInfo("case-1", "oncology", case_date="2026-07-01"))
    subjects = {s["ref"]: s for s in item(report, "pathology-report").get("subjects", [])}
    assert ("DiagnosticReport/path1" in subjects["Procedure/bx1"]["linked"]) is with_order


def test_results_too_old_for_every_window_are_dropped_and_the_newest_is_cited() -> None:
    from datetime import date

    res = complete_resources()
    res["lab1"]["effectiveDateTime"] = "2025-06-01"
    res["lab2"] = {**copy.deepcopy(res["lab1"]), "id": "lab2", "effectiveDateTime": "2025-08-01"}
    rec = record(res)
    kept = {r.ref for r in _index(rec, "general", reference=date(2026, 3, 10)).items}
    assert not kept & {"Observation/lab1", "Observation/lab2"} and "Procedure/bx1" in kept
    report = run(rec)
    assert gaps(report) == {"lab-results": ["outdated"]}
    assert "2025-08-01" in item(report, "lab-results")["gaps"][0]["detail"]


def test_only_spellings_that_end_in_one_id_need_the_extra_pass() -> None:
    from aggregator.checklist.index import _spellings_meet

    assert not _spellings_meet(["urn:uuid:a", "urn:uuid:b", "Encounter/c", "urn:uuid:a"])
    assert _spellings_meet(["urn:uuid:a", "ServiceRequest/a"])
    assert _spellings_meet(["Encounter/a", "http://h/fhir/Encounter/a/_history/2"])
