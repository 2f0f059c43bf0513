"""The ``fhir`` connector against recorded Medplum exchanges and the local fake server.

Which test replays which folder of ``../shared/recordings`` (every folder is replayed):

- ``capabilities``: 0001 metadata - test_check_reports_version_and_interactions, the everything
  and crawl replays here, test_medplum_group_export_replay (test_fhir_bulk.py); 0002 base
  .well-known - test_smart.py::test_smart_backend_token_discovered_signed_and_cached; 0003 root
  .well-known - test_smart.py::test_token_url_discovered_at_the_server_root.
- ``patient-match`` (all 4): test_patient_lookup_by_identifier_and_by_name,
  test_patient_lookup_several_matches_is_an_error_without_phi, test_lookup_failure_logs_no_search_values.
- ``everything-paged`` (A: 17 pages, B: 5): test_everything_paged_replay,
  test_everything_since_sends_the_cursor_and_takes_the_change.
- ``everything-since``: 0001 and 0004 - test_everything_since_sends_the_cursor_and_takes_the_change
  (0002/0003 are the recorder's own read and PUT that changed the Observation; a puller never sends a PUT).
- ``crawl-by-type``: patient-A pages - test_crawl_by_type_replay_with_hydration_failures,
  test_crawl_failed_search_is_a_ledger_failure_and_keeps_its_cursor; 0013 - test_crawl_incremental_uses_lastUpdated_ge;
  0014 and 0015 - test_include_page_and_patient_b_imaging_replay.
- ``offset-cap-quirk``: 0002-0005 - test_offset_cap_switches_to_lastupdated_cursor_paging (0001's next link
  points at page 2, which was not recorded, so the replay starts at the last good page).
- ``conditional-read``: 0001/0002 - test_conditional_read_304_is_not_re_emitted; 0003-0005 -
  test_conditional_read_stale_etag_and_observation_replay; 0001 also in the crawl replays.
- ``errors`` (all 10): test_fhir_http.py::test_recorded_errors_are_classified and
  test_accepted_invalid_count_is_not_an_error; 0001 in the crawl and bulk replays; 0003 in
  test_crawl_failed_search...; 0007 in test_smart.py (401 refresh, bearer check).
- ``smart-backend`` (all 4): test_smart.py (token, Patient read, 403 on $export, wrongly signed);
  0003 also in test_fhir_http.py::test_403_is_access_denied.
- ``bulk-export-patient``: 0002-0011 - test_fhir_bulk.py::test_medplum_group_export_replay; 0012 -
  test_medplum_status_after_delete_is_reported_as_gone (0001 is the recorder's POST creating the Group).
- ``binary``: 0002/0005 - test_binary_relative_native_then_hash_check; 0004 - test_binary_fallback_to_fhir_json;
  0003/0006 - test_document_search_and_presigned_download_replay; 0005 also in the everything and
  bulk replays (0001 is the recorder's POST of the PDF).
- ``bds-export``: 0001-0005 - test_fhir_bulk.py::test_bds_export_polls_with_retry_after_and_reports_progress;
  0006-0017 - test_bds_system_export_reports_rising_progress.
- ``bds-faults`` (all 18): test_fhir_bulk.py::test_bds_transient_poll_errors_are_polled_again,
  test_bds_expired_file_and_error_files, test_bds_kickoff_failure_and_missing_token.

Conformance (tests/conformance.py): ``fhir`` $everything and crawl in
test_fake_server_incremental_and_conformance; ``fhir-bulk`` patient- and group-level in
test_fhir_bulk.py::test_bulk_conformance.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import re
from pathlib import Path

import pytest
import responses
from responses.registries import OrderedRegistry

from aggregator.errors import ConnectorError, ProtocolError, RemoteNotFound
from connectors.base import NullProgress, PatientRef
from connectors.fhir_rest import COMPARTMENT, FhirConfig, FhirConnector, PullState
from connectors.http import HttpClient
from connectors.paging import Paginator
from tests.conformance import assert_connector_conforms
from tests.fakes.fhir_server import FakeFhirServer
from tests.fakes.recordings import load, register, register_one
from tests.support import make_sink

BASE = "http://127.0.0.1:8103/fhir/R4"
A = "ba5e1362-5dbd-47e6-bc4d-d19d1d1e8075"
B = "e3e7586e-7c02-4109-bb51-04a256251625"
MRN = "55940999-fd98-4922-b9bc-a6bf0c1855ed"



@pytest.fixture()
def no_sleep(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Replace only the sleep itself (Retry-After and backoff waits are recorded, not waited)."""
    slept: list[float] = []
    monkeypatch.setattr("time.sleep", slept.append)
    return slept


