"""One odd resource never sinks a FHIR pull (issue 12, part 1), against a local FHIR server.

The odd resource is valid JSON that our own storing chokes on: an extension nested 300 levels
deep, which ``orjson`` refuses to serialize. Before, the ``TypeError`` ended the whole pull.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from aggregator.ledger import DONE, FAILED
from connectors.base import NullProgress, PatientRef
from connectors.fhir_bulk import FhirBulkConfig, FhirBulkConnector
from connectors.fhir_rest import FhirConfig, FhirConnector
from tests.fakes.fhir_server import FakeFhirServer
from tests.support import make_sink


def _deep_observation() -> dict[str, Any]:
    node: dict[str, Any] = {"url": "urn:x", "valueString": "leaf"}
    for _ in range(300):
        node = {"url": "urn:x", "extension": [node]}
    return {"resourceType": "Observation", "id": "deep", "status": "final",
            "subject": {"reference": "Patient/p0"}, "code": {"text": "glucose"}, "extension": [node]}


@pytest.fixture()
def no_sleep(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("time.sleep", lambda s: None)


@pytest.mark.parametrize("strategy", ["everything", "crawl"])
def test_rest_pull_fails_the_odd_resource_only(tmp_path: Path, strategy: str) -> None:
    with FakeFhirServer(n_obs=12) as srv:
        srv._put(_deep_observation())
        h = make_sink(tmp_path, kind="fhir")
        FhirConnector(FhirConfig(url=srv.url, strategy=strategy, page_size=5)).pull(
            PatientRef(id="p0"), None, h.sink, NullProgress())
    rows = h.entries()
    (bad,) = [r for r in rows if r.key == "Observation/deep"]
    assert bad.state == FAILED and bad.reason == "could not be read: unexpected TypeError"
    done = {r.key for r in rows if r.state == DONE}
    assert {f"Observation/o0-{i}" for i in range(12)} <= done and "Patient/p0" in done


def test_bulk_pull_fails_the_odd_line_only(tmp_path: Path, no_sleep: None) -> None:
    with FakeFhirServer(n_obs=12) as srv:
        srv._put(_deep_observation())
        h = make_sink(tmp_path, kind="fhir-bulk")
        FhirBulkConnector(FhirBulkConfig(url=srv.url, auth="none")).pull(
            PatientRef(id="p0"), None, h.sink, NullProgress())
    rows = h.entries()
    assert [r.state for r in rows if r.key == "Observation/deep"] == [FAILED]
    done = {r.key for r in rows if r.state == DONE}
    assert {f"Observation/o0-{i}" for i in range(12)} <= done
