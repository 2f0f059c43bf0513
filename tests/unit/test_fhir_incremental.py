"""Incremental FHIR pulls against the local FHIR server, three pulls in a row.

Each pull must ask only for what changed since the start of the previous complete pull: the
``_since`` ($everything, Bulk ``$export``) and ``_lastUpdated=ge`` (crawl) sent must move
forward every time, and the second and third pulls send only the requests that bring changes.
The server's clock is set by the test (its ``Date`` header, ``meta.lastUpdated`` and the export
``transactionTime`` follow it), so time moves by hours without any waiting.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from connectors.base import Cursor, NullProgress, PatientRef
from connectors.fhir_bulk import FhirBulkConfig, FhirBulkConnector
from connectors.fhir_rest import COMPARTMENT, FhirConfig, FhirConnector
from tests.fakes.fhir_server import FakeFhirServer
from tests.support import SinkHarness, make_sink

T0 = datetime(2026, 3, 2, 8, 0, 0, tzinfo=UTC)


def stamp(when: datetime) -> str:
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


@pytest.fixture()
def slept(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    waits: list[float] = []
    monkeypatch.setattr("time.sleep", waits.append)
    monkeypatch.setattr("connectors.fhir_bulk.pause", lambda seconds, cancel: waits.append(seconds) or cancel.is_set())
    return waits


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def query(path: str) -> dict[str, str]:
    return {k: v[-1] for k, v in parse_qs(urlsplit(path).query).items()}


def run_pull(srv: FakeFhirServer, make: Callable[[], FhirConnector], cursor: Cursor | None,
             h: SinkHarness) -> tuple[Cursor, list[tuple[str, str]]]:
    """One pull on a fresh connector and sink; returns its cursor and the requests it sent."""
    first = len(srv.log)
    c = make()
    try:
        sink = h.sink if cursor is None else h.new_sink()
        new = c.pull(PatientRef(id="p0"), cursor, sink, NullProgress())
    finally:
        c.close()
    return new, srv.log[first:]


def test_everything_since_moves_to_the_start_of_each_previous_pull(tmp_path: Path) -> None:
    with FakeFhirServer(n_obs=30) as srv:
        clock = srv.clock = Clock(T0)
        h = make_sink(tmp_path, kind="fhir")

        def make() -> FhirConnector:
            return FhirConnector(FhirConfig(url=srv.url, page_size=50))

        cursor1, log1 = run_pull(srv, make, None, h)
        paths1 = [p.split("?")[0] for _, p in log1]
        assert paths1 == ["/fhir/metadata", "/fhir/Patient/p0/$everything", "/fhir/Practitioner/pr0",
                          "/fhir/Binary/doc-p0"]
        assert "_since" not in query(log1[1][1])
        assert cursor1["Observation"]["since"] == stamp(T0)
        assert "Practitioner" not in cursor1  # read by id for hydration: no stream, no cursor

        clock.now = T0 + timedelta(hours=1)
        srv.update("Observation/o0-3", status="amended")
        clock.now = T0 + timedelta(hours=2)
        cursor2, log2 = run_pull(srv, make, cursor1, h)
        # only the change: /metadata and one $everything page; the Practitioner and the
        # attachment are already in the ledger and are not asked for again
        assert [p.split("?")[0] for _, p in log2] == ["/fhir/metadata", "/fhir/Patient/p0/$everything"]
        assert query(log2[1][1])["_since"] == stamp(T0)
        assert h.sink.counts["done"] == 1

        clock.now = T0 + timedelta(hours=3)
        srv.update("Observation/o0-4", status="amended")
        clock.now = T0 + timedelta(hours=4)
        cursor3, log3 = run_pull(srv, make, cursor2, h)
        assert [p.split("?")[0] for _, p in log3] == ["/fhir/metadata", "/fhir/Patient/p0/$everything"]
        assert query(log3[1][1])["_since"] == stamp(T0 + timedelta(hours=2))  # not the first pull's
        assert h.sink.counts["done"] == 1
        assert {v["since"] for v in cursor3.values()} == {stamp(T0 + timedelta(hours=4))}
    changed = sorted(e.key for e in h.entries() if e.attempts == 2)
    assert changed == ["Observation/o0-3", "Observation/o0-4"]


def test_a_hydrated_type_in_an_old_cursor_does_not_pin_since(tmp_path: Path) -> None:
    """Cursors written before the fix hold the first pull's stamp for types read by id
    (Practitioner); the $everything _since ignores them."""
    later = stamp(T0 + timedelta(days=30))
    cursor = {t: {"since": later} for t in [*COMPARTMENT, "Patient"]}
    cursor["Practitioner"] = {"since": stamp(T0)}
    cursor["Organization"] = {"since": stamp(T0 - timedelta(days=300))}
    with FakeFhirServer(n_obs=5) as srv:
        srv.clock = Clock(T0 + timedelta(days=31))
        h = make_sink(tmp_path, kind="fhir")
        new, sent = run_pull(srv, lambda: FhirConnector(FhirConfig(url=srv.url, strategy="everything")), cursor, h)
    (everything,) = [p for _, p in sent if "$everything" in p]
    assert query(everything)["_since"] == later
    assert new["Practitioner"] == {"since": stamp(T0)}  # kept as it was, and ignored
    assert new["Observation"] == {"since": stamp(T0 + timedelta(days=31))}


def test_crawl_lastupdated_moves_to_the_start_of_each_previous_pull(tmp_path: Path) -> None:
    with FakeFhirServer(n_obs=30) as srv:
        clock = srv.clock = Clock(T0)
        h = make_sink(tmp_path, kind="fhir")

        def make() -> FhirConnector:
            return FhirConnector(FhirConfig(url=srv.url, strategy="crawl", page_size=50))

        def searches(log: list[tuple[str, str]]) -> dict[str, dict[str, str]]:
            return {p.split("?")[0].rsplit("/", 1)[-1]: query(p) for _, p in log if "?" in p}

        cursor, log1 = run_pull(srv, make, None, h)
        # /metadata, the Patient, one search per type the server supports, then hydration and
        # the attachment
        assert len(log1) == 6
        assert set(searches(log1)) == {"Observation", "DocumentReference"}
        assert all("_lastUpdated" not in q for q in searches(log1).values())
        for hour, key in ((2, "Observation/o0-3"), (4, "DocumentReference/d0")):
            clock.now = T0 + timedelta(hours=hour - 1)
            srv.update(key, status="superseded" if key.startswith("Doc") else "amended")
            clock.now = T0 + timedelta(hours=hour)
            previous = T0 + timedelta(hours=hour - 2)
            cursor, sent = run_pull(srv, make, cursor, h)
            # /metadata, the Patient (If-None-Match: 304) and the two searches; nothing else
            assert len(sent) == 4, sent
            assert {q["_lastUpdated"] for q in searches(sent).values()} == {f"ge{stamp(previous)}"}
            assert h.sink.counts["done"] == 1
            assert cursor["Observation"]["since"] == cursor["Patient"]["since"] == stamp(clock.now)
    assert sorted(e.key for e in h.entries() if e.attempts == 2) == ["DocumentReference/d0", "Observation/o0-3"]


def test_bulk_since_moves_to_each_previous_transaction_time(tmp_path: Path, slept: list[float]) -> None:
    with FakeFhirServer(n_obs=20) as srv:
        clock = srv.clock = Clock(T0)
        h = make_sink(tmp_path, kind="fhir-bulk")

        def make() -> FhirConnector:
            return FhirBulkConnector(FhirBulkConfig(url=srv.url))

        def kickoff(log: list[tuple[str, str]]) -> dict[str, str]:
            (kick,) = [p for _, p in log if "$export" in p]
            return query(kick)

        cursor, log1 = run_pull(srv, make, None, h)
        assert "_since" not in kickoff(log1)
        # kick-off, two status polls, two files (Patient, Observation), DELETE, the Practitioner
        assert len(log1) == 7
        for hour, key in ((2, "Observation/o0-3"), (4, "Observation/o0-9")):
            clock.now = T0 + timedelta(hours=hour - 1)
            srv.update(key, status="amended")
            clock.now = T0 + timedelta(hours=hour)
            cursor, sent = run_pull(srv, make, cursor, h)
            assert kickoff(sent)["_since"] == stamp(T0 + timedelta(hours=hour - 2))
            # no hydration read: the Practitioner is in the ledger. A file download that the local
            # server's connection handling broke is resumed (the client's FILE_ATTEMPTS): that asks
            # for the same file again, not for more data, so repeats of a file are not counted.
            files = [path for _, path in sent if "/bulkfiles/" in path]
            assert len(sent) - (len(files) - len(set(files))) == 6, sent
            assert not any("Practitioner" in path for _, path in sent)
            assert h.sink.counts["done"] == 1
            assert cursor["Observation"] == cursor["Condition"] == {"since": stamp(clock.now)}
