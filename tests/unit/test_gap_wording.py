"""Gap wording a navigator can act on: who to ask (an institution, from the data), each clause once.

Records are the hand-built ones of ``test_checklist_engine`` (the same complete twin), with one
thing removed and one place in the data naming the institution that holds it. Sources carry no
configured organization unless a test says so, so the name can only come from the data, from
the endpoint's name, or (last) from the source's label.
"""

from __future__ import annotations

from typing import Any

import pytest

from aggregator.checklist import render_text
from aggregator.checklist.reasons import compose
from aggregator.model import SourceInfo
from tests.unit.test_checklist_engine import (
    HOSPITAL,
    PACS,
    complete_resources,
    failed,
    images,
    item,
    record,
    run,
    u,
)

PULLED = "2026-03-09T10:00:00Z"
MEDIA = SourceInfo(1, "media", "portal-export", pulled_at=PULLED)
"""A download: its label is a folder name, never what a navigator should be told to call."""
ENDPOINT = SourceInfo(1, "fhir", "stmary-fhir-source", endpoint_name="stmary", pulled_at=PULLED)
CD = SourceInfo(2, "dicomweb", "archive-source", endpoint_name="archive", pulled_at=PULLED)


def org(rid: str, name: str) -> dict[str, Any]:
    return {"resourceType": "Organization", "id": rid, "name": name}


def gap_of(report: dict[str, Any], item_id: str) -> dict[str, Any]:
    (g, *_) = item(report, item_id)["gaps"]
    return g


# --- the institution, from the data ------------------------------------------------------------


def test_report_performer_organization_is_named_not_the_folder() -> None:
    res = complete_resources()
    del res["path1"]["presentedForm"]
    res["lab-org"] = org("lab-org", "Lakeside Pathology Lab")
    res["path1"]["performer"] = [{"reference": u("lab-org")}]
    action = gap_of(run(record(res), sources=[MEDIA, CD]), "pathology-report")["next_action"]
    assert "from Lakeside Pathology Lab" in action
    assert "portal-export" not in action


def test_source_provenance_agent_organization_holds_its_targets() -> None:
    res = complete_resources()
    del res["path1"]["presentedForm"]
    res["cc"] = org("cc", "Harbor Cancer Center")
    res["prov-src"] = {"resourceType": "Provenance", "id": "prov-src", "recorded": "2026-03-05T10:00:00Z",
                       "target": [{"reference": u("path1")}],
                       "agent": [{"who": {"reference": u("dr")}, "onBehalfOf": {"reference": u("cc")}}]}
    action = gap_of(run(record(res), sources=[MEDIA, CD]), "pathology-report")["next_action"]
    assert "from Harbor Cancer Center" in action


def test_our_own_provenance_labels_are_not_institutions() -> None:
    # record() adds normalization's Provenance, whose agent is the source label: it must not count
    res = complete_resources()
    del res["path1"]["presentedForm"]
    action = gap_of(run(record(res), sources=[MEDIA, CD]), "pathology-report")["next_action"]
    assert "hospital-fhir" not in action and "from portal-export" in action


def test_subject_without_organization_uses_its_visits_provider() -> None:
    res = complete_resources()
    del res["path1"]
    res["h"] = org("h", "Synthetic Memorial")
    res["enc1"]["serviceProvider"] = {"reference": u("h")}
    report = run(record(res), sources=[MEDIA, CD])
    for g in item(report, "pathology-report")["gaps"]:
        if g.get("subject") == "Procedure/bx1":
            assert "from Synthetic Memorial" in g["next_action"]
            break
    else:
        pytest.fail("no gap for the biopsy")


def test_procedure_performed_on_behalf_of_an_organization() -> None:
    res = complete_resources()
    del res["path1"]
    res["bx1"]["performer"] = [{"actor": {"display": "Dr. A"}, "onBehalfOf": {"display": "Breast Center East"}}]
    report = run(record(res), sources=[MEDIA, CD])
    g = next(g for g in item(report, "pathology-report")["gaps"] if g.get("subject") == "Procedure/bx1")
    assert "from Breast Center East" in g["next_action"]
    assert "Dr. A" not in g["next_action"]  # a practitioner is not an institution


