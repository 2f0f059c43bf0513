"""The per-type crawl runs its type searches concurrently, under the endpoint's cap, with the
same result as one search after another (the local fake FHIR server, real HTTP)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest

from connectors.base import Cursor, NullProgress, PatientRef
from connectors.fhir_rest import FhirConfig, FhirConnector
from tests.fakes.fhir_server import FakeFhirServer
from tests.support import SinkHarness, make_sink

#: compartment types given data on top of the fake's Observations and DocumentReference
EXTRA_TYPES = ("Condition", "Procedure", "Encounter", "MedicationRequest", "DiagnosticReport", "AllergyIntolerance",
               "Immunization", "CarePlan")


def server_with_types(delay: float) -> FakeFhirServer:
    srv = FakeFhirServer(n_obs=45, delay=delay)
    for rtype in EXTRA_TYPES:
        for i in range(7):
            srv._put({"resourceType": rtype, "id": f"{rtype.lower()}-{i}", "subject": {"reference": "Patient/p0"}})
    return srv


def crawl(srv: FakeFhirServer, tmp_path: Path, concurrency: int) -> tuple[SinkHarness, Cursor]:
    h = make_sink(tmp_path, kind="fhir")
    conn = FhirConnector(FhirConfig(url=srv.url, strategy="crawl", page_size=5, concurrency=concurrency))
    try:
        cursor = conn.pull(PatientRef(id="p0"), None, h.sink, NullProgress())
    finally:
        conn.close()
    return h, cursor


def ledger(h: SinkHarness) -> set[tuple[Any, ...]]:
    """Every ledger row as (kind, key, state, status, sha256 of the stored bytes)."""
    rows = set()
    for e in h.entries():
        digest = hashlib.sha256(h.read(e)).hexdigest() if e.state == "done" else None
        rows.add((e.kind, e.key, e.state, e.status, digest))
    return rows


def test_concurrent_crawl_equals_the_sequential_one_within_the_cap(tmp_path: Path) -> None:
    with server_with_types(delay=0.02) as srv:
        one, cursor_one = crawl(srv, tmp_path / "one", 1)
        assert srv.max_in_flight == 1
        srv.max_in_flight = 0
        many, cursor_many = crawl(srv, tmp_path / "many", 3)
        # the type searches did overlap, never more than the endpoint's cap
        assert srv.max_in_flight == 3
    rows = ledger(one)
    assert rows == ledger(many)
    assert len([r for r in rows if r[0] == "resource"]) == 1 + 45 + 1 + 7 * len(EXTRA_TYPES) + 1  # + the Practitioner
    assert sorted(cursor_one) == sorted(cursor_many)
    assert {k: set(v) for k, v in cursor_one.items()} == {k: set(v) for k, v in cursor_many.items()}


def test_a_failed_type_search_fails_only_that_type(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("time.sleep", lambda s: None)
    with server_with_types(delay=0.0) as srv:
        srv.inject(r"^/fhir/Condition\?", "status", 500)  # not retried: the search fails
        h, cursor = crawl(srv, tmp_path, 4)
    failed = {e.key: e for e in h.entries("failed")}
    assert set(failed) == {"query:Condition"}
    done = {e.key for e in h.entries("done")}
    assert not any(k.startswith("Condition/") for k in done)
    assert {f"Procedure/procedure-{i}" for i in range(7)} <= done
    assert len([k for k in done if k.startswith("Observation/")]) == 45
    assert "Condition" not in cursor and "Procedure" in cursor


def test_an_error_in_the_caller_stops_the_searches(tmp_path: Path) -> None:
    """A sink that fails (a job's cancel, a full disk) ends the crawl at once; no lane lingers."""
    import threading

    class Stop(BaseException):
        pass

    with server_with_types(delay=0.02) as srv:
        h = make_sink(tmp_path, kind="fhir")
        seen = [0]
        real = h.sink.resource

        def resource(res: dict[str, Any], **kw: Any) -> None:
            seen[0] += 1
            if seen[0] == 10:
                raise Stop
            real(res, **kw)

        h.sink.resource = resource  # type: ignore[method-assign]
        conn = FhirConnector(FhirConfig(url=srv.url, strategy="crawl", page_size=5, concurrency=4))
        with pytest.raises(Stop):
            conn.pull(PatientRef(id="p0"), None, h.sink, NullProgress())
        conn.close()
        sent = len(srv.log)
        threading.Event().wait(0.3)
        assert len(srv.log) == sent  # nothing asked for after the crawl stopped
    assert not [t for t in threading.enumerate() if t.name.startswith("fhir-crawl")]