def connector(**kw: object) -> FhirConnector:
    return FhirConnector(FhirConfig(url=BASE, **kw))  # type: ignore[arg-type]


def pdf_bytes(recordings: Path) -> bytes:
    return load(recordings / "binary", "read-as-pdf")[0]["response"]["body"].encode("latin-1")


def presigned_urls(records: list[dict]) -> list[str]:
    urls = []
    for r in records:
        for e in (r["response"]["body"] or {}).get("entry", []):
            for c in e["resource"].get("content", []) if e["resource"]["resourceType"] == "DocumentReference" else []:
                urls.append(c["attachment"]["url"])
    return urls


def by_type(entries: list) -> collections.Counter:
    return collections.Counter(e.key.split("/")[0] for e in entries if e.kind == "resource" and e.state == "done")


def test_check_reports_version_and_interactions(recordings: Path) -> None:
    with responses.RequestsMock() as rsps:
        register(rsps, recordings / "capabilities", "metadata")
        result = connector().check()
    assert result.ok
    assert result.details["fhirVersion"] == "4.0.1"
    assert result.details["lastUpdated"] is True
    assert result.details["everything"] is None  # Medplum does not declare it (it serves it)
    assert result.details["export"] is True
    assert result.details["software"].startswith("medplum")


def test_check_reports_a_dead_server_as_not_ok(no_sleep: list[float]) -> None:
    result = FhirConnector(FhirConfig(url="http://127.0.0.1:9/fhir", connect_timeout=0.5)).check()
    assert not result.ok and "connection failed" in result.details["error"]
    assert len(no_sleep) == 4  # five attempts, backoff between them


def test_patient_lookup_by_identifier_and_by_name(recordings: Path) -> None:
    c = connector()
    with responses.RequestsMock(registry=OrderedRegistry) as rsps:
        register(rsps, recordings / "patient-match")
        assert c.resolve_patient(PatientRef(identifier=f"http://hospital.smarthealthit.org|{MRN}")) == A
        assert c.resolve_patient(PatientRef(name="Seth Lakin", birth_date="1931-04-18")) == A
        with pytest.raises(RemoteNotFound) as e1:
            c.resolve_patient(PatientRef(name="Lakin, Seth", birth_date="1931-04-19"))
        with pytest.raises(RemoteNotFound) as e2:
            c.resolve_patient(PatientRef(identifier="http://hospital.smarthealthit.org|00000000-0000-0000-0000-000000000000"))
    for err in (e1.value, e2.value):
        text = str(err)
        assert "no patient" in text
        assert "Lakin" not in text and "1931" not in text and "0000" not in text


def test_patient_lookup_several_matches_is_an_error_without_phi(recordings: Path) -> None:
    rec = load(recordings / "patient-match", "MRN")[0]
    bundle = rec["response"]["body"]
    bundle["entry"] = bundle["entry"] * 2
    with responses.RequestsMock() as rsps:
        rsps.add("GET", f"{BASE}/Patient", json=bundle)
        with pytest.raises(ConnectorError) as err:
            connector().resolve_patient(PatientRef(identifier=f"urn:x|{MRN}"))
    assert "2 patients" in str(err.value) and MRN not in str(err.value)


