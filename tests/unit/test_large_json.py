"""Large JSON is streamed entry by entry, with exactly the ledger rows of the in-memory path.

The threshold (``max_json_bytes``) is lowered to 1 byte so the project's own generated bundle
takes the streamed path; peak memory on multi-gigabyte inputs is measured in
``bench/bench_intake.py``, not asserted here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from aggregator.ledger import DONE, FAILED, SKIPPED, LedgerEntry
from connectors.base import NullProgress, PatientRef
from connectors.media import MediaConfig, MediaConnector
from tests.support import make_sink


def _pull(folder: Path, store: Path, **options: Any) -> list[LedgerEntry]:
    h = make_sink(store)
    MediaConnector(MediaConfig(path=str(folder), **options)).pull(PatientRef(id=None), None, h.sink, NullProgress())
    rows = h.entries()
    h.db.dispose()
    return rows


def _view(rows: list[LedgerEntry]) -> list[tuple[Any, ...]]:
    return sorted((r.kind, r.key, r.state, r.reason, r.sha256, json.dumps(r.meta, sort_keys=True)) for r in rows)


@pytest.fixture(scope="module")
def bundle_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fixtures.generate import generate_download

    root = tmp_path_factory.mktemp("big") / "dl"
    generate_download(root)
    folder = root.parent / "only-json"
    folder.mkdir()
    (folder / "record.json").write_bytes((root / "portal-a" / "record.json").read_bytes())
    return folder


def test_streamed_bundle_gives_the_same_rows_as_in_memory(bundle_file: Path, tmp_path: Path) -> None:
    whole = _pull(bundle_file, tmp_path / "a")
    streamed = _pull(bundle_file, tmp_path / "b", max_json_bytes=1)
    assert len([r for r in whole if r.state == DONE]) > 20
    assert _view(streamed) == _view(whole)


def test_streamed_array_nested_bundle_and_entry_problems(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    inner = {"resourceType": "Bundle", "type": "collection",
             "entry": [{"fullUrl": "urn:uuid:1", "resource": {"resourceType": "Observation", "id": "o1"}}]}
    doc = {"resourceType": "Bundle", "entry": [
        {"fullUrl": "urn:uuid:p", "resource": {"resourceType": "Patient", "id": "p", "deceasedBoolean": False,
                                                "extension": [{"url": "x", "valueDecimal": 82.60002748167719}]}},
        {"request": {"method": "DELETE", "url": "Observation/9"}},
        "not an object",
        {"resource": inner},
    ], "type": "transaction"}  # 'type' after the entries: read by a second look
    (folder / "b.json").write_text(json.dumps(doc))
    (folder / "a.json").write_text(json.dumps([{"resourceType": "Condition", "id": "c"}, {"no": "type"}]))
    whole = _pull(folder, tmp_path / "a")
    streamed = _pull(folder, tmp_path / "b", max_json_bytes=1)
    assert _view(streamed) == _view(whole)
    patient = next(r for r in streamed if r.key == "file:b.json#/entry/0/resource")
    assert patient.meta["bundle_type"] == "transaction" and patient.meta["fullUrl"] == "urn:uuid:p"
    assert {r.state for r in streamed if r.key.startswith("file:b.json#/entry/1")} == {SKIPPED}


def test_large_single_resource_is_refused_with_a_reason(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    big = {"resourceType": "Observation", "id": "x", "note": [{"text": "y" * 1000}]}
    (folder / "r.json").write_text(json.dumps(big))
    rows = _pull(folder, tmp_path / "s", max_json_bytes=10)
    (row,) = rows
    assert row.state == SKIPPED and "too large to read in memory" in (row.reason or "")


def test_malformed_part_way_keeps_the_entries_before(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    entries = [{"resource": {"resourceType": "Observation", "id": f"o{i}"}} for i in range(5)]
    text = json.dumps({"resourceType": "Bundle", "type": "collection", "entry": entries})
    cut = text.index('{"resource": {"resourceType": "Observation", "id": "o3"')
    (folder / "r.json").write_text(text[:cut] + '{"resource": {"resourceType": "Obs')
    rows = _pull(folder, tmp_path / "s", max_json_bytes=10)
    done = sorted(r.key for r in rows if r.state == DONE)
    assert done == [f"file:r.json#/entry/{i}/resource" for i in range(3)]
    (bad,) = [r for r in rows if r.state == FAILED]
    assert bad.key == "file:r.json" and "malformed JSON" in (bad.reason or "")
    assert "Obs" not in (bad.reason or "")


def test_ndjson_named_json_is_streamed_by_line(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    lines = [json.dumps({"resourceType": "Observation", "id": f"o{i}"}) for i in range(4)]
    (folder / "export.json").write_text("\n".join(lines) + "\n")
    whole = _pull(folder, tmp_path / "a")
    streamed = _pull(folder, tmp_path / "b", max_json_bytes=10)
    assert _view(streamed) == _view(whole)
    assert len([r for r in streamed if r.state == DONE]) == 4


def test_xml_above_its_limit_is_failed_with_the_reason(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "big.xml").write_text('<?xml version="1.0"?><ClinicalDocument xmlns="urn:hl7-org:v3">'
                                    + "<x/>" * (600 * 1024) + "</ClinicalDocument>")
    (row,) = _pull(folder, tmp_path / "s", max_xml_bytes=1024 * 1024)
    assert row.state == FAILED and "limit for clinical documents" in (row.reason or "")
