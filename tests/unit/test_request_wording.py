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


def test_golden_lines_for_the_other_reasons() -> None:
    """Access denied, gone at the source, failed, pending: the clerk reads what to send, not why."""
    subjects = [{"ref": "DiagnosticReport/r9", "about": "the radiology report of 2026-03-10 (CT chest)",
                 "status": "missing"},
                {"ref": "Encounter/e2", "about": "the visit of 2026-03-20 (Oncology visit)", "status": "missing"}]
    report = _report(
        _item("path", [{"reason": "access-denied", "detail": "HTTP 403", "next_action": "x", "holder": "St Mary"}]),
        _item("notes", [{"reason": "not-found-at-source", "detail": "HTTP 410", "next_action": "x",
                         "holder": "St Mary", "subject": "Encounter/e2"}], subjects),
        _item("img", [{"reason": "retrieval-failed", "detail": "C-GET failed", "next_action": "x",
                       "holder": "City Imaging", "subject": "DiagnosticReport/r9",
                       "resource": "ImagingStudy/i9"}], subjects),
        _item("labs", [{"reason": "pending", "detail": "", "next_action": "x", "holder": "St Mary"}]),
    )
    plan = plan_requests(report, REQUESTS, {"ImagingStudy/i9": "778812"})
    assert {k: [(ln.text, ln.format) for ln in v] for k, v in plan.by_institution.items()} == {
        "St Mary": [("the full surgical pathology report", "PDF, FHIR or C-CDA"),
                    ("the visit note for the visit of 2026-03-20 (Oncology visit)", "PDF, FHIR or C-CDA"),
                    ("the laboratory results of the last 90 days", "PDF, FHIR or C-CDA")],
        "City Imaging": [("the images (DICOM) of the CT chest study of 2026-03-10, accession 778812", "DICOM")],
    }


def test_golden_letter(tmp_path: Any) -> None:
    """The whole letter as a records department receives it, under HIPAA and under a stricter rule."""
    from aggregator.records_requests.draft import Line
    from aggregator.records_requests.letter import render_text
    from aggregator.records_requests.rules import Rule

    lines = [Line(("a|||",), "path", "summary-only", "the full surgical pathology report for the specimen collected "
                  "on 2026-03-02 (Breast tissue), accession S26-1234, not only the summary", "PDF, FHIR or C-CDA"),
             Line(("b|||",), "img", "images-not-retrieved", "the images (DICOM) of the CT chest study of 2026-03-10, "
                  "accession 778812, not only the radiology report", "DICOM")]
    hipaa = Rule("US-HIPAA", "HIPAA Privacy Rule right of access", "45 CFR 164.524(b)(2)", 30, 30, (10, 25))
    context = {"date": "2026-10-02", "institution": "St Mary Hospital", "patient_name": "Alex Rivera",
               "birth_date": "1971-03-14", "request_id": "rq-0123456789", "lines": lines, "formats": formats(lines),
               "send_to": "Casey Navigator, 100 Placeholder Ave", "rule": hipaa}
    assert render_text(context) == GOLDEN_LETTER
    strict = Rule("US-XX", "State XX access", "XX Health Code 123.4", 15, 0, (7,))
    text = render_text({**context, "rule": strict})
    assert "Under XX Health Code 123.4, please act on this request within 15 days of receiving it." in text
    assert "45 CFR 164.524)" in text  # the right of access is still cited


GOLDEN_LETTER = """2026-10-02

To: Health Information Management / Release of Information
    St Mary Hospital

Re: Request for copies of health records under the HIPAA right of access
Patient: Alex Rivera, born 1971-03-14
Request reference: rq-0123456789

To the records department:

Under the HIPAA Privacy Rule right of access (45 CFR 164.524), I request copies of the following records held by \
St Mary Hospital:

1. the full surgical pathology report for the specimen collected on 2026-03-02 (Breast tissue), accession \
S26-1234, not only the summary
2. the images (DICOM) of the CT chest study of 2026-03-10, accession 778812, not only the radiology report

Please provide electronic copies in these formats:
- reports and notes as PDF, or as FHIR or C-CDA where your system offers it
- images as DICOM files (a CD/DVD or secure download), not only the radiology report

Under 45 CFR 164.524(c)(2), where the records are held electronically, an electronic copy in the form and format \
requested is to be provided if it is readily producible. Under 45 CFR 164.524(b)(2), please act on this request \
within 30 days of receiving it.

Please send the records to:
Casey Navigator, 100 Placeholder Ave

If any item cannot be found or is held elsewhere, please say so in writing, so that it can be requested from the \
right place.

Thank you.

Signature: ______________________________   Date: ______________
Printed name: ___________________________
[ ] Patient   [ ] Personal representative (relationship and authority: ______________________)
"""