@pytest.mark.parametrize(("patient", "pattern", "expected"), [("A", "Patient-A", 816), ("B", "Patient-B", 216)])
def test_everything_paged_replay(recordings: Path, tmp_path: Path, patient: str, pattern: str, expected: int) -> None:
    pid = {"A": A, "B": B}[patient]
    h = make_sink(tmp_path, kind="fhir")
    with responses.RequestsMock(registry=OrderedRegistry) as rsps:
        register(rsps, recordings / "capabilities", "metadata")  # auto strategy reads /metadata first
        records = register(rsps, recordings / "everything-paged", pattern)
        urls = presigned_urls(records)
        for url in urls:  # the recording's presigned link to the same Binary, serving the recorded PDF
            rsps.add("GET", url, body=pdf_bytes(recordings), content_type="application/pdf")
        cursor = connector(page_size=50).pull(PatientRef(id=pid), None, h.sink, NullProgress())
    entries = h.entries()
    resources = [e for e in entries if e.kind == "resource"]
    assert len(resources) == expected and all(e.state == "done" for e in resources)
    assert h.sink.method == "$everything"
    assert all(e.meta["base_url"] == BASE for e in resources)
    if patient == "A":
        assert by_type(entries)["Observation"] == 414
        assert by_type(entries)["DiagnosticReport"] == 31
        (binary,) = [e for e in entries if e.kind == "binary"]
        assert binary.state == "done" and binary.key == urls[0]
        assert binary.sha256 == hashlib.sha256(pdf_bytes(recordings)).hexdigest()
    # No server clock in the recordings (no Date header, no Bundle.meta): the cursor stays put.
    assert cursor == {}


def test_everything_since_sends_the_cursor_and_takes_the_change(recordings: Path, tmp_path: Path) -> None:
    h = make_sink(tmp_path, kind="fhir")
    with responses.RequestsMock(registry=OrderedRegistry) as rsps:  # the full pull first
        records = register(rsps, recordings / "everything-paged", "Patient-A")
        for url in presigned_urls(records):
            rsps.add("GET", url, body=pdf_bytes(recordings), content_type="application/pdf")
        connector(strategy="everything", page_size=50).pull(PatientRef(id=A), None, h.sink, NullProgress())
    # $everything's _since must hold for every compartment type: a type without a cursor was
    # never fetched completely, and would make the pull a full one.
    since = {t: {"since": "2026-11-24T16:03:35Z"} for t in [*COMPARTMENT, "Patient"]}
    recs = load(recordings / "everything-since")
    with responses.RequestsMock(registry=OrderedRegistry) as rsps:
        register_one(rsps, recs[0], loose_query=True)
        sink = h.new_sink()
        connector(strategy="everything").pull(PatientRef(id=A), since, sink, NullProgress())
        assert sink.counts["done"] == 0
        register_one(rsps, recs[3], loose_query=True)
        sink = h.new_sink()
        connector(strategy="everything").pull(PatientRef(id=A), since, sink, NullProgress())
        sent = [str(c.request.url) for c in rsps.calls]
    assert sink.counts == {"done": 1, "failed": 0, "skipped": 0}
    (obs,) = [e for e in h.entries() if e.attempts == 2]
    assert obs.key == "Observation/3418458f-613f-4f8d-b59d-53144ffc0357" and obs.state == "done"
    assert all("_since=2026-11-24T16%3A03%3A35Z" in u for u in sent)


def _crawl_registry(rsps: responses.RequestsMock, recordings: Path, skip: tuple[str, ...] = ()) -> list[dict]:
    """Recorded crawl pages; other compartment types and unrecorded reads answered by own fakes."""
    records = [r for r in load(recordings / "crawl-by-type") if "patient=" + A in r["request"]["url"]
               and "_include" not in r["request"]["url"] and "_lastUpdated" not in r["request"]["url"]
               and not any(s in r["request"]["url"] for s in skip)]
    for r in records:
        register_one(rsps, r)
    register_one(rsps, load(recordings / "conditional-read", "Patient-read.json")[0])
    for url in presigned_urls(records):
        rsps.add("GET", url, body=pdf_bytes(recordings), content_type="application/pdf")
    not_found = load(recordings / "errors", "not-found.json")[0]["response"]["body"]
    empty = load(recordings / "crawl-by-type", "ImagingStudy-search-page01")[0]["response"]["body"]

    def other(request):  # type: ignore[no-untyped-def]
        path = request.path_url.split("?")[0]
        if path.count("/") == 3:  # a search on a type the recording did not cover
            return 200, {"Content-Type": "application/fhir+json"}, json.dumps(empty)
        return 404, {"Content-Type": "application/fhir+json"}, json.dumps(not_found)

    rsps.add_callback("GET", re.compile(rf"{re.escape(BASE)}/.*"), callback=other)
    return records


