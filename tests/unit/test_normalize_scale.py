"""normalize() over a few thousand resources: the process-pool path gives exactly the serial result.

Functional only (nothing timed: speed and memory are measured in ``bench/bench_normalize.py``).
The record is the project's own generated patient, downloaded many times over (different seeds,
so different ids, the same person and many equal facts), fed through a real LedgerSink: large
enough that validation goes to worker processes and results arrive out of order, with
duplicates to merge, references to rewrite and invalid input to quarantine on the way.
"""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from aggregator.model import CaseInfo, NormalizedRecord, SourceInfo
from aggregator.normalize import normalize, parse
from fixtures.generate import build_record
from tests.support import SinkHarness, make_sink

SEEDS = 100


def feed(h: SinkHarness) -> int:
    n = 0
    for i in range(SEEDS):
        bundle, ndjson = build_record(seed=f"scale-{i}")
        name = f"s{i:03d}/portal-a/record.json"
        for j, e in enumerate(bundle["entry"]):
            h.sink.resource(e["resource"], key=f"{name}#{j}",
                            meta={"file": name, "bundle": name, "fullUrl": e["fullUrl"]})
            n += 1
        nd = f"s{i:03d}/portal-b/export.ndjson"
        for j, res in enumerate(ndjson):
            h.sink.resource(res, key=f"{nd}#{j}", meta={"file": nd, "bundle": nd})
            n += 1
        if i % 25 == 0:  # invalid input scattered through the chunks
            bad = {"resourceType": "Observation", "id": f"bad-{i}", "status": "final", "code": {"text": "x"},
                   "valueQuantity": {"value": "not a number"}}
            h.sink.resource(bad, key=f"s{i:03d}/bad.json#0", meta={"file": f"s{i:03d}/bad.json"})
            n += 1
    return n


def run(h: SinkHarness, workers: str, monkeypatch: pytest.MonkeyPatch) -> NormalizedRecord:
    monkeypatch.setenv("AGGREGATOR_NORMALIZE_WORKERS", workers)
    src = SourceInfo(h.source_id, "media", "download", method="media", pulled_at="2026-09-30T12:00:00Z")
    case = CaseInfo(h.case_id, "oncology")
    return normalize(case, [src], h.entries("done"), h.blobs)


def test_parallel_and_serial_give_the_same_record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    h = make_sink(tmp_path)
    n = feed(h)
    assert n > parse.POOL_MIN + 2 * parse.CHUNK  # the pool is used, with many chunks in flight

    serial = run(h, "1", monkeypatch)
    parallel = run(h, "2", monkeypatch)

    assert orjson.dumps(parallel.bundle) == orjson.dumps(serial.bundle)
    assert parallel.quarantine == serial.quarantine
    assert parallel.unresolved == serial.unresolved
    assert parallel.documents == serial.documents
    assert parallel.conflicts == serial.conflicts

    # and the record is a real one: one patient, facts merged, invalid input named, all accounted
    assert len(serial.resources("Patient")) == 1
    reasons = [q.reason for q in serial.quarantine if q.kind == "resource"]
    assert sum(r.startswith("invalid FHIR R4: ") for r in reasons) == len(range(0, SEEDS, 25))
    assert sum(r.startswith("merged into ") for r in reasons) > n // 4
    made = {"Provenance", "Endpoint"}
    kept = sum(1 for r in serial.resources() if r["resourceType"] not in made)
    assert kept + len(reasons) == n  # the merged Patient stands for one input Patient
