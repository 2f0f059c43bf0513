"""Incremental FHIR pulls against a real FHIR implementation, through a fault-injecting proxy.

The peer is Medplum's ``@medplum/fhir-router`` over its in-memory repository (``tests/peers/
medplum/server.mjs``, installed with ``npm ci`` from the committed lock file). It keeps real
versions and ``meta.lastUpdated`` on the real clock, so the pulls are a second apart: the
``Date`` header that starts each pull's cursor counts whole seconds. Skipped, with the reason,
when Node or npm is not installed.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import requests

from connectors.base import Cursor, NullProgress, PatientRef
from connectors.fhir_rest import FhirConfig, FhirConnector
from tests.fakes.proxy import FaultProxy
from tests.support import SinkHarness, make_sink

PEER = Path(__file__).resolve().parents[1] / "peers" / "medplum"
PID = "agg-pat-1"


@pytest.fixture(scope="module")
def medplum() -> Iterator[str]:
    """The Medplum peer's FHIR base URL (one server for the module)."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if not node or not npm:
        pytest.skip("Node.js and npm are not installed: the Medplum FHIR peer cannot run")
    if not (PEER / "node_modules" / "@medplum" / "fhir-router").is_dir():
        done = subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=PEER, capture_output=True, text=True,
                              timeout=600, check=False)
        if done.returncode:
            pytest.skip(f"npm ci for the Medplum peer failed: {done.stderr.strip()[-300:]}")
    proc = subprocess.Popen([node, "server.mjs"], cwd=PEER, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # printed once the definitions are indexed and it listens
        if not line:
            pytest.fail("the Medplum peer exited before listening")
        yield f"http://127.0.0.1:{json.loads(line)['port']}/fhir"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def put(base: str, res: dict) -> dict:
    resp = requests.put(f"{base}/{res['resourceType']}/{res['id']}", json=res, timeout=30,
                        headers={"Content-Type": "application/fhir+json"})
    assert resp.status_code in (200, 201), resp.text[:200]
    return dict(resp.json())


def observation(i: int, value: float) -> dict:
    return {"resourceType": "Observation", "id": f"agg-obs-{i}", "status": "final",
            "code": {"coding": [{"system": "http://loinc.org", "code": "2339-0"}]},
            "subject": {"reference": f"Patient/{PID}"}, "performer": [{"reference": "Practitioner/agg-dr-1"}],
            "valueQuantity": {"value": value, "unit": "mg/dL"}}


def a_second_passes() -> None:
    """Real time must pass (the peer stamps changes with its clock); time.sleep is patched."""
    threading.Event().wait(1.1)


def query(path: str) -> dict[str, str]:
    return {k: v[-1] for k, v in parse_qs(urlsplit(path).query).items()}


def test_three_incremental_crawls_ask_only_for_changes(medplum: str, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    put(medplum, {"resourceType": "Patient", "id": PID, "name": [{"family": "Peer", "given": ["Test"]}],
                  "birthDate": "1961-02-03"})
    put(medplum, {"resourceType": "Practitioner", "id": "agg-dr-1", "name": [{"family": "Doc"}]})
    for i in range(25):
        put(medplum, observation(i, 90 + i))
    put(medplum, {"resourceType": "Condition", "id": "agg-cond-1", "subject": {"reference": f"Patient/{PID}"},
                  "code": {"text": "diabetes"}})
    waits: list[float] = []
    monkeypatch.setattr("time.sleep", waits.append)
    h = make_sink(tmp_path, kind="fhir")
    with FaultProxy(medplum.rsplit("/fhir", 1)[0]) as proxy:

        def pull(cursor: Cursor | None, harness: SinkHarness) -> tuple[Cursor, list[tuple[str, int]]]:
            first = len(proxy.log)
            c = FhirConnector(FhirConfig(url=proxy.url("/fhir"), strategy="crawl", page_size=10))
            try:
                new = c.pull(PatientRef(id=PID), cursor, harness.sink if cursor is None else harness.new_sink(),
                             NullProgress())
            finally:
                c.close()
            return new, proxy.log[first:]

        a_second_passes()
        cursor1, log1 = pull(None, h)
        assert all("_lastUpdated" not in query(p) for p, _ in log1)
        obs_pages = [p for p, _ in log1 if p.startswith("/fhir/Observation?")]
        assert len(obs_pages) == 3  # 25 Observations, 10 a page
        assert "/fhir/Practitioner/agg-dr-1" in [p for p, _ in log1]  # hydration
        first_done = {e.key for e in h.entries("done")}
        assert {f"Observation/agg-obs-{i}" for i in range(25)} | {f"Patient/{PID}", "Condition/agg-cond-1"} \
            <= first_done

        cursors = [cursor1]
        for n, changed in ((2, 3), (3, 17)):
            a_second_passes()
            put(medplum, observation(changed, 500 + n))
            a_second_passes()
            proxy.inject(r"^/fhir/Observation\?", 429, retry_after=2)  # the proxy throttles once
            cursor, sent = pull(cursors[-1], h)
            searches = [(p, s) for p, s in sent if "?" in p]
            # every search asks only for changes since the start of the previous pull
            assert {query(p)["_lastUpdated"] for p, _ in searches} == {f"ge{cursors[-1]['Observation']['since']}"}
            # /metadata, the Patient, the throttled Observation search and its retry, and one
            # search for each other type the server declares: nothing else
            assert [s for p, s in sent if p.startswith("/fhir/Observation?")] == [429, 200]
            assert len(sent) == 2 + 2 + 3, sent
            assert h.sink.counts["failed"] == 0
            cursors.append(cursor)
        assert waits == [2.0, 2.0]
    since = [c["Observation"]["since"] for c in cursors]
    assert since[0] < since[1] < since[2]
    observations = [e for e in h.entries() if e.key.startswith("Observation/")]
    assert sorted(e.key for e in observations if e.attempts == 2) == ["Observation/agg-obs-17",
                                                                       "Observation/agg-obs-3"]


def test_concurrent_crawl_gives_the_sequential_result_within_the_cap(medplum: str, tmp_path: Path) -> None:
    """The type searches run together (at most ``concurrency`` requests in flight), same ledger."""
    pid = "agg-pat-2"
    put(medplum, {"resourceType": "Patient", "id": pid, "name": [{"family": "Peer", "given": ["Two"]}]})
    put(medplum, {"resourceType": "Practitioner", "id": "agg-dr-2", "name": [{"family": "Doc"}]})
    for i in range(12):
        obs = observation(100 + i, 80 + i)
        obs["subject"] = {"reference": f"Patient/{pid}"}
        obs["performer"] = [{"reference": "Practitioner/agg-dr-2"}]
        put(medplum, obs)
    for rtype, n in (("Condition", 3), ("Encounter", 2)):  # types the peer declares (it searches those)
        for i in range(n):
            res: dict = {"resourceType": rtype, "id": f"agg-{rtype.lower()}-{i}",
                         "subject": {"reference": f"Patient/{pid}"}}
            if rtype == "Condition":
                res["code"] = {"text": "x"}
            else:
                res.update(status="finished", **{"class": {"code": "AMB"}})
            put(medplum, res)

    def crawl(concurrency: int, where: Path) -> tuple[set[tuple[str, str, str]], Cursor, int]:
        h = make_sink(where, kind="fhir")
        with FaultProxy(medplum.rsplit("/fhir", 1)[0]) as proxy:
            proxy.hold(r"^/fhir/[A-Za-z]+\?", 0.05)  # searches sent together are sure to overlap
            c = FhirConnector(FhirConfig(url=proxy.url("/fhir"), strategy="crawl", page_size=5,
                                         concurrency=concurrency))
            try:
                cursor = c.pull(PatientRef(id=pid), None, h.sink, NullProgress())
            finally:
                c.close()
            peak = proxy.peak
        rows = {(e.kind, e.key, e.state) for e in h.entries()}
        return rows, cursor, peak

    one, cursor_one, peak_one = crawl(1, tmp_path / "one")
    many, cursor_many, peak_many = crawl(4, tmp_path / "many")
    assert one == many
    expected = {f"Patient/{pid}", "Practitioner/agg-dr-2", "Encounter/agg-encounter-1",
                "Condition/agg-condition-2", *(f"Observation/agg-obs-{100 + i}" for i in range(12))}
    assert {k for _, k, s in one if s == "done"} >= expected
    assert sorted(cursor_one) == sorted(cursor_many)
    assert peak_one == 1 and 2 <= peak_many <= 4