def test_crawl_by_type_replay_with_hydration_failures(recordings: Path, tmp_path: Path) -> None:
    h = make_sink(tmp_path, kind="fhir")
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        register(rsps, recordings / "capabilities", "metadata")
        _crawl_registry(rsps, recordings)
        connector(strategy="crawl").pull(PatientRef(id=A), None, h.sink, NullProgress())
        reads = [str(c.request.url) for c in rsps.calls if "/Practitioner/" in str(c.request.url)]
    entries = h.entries()
    counts = by_type(entries)
    assert h.sink.method == "crawl"
    assert counts["Observation"] == 414 and counts["Condition"] == 9 and counts["DiagnosticReport"] == 31
    assert counts["Encounter"] == 74 and counts["Procedure"] == 17 and counts["MedicationRequest"] == 49
    assert counts["DocumentReference"] == 1 and counts["Patient"] == 1
    # Referenced Practitioners/Organizations were not in the crawl: each read once; 404 -> ledger failure.
    failed = [e for e in entries if e.state == "failed"]
    assert failed and all(e.kind == "resource" and e.status == "404" for e in failed)
    assert {e.key.split("/")[0] for e in failed} <= {"Practitioner", "Organization", "Medication", "Specimen",
                                                     "PractitionerRole", "Encounter"}
    assert all("not-found: Not found" in (e.reason or "") for e in failed)
    assert reads and len(reads) == len(set(reads))
    assert next(e for e in entries if e.kind == "binary").state == "done"


def test_crawl_failed_search_is_a_ledger_failure_and_keeps_its_cursor(recordings: Path, tmp_path: Path) -> None:
    h = make_sink(tmp_path, kind="fhir")
    bad = load(recordings / "errors", "unknown-param")[0]["response"]["body"]
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        register(rsps, recordings / "capabilities", "metadata")
        rsps.add("GET", f"{BASE}/Condition", json=bad, status=400, content_type="application/fhir+json")
        _crawl_registry(rsps, recordings, skip=("Condition?",))
        connector(strategy="crawl").pull(PatientRef(id=A), {"Condition": {"since": "2020-01-01T00:00:00Z"}},
                                         h.sink, NullProgress())
    (failed,) = [e for e in h.entries() if e.kind == "query"]
    assert failed.key == "query:Condition" and failed.status == "400"
    assert "invalid: Unknown search parameter: foo" in (failed.reason or "")


def test_crawl_incremental_uses_lastUpdated_ge(recordings: Path, tmp_path: Path) -> None:
    rec = load(recordings / "crawl-by-type", "lastUpdated-ge")[0]
    h = make_sink(tmp_path, kind="fhir")
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        register(rsps, recordings / "capabilities", "metadata")
        register_one(rsps, rec)
        _crawl_registry(rsps, recordings, skip=("Observation?",))
        connector(strategy="crawl").pull(PatientRef(id=A), {"Observation": {"since": "2026-11-24T16:03:35Z"}},
                                         h.sink, NullProgress())
        sent = [str(c.request.url) for c in rsps.calls]
    assert by_type(h.entries())["Observation"] == 1
    assert any("_lastUpdated=ge2026-11-24T16" in u for u in sent)


