"""Real public records (../shared/data) through the whole pipeline and every checklist."""

from __future__ import annotations

import json
import shutil
from importlib.resources import files
from pathlib import Path

import jsonschema
import pytest

from aggregator.app import App
from aggregator.cases import add_source, create_case
from aggregator.checklist import list_checklists
from aggregator.jobs.pull import pull_case
from aggregator.pipeline import build_record, check_case

PATIENTS = {
    # Synthea R4 with notes: each note is both a DocumentReference and a DiagnosticReport.presentedForm
    "notes": "fhir/synthea-r4-bundles-with-notes/Cecelia952_Romaguera67_f1731e33-dc55-4ee8-72d7-cece2e49bedd.json",
    # Synthea R4 with a neoplasm and ImagingStudy resources that have no pixel data anywhere
    "synthea": "fhir/synthea-r4-bundles/Chadwick_Von_628e4827-ecda-4c9d-881e-7b53d0c6e5ed.json",
    "mcode": "fhir/mcode-examples/Bundle-mcode-patient-bundle-jenny-m.json",
}


def _case(tmp_path: Path, shared: Path, rel: str, checklist: str) -> tuple[App, dict]:
    dl = tmp_path / "dl"
    dl.mkdir(parents=True, exist_ok=True)
    shutil.copy(shared / rel, dl / Path(rel).name)
    app = App.open(tmp_path / "home")
    create_case(app, "c", checklist, case_date="2026-10-01")
    add_source(app, "c", media=str(dl))
    (summary,) = pull_case(app, "c")
    assert summary.state == "done", summary.error
    report, _ = check_case(app, "c")
    return app, report


@pytest.mark.parametrize("checklist", ["general", "oncology", "surgery", "cardiology"])
@pytest.mark.parametrize("patient", sorted(PATIENTS))
def test_report_is_schema_valid_for_every_checklist(shared_data: Path, tmp_path: Path, patient: str,
                                                    checklist: str) -> None:
    assert checklist in list_checklists()
    _, report = _case(tmp_path, shared_data, PATIENTS[patient], checklist)
    schema = json.loads(files("schemas").joinpath("gap-report.schema.json").read_text())
    jsonschema.validate(report, schema)
    for item in report["items"]:
        for gap in item.get("gaps", []):
            assert gap["reason"] and gap["next_action"]


def test_synthea_images_never_retrieved_are_reported_as_such(shared_data: Path, tmp_path: Path) -> None:
    _, report = _case(tmp_path, shared_data, PATIENTS["synthea"], "general")
    items = {i["id"]: i for i in report["items"]}
    radiology = items["radiology-images"]
    if radiology["status"] != "not-applicable":
        assert radiology["status"] in ("missing", "partial")
        assert {g["reason"] for g in radiology["gaps"]} == {"images-not-retrieved"}


def test_notes_set_keeps_each_note_once_and_counts_them_as_content(shared_data: Path, tmp_path: Path) -> None:
    app, report = _case(tmp_path, shared_data, PATIENTS["notes"], "general")
    record = build_record(app, "c").record
    # every note is a DocumentReference and the same bytes in a DiagnosticReport: one document file each
    hashes = [d.sha256 for d in record.documents]
    assert len(hashes) == len(set(hashes)) and hashes
    notes = {i["id"]: i for i in report["items"]}["clinical-notes"]
    assert notes["status"] in ("complete", "partial")
