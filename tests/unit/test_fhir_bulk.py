"""The ``fhir-bulk`` connector: recorded Medplum and SMART Bulk Data server exports, own faults."""

from __future__ import annotations

import collections
import json
import re
from pathlib import Path

import pytest
import responses
from responses.registries import OrderedRegistry

from aggregator.errors import AuthError
from connectors.base import NullProgress, PatientRef
from connectors.fhir_bulk import ExportFailed, FhirBulkConfig, FhirBulkConnector, belongs_to
from connectors.fhir_rest import PullState
from tests.conformance import assert_connector_conforms
from tests.fakes.fhir_server import FakeFhirServer
from tests.fakes.recordings import load, register_one
from tests.support import RecordingProgress, SinkHarness, make_sink

MEDPLUM = "http://127.0.0.1:8103/fhir/R4"
BDS = "http://127.0.0.1:9443"
A = "ba5e1362-5dbd-47e6-bc4d-d19d1d1e8075"
GROUP = "9aaa734b-8271-4345-b87c-46bbf569e1ef"
TYPES = "Patient,Observation,DiagnosticReport,DocumentReference,ImagingStudy,Condition"



@pytest.fixture()
def slept(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    waits: list[float] = []
    monkeypatch.setattr("time.sleep", waits.append)
    monkeypatch.setattr("connectors.fhir_bulk.pause", lambda seconds, cancel: waits.append(seconds) or cancel.is_set())
    return waits


def test_medplum_group_export_replay(recordings: Path, tmp_path: Path, slept: list[float]) -> None:
    recs = load(recordings / "bulk-export-patient")
    h = make_sink(tmp_path, kind="fhir-bulk")
    pdf = load(recordings / "binary", "read-as-pdf")[0]
    c = FhirBulkConnector(FhirBulkConfig(url=MEDPLUM, group_id=GROUP, types=TYPES))
    not_found = load(recordings / "errors", "not-found.json")[0]["response"]["body"]
    with responses.RequestsMock() as rsps:
        # Medplum declares $export on Group only: the connector keeps the group export
        register_one(rsps, load(recordings / "capabilities", "metadata")[0])
        for r in recs[1:11]:  # kick-off .. DELETE
            register_one(rsps, r)
        register_one(rsps, pdf)  # the DocumentReference's Binary, read after the export
        # hydration reads (Encounter, Practitioner...) were not recorded: the server's recorded 404
        rsps.add("GET", re.compile(rf"{re.escape(MEDPLUM)}/[A-Za-z]+/[^/$]+$"), json=not_found, status=404)
        cursor = c.pull(PatientRef(id=A), None, h.sink, NullProgress())
        methods = [c.request.method for c in rsps.calls]
        (kick,) = [c.request for c in rsps.calls if "$export" in str(c.request.url)]
    assert kick.headers["Prefer"] == "respond-async" and f"Group/{GROUP}/$export" in str(kick.url)
    assert methods.count("DELETE") == 1
    assert slept == [1.0]  # Medplum's 202 has no Retry-After: our own first interval
    rows = h.entries()
    done = collections.Counter(r.key.split("/")[0] for r in rows if r.kind == "resource" and r.state == "done")
    # patient A only: 414 Observations, 31 reports, 9 conditions, the Patient, the DocumentReference
    assert done["Observation"] == 414 and done["DiagnosticReport"] == 31 and done["Condition"] == 9
    assert done["Patient"] == 1 and done["DocumentReference"] == 1 and done["ImagingStudy"] == 0
    skipped = [r for r in rows if r.state == "skipped"]
    assert skipped and all("other group members" in (r.reason or "") for r in skipped)
    (binary,) = [r for r in rows if r.kind == "binary"]
    assert binary.key.startswith("Binary/") and binary.state == "done"
    hydration = [r for r in rows if r.kind == "resource" and r.state == "failed"]
    assert hydration and all(r.status == "404" for r in hydration)
    assert h.sink.method == "Group/$export"  # the group export, as Medplum serves only that level
    assert cursor["Observation"] == {"since": "2026-11-24T16:03:50Z"}


def test_bds_export_polls_with_retry_after_and_reports_progress(recordings: Path, tmp_path: Path,
                                                                 slept: list[float]) -> None:
    recs = load(recordings / "bds-export")
    lines = recs[3]["response"]["body"].splitlines()
    pid = json.loads(lines[1])["subject"]["reference"].split("/")[1]
    h = make_sink(tmp_path, kind="fhir-bulk")
    progress = RecordingProgress()
    with responses.RequestsMock() as rsps:
        for r in recs[:4]:
            register_one(rsps, r)
        # the Conditions cite Encounters the export did not include: hydration reads, not recorded
        for enc in sorted({json.loads(x)["encounter"]["reference"] for x in lines
                           if json.loads(x)["subject"]["reference"].endswith(pid)}):
            rsps.add("GET", f"{BDS}/fhir/{enc}", status=404, json={"resourceType": "OperationOutcome", "issue": [
                {"severity": "error", "code": "not-found", "details": {"text": "Not found"}}]})
        register_one(rsps, recs[4])
        cursor = FhirBulkConnector(FhirBulkConfig(url=f"{BDS}/fhir", group_id="FallonHealth", types="Condition",
                                                  export_level="group")
                                   ).pull(PatientRef(id=pid), None, h.sink, progress)
    assert slept == [1.0]
    assert progress.texts[0] == "export: 0% complete, Please wait..."
    rows = h.entries()
    assert len([r for r in rows if r.kind == "resource" and r.state == "done"]) == 3  # 3 of the 7 lines
    (skip,) = [r for r in rows if r.state == "skipped"]
    assert skip.reason == "4 Condition of other group members"
    assert cursor == {"Condition": {"since": "2026-11-24T16:05:50Z"}}


def test_bds_transient_poll_errors_are_polled_again(recordings: Path, tmp_path: Path, slept: list[float]) -> None:
    recs = load(recordings / "bds-faults", "transient-error")
    h = make_sink(tmp_path, kind="fhir-bulk")
    base = f"{BDS}/eyJlcnIiOiJ0cmFuc2llbnRfZXJyb3IifQ/fhir"
    c = FhirBulkConnector(FhirBulkConfig(url=base, group_id="FallonHealth", types="Condition", export_level="group"))
    with responses.RequestsMock(assert_all_requests_are_fired=True) as rsps:
        for r in recs:
            register_one(rsps, r)
        c.client.max_attempts = 1  # the output file was not recorded: fail it at once
        cursor = c.pull(PatientRef(id="x"), None, h.sink, NullProgress())
        methods = [(c.request.method, str(c.request.url).rsplit("/", 1)[-1]) for c in rsps.calls]
    assert [m for m, _ in methods].count("DELETE") == 1
    polls = [m for m in methods if m[1].startswith("085be")]
    assert len(polls) == 4  # 2 transient 500s, the manifest, the DELETE
    assert slept[:2] == [1.0, 2.0]
    (lost,) = [r for r in h.entries() if r.state == "failed"]
    assert lost.kind == "file" and "Condition export file" in (lost.reason or "")
    assert "Condition" not in cursor  # the lost file's type keeps no cursor


def test_bds_expired_file_and_error_files(recordings: Path, tmp_path: Path, slept: list[float]) -> None:
    h = make_sink(tmp_path, kind="fhir-bulk")
    expired = load(recordings / "bds-faults", "file-expired")
    with responses.RequestsMock(registry=OrderedRegistry) as rsps:
        for r in expired:  # our kick-off adds _since to the recorded one
            register_one(rsps, r, loose_query=True)
        c = FhirBulkConnector(FhirBulkConfig(url=f"{BDS}/eyJlcnIiOiJmaWxlX2V4cGlyZWQifQ/fhir",
                                             group_id="FallonHealth", types="Condition", export_level="group"))
        cursor = c.pull(PatientRef(id="x"), {"Condition": {"since": "2026-01-01T00:00:00Z"}}, h.sink, NullProgress())
        kick = str(rsps.calls[0].request.url)
    assert "_since=2026-01-01T00%3A00%3A00Z" in kick
    (row,) = [r for r in h.entries() if r.state == "failed"]
    assert row.status == "410" and "expired" in (row.reason or "") and "Condition export file" in (row.reason or "")
    assert cursor["Condition"] == {"since": "2026-01-01T00:00:00Z"}  # not advanced past lost data

    some = load(recordings / "bds-faults", "some-failed")
    (tmp_path / "2").mkdir()
    h2 = make_sink(tmp_path / "2", kind="fhir-bulk")
    sim = "eyJlcnIiOiJzb21lX2ZpbGVfZ2VuZXJhdGlvbl9mYWlsZWQiLCJwYWdlIjoyNX0"
    c = FhirBulkConnector(FhirBulkConfig(url=f"{BDS}/{sim}/fhir"))
    c.client.max_attempts = 1  # two error files were not recorded
    with responses.RequestsMock(assert_all_requests_are_fired=True) as rsps:
        for r in some:
            register_one(rsps, r)
        # a system-level Patient/$export: drive the connector's own steps
        status = c.kick_off("Patient/$export", [("_type", "Patient")], h2.sink)
        manifest = c.wait(status, NullProgress())
        state = PullState(c.config.url, {})
        c.download(manifest, None, state, h2.sink, NullProgress())  # system level: no filter
        c.delete_job(status)
    rows = h2.entries()
    assert len([r for r in rows if r.kind == "resource"]) == 25
    errors = [r for r in rows if r.status == "export-error"]
    assert len(errors) == 1 and "processing" in (errors[0].reason or "")
    assert len([r for r in rows if r.kind == "file" and r.state == "failed"]) == 2  # unrecorded error files


def test_bds_kickoff_failure_and_missing_token(recordings: Path, tmp_path: Path) -> None:
    h = make_sink(tmp_path, kind="fhir-bulk")
    failed, secure = load(recordings / "bds-faults", "all-failed")[0], load(recordings / "bds-faults", "secure")[0]
    with responses.RequestsMock() as rsps:
        register_one(rsps, failed)
        register_one(rsps, secure)
        c = FhirBulkConnector(FhirBulkConfig(url=f"{BDS}/eyJlcnIiOiJmaWxlX2dlbmVyYXRpb25fZmFpbGVkIn0/fhir"))
        with pytest.raises(ExportFailed, match=r"kick-off failed: HTTP 500 .*\(processing\)"):
            c.kick_off("Patient/$export", [("_type", "Patient")], h.sink)
        c = FhirBulkConnector(FhirBulkConfig(url=f"{BDS}/eyJzZWN1cmUiOjF9/fhir"))
        with pytest.raises(AuthError, match="401"):
            c.kick_off("Patient/$export", [("_type", "Patient")], h.sink)
    (row,) = h.entries()  # one ledger row for the export query, updated by the second refusal
    assert row.key == "query:$export" and row.status == "401" and "refused" in (row.reason or "")


def test_stream_reset_mid_file_resumes_without_duplicates(tmp_path: Path, slept: list[float]) -> None:
    with FakeFhirServer(n_obs=50) as srv:
        h = make_sink(tmp_path, kind="fhir-bulk")
        srv.inject(r"/bulkfiles/", "reset", times=1)
        cursor = FhirBulkConnector(FhirBulkConfig(url=srv.url, auth="none")).pull(
            PatientRef(id="p0"), None, h.sink, NullProgress())
        assert srv.deleted_jobs == ["job1"]
    obs = [r for r in h.entries() if r.key.startswith("Observation/")]
    assert len(obs) == 50 and all(r.attempts == 1 for r in obs)
    assert "Observation" in cursor


def _done_keys(h: SinkHarness) -> set[str]:
    return {r.key for r in h.entries("done") if r.kind == "resource"}


def test_group_configured_prefers_patient_level_export(tmp_path: Path, slept: list[float]) -> None:
    """The server declares Patient-level $export: only this patient's data is transferred."""
    with FakeFhirServer(patients=3, n_obs=20) as srv:
        h = make_sink(tmp_path, kind="fhir-bulk")
        FhirBulkConnector(FhirBulkConfig(url=srv.url, group_id="all")).pull(
            PatientRef(id="p1"), None, h.sink, NullProgress())
        kicks = [path for method, path in srv.log if "$export" in path]
    assert kicks == ["/fhir/Patient/p1/$export"]
    keys = _done_keys(h)
    assert "Patient/p1" in keys and len([k for k in keys if k.startswith("Observation/o1-")]) == 20
    others = ("Patient/p0", "Patient/p2", "Observation/o0-", "Observation/o2-")
    assert not [k for k in keys if k.startswith(others)]
    assert not h.entries("skipped")  # nothing of anyone else was even sent


def test_group_export_filters_other_members_and_counts_them(tmp_path: Path, slept: list[float]) -> None:
    """Group-level only (the Patient-level kick-off is refused): other members' lines are
    counted in the ledger and none of their resources reaches the sink."""
    with FakeFhirServer(patients=3, n_obs=20) as srv:
        h = make_sink(tmp_path, kind="fhir-bulk")
        c = FhirBulkConnector(FhirBulkConfig(url=srv.url, group_id="all"))
        assert c.capabilities().export_types == {"Patient", "Group"}
        srv.export_levels = ("Group",)  # declared, but refused when asked
        c.pull(PatientRef(id="p1"), None, h.sink, NullProgress())
        kicks = [path for method, path in srv.log if "$export" in path]
    assert kicks == ["/fhir/Patient/p1/$export", "/fhir/Group/all/$export"]
    keys = _done_keys(h)
    assert {k for k in keys if k.startswith("Patient/")} == {"Patient/p1"}
    assert {k.split("-")[0] for k in keys if k.startswith("Observation/")} == {"Observation/o1"}
    skipped = {r.key.rsplit("-", 1)[-1]: r for r in h.entries("skipped")}
    assert skipped["Patient.ndjson"].reason == "2 Patient of other group members"
    assert skipped["Observation.ndjson"].reason == "40 Observation of other group members"
    assert skipped["Observation.ndjson"].meta == {"lines_skipped": 40}


def test_belongs_to_reads_relative_and_absolute_references() -> None:
    obs = {"resourceType": "Observation", "subject": {"reference": "http://h/fhir/Patient/p1/_history/2"}}
    assert belongs_to(obs, "p1") and not belongs_to(obs, "p2")
    assert not belongs_to({"resourceType": "Observation", "subject": {"reference": "Patient/p11"}}, "p1")
    orphan = {"resourceType": "Observation", "subject": {"reference": "Group/g"}}
    assert not belongs_to(orphan, "p1") and belongs_to(orphan, "p1", strict=False)
    assert belongs_to({"resourceType": "Practitioner", "id": "x"}, "p1")
    assert not belongs_to({"resourceType": "Patient", "id": "p2"}, "p1")


@pytest.mark.parametrize("level", ["patient", "group"])
def test_bulk_conformance(tmp_path: Path, slept: list[float], level: str) -> None:
    with FakeFhirServer(patients=2, n_obs=30) as srv:
        report = assert_connector_conforms(
            lambda: FhirBulkConnector(FhirBulkConfig(url=srv.url, group_id="all", export_level=level)),
            PatientRef(id="p0"), tmp_path, kind="fhir-bulk", min_done=31)
    assert report.first_counts["done"] == 32  # the Patient, 30 Observations, the Practitioner they cite (read)
    assert report.second_counts["done"] == 0  # _since: nothing changed, nothing transferred


def test_bds_system_export_reports_rising_progress(recordings: Path, tmp_path: Path, slept: list[float]) -> None:
    """bds-export/0006-0017: a 9 s system-level export; every poll's X-Progress is shown and
    its Retry-After honoured; the job is DELETEd."""
    recs = load(recordings / "bds-export")[5:]
    h = make_sink(tmp_path, kind="fhir-bulk")
    progress = RecordingProgress()
    c = FhirBulkConnector(FhirBulkConfig(url=f"{BDS}/fhir"))
    with responses.RequestsMock(registry=OrderedRegistry) as rsps:
        for r in recs:
            register_one(rsps, r)
        status = c.kick_off("$export", [], h.sink)
        manifest = c.wait(status, progress)
        c.delete_job(status)
    assert [t.split("%")[0] for t in progress.texts] == ["export: 0", "export: 19", "export: 31", "export: 44",
                                                          "export: 50", "export: 50", "export: 76", "export: 76",
                                                          "export: 93"]
    assert slept == [1.0] * 9
    assert len(manifest["output"]) == 20 and manifest["transactionTime"] == "2026-11-24T16:05:51+00:00"
    assert h.entries() == []  # nothing failed


def test_medplum_status_after_delete_is_reported_as_gone(recordings: Path, slept: list[float]) -> None:
    """bulk-export-patient/0012: polling a deleted job gives 404 -> ExportFailed, not a retry loop."""
    rec = load(recordings / "bulk-export-patient", "after-delete")[0]
    c = FhirBulkConnector(FhirBulkConfig(url=MEDPLUM, group_id=GROUP))
    with responses.RequestsMock() as rsps:
        register_one(rsps, rec)
        with pytest.raises(ExportFailed, match=r"expired or was removed \(HTTP 404: not-found: Not found\)"):
            c.wait(rec["request"]["url"], NullProgress())
    assert slept == []
