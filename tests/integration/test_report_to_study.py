"""Report to study, end to end: FHIR reports in a case's ledger bring in their studies from Orthanc.

The case's patient is the archive's ``LAT-0001`` (Müller, born 1955-04-12; accession LA0001, MG,
2026-08-04). The imaging source has NO PatientID: the studies come in through the reports only.
Runs through the real pull runner (``run_pull``), a real SQLite ledger and the session Orthanc.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from aggregator.app import App
from aggregator.cases import add_endpoint, add_source, create_case
from aggregator.jobs.pull import run_pull
from aggregator.ledger import LedgerSink, entries_for_case, stored_path
from connectors.base import KIND_DICOM, KIND_QUERY
from connectors.dicom_stream import split_part10
from tests.integration.orthanc import LoadedArchive

pytestmark = pytest.mark.orthanc

RAD = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0074", "code": "RAD"}]}
ACSN = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "ACSN"}]}


def _report(rid: str, *, accession: str | None = None, date: str = "2026-08-04", text: str = "MG screening",
            ) -> dict[str, object]:
    res: dict[str, object] = {
        "resourceType": "DiagnosticReport", "id": rid, "status": "final", "category": [RAD],
        "code": {"text": text}, "effectiveDateTime": date + "T10:15:00Z",
    }
    if accession:
        res["identifier"] = [{"type": ACSN, "value": accession}]
    return res


def _case_with_reports(tmp_path: Path, archive: LoadedArchive, kind: str, reports: list[dict[str, object]],
                       *, patient_id: str | None = None) -> tuple[App, int]:
    """A case whose FHIR ledger holds ``reports``, and an imaging source (``kind``) on the archive."""
    app = App.open(tmp_path / "home")
    create_case(app, "c1", "general", patient_name="Jürgen Müller", birth_date="1955-04-12")
    fhir_dir = tmp_path / "fhir-export"
    fhir_dir.mkdir()
    fhir_src = add_source(app, "c1", media=str(fhir_dir))["id"]
    sink = LedgerSink(app.db, app.blobs("c1"), fhir_src, None)
    for r in reports:
        sink.resource(r)
    sink.flush()
    server = archive.server
    options: dict[str, object] = (
        {"host": "127.0.0.1", "port": server.dicom_port, "called_ae": server.aet, "calling_ae": "AGGREGATOR"}
        if kind == "dimse" else {"url": server.dicomweb})
    add_endpoint(app, "pacs", kind, options)
    src = add_source(app, "c1", endpoint="pacs", patient_id=patient_id)["id"]
    return app, int(src)


@pytest.mark.parametrize("kind", ["dimse", "dicomweb"])
def test_reports_bring_in_their_studies_without_a_patient_id(loaded_archive: LoadedArchive, tmp_path: Path,
                                                             kind: str) -> None:
    expected = loaded_archive.copies["LATIN1"]
    reports = [
        _report("mammo", accession="LA0001"),
        _report("lost", accession="NO-SUCH-ACCESSION"),
        # HOSP-B's study (Tanaka, born 1988): the accession matches exactly, the patient does not
        _report("other", accession="HB0001", date="2026-08-03", text="CT head"),
        _report("vague", date="2026-08-04", text="Outside consult"),  # no accession, no modality
    ]
    app, src = _case_with_reports(tmp_path, loaded_archive, kind, reports)
    summary = run_pull(app, src)
    assert summary.state == "partial", summary.error
    rows = [e for e in entries_for_case(app.db, "c1") if e.source_id == src]
    done = {e.key: e for e in rows if e.kind == KIND_DICOM and e.state == "done"}
    assert set(done) == set(expected)  # the matched study, and nothing of patient HOSP-B
    blobs = app.blobs("c1")
    for uid, original in expected.items():
        got = stored_path(blobs, done[uid]).read_bytes()
        if kind == "dicomweb":
            assert got == original
        else:  # DIMSE: our File Meta around the dataset bytes exactly as the archive sent them
            (a, _), (b, _) = split_part10(got), split_part10(original)
            assert got[a:] == original[b:]
    gaps = {e.key: e for e in rows if e.kind == KIND_QUERY}
    assert set(gaps) == {"study:DiagnosticReport/lost", "study:DiagnosticReport/other",
                         "study:DiagnosticReport/vague"}
    assert gaps["study:DiagnosticReport/lost"].status == "not-found"
    assert "no matching study" in (gaps["study:DiagnosticReport/lost"].reason or "")
    assert gaps["study:DiagnosticReport/other"].status == "other-patient"
    assert gaps["study:DiagnosticReport/vague"].status == "no-criteria"
    for gap in gaps.values():  # PHI-free: no accession numbers in reasons
        assert "LA0001" not in (gap.reason or "") and "HB0001" not in (gap.reason or "")
    app.close()


@pytest.mark.parametrize("kind", ["dimse", "dicomweb"])
def test_date_and_modality_match_is_scoped_to_the_patient(loaded_archive: LoadedArchive, tmp_path: Path,
                                                          kind: str) -> None:
    """With the PatientID known, a report with only date + modality finds the patient's study."""
    reports = [_report("by-date", date="2026-08-04", text="Screening mammography"),
               _report("wrong-day", date="2026-08-05", text="Screening mammography")]
    app, src = _case_with_reports(tmp_path, loaded_archive, kind, reports, patient_id="LAT-0001")
    run_pull(app, src)
    rows = [e for e in entries_for_case(app.db, "c1") if e.source_id == src]
    assert {e.key for e in rows if e.kind == KIND_DICOM and e.state == "done"} == set(
        loaded_archive.copies["LATIN1"])
    gaps = {e.key: e.status for e in rows if e.kind == KIND_QUERY}
    assert gaps == {"study:DiagnosticReport/wrong-day": "not-found"}
    app.close()


