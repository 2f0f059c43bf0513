"""Golden lines of a records request for each kind of gap, and the grouping by holder."""

from __future__ import annotations

from typing import Any

from aggregator.records_requests.draft import UNKNOWN_HOLDER, formats, gap_key, plan_requests

REQUESTS = {"path": "full surgical pathology report", "img": "DICOM images",
            "labs": "laboratory results of the last 90 days", "notes": "visit note",
            "rec:ER": "estrogen receptor (ER) result"}


def _report(*items: dict[str, Any]) -> dict[str, Any]:
    return {"items": list(items)}


def _item(iid: str, gaps: list[dict[str, Any]], subjects: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"id": iid, "title": iid, "status": "missing", "gaps": gaps, "subjects": subjects or []}


def test_golden_lines_per_gap_kind() -> None:
    report = _report(
        _item("path", [
            {"reason": "summary-only", "detail": "", "next_action": "x", "holder": "St Mary",
             "subject": "Procedure/p1", "resource": "DiagnosticReport/d1"},
            {"reason": "summary-only", "detail": "", "next_action": "x", "holder": "St Mary",
             "subject": "Specimen/s1", "resource": "DiagnosticReport/d1"}],
            [{"ref": "Procedure/p1", "about": "the biopsy of 2026-03-02 (Core biopsy)", "status": "missing"},
             {"ref": "Specimen/s1", "about": "the specimen of 2026-03-02 (Breast tissue)", "status": "missing"}]),
        _item("img", [{"reason": "images-not-retrieved", "next_action": "x", "holder": "City Imaging",
                       "detail": "ImagingStudy/i1 (CT study of 2026-03-10, accession 778812, Study Instance UID 1.2)",
                       "subject": "DiagnosticReport/r1", "resource": "ImagingStudy/i1"}],
              [{"ref": "DiagnosticReport/r1", "about": "the imaging report of 2026-03-10 (CT chest)",
                "status": "missing"}]),
        _item("labs", [{"reason": "outdated", "next_action": "x", "holder": "St Mary",
                        "detail": "nothing recent: newest 2025-01-01, older than the window "
                                  "2025-12-01 to 2026-03-08"}]),
        _item("notes", [{"reason": "not-found", "detail": "", "next_action": "x", "holder": "St Mary",
                         "subject": "Encounter/e1"}],
              [{"ref": "Encounter/e1", "about": "the visit of 2026-02-14 (Oncology visit)", "status": "missing"}]),
        _item("rec", [{"reason": "not-found", "detail": "", "next_action": "x", "component": "ER"}]),
        _item("identity", [{"reason": "identity-conflict", "detail": "", "next_action": "x", "holder": "St Mary"}]),
    )
    plan = plan_requests(report, REQUESTS, {"Specimen/s1": "S26-1234"})
    assert {k: [ln.text for ln in v] for k, v in plan.by_institution.items()} == {
        "St Mary": [
            "the full surgical pathology report for the specimen collected on 2026-03-02 (Breast tissue), "
            "accession S26-1234, not only the summary",
            "all laboratory results since 2025-12-01",
            "the visit note for the visit of 2026-02-14 (Oncology visit)",
        ],
        "City Imaging": ["the images (DICOM) of the CT chest study of 2026-03-10, accession 778812, "
                         "not only the radiology report"],
        UNKNOWN_HOLDER: ["the estrogen receptor (ER) result"],
    }
    # the biopsy and its specimen point at one report: one line, both gaps tracked
    path = plan.by_institution["St Mary"][0]
    assert path.keys == ("path|Procedure/p1|DiagnosticReport/d1|", "path|Specimen/s1|DiagnosticReport/d1|")
    assert [n["reason"] for n in plan.not_requestable] == ["identity-conflict"]
    assert formats(plan.by_institution["City Imaging"]) == [
        "images as DICOM files (a CD/DVD or secure download), not only the radiology report"]
    assert len(formats(plan.by_institution["St Mary"])) == 1


def test_complete_items_and_keys() -> None:
    done = {"id": "x", "status": "complete", "gaps": []}
    assert plan_requests(_report(done), REQUESTS).by_institution == {}
    assert gap_key("rec", {"component": "ER"}) == "rec|||ER"
