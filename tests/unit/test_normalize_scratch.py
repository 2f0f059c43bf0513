"""normalize()'s scratch data: it stays in the case's folder, leaves nothing behind, and spilling it
to disk changes nothing in the record.

The scratch database and spool hold PHI (resource bodies, identifiers, reference strings), so
they must live in the folder the caller names (the case's tmp folder), unlinked, and be gone when
normalization returns. A tiny page cache forces SQLite to spill even this small record to disk.
"""

from __future__ import annotations

import os
from pathlib import Path

import orjson
import pytest

from aggregator.model import CaseInfo, NormalizedRecord, SourceInfo
from aggregator.normalize import dedup, normalize, scratch
from fixtures.generate import build_record
from tests.support import SinkHarness, make_sink


def feed(h: SinkHarness, copies: int = 3) -> None:
    for i in range(copies):  # the same patient downloaded several times: duplicates to merge
        bundle, ndjson = build_record(seed=f"scratch-{i}")
        name = f"s{i}/record.json"
        for j, e in enumerate(bundle["entry"]):
            h.sink.resource(e["resource"], key=f"{name}#{j}", meta={"file": name, "bundle": name,
                                                                    "fullUrl": e["fullUrl"]})
        for j, res in enumerate(ndjson):
            h.sink.resource(res, key=f"s{i}/export.ndjson#{j}", meta={"file": f"s{i}/export.ndjson"})


def run(h: SinkHarness, workdir: Path) -> NormalizedRecord:
    src = SourceInfo(h.source_id, "media", "download", method="media", pulled_at="2026-09-30T12:00:00Z")
    return normalize(CaseInfo(h.case_id, "general"), [src], h.entries("done"), h.blobs, workdir=str(workdir))


def open_files() -> list[str]:
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            out.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            continue
    return out


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc to see open files")
def test_scratch_spills_only_into_the_case_folder_and_is_gone_afterwards(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    h = make_sink(tmp_path)
    feed(h)
    roomy = run(h, tmp_path)

    work = tmp_path / "case-tmp"
    work.mkdir()
    seen: list[str] = []
    real = dedup.deduplicate

    def spy(*args: object, **kwargs: object) -> dedup.Outcome:
        seen.extend(open_files())  # mid-normalization: the scratch files are open
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(scratch, "CACHE_KIB", 64)  # 64 KiB: the database must spill to disk
    monkeypatch.setattr("aggregator.normalize.pipeline.deduplicate", spy)
    tight = run(h, work)

    scratch_files = [f for f in seen if "etilqs_" in f or "aggregator-spool-" in f]
    assert any("etilqs_" in f for f in scratch_files)  # SQLite did spill
    assert any("aggregator-spool-" in f for f in scratch_files)
    for f in scratch_files:
        assert f.startswith(str(work) + "/") and f.endswith(" (deleted)"), f
    assert not any(str(work) in f for f in open_files())
    assert sorted(p.name for p in work.iterdir()) == [tight.bundle_path.parent.name]  # only the record

    assert orjson.dumps(tight.bundle) == orjson.dumps(roomy.bundle)
    assert tight.quarantine == roomy.quarantine
    assert tight.unresolved == roomy.unresolved
    assert tight.documents == roomy.documents
    assert any(q.reason.startswith("merged into ") for q in tight.quarantine)


def test_scratch_folder_name_may_hold_a_quote(tmp_path: Path) -> None:
    odd = tmp_path / "o'brien"
    odd.mkdir()
    db = scratch.Scratch(str(odd))
    try:
        assert db.db.execute("PRAGMA temp_store_directory").fetchone()[0] == str(odd)
    finally:
        db.close()
