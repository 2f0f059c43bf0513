"""FHIR pulls on servers that refuse parts of the protocol, against the local FHIR server.

- Bulk kick-off answered 429 / 503 with Retry-After: sent again after the wait (no job exists
  after those answers); a dropped connection or a 500 is not (a job may exist).
- No patient-level export (404): the group export when ``group_id`` is set, else the REST API;
  the pull's method and a ``skipped`` ledger row say which was used.
- A token endpoint that refuses ``system/*.read`` (403): the scopes advertised in
  ``.well-known/smart-configuration`` decide what is asked for instead (SMART v2 ``system/*.rs``).
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import cast

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from aggregator.errors import AuthError, RemoteNotFound
from connectors.base import NullProgress, PatientRef
from connectors.fhir_bulk import ExportFailed, FhirBulkConfig, FhirBulkConnector
from connectors.fhir_rest import FhirConfig, FhirConnector
from connectors.smart import SmartBackendAuth, advertised_scopes
from tests.fakes.fhir_server import FakeFhirServer
from tests.support import SinkHarness, make_sink


@pytest.fixture()
def slept(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    waits: list[float] = []
    monkeypatch.setattr("time.sleep", waits.append)
    monkeypatch.setattr("connectors.fhir_bulk.pause", lambda seconds, cancel: waits.append(seconds) or cancel.is_set())
    return waits


def kickoffs(srv: FakeFhirServer) -> list[str]:
    return [p.split("?")[0] for _, p in srv.log if "$export" in p]


def done_keys(h: SinkHarness) -> set[str]:
    return {r.key for r in h.entries("done") if r.kind == "resource"}


# -- kick-off retries -----------------------------------------------------------------------


def test_kickoff_429_and_503_are_retried_after_retry_after(tmp_path: Path, slept: list[float]) -> None:
    with FakeFhirServer(n_obs=10) as srv:
        srv.inject(r"/Patient/p0/\$export", "status", (429, 7))
        srv.inject(r"/Patient/p0/\$export", "status", (503, 3))
        h = make_sink(tmp_path, kind="fhir-bulk")
        cursor = FhirBulkConnector(FhirBulkConfig(url=srv.url)).pull(PatientRef(id="p0"), None, h.sink,
                                                                     NullProgress())
        assert kickoffs(srv) == ["/fhir/Patient/p0/$export"] * 3
        assert list(srv.jobs) == ["job1"] and srv.deleted_jobs == ["job1"]  # one job, cleaned up
    # the two Retry-After waits, then the status poll's own Retry-After: 1
    assert slept == [7.0, 3.0, 1.0]
    assert {"Patient/p0", "Observation/o0-9"} <= done_keys(h)
    assert not h.entries("failed") and h.sink.method == "$export"
    assert "Observation" in cursor


def test_kickoff_without_retry_after_backs_off_and_gives_up(tmp_path: Path, slept: list[float]) -> None:
    with FakeFhirServer(n_obs=3) as srv:
        srv.inject(r"/\$export", "status", 503, times=5)
        h = make_sink(tmp_path, kind="fhir-bulk")
        c = FhirBulkConnector(FhirBulkConfig(url=srv.url))
        with pytest.raises(ExportFailed, match="kick-off failed: HTTP 503"):
            c.pull(PatientRef(id="p0"), None, h.sink, NullProgress())
        assert len(kickoffs(srv)) == c.client.max_attempts == 5
        assert srv.jobs == {}
    assert len(slept) == 4 and all(0 < w <= 30 for w in slept)
    (row,) = h.entries("failed")
    assert row.key == "query:$export" and row.status == "503"


@pytest.mark.parametrize("fault", ["reset", 500])
def test_kickoff_is_not_resent_when_a_job_may_exist(tmp_path: Path, slept: list[float], fault: object) -> None:
    """A dropped connection or a 500 says nothing about whether a job was started."""
    with FakeFhirServer(n_obs=3) as srv:
        if fault == "reset":
            srv.inject(r"/\$export", "reset")
        else:
            srv.inject(r"/\$export", "status", fault)
        h = make_sink(tmp_path, kind="fhir-bulk")
        with pytest.raises(ExportFailed):
            FhirBulkConnector(FhirBulkConfig(url=srv.url)).pull(PatientRef(id="p0"), None, h.sink, NullProgress())
        assert len(kickoffs(srv)) == 1
    assert slept == []


# -- export levels and the REST fallback ---------------------------------------------------


def test_patient_export_404_uses_the_group_and_says_so(tmp_path: Path, slept: list[float]) -> None:
    with FakeFhirServer(patients=2, n_obs=10) as srv:
        h = make_sink(tmp_path, kind="fhir-bulk")
        c = FhirBulkConnector(FhirBulkConfig(url=srv.url, group_id="all"))
        assert "Patient" in c.capabilities().export_types  # declared ...
        srv.export_levels = ("Group",)  # ... but answered 404
        c.pull(PatientRef(id="p1"), None, h.sink, NullProgress())
        assert kickoffs(srv) == ["/fhir/Patient/p1/$export", "/fhir/Group/all/$export"]
    assert h.sink.method == "Group/$export"
    (note,) = [r for r in h.entries("skipped") if r.kind == "query"]
    assert note.key == "query:Patient/$export"
    assert note.reason == "Patient/$export not served here (HTTP 404); pulled with Group/$export instead"
    assert not h.entries("failed")
    keys = done_keys(h)
    assert {k for k in keys if k.startswith("Patient/")} == {"Patient/p1"}
    assert len([k for k in keys if k.startswith("Observation/o1-")]) == 10


@pytest.mark.parametrize("group", [None, "all"])
def test_no_export_at_all_falls_back_to_rest(tmp_path: Path, slept: list[float], group: str | None) -> None:
    """Neither level served (404): the REST API ($everything) brings the record, and says so."""
    with FakeFhirServer(n_obs=12) as srv:
        srv.export_levels = ()
        h = make_sink(tmp_path, kind="fhir-bulk")
        c = FhirBulkConnector(FhirBulkConfig(url=srv.url, group_id=group))
        cursor = c.pull(PatientRef(id="p0"), None, h.sink, NullProgress())
        everything = [p for _, p in srv.log if "$everything" in p]
        srv.clock = lambda: datetime(2030, 1, 1, tzinfo=UTC)
        again = FhirBulkConnector(FhirBulkConfig(url=srv.url, group_id=group))
        again.pull(PatientRef(id="p0"), cursor, h.new_sink(), NullProgress())
        since_sent = [p for _, p in srv.log if "$everything" in p][len(everything):]
    assert len(everything) == 1
    assert h.sink.method == "$everything"
    notes = {r.key: r.reason for r in h.entries("skipped") if r.kind == "query"}
    if group:  # /metadata declares no Patient-level $export either: only the group is tried
        assert notes == {
            "query:Group/$export": "Group/$export not served here (HTTP 404); pulled with the REST API instead"}
    else:
        assert notes == {
            "query:Patient/$export": "Patient/$export not served here (HTTP 404); pulled with the REST API instead"}
    keys = done_keys(h)
    assert "Patient/p0" in keys and len([k for k in keys if k.startswith("Observation/")]) == 12
    assert "DocumentReference/d0" in keys and any(r.kind == "binary" for r in h.entries("done"))
    assert not h.entries("failed")
    # the REST pull's cursor serves the next pull: only changes are asked for
    assert len(since_sent) == 1 and "_since=" in since_sent[0]


def test_a_forced_patient_level_is_not_replaced(tmp_path: Path, slept: list[float]) -> None:
    with FakeFhirServer(n_obs=3) as srv:
        srv.export_levels = ()
        h = make_sink(tmp_path, kind="fhir-bulk")
        with pytest.raises(RemoteNotFound):
            FhirBulkConnector(FhirBulkConfig(url=srv.url, export_level="patient")).pull(
                PatientRef(id="p0"), None, h.sink, NullProgress())
        assert not [p for _, p in srv.log if "$everything" in p]
    (row,) = h.entries("failed")
    assert row.key == "query:$export" and row.status == "404"


# -- SMART scopes --------------------------------------------------------------------------


def private_key(tmp_path: Path) -> str:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    path = tmp_path / "key.pem"
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    return str(path)


def smart_bulk(srv: FakeFhirServer, tmp_path: Path, **kw: object) -> FhirBulkConnector:
    return FhirBulkConnector(FhirBulkConfig(url=srv.url, auth="smart-backend", client_id="agg",
                                            private_key=private_key(tmp_path), **kw))  # type: ignore[arg-type]


def test_refused_v1_scope_leads_to_the_advertised_v2_scope(tmp_path: Path, slept: list[float]) -> None:
    """The token endpoint refuses system/*.read (403); smart-configuration advertises SMART v2,
    so system/*.rs is asked for, and the export runs with that token."""
    with FakeFhirServer(n_obs=5, token="tok-v2") as srv:
        srv.smart(["permission-v2", "client-confidential-asymmetric"], ["system/*.rs", "patient/*.rs"])
        srv.refused_scopes = frozenset({"system/*.read"})
        token_url = cast(dict, srv.smart_configuration)["token_endpoint"]
        # token URL given: smart-configuration is read only once the first scope is refused
        h = make_sink(tmp_path, kind="fhir-bulk")
        c = smart_bulk(srv, tmp_path, token_url=token_url)
        c.pull(PatientRef(id="p0"), None, h.sink, NullProgress())
        assert srv.token_scopes == ["system/*.read", "system/*.rs"]
        assert cast(SmartBackendAuth, c.client.auth).scope == "system/*.rs"
        # without a token URL, smart-configuration is read first: v2 is asked for at once
        srv.token_scopes.clear()
        (tmp_path / "b").mkdir()
        c = smart_bulk(srv, tmp_path)
        c.pull(PatientRef(id="p0"), None, make_sink(tmp_path / "b", kind="fhir-bulk").sink, NullProgress())
        assert srv.token_scopes == ["system/*.rs"]
    assert {"Patient/p0", "Observation/o0-4"} <= done_keys(h)


def test_check_reports_the_scope_it_was_granted(tmp_path: Path) -> None:
    with FakeFhirServer(n_obs=1, token="tok") as srv:
        srv.smart(["permission-v1", "permission-v2"], ["system/*.rs", "system/*.read"])
        srv.refused_scopes = frozenset({"system/*.read"})
        result = FhirConnector(FhirConfig(url=srv.url, auth="smart-backend", client_id="agg",
                                          private_key=private_key(tmp_path))).check()
        assert srv.token_scopes == ["system/*.read", "system/*.rs"]
    assert result.ok and result.details["auth_ok"] and result.details["scope"] == "system/*.rs"


def test_a_v1_only_server_keeps_the_v1_scope_and_reports_the_refusal(tmp_path: Path) -> None:
    with FakeFhirServer(n_obs=1, token="tok") as srv:
        srv.smart(["permission-v1"], ["system/*.read", "patient/*.read"])
        srv.refused_scopes = frozenset({"system/*.read"})
        c = FhirConnector(FhirConfig(url=srv.url, auth="smart-backend", client_id="agg",
                                     private_key=private_key(tmp_path)))
        with pytest.raises(AuthError, match=r"token request refused: HTTP 403.*invalid_scope"):
            c.client.auth.headers()
        assert srv.token_scopes == ["system/*.read"]  # v2 is not advertised: not tried


def test_an_explicit_scope_is_sent_as_given(tmp_path: Path) -> None:
    with FakeFhirServer(n_obs=1, token="tok") as srv:
        srv.smart(["permission-v2"], ["system/*.rs"])
        srv.refused_scopes = frozenset({"system/Observation.read"})
        c = FhirConnector(FhirConfig(url=srv.url, auth="smart-backend", client_id="agg",
                                     private_key=private_key(tmp_path), scope="system/Observation.read"))
        with pytest.raises(AuthError):
            c.client.auth.headers()
        assert srv.token_scopes == ["system/Observation.read"]


@pytest.mark.parametrize(("doc", "expected"), [
    ({"capabilities": ["permission-v1", "permission-v2"]}, ["system/*.read", "system/*.rs"]),
    ({"capabilities": ["permission-v2"]}, ["system/*.rs"]),
    ({"capabilities": ["permission-v1"]}, ["system/*.read"]),
    ({"scopes_supported": ["patient/*.rs", "user/*.cruds"]}, ["system/*.rs"]),
    ({"scopes_supported": ["patient/*.read", "user/*.*"]}, ["system/*.read"]),
    ({"scopes_supported": ["openid", "launch"]}, ["system/*.read", "system/*.rs"]),
    (None, ["system/*.read", "system/*.rs"]),
])
def test_advertised_scopes(doc: dict | None, expected: list[str]) -> None:
    assert advertised_scopes(doc) == expected