def test_offset_cap_switches_to_lastupdated_cursor_paging(recordings: Path) -> None:
    recs = load(recordings / "offset-cap-quirk")
    client = HttpClient(BASE)
    with responses.RequestsMock(registry=OrderedRegistry) as rsps:
        for r in recs[1:]:
            register_one(rsps, r)
        # page 2 of the cursor run points at a page the recording does not hold: end it there
        last = recs[4]["response"]["body"]["link"][-1]["url"]
        rsps.add("GET", last, json={"resourceType": "Bundle", "type": "searchset", "link": []})
        pager = Paginator(client, recs[1]["request"]["url"])
        keys = [f"{e['resource']['resourceType']}/{e['resource']['id']}" for p in pager
                for e in p.bundle.get("entry", [])]
        restart = str(rsps.calls[2].request.url)
    assert pager.switched
    assert len(keys) == len(set(keys))
    expected = set()
    for r in (recs[1], recs[3], recs[4]):
        expected |= {f"Observation/{e['resource']['id']}" for e in r["response"]["body"]["entry"]}
    assert set(keys) == expected
    assert "_sort=_lastUpdated" in restart and "_offset" not in restart


def test_next_link_loop_is_refused() -> None:
    with FakeFhirServer(n_obs=5) as srv:
        srv.loop_links = True
        with pytest.raises(ProtocolError, match="loop"):
            list(Paginator(HttpClient(srv.url), "Observation", [("patient", "p0")]))


def test_binary_relative_native_then_hash_check(recordings: Path, tmp_path: Path) -> None:
    docref = load(recordings / "binary", "DocumentReference-create")[0]["request"]["body"]
    pdf = pdf_bytes(recordings)
    import base64

    good = dict(docref, id="good")
    bad = json.loads(json.dumps(docref))
    bad["id"] = "bad"
    bad["content"][0]["attachment"]["url"] = "Binary/other"
    bad["content"][0]["attachment"]["hash"] = base64.b64encode(hashlib.sha1(b"not it").digest()).decode()
    good["content"][0]["attachment"]["hash"] = base64.b64encode(hashlib.sha1(pdf).digest()).decode()
    bundle = {"resourceType": "Bundle", "type": "searchset", "entry": [{"resource": good}, {"resource": bad}]}
    h = make_sink(tmp_path, kind="fhir")
    with responses.RequestsMock() as rsps:
        rsps.add("GET", f"{BASE}/Patient/{A}/$everything", json=bundle)
        register(rsps, recordings / "binary", "read-as-pdf")
        rsps.add("GET", f"{BASE}/Binary/other", body=pdf, content_type="application/pdf")
        connector(strategy="everything").pull(PatientRef(id=A), None, h.sink, NullProgress())
        accept = rsps.calls[1].request.headers["Accept"]
    binaries = {e.key: e for e in h.entries() if e.kind == "binary"}
    assert binaries[good["content"][0]["attachment"]["url"]].state == "done"
    assert binaries["Binary/other"].state == "failed" and binaries["Binary/other"].status == "hash-mismatch"
    assert accept == "application/pdf"


def test_binary_fallback_to_fhir_json(recordings: Path, tmp_path: Path) -> None:
    """406 on the native type -> FHIR JSON Binary; Medplum's has no data -> a ledger failure;
    a Binary with base64 data is decoded."""
    docref = load(recordings / "binary", "DocumentReference-create")[0]["request"]["body"]
    import base64

    other = json.loads(json.dumps(docref))
    other["id"] = "inline"
    other["content"][0]["attachment"]["url"] = "Binary/withdata"
    h = make_sink(tmp_path, kind="fhir")
    bundle = {"resourceType": "Bundle", "type": "searchset", "entry": [{"resource": dict(docref, id="x")},
                                                                      {"resource": other}]}
    with responses.RequestsMock() as rsps:
        rsps.add("GET", f"{BASE}/Patient/{A}/$everything", json=bundle)
        url = f"{BASE}/{docref['content'][0]['attachment']['url']}"
        rsps.add("GET", url, status=406, json={"resourceType": "OperationOutcome", "issue": []})
        register(rsps, recordings / "binary", "read-as-fhir-json")
        rsps.add("GET", f"{BASE}/Binary/withdata", json={"resourceType": "Binary", "contentType": "text/plain",
                                                         "data": base64.b64encode(b"hello").decode()},
                 content_type="application/fhir+json")
        connector(strategy="everything").pull(PatientRef(id=A), None, h.sink, NullProgress())
    binaries = {e.key: e for e in h.entries() if e.kind == "binary"}
    assert binaries[docref["content"][0]["attachment"]["url"]].state == "failed"
    assert "no data" in (binaries[docref["content"][0]["attachment"]["url"]].reason or "")
    done = binaries["Binary/withdata"]
    assert done.state == "done" and done.sha256 == hashlib.sha256(b"hello").hexdigest()
    assert done.content_type == "text/plain"


