"""Labelled records: each generated variant removes one thing; the gap report must find exactly it.

The records go the whole way a navigator's would: files on disk -> media pull -> normalize ->
checklist. The complete twin must show no gap at all (no false gaps).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from aggregator.app import App
from aggregator.cases import add_source, create_case
from aggregator.jobs.pull import pull_case
from aggregator.ledger import entries_for_case
from aggregator.pipeline import check_case

# variant -> {checklist item id: expected reason}
EXPECTED: dict[str, dict[str, str]] = {
    "complete": {},
    "no-pathology-text": {"pathology-report": "summary-only", "breast-receptors": "not-found"},
    # "See outside report." is a pointer, not the report: the receptors are still there
    "stub-pathology-text": {"pathology-report": "summary-only"},
    "no-images": {"radiology-images": "images-not-retrieved"},
    "no-recent-labs": {"lab-results": "outdated"},
    "no-visit-note": {"clinical-notes": "not-found"},
    "identity-conflict": {"identity": "identity-conflict"},
    "second-patient": {},
}


def _run(tmp_path: Path, variant: str, checklist: str = "oncology",
         extra: dict[str, dict] | None = None) -> tuple[dict, App]:
    from fixtures import generate_download

    info = generate_download(tmp_path / "dl", variant=variant)
    for rel, resource in (extra or {}).items():  # files a patient's download may also hold
        (tmp_path / "dl" / rel).write_text(json.dumps(resource), encoding="utf-8")
    app = App.open(tmp_path / "home")
    create_case(app, "c", checklist, patient_name=info.patient_name, birth_date=info.birth_date,
                case_date=info.case_date.isoformat())
    add_source(app, "c", media=str(tmp_path / "dl"))
    (summary,) = pull_case(app, "c")
    assert summary.state == "done", summary.error
    report, _ = check_case(app, "c")
    return report, app


@pytest.mark.parametrize("variant", sorted(EXPECTED))
def test_each_removed_item_is_found_with_its_reason(tmp_path: Path, variant: str) -> None:
    report, _ = _run(tmp_path, variant)
    gaps = {
        item["id"]: {g["reason"] for g in item.get("gaps", [])}
        for item in report["items"]
        if item["status"] in ("missing", "partial")
    }
    assert set(gaps) == set(EXPECTED[variant]), f"{variant}: gaps {gaps}"
    for item_id, reason in EXPECTED[variant].items():
        assert reason in gaps[item_id], f"{variant}/{item_id}: reasons {gaps[item_id]}"
        item = next(i for i in report["items"] if i["id"] == item_id)
        assert all(g.get("next_action") for g in item["gaps"]), "every gap says what to do next"
    if not EXPECTED[variant]:
        assert report["score"] == 1.0


def test_another_patients_data_is_excluded_and_in_the_ledger(tmp_path: Path) -> None:
    _, app = _run(tmp_path, "second-patient")
    quarantined = [e for e in entries_for_case(app.db, "c") if e.kind == "quarantine"]
    other = [e for e in quarantined if "another patient" in (e.reason or "")]
    # the other patient's Patient, its Observation, and its study's DICOM instances on the CD
    assert any(e.key.startswith("resource:") for e in other)
    assert any(e.key.startswith("dicom:") for e in other)


@pytest.mark.parametrize("checklist", ["general", "surgery", "cardiology"])
def test_other_checklists_run_on_the_complete_record(tmp_path: Path, checklist: str) -> None:
    report, _ = _run(tmp_path, "complete", checklist)
    assert report["items"] and 0.0 <= report["score"] <= 1.0
    if checklist == "general":
        assert report["score"] == 1.0


def test_stub_pathology_report_gap_names_its_trigger(tmp_path: Path) -> None:
    """The report's only text is "See outside report.": a pointer to the report, not the report."""
    report, _ = _run(tmp_path, "stub-pathology-text")
    item = next(i for i in report["items"] if i["id"] == "pathology-report")
    assert item["gaps"] and item["status"] == "missing"  # one gap per subject: the biopsy and its specimen
    for gap in item["gaps"]:
        assert gap["reason"] == "summary-only"
        assert gap["resource"].startswith("DiagnosticReport/")
        assert '"See outside report"' in gap["detail"] and "points elsewhere" in gap["detail"]
        assert "pathology report" in gap["next_action"]


def test_ips_patient_summary_does_not_count_as_the_visit_note(tmp_path: Path) -> None:
    """An IPS "Patient summary" Composition of the follow-up visit, with narrative, stands where its
    note should be: summary-only, not a note (and not "not found": the navigator sees what is there)."""
    from fixtures.generate import _Ids

    ids = _Ids("demo")
    summary = {
        "resourceType": "Composition", "id": "ips-followup", "status": "final",
        "type": {"coding": [{"system": "http://loinc.org", "code": "60591-5", "display": "Patient summary Document"}]},
        "subject": {"reference": f"Patient/{ids('patient')}"},
        "encounter": {"reference": f"Encounter/{ids('enc-followup')}"},
        "date": "2026-09-22T15:00:00-05:00", "author": [{"display": "Synthetic General Hospital"}],
        "title": "International Patient Summary",
        "section": [{"title": "Active Problems",
                     "code": {"coding": [{"system": "http://loinc.org", "code": "11450-4"}]},
                     "text": {"status": "generated", "div": '<div xmlns="http://www.w3.org/1999/xhtml"><ul>'
                              "<li>Invasive ductal carcinoma of the left breast, stage IA, on letrozole</li>"
                              "<li>Essential hypertension, controlled on lisinopril</li></ul></div>"}}],
    }
    report, _ = _run(tmp_path, "no-visit-note", extra={"portal-a/ips-summary.json": summary})
    item = next(i for i in report["items"] if i["id"] == "clinical-notes")
    assert item["status"] in ("partial", "missing")
    reasons = {g["reason"] for g in item["gaps"]}
    assert reasons == {"summary-only"}, item["gaps"]
    assert any("patient summary (LOINC 60591-5)" in g["detail"] for g in item["gaps"])
