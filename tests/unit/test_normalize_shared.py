"""normalize() on the public sample data, fed through a real LedgerSink (SQLite + blob store)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import orjson
import pydicom
import pytest
from fhir.resources.R4B import get_fhir_model_class

from aggregator.model import CaseInfo, NormalizedRecord, SourceInfo
from aggregator.normalize import normalize
from tests.support import SinkHarness, make_sink


def feed_json(h: SinkHarness, path: Path, name: str | None = None) -> int:
    """Emit a file's resources as a media connector would: key per file, fullUrl and bundle in meta."""
    name = name or path.name
    doc = json.loads(path.read_bytes())
    entries = doc.get("entry", []) if doc.get("resourceType") == "Bundle" else [{"resource": doc}]
    n = 0
    for i, e in enumerate(entries):
        res = e.get("resource")
        if not isinstance(res, dict):
            continue
        meta = {"file": name, "bundle": name}
        if e.get("fullUrl"):
            meta["fullUrl"] = e["fullUrl"]
        h.sink.resource(res, key=f"{name}#{i}", meta=meta)
        n += 1
    return n


def run(h: SinkHarness, case: CaseInfo | None = None) -> NormalizedRecord:
    src = SourceInfo(h.source_id, "media", "download", method="media", pulled_at="2026-09-30T12:00:00+00:00")
    return normalize(case or CaseInfo(h.case_id, "general"), [src], h.entries("done"), h.blobs)


def accounted(rec: NormalizedRecord, n_inputs: int) -> None:
    """Every input resource is exactly once in the bundle or in quarantine (Provenance and Endpoint
    are made by normalization; the one Patient stands for the source Patients merged into it)."""
    def made_here(r: dict) -> bool:
        if r["resourceType"] == "Endpoint":
            return r["connectionType"].get("system") == "urn:aggregator:endpoint-connection-type"
        return r["resourceType"] == "Patient" or (r["resourceType"] == "Provenance" and any(
            str(a.get("who", {}).get("display", "")).startswith("second-opinion-aggregator") for a in r["agent"]))

    in_bundle = sum(1 for r in rec.resources() if not made_here(r))
    quarantined = sum(1 for q in rec.quarantine if q.kind == "resource")
    # the merged Patient stands for a source Patient only when one was chosen
    assert in_bundle + (1 if rec.identity.get("chosen") else 0) + quarantined == n_inputs


def all_valid(rec: NormalizedRecord) -> None:
    for r in rec.resources():
        get_fhir_model_class(r["resourceType"]).model_validate(r)
    get_fhir_model_class("Bundle").model_validate({**rec.bundle, "entry": rec.bundle["entry"][:50]})


def test_synthea_bundle_one_patient_refs_resolved_and_deterministic(shared_data: Path, tmp_path: Path) -> None:
    folder = shared_data / "fhir/synthea-r4-bundles"
    h = make_sink(tmp_path)
    n = feed_json(h, folder / "Chet_Thompson_eda17701-070d-4fae-9f7d-c8cd6263b63a.json")
    rec = run(h)
    assert len(rec.resources("Patient")) == 1 and rec.patient_ref == f"Patient/{rec.resources('Patient')[0]['id']}"
    assert rec.unresolved == []  # transaction bundle: every urn:uuid reference resolves
    ids = {e["fullUrl"] for e in rec.bundle["entry"]}
    for r in rec.resources("Observation"):
        assert r["subject"]["reference"] == f"urn:uuid:{rec.resources('Patient')[0]['id']}"
        assert r["encounter"]["reference"] in ids
    # claims share a group identifier: not a business identifier, nothing merged away
    assert len(rec.resources("ExplanationOfBenefit")) == 10
    accounted(rec, n)
    all_valid(rec)
    prov = rec.resources("Provenance")
    assert len(prov) == 1 and len(prov[0]["target"]) == len(rec.bundle["entry"]) - 1
    again = run(h)
    assert orjson.dumps(again.bundle) == orjson.dumps(rec.bundle)


def test_notes_set_both_kept_identical_attachments_collapse(shared_data: Path, tmp_path: Path) -> None:
    h = make_sink(tmp_path)
    f = shared_data / "fhir/synthea-r4-bundles-with-notes" / (
        "Cecelia952_Romaguera67_f1731e33-dc55-4ee8-72d7-cece2e49bedd.json")
    n = feed_json(h, f)
    rec = run(h)
    notes = rec.resources("DocumentReference")
    reports = [r for r in rec.resources("DiagnosticReport") if r.get("presentedForm")]
    assert notes and reports
    n_attachments = len(notes) + sum(len(r["presentedForm"]) for r in reports)
    assert len(rec.documents) < n_attachments  # the same note bytes are one file
    paths = {d.path for d in rec.documents}
    for r in notes:
        att = r["content"][0]["attachment"]
        assert att["url"] in paths and att["size"] > 0 and len(att["hash"]) == 28 and att["data"]
    for d in rec.documents:
        assert d.path.startswith("documents/D") and len(d.path.split("/")[1].split(".")[0]) == 8
        assert h.blobs.exists(d.sha256)
    accounted(rec, n)