def test_dicom_institution_name_on_the_study_names_who_holds_the_images() -> None:
    res = complete_resources()
    # as normalization carries DICOM InstitutionName (aggregator.normalize.dicom.build_study)
    res["is1"]["series"][0]["performer"] = [{"actor": {"type": "Organization", "display": "Northside Imaging"}}]
    report = run(record(res, imgs=images(1)), sources=[MEDIA, CD])
    g = gap_of(report, "radiology-images")
    assert "1 of 2 instances" in g["detail"]
    assert "from Northside Imaging" in g["next_action"]


def test_ccda_custodian_names_who_holds_the_note() -> None:
    res = complete_resources()
    # the C-CDA header's custodian, as connectors.ccda writes it; the note itself has no text
    res["note1"]["custodian"] = {"display": "Riverside Clinic"}
    res["note1"]["content"] = [{"attachment": {"contentType": "application/xml", "url": "Binary/9"}}]
    report = run(record(res), sources=[MEDIA, CD])
    g = gap_of(report, "clinical-notes")
    assert "Riverside Clinic" in g["next_action"]


def test_absent_item_names_the_institution_the_sources_data_names_most() -> None:
    res = complete_resources()
    del res["lab1"]
    res["h"] = org("h", "Synthetic Memorial")
    res["o"] = org("o", "Other Clinic")
    res["enc1"]["serviceProvider"] = {"reference": u("h")}
    res["enc1"]["meta"] = {"source": "urn:aggregator:source:1#Encounter/e"}
    res["p1"]["managingOrganization"] = {"reference": u("h")}
    res["p1"]["meta"] = {"source": "urn:aggregator:source:1#Patient/p"}
    res["rad1"]["performer"] = [{"reference": u("o")}]
    res["rad1"]["meta"] = {"source": "urn:aggregator:source:1#DiagnosticReport/r"}
    g = gap_of(run(record(res), sources=[MEDIA, CD]), "lab-results")
    assert g["reason"] == "not-found"
    assert g["next_action"].endswith("from Synthetic Memorial")


def test_network_source_without_organization_is_named_by_its_endpoint() -> None:
    res = complete_resources()
    del res["lab1"]
    g = gap_of(run(record(res), sources=[ENDPOINT, CD]), "lab-results")
    assert g["next_action"].endswith("from stmary")
    assert "stmary-fhir-source" not in g["next_action"]
    ledger = [failed("query:Observation?category=laboratory", "403", "forbidden", kind="query")]
    g = gap_of(run(record(res), ledger=ledger, sources=[ENDPOINT, CD]), "lab-results")
    assert g["reason"] == "access-denied" and g["next_action"].startswith("Ask stmary to grant access")


def test_source_label_only_when_nothing_better_exists() -> None:
    res = complete_resources()
    del res["lab1"]
    g = gap_of(run(record(res), sources=[MEDIA, CD]), "lab-results")
    assert g["next_action"].endswith("from portal-export")


def test_item_holder_before_configured_organization_before_data_of_the_source() -> None:
    res = complete_resources()
    del res["path1"]["presentedForm"]
    del res["lab1"]
    res["lab-org"] = org("lab-org", "Lakeside Pathology Lab")
    res["path1"]["performer"] = [{"reference": u("lab-org")}]
    res["path1"]["meta"] = {"source": "urn:aggregator:source:1#DiagnosticReport/p"}
    report = run(record(res), sources=[HOSPITAL, PACS])  # HOSPITAL is configured as "Good Hospital"
    assert "from Lakeside Pathology Lab" in gap_of(report, "pathology-report")["next_action"]
    assert gap_of(report, "lab-results")["next_action"].endswith("from Good Hospital")


# --- one clause once ----------------------------------------------------------------------------


def test_compose_says_each_clause_once() -> None:
    assert compose(["not found at any source"] * 3) == "not found at any source"
    assert compose(["a b; c", "c", "A  B."]) == "a b; c"
    # a later, wider clause replaces the narrower one in its place
    assert compose(["nothing recent", "x", "nothing recent at any source: 2025-01-02"]) == \
        "nothing recent at any source: 2025-01-02; x"
    # whole words only: a shorter id is not "inside" a longer one
    assert compose(["Report/1 is preliminary", "Report/10 is preliminary"]) == \
        "Report/1 is preliminary; Report/10 is preliminary"
    assert compose(["a", "b", "c", "d"], limit=2) == "a; b"
    assert compose(["", " ; "]) == ""