def test_conditional_read_304_is_not_re_emitted(recordings: Path, tmp_path: Path) -> None:
    h = make_sink(tmp_path, kind="fhir")
    recs = load(recordings / "conditional-read")
    etag = recs[0]["response"]["headers"]["ETag"]
    c = connector(strategy="crawl")
    with responses.RequestsMock(registry=OrderedRegistry) as rsps:
        register_one(rsps, recs[0])
        register_one(rsps, recs[1])
        state = PullState(BASE, {})
        c._read_patient(A, state, h.sink)
        assert state.etags["Patient"] == etag
        state2 = PullState(BASE, {"Patient": {"since": "2026-11-24T16:00:00Z", "etag": etag}})
        c._read_patient(A, state2, h.new_sink())  # the next pull gets a sink of its own
        sent_etag = rsps.calls[1].request.headers["If-None-Match"]
    assert state2.unchanged == 1 and h.sink.counts["done"] == 0
    assert len(h.entries("done")) == 1
    assert sent_etag == etag


def test_fake_server_incremental_and_conformance(tmp_path: Path) -> None:
    with FakeFhirServer(n_obs=130) as srv:
        for strategy in ("everything", "crawl"):
            def make(s: str = strategy) -> FhirConnector:
                return FhirConnector(FhirConfig(url=srv.url, strategy=s, page_size=40))

            report = assert_connector_conforms(
                make,
                PatientRef(id="p0"), tmp_path / strategy, kind="fhir", min_done=130)
            assert report.second_counts["done"] == 0  # nothing changed: nothing transferred again
        h = make_sink(tmp_path / "changes", kind="fhir")
        c = FhirConnector(FhirConfig(url=srv.url, page_size=40))
        cursor = c.pull(PatientRef(id="p0"), None, h.sink, NullProgress())
        srv.update("Observation/o0-7", status="amended")
        sink2 = h.new_sink()
        c.pull(PatientRef(id="p0"), cursor, sink2, NullProgress())
        assert sink2.counts["done"] == 1
        assert [e.key for e in h.entries() if e.attempts == 2] == ["Observation/o0-7"]


