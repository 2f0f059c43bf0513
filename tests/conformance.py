"""The conformance suite every connector must pass (issue 2, DESIGN.md "conventions").

A connector test calls :func:`assert_connector_conforms` with a factory that builds the
connector against a real peer (a folder, a recorded or local FHIR server, a real Orthanc).
It checks, against a real SQLite-backed ledger:

1. ``check()`` reports success;
2. a first pull stores items, every ``done`` row has its bytes in the blob store, and every
   ``failed``/``skipped`` row has a reason (the ledger is complete);
3. the cursor is a JSON object of streams, and survives a JSON round trip;
4. a re-pull with that cursor adds no duplicate rows and no new ``done`` keys, unless the
   peer really changed;
5. the cursor does not move backwards;
6. sink calls for the same key collapse: the ledger never holds two rows for one item.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aggregator.ledger import DONE, STATES
from connectors.base import Connector, Cursor, NullProgress, PatientRef
from tests.support import make_sink


@dataclass
class ConformanceReport:
    first_counts: dict[str, int] = field(default_factory=dict)
    second_counts: dict[str, int] = field(default_factory=dict)
    rows: int = 0
    cursor: Cursor = field(default_factory=dict)


def _comparable(a: Any, b: Any) -> bool:
    return type(a) is type(b) and isinstance(a, str | int | float)


def _assert_monotonic(before: Cursor, after: Cursor) -> None:
    for stream, value in before.items():
        assert stream in after, f"cursor stream {stream!r} disappeared on re-pull"
        for k, v in value.items():
            w = after[stream].get(k)
            if _comparable(v, w):
                assert w >= v, f"cursor {stream}.{k} moved backwards"


def assert_connector_conforms(
    make_connector: Callable[[], Connector],
    patient: PatientRef,
    tmp_path: Path,
    *,
    kind: str = "test",
    min_done: int = 1,
    peer_changes: Callable[[], None] | None = None,
) -> ConformanceReport:
    """Run the suite; ``peer_changes`` may modify the peer between the two pulls."""
    report = ConformanceReport()
    harness = make_sink(tmp_path, kind=kind)

    connector = make_connector()
    try:
        result = connector.check()
        assert result.ok, f"check() failed: {result.details}"
        cursor = connector.pull(patient, None, harness.sink, NullProgress())
    finally:
        connector.close()
    rows = harness.entries()
    report.first_counts = dict(harness.sink.counts)

    assert isinstance(cursor, dict), "pull must return a cursor dict"
    assert all(isinstance(v, dict) for v in cursor.values()), "cursor values must be JSON objects"
    cursor = json.loads(json.dumps(cursor))  # it is stored as JSON between pulls
    report.cursor = cursor

    done = [r for r in rows if r.state == DONE]
    assert len(done) >= min_done, f"expected at least {min_done} items, got {len(done)}"
    for r in rows:
        assert r.state in STATES, f"unknown ledger state {r.state!r}"
        if r.state == DONE:
            assert harness.path(r).is_file(), f"{r.key}: done but bytes missing"
        else:
            assert r.reason, f"{r.key}: {r.state} without a reason"
    keys = [(r.kind, r.key) for r in rows]
    assert len(keys) == len(set(keys)), "the ledger holds two rows for one item"

    if peer_changes is not None:
        peer_changes()
    sink2 = harness.new_sink()
    connector = make_connector()
    try:
        cursor2 = connector.pull(patient, cursor, sink2, NullProgress())
    finally:
        connector.close()
    rows2 = harness.entries()
    report.second_counts = dict(sink2.counts)
    keys2 = [(r.kind, r.key) for r in rows2]
    assert len(keys2) == len(set(keys2)), "re-pull created duplicate ledger rows"
    if peer_changes is None:
        assert set(keys2) == set(keys), "re-pull without changes at the peer added or lost items"
    _assert_monotonic(cursor, json.loads(json.dumps(cursor2)))
    report.rows = len(rows2)
    return report
