"""Labelled records for the cardiology and surgery checklists: each variant removes one thing.

Same contract as ``test_gap_variants`` (the oncology patient): the generated download goes the
whole way - files on disk -> media pull -> normalize -> checklist - and the gap report must name
exactly the removed item, with its reason and a next action that names the institution holding
it (not the download folder); the complete twin must show no gap at all, under its own
checklist and under ``general``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydicom
import pytest
from fhir.resources.R4B import get_fhir_model_class

from aggregator.app import App
from aggregator.cases import add_source, create_case
from aggregator.jobs.pull import pull_case
from aggregator.pipeline import build_record, check_case
from fixtures.cardiology import VARIANTS as CARDIO_VARIANTS
from fixtures.cardiology import generate_cardiology_download
from fixtures.generate import DownloadInfo
from fixtures.surgery import OPERATIVE_NOTE_FILE, generate_surgery_download
from fixtures.surgery import VARIANTS as SURGERY_VARIANTS

Generator = Callable[..., DownloadInfo]
GENERATORS: dict[str, tuple[Generator, str]] = {
    "cardiology": (generate_cardiology_download, "cardiology"),
    "surgery": (generate_surgery_download, "surgery"),
}

# (patient, variant) -> {checklist item id: the reason every gap of that item must carry}
EXPECTED: dict[tuple[str, str], dict[str, str]] = {
    ("cardiology", "complete"): {},
    ("cardiology", "no-ecg"): {"ecg": "not-found"},
    ("cardiology", "no-echo-images"): {"radiology-images": "images-not-retrieved"},
    # troponin and BNP have no window in the checklist; the 12-month lipid panel is what goes stale
    ("cardiology", "no-recent-cardiac-labs"): {"cardiac-labs": "outdated"},
    ("cardiology", "summary-only-echo"): {"echo": "summary-only"},
    ("cardiology", "no-visit-note"): {"clinical-notes": "not-found"},
    ("cardiology", "identity-conflict"): {"identity": "identity-conflict"},
    ("surgery", "complete"): {},
    # the discharge summary of the same stay is all that is left: a summary in place of the note
    ("surgery", "no-operative-note"): {"operative-notes": "summary-only"},
    ("surgery", "no-preop-images"): {"radiology-images": "images-not-retrieved"},
    ("surgery", "no-preop-labs"): {"preop-labs": "outdated"},
    ("surgery", "no-pathology-text"): {"pathology-report": "summary-only"},
    ("surgery", "identity-conflict"): {"identity": "identity-conflict"},
}


def test_every_variant_is_labelled() -> None:
    assert {v for p, v in EXPECTED if p == "cardiology"} == set(CARDIO_VARIANTS)
    assert {v for p, v in EXPECTED if p == "surgery"} == set(SURGERY_VARIANTS)


def _run(tmp_path: Path, patient: str, variant: str, checklist: str | None = None
         ) -> tuple[dict[str, Any], App, DownloadInfo]:
    generate, default_checklist = GENERATORS[patient]
    info = generate(tmp_path / "dl", variant=variant)
    app = App.open(tmp_path / "home")
    create_case(app, "c", checklist or default_checklist, patient_name=info.patient_name,
                birth_date=info.birth_date, case_date=info.case_date.isoformat())
    add_source(app, "c", media=str(tmp_path / "dl"))
    (summary,) = pull_case(app, "c")
    assert summary.state == "done", summary.error
    report, _ = check_case(app, "c")
    return report, app, info


def _gaps(report: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    return {i["id"]: i["gaps"] for i in report["items"] if i["status"] in ("missing", "partial")}


@pytest.mark.parametrize(("patient", "variant"), sorted(EXPECTED))
def test_the_removed_item_is_found_with_its_reason(tmp_path: Path, patient: str, variant: str) -> None:
    report, _, _ = _run(tmp_path, patient, variant)
    gaps = _gaps(report)
    expected = EXPECTED[(patient, variant)]
    assert set(gaps) == set(expected), f"{patient}/{variant}: gaps {json.dumps(gaps, indent=1)}"
    labels = [s["label"] for s in report["sources"]]
    for item_id, reason in expected.items():
        assert gaps[item_id], f"{item_id} is {reason} but lists no gap"
        assert {g["reason"] for g in gaps[item_id]} == {reason}, gaps[item_id]
        for g in gaps[item_id]:
            assert g["next_action"], "every gap says what to do next"
            if reason == "identity-conflict":
                assert any(label in g["next_action"] for label in labels), g["next_action"]
            else:  # who to ask: the institution the data names, not the download folder
                assert "Synthetic General Hospital" in g["next_action"], g["next_action"]
                assert not any(f"from {label}" in g["next_action"] for label in labels), g["next_action"]
    if expected:
        assert report["score"] < 1.0 and not report["complete"]
    else:
        assert report["score"] == 1.0 and report["complete"]


@pytest.mark.parametrize("patient", sorted(GENERATORS))
def test_complete_patients_have_no_gap_under_the_general_checklist(tmp_path: Path, patient: str) -> None:
    report, _, _ = _run(tmp_path, patient, "complete", "general")
    assert _gaps(report) == {}
    assert report["score"] == 1.0
    status = {i["id"]: i["status"] for i in report["items"]}
    # the items a record like this must actually exercise, not pass as "not applicable"
    assert status["radiology-images"] == status["clinical-notes"] == status["lab-results"] == "complete"
    if patient == "surgery":
        assert status["pathology-report"] == "complete"


def test_operative_note_pdf_is_linked_through_its_relative_url(tmp_path: Path) -> None:
    report, app, info = _run(tmp_path, "surgery", "complete")
    pdf_bytes = (info.root / "portal-a" / OPERATIVE_NOTE_FILE).read_bytes()
    record = build_record(app, "c").record
    docs = {d.sha256: d for d in record.documents}
    assert hashlib.sha256(pdf_bytes).hexdigest() in docs, "the PDF's bytes are a document of the record"
    op_notes = [e["resource"] for e in record.bundle["entry"]
                if e["resource"]["resourceType"] == "DocumentReference"
                and any(c.get("code") == "11504-8" for c in e["resource"].get("type", {}).get("coding", []))]
    assert len(op_notes) == 1
    att = op_notes[0]["content"][0]["attachment"]
    assert att["url"].startswith("documents/") and att["size"] == len(pdf_bytes)
    item = next(i for i in report["items"] if i["id"] == "operative-notes")
    assert item["status"] == "complete" and f"DocumentReference/{op_notes[0]['id']}" in item["evidence"]
    assert [s["status"] for s in item["subjects"]] == ["complete", "complete"]  # ERCP and cholecystectomy


@pytest.mark.parametrize("patient", sorted(GENERATORS))
def test_generation_is_byte_for_byte_deterministic(tmp_path: Path, patient: str) -> None:
    generate, _ = GENERATORS[patient]
    first = generate(tmp_path / "a")
    second = generate(tmp_path / "b")
    assert first.files == second.files
    for rel in first.files:
        assert (first.root / rel).read_bytes() == (second.root / rel).read_bytes(), rel
    other_seed = generate(tmp_path / "c", seed="another-seed")
    assert (other_seed.root / "portal-a/record.json").read_bytes() != (first.root / "portal-a/record.json").read_bytes()


def _resources(info: DownloadInfo) -> list[dict[str, Any]]:
    bundle = json.loads((info.root / "portal-a/record.json").read_text(encoding="utf-8"))
    lines = (info.root / "portal-b/labs.ndjson").read_text(encoding="utf-8").splitlines()
    return [e["resource"] for e in bundle["entry"]] + [json.loads(line) for line in lines]


@pytest.mark.parametrize(("patient", "variant"), [("cardiology", "complete"), ("cardiology", "summary-only-echo"),
                                                  ("surgery", "complete"), ("surgery", "no-pathology-text")])
def test_resources_are_valid_r4b_and_counted(tmp_path: Path, patient: str, variant: str) -> None:
    generate, _ = GENERATORS[patient]
    info = generate(tmp_path / "dl", variant=variant)
    resources = _resources(info)
    for res in resources:
        get_fhir_model_class(res["resourceType"]).model_validate(res)  # raises on anything malformed
    counts: dict[str, int] = {}
    for res in resources:
        counts[res["resourceType"]] = counts.get(res["resourceType"], 0) + 1
    assert counts == info.resource_counts


@pytest.mark.parametrize("patient", sorted(GENERATORS))
def test_dicom_cd_is_readable_by_pydicom_and_dcmtk(tmp_path: Path, patient: str) -> None:
    generate, _ = GENERATORS[patient]
    info = generate(tmp_path / "dl")
    instances = [rel for rel in info.files if rel.startswith("cd/DICOM/")]
    assert len(instances) == info.dicom_instances > 0
    studies: dict[str, int] = {}
    for rel in instances:
        ds = pydicom.dcmread(info.root / rel)
        assert ds.PatientID == info.mrn and str(ds.PatientName) == info.dicom_patient_name
        studies[ds.StudyInstanceUID] = studies.get(ds.StudyInstanceUID, 0) + 1
        if ds.Modality == "ECG":
            group = ds.WaveformSequence[0]
            assert group.NumberOfWaveformChannels == 12
            assert len(group.WaveformData) == 2 * 12 * group.NumberOfWaveformSamples
        else:
            assert len(ds.PixelData) == ds.Rows * ds.Columns * 2 * int(ds.get("NumberOfFrames", 1))
    assert set(studies) == set(info.dicom_study_uids) >= set(info.study_uids)
    # every study the bundle describes has the instance count the ImagingStudy states
    described = {r["identifier"][0]["value"].removeprefix("urn:oid:"): r["numberOfInstances"]
                 for r in _resources(info) if r["resourceType"] == "ImagingStudy"}
    assert {uid: studies[uid] for uid in described} == described
    dcmdump = shutil.which("dcmdump")
    if dcmdump is None:
        pytest.skip("dcmdump (dcmtk) is not installed")
    for rel in [*instances, "cd/DICOMDIR"]:
        done = subprocess.run([dcmdump, "-q", str(info.root / rel)], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0 and "E:" not in done.stderr, (rel, done.stderr)