@pytest.mark.parametrize("kind", ["dimse", "dicomweb"])
def test_a_patient_id_of_two_people_is_a_gap_the_navigator_sees(loaded_archive: LoadedArchive, tmp_path: Path,
                                                                 kind: str) -> None:
    """PatientID 100200 is Kowalski at HOSP-A and Tanaka at HOSP-B; the case says neither issuer
    nor birth date. Nothing is retrieved, and the gap report says why and what to set."""
    from aggregator.checklist import render_text
    from aggregator.pipeline import check_case

    app = App.open(tmp_path / "home")
    create_case(app, "c1", "general")
    server = loaded_archive.server
    options: dict[str, object] = (
        {"host": "127.0.0.1", "port": server.dicom_port, "called_ae": server.aet, "calling_ae": "AGGREGATOR"}
        if kind == "dimse" else {"url": server.dicomweb})
    add_endpoint(app, "pacs", kind, options)
    src = int(add_source(app, "c1", endpoint="pacs", patient_id="100200")["id"])
    summary = run_pull(app, src)
    assert summary.state == "partial", summary.error
    rows = list(entries_for_case(app.db, "c1"))
    assert not [e for e in rows if e.kind == KIND_DICOM]
    gaps = [e for e in rows if e.kind == KIND_QUERY]
    assert len(gaps) == 2 and {e.status for e in gaps} == {"ambiguous"}

    report, _ = check_case(app, "c1")
    (source,) = report["sources"]
    (problem,) = source["problems"]
    assert problem["status"] == "ambiguous" and problem["count"] == 2
    assert "names several patients at the archive" in problem["detail"] and "--issuer" in problem["detail"]
    text = render_text(report)
    assert "! pacs: 2 x this PatientID names several patients" in text
    assert "Kowalski" not in text + json.dumps(report) and "Tanaka" not in text + json.dumps(report)
    app.close()


@pytest.mark.parametrize("kind", ["dimse", "dicomweb"])
def test_synthea_style_imaging_study_brings_in_its_study_and_stays_one_study(loaded_archive: LoadedArchive,
                                                                               tmp_path: Path, kind: str) -> None:
    """An ImagingStudy written Synthea's way (``urn:ietf:rfc:3986`` + ``urn:oid:``, series and
    instance UIDs as ``urn:oid:`` too) and no report: its hint retrieves the study, normalization
    merges the FHIR and the DICOM ImagingStudy, and the checklist sees the images (no gap)."""
    from io import BytesIO

    import pydicom

    from aggregator.pipeline import check_case

    copies = loaded_archive.copies["LATIN1"]
    headers = [pydicom.dcmread(BytesIO(b), stop_before_pixels=True) for b in copies.values()]
    study_uid = str(headers[0].StudyInstanceUID)
    series: dict[str, list[str]] = {}
    for h in headers:
        series.setdefault(str(h.SeriesInstanceUID), []).append(str(h.SOPInstanceUID))
    patient = {"resourceType": "Patient", "id": "p-mueller", "name": [{"family": "Müller", "given": ["Jürgen"]}],
               "birthDate": "1955-04-12"}
    study = {
        "resourceType": "ImagingStudy", "id": "synthea-style", "status": "available",
        "identifier": [{"use": "official", "system": "urn:ietf:rfc:3986", "value": f"urn:oid:{study_uid}"}],
        "subject": {"reference": "Patient/p-mueller"}, "started": "2026-08-04T10:00:00Z",
        "numberOfSeries": len(series), "numberOfInstances": len(copies),
        "series": [{"uid": f"urn:oid:{s}", "numberOfInstances": len(sops),
                    "modality": {"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "MG"},
                    "instance": [{"uid": f"urn:oid:{sop}", "sopClass": {"system": "urn:ietf:rfc:3986",
                                                                        "code": str(headers[0].SOPClassUID)}}
                                 for sop in sops]} for s, sops in sorted(series.items())],
    }
    app, src = _case_with_reports(tmp_path, loaded_archive, kind, [patient, study])
    run_pull(app, src)
    rows = [e for e in entries_for_case(app.db, "c1") if e.source_id == src]
    assert {e.key for e in rows if e.kind == KIND_DICOM and e.state == "done"} == set(copies)

    report, cr = check_case(app, "c1")
    rad = next(i for i in report["items"] if i["id"] == "radiology-images")
    (merged,) = cr.record.resources("ImagingStudy")
    assert rad["status"] == "complete" and rad["evidence"] == [f"ImagingStudy/{merged['id']}"], rad
    assert merged["meta"]["source"].endswith("#ImagingStudy/synthea-style"), "the FHIR study, DICOM merged in"
    assert merged["numberOfInstances"] == len(copies)
    assert {i["uid"] for s in merged["series"] for i in s["instance"]} == set(copies)
    assert merged.get("endpoint"), "the merged study points at the package's images"
    app.close()