@pytest.mark.parametrize("group", ["ips-examples", "mcode-examples", "us-core-examples",
                                   "cancer-pathology-sdc-connectathon", "hl7-r4-spec-examples"])
def test_example_sets_accounted_for(shared_data: Path, tmp_path: Path, group: str) -> None:
    h = make_sink(tmp_path)
    n = sum(feed_json(h, p) for p in sorted((shared_data / "fhir" / group).glob("*.json")))
    rec = run(h)
    accounted(rec, n)
    assert len(rec.resources("Patient")) == 1
    reasons = Counter("merged into" if q.reason.startswith("merged into ")
                      else q.reason.split(":")[0].split(" of ")[0] for q in rec.quarantine)
    assert set(reasons) <= {"invalid FHIR R4", "unsupported type", "another patient", "merged into",
                            "several patients in the sources", "attachment"}
    # the case has no demographics: a set of examples about several people chooses none of them
    several = rec.identity["several"]
    assert (len(several) > 1) == ("several patients in the sources" in reasons)
    assert (len(several) > 1) != rec.identity["chosen"]
    all_valid(rec)


def test_us_core_patient_matched_by_typed_name(shared_data: Path, tmp_path: Path) -> None:
    h = make_sink(tmp_path)
    for p in sorted((shared_data / "fhir/us-core-examples").glob("*.json")):
        feed_json(h, p)
    rec = run(h, CaseInfo(h.case_id, "general", patient_name="SHAW, amy"))
    (patient,) = rec.resources("Patient")
    assert any(n.get("family") == "Shaw" for n in patient["name"])
    full = {e["fullUrl"] for e in rec.bundle["entry"]}
    (cbc,) = [r for r in rec.resources("DiagnosticReport") if "58410-2" in str(r["code"])]
    assert cbc["result"] and all(ref["reference"] in full for ref in cbc["result"])
    # the cardiology report's member Observations are not in the examples: listed, left as written
    missing = [u for u in rec.unresolved if u["reference"] == "Observation/ekg-lead"]
    assert missing and missing[0]["path"].startswith("result[") and missing[0]["source_id"] == h.source_id


def test_dicom_cd_with_three_patients(shared_data: Path, tmp_path: Path) -> None:
    cd = shared_data / "dicom/cd-dicomdir-3-patients"
    h = make_sink(tmp_path)
    files = sorted(p for p in cd.rglob("*") if p.is_file() and p.parent != cd)
    headers = {}
    for p in files:
        ds = pydicom.dcmread(p, stop_before_pixels=True)
        headers[p] = ds
        h.sink.dicom(str(ds.SOPInstanceUID), p.read_bytes(), meta={"file": p.relative_to(cd).as_posix()})
    h.sink.dicom("1.2.3.broken", b"not a dicom file at all", meta={"file": "junk"})
    target = headers[files[0]]
    rec = run(h, CaseInfo(h.case_id, "general", patient_name=str(target.PatientName)))
    mine = [p for p, ds in headers.items() if ds.PatientID == target.PatientID]
    assert len(rec.images) == len({headers[p].SOPInstanceUID for p in mine})
    assert {i.patient_id for i in rec.images} == {str(target.PatientID)}
    others = [q for q in rec.quarantine if q.reason == "another patient"]
    assert len(others) == len(files) - len(mine) > 0
    assert any(q.key == "1.2.3.broken" and q.reason.startswith("broken DICOM") for q in rec.quarantine)
    studies = rec.resources("ImagingStudy")
    assert len(studies) == len({headers[p].StudyInstanceUID for p in mine})
    for s in studies:
        assert s["identifier"][0]["system"] == "urn:dicom:uid" and s["identifier"][0]["value"].startswith("urn:oid:")
        assert s["numberOfInstances"] == sum(len(x["instance"]) for x in s["series"])
        assert s["endpoint"][0]["reference"] == f"urn:uuid:{rec.resources('Endpoint')[0]['id']}"
    (patient,) = rec.resources("Patient")
    assert any(i["value"] == str(target.PatientID) for i in patient["identifier"])
    all_valid(rec)