def test_lookup_failure_logs_no_search_values(recordings: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        register(rsps, recordings / "patient-match", "zero-matches")
        with pytest.raises(RemoteNotFound):
            connector().resolve_patient(PatientRef(name="Seth Lakin", birth_date="1931-04-19"))
    assert caplog.records
    assert "Lakin" not in caplog.text and "1931" not in caplog.text


def test_document_search_and_presigned_download_replay(recordings: Path, tmp_path: Path) -> None:
    """binary/0003 (the DocumentReference search) and 0006 (its presigned attachment URL)."""
    search = load(recordings / "binary", "DocumentReference-search")[0]
    download = load(recordings / "binary", "attachment-url-download")[0]
    h = make_sink(tmp_path, kind="fhir")
    c = connector()
    state = PullState(BASE, {}, patient_id=A)
    with responses.RequestsMock(registry=OrderedRegistry) as rsps:
        register_one(rsps, search, loose_query=True)
        register_one(rsps, download)
        for page in Paginator(c.client, "DocumentReference", [("patient", A)]):
            c._take_page(page, state, h.sink, NullProgress())
        c.fetch_attachments(state, h.sink, NullProgress())
        sent_token = rsps.calls[1].request.headers.get("Authorization")
    (binary,) = [e for e in h.entries() if e.kind == "binary"]
    assert binary.state == "done" and binary.key == download["request"]["url"]
    assert binary.sha256 == hashlib.sha256(download["response"]["body"].encode("latin-1")).hexdigest()
    assert binary.content_type == "application/pdf" and sent_token is None


def test_include_page_and_patient_b_imaging_replay(recordings: Path, tmp_path: Path) -> None:
    """crawl-by-type/0014 (_include: 31 matches + 322 included Observations in one page) and
    0015 (ImagingStudy for patient B): every entry, match or include, reaches the sink once."""
    include = load(recordings / "crawl-by-type", "include-result")[0]
    imaging = load(recordings / "crawl-by-type", "patientB")[0]
    h = make_sink(tmp_path, kind="fhir")
    c = connector()
    state = PullState(BASE, {}, patient_id=A)
    with responses.RequestsMock() as rsps:
        register_one(rsps, include)
        register_one(rsps, imaging)
        for url in (include["request"]["url"], imaging["request"]["url"]):
            for page in Paginator(c.client, url):
                c._take_page(page, state, h.sink, NullProgress())
    counts = by_type(h.entries())
    assert counts == {"DiagnosticReport": 31, "Observation": 322, "ImagingStudy": 2}


def test_conditional_read_stale_etag_and_observation_replay(recordings: Path) -> None:
    """conditional-read/0003-0005: a stale ETag gets the resource again; the amended
    Observation's current ETag gets a 304."""
    recs = load(recordings / "conditional-read")
    c = connector()
    with responses.RequestsMock(registry=OrderedRegistry) as rsps:
        for r in recs[2:]:
            register_one(rsps, r)
        stale = c.client.request("GET", recs[2]["request"]["url"],
                                 headers={"If-None-Match": recs[2]["request"]["headers"]["If-None-Match"]})
        obs, resp = c.client.get_json(recs[3]["request"]["url"])
        again = c.client.request("GET", recs[4]["request"]["url"], headers={"If-None-Match": resp.headers["ETag"]})
    assert stale.status_code == 200 and stale.json()["id"] == A
    assert obs["resourceType"] == "Observation" and again.status_code == 304


def test_bearer_check_proves_the_token_on_a_live_server(monkeypatch: pytest.MonkeyPatch) -> None:
    with FakeFhirServer(n_obs=1, token="right") as srv:
        monkeypatch.setenv("FHIR_TOKEN", "right")
        good = FhirConnector(FhirConfig(url=srv.url, auth="bearer", token_env="FHIR_TOKEN")).check()
        monkeypatch.setenv("FHIR_TOKEN", "wrong")
        bad = FhirConnector(FhirConfig(url=srv.url, auth="bearer", token_env="FHIR_TOKEN")).check()
        monkeypatch.setenv("FHIR_TOKEN", "right")
        srv.inject(r"/Patient\?_summary=count", "status", 403)
        denied = FhirConnector(FhirConfig(url=srv.url, auth="bearer", token_env="FHIR_TOKEN")).check()
        probes = [p for m, p in srv.log if "_summary=count" in p]
    assert good.ok and good.details["auth_ok"] is True
    assert not bad.ok and bad.details["auth_ok"] is False and bad.details["status"] == 401
    assert not denied.ok and denied.details["auth_ok"] is False and denied.details["status"] == 403
    assert "wrong" not in json.dumps(bad.details)
    assert len(probes) == 4  # one each, plus the single 401 retry of the wrong token


def test_paginator_drops_repeats_within_a_search() -> None:
    """Offset pages shift when data changes mid-search: a resource seen on an earlier page is
    not handed on twice (the connector keeps no per-pull key set of its own)."""
    with FakeFhirServer(n_obs=30) as srv:
        pager = Paginator(HttpClient(srv.url), "Observation", [("patient", "p0"), ("_count", "10")])
        keys = []
        for i, page in enumerate(pager):
            keys += [e["resource"]["id"] for e in page.bundle["entry"]]
            if i == 0:  # a new resource sorts first: everything shifts one place down
                with srv.lock:
                    srv._put({"resourceType": "Observation", "id": "new", "subject": {"reference": "Patient/p0"}})
                    srv.resources = {"Observation/new": srv.resources.pop("Observation/new"), **srv.resources}
    assert len(keys) == len(set(keys)) == 30 and pager.repeats == 1