def test_missing_components_do_not_repeat_their_reason() -> None:
    res = complete_resources()
    for k in ("er", "pr", "her2"):
        del res[k]
    report = run(record(res), "oncology", sources=[MEDIA, CD])
    receptors = item(report, "breast-receptors")
    assert len(receptors["gaps"]) == 3
    assert receptors["detail"] == "not found at any source"
    text = render_text(report)
    assert "not found at any source; not found at any source" not in text
    for line in text.splitlines():
        clauses = [c.strip() for c in line.strip(" ()").split(";") if c.strip()]
        assert len(clauses) == len(set(clauses)), line


# --- a preliminary report that was retrieved ------------------------------------------------------


def test_retrieved_preliminary_report_asks_when_the_final_will_be_signed() -> None:
    res = complete_resources()
    res["path1"]["status"] = "preliminary"
    res["lab-org"] = org("lab-org", "Lakeside Pathology Lab")
    res["path1"]["performer"] = [{"reference": u("lab-org")}]
    report = run(record(res), sources=[MEDIA, CD])
    for g in item(report, "pathology-report")["gaps"]:
        assert g["reason"] == "pending"
        action = g["next_action"]
        assert "final report is pending at Lakeside Pathology Lab" in action
        assert "when it will be signed" in action
        assert "not retrieved yet" not in action and "Pull media" not in action


def test_unpulled_source_still_says_pull_it() -> None:
    res = complete_resources()
    del res["lab1"]
    lab = SourceInfo(3, "fhir", "lab-portal", endpoint_name="citylab")
    g = gap_of(run(record(res), sources=[MEDIA, CD, lab]), "lab-results")
    assert g["reason"] == "pending"
    assert g["next_action"].startswith("Pull lab-portal (not retrieved yet)") and "from citylab" in g["next_action"]


# --- what the pull did not read -------------------------------------------------------------------


def test_gap_report_lists_pull_skips_and_refused_members_not_quarantine() -> None:
    from datetime import datetime

    from aggregator.ledger import LedgerEntry

    def row(kind: str, key: str, state: str, reason: str, meta: dict[str, Any] | None = None) -> LedgerEntry:
        return LedgerEntry(1, kind, key, state, reason, None, 1, None, None, None, meta or {}, datetime(2026, 3, 9))

    ledger = [
        row("file", "file:photos/scan.heic", "skipped", "unsupported file type: HEIC image"),
        row("file", "file:export.zip!/../evil.txt", "failed", "unsafe path in archive", {"member": "rejected"}),
        row("quarantine", "resource:Observation/x", "skipped", "duplicate of Observation/y"),
        row("binary", "Binary/9", "failed", "HTTP 500"),
    ]
    report = run(record(complete_resources()), ledger=ledger, sources=[MEDIA, CD])
    src = next(s for s in report["sources"] if s["id"] == 1)
    assert src["skipped"] == [
        {"kind": "file", "key": "file:export.zip!/../evil.txt", "reason": "unsafe path in archive"},
        {"kind": "file", "key": "file:photos/scan.heic", "reason": "unsupported file type: HEIC image"},
    ]
    assert next(s for s in report["sources"] if s["id"] == 2)["skipped"] == []
    text = render_text(report)
    assert "SKIPPED AT PULL (2 item(s)" in text and "photos/scan.heic: unsupported file type: HEIC image" in text


def test_rendered_gap_line_says_the_reason_and_its_detail_once() -> None:
    report = {"case": "c", "checklist": "x", "counts": {}, "items": [{
        "id": "labs", "title": "Recent labs", "rule": "presence", "status": "missing",
        "detail": "nothing recent at any source: newest 2025-06-16; nothing recent at any source: newest 2025-06-16",
        "gaps": [{"reason": "outdated", "detail": "nothing recent at any source: newest 2025-06-16",
                  "next_action": "Ask X"},
                 {"reason": "not-found", "detail": "not found at any source; not found at any source",
                  "next_action": "Ask X"}]}]}
    text = render_text(report)  # "outdated" reads "outdated: nothing recent" in the text report
    assert "(nothing recent at any source: newest 2025-06-16)" in text
    assert "nothing recent: nothing recent" not in text
    assert "- outdated: nothing recent at any source: newest 2025-06-16" in text
    assert "- not found at any source\n" in text
