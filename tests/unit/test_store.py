"""The store and ledger against real databases: SQLite always, PostgreSQL when it is up."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from sqlalchemy import inspect

from aggregator.blobs import BlobRef, BlobStore
from aggregator.errors import StoreError
from aggregator.ledger import DONE, FAILED, SKIPPED
from aggregator.store.db import Database
from tests.support import make_sink


def test_migrations_create_every_table(db_url: str) -> None:
    db = Database(db_url)
    names = set(inspect(db.engine).get_table_names())
    assert {"endpoints", "cases", "sources", "pulls", "ledger_items", "cursors", "alembic_version"} <= names
    Database(db_url)  # opening again is a no-op upgrade
    db.dispose()


def test_ledger_upsert_counts_attempts_and_resume(db_url: str, tmp_path: Path) -> None:
    h = make_sink(tmp_path, url=db_url)
    h.sink.resource({"resourceType": "Observation", "id": "o1", "status": "final"})
    h.sink.failed("binary", "Binary/b1", "HTTP 403: access denied", status=403)
    h.sink.skipped("file", "file:notes.docx", "unsupported file type")
    rows = {r.key: r for r in h.entries()}
    assert rows["Observation/o1"].state == DONE and rows["Observation/o1"].attempts == 1
    assert rows["Binary/b1"].state == FAILED and rows["Binary/b1"].status == "403"
    assert rows["file:notes.docx"].state == SKIPPED

    sink2 = h.new_sink()
    assert sink2.is_done("resource", "Observation/o1")
    assert not sink2.is_done("binary", "Binary/b1")
    sink2.binary("Binary/b1", b"%PDF-1.4 body", "application/pdf")
    rows = {r.key: r for r in h.entries()}
    assert rows["Binary/b1"].state == DONE and rows["Binary/b1"].attempts == 2
    assert h.blobs.read_bytes(rows["Binary/b1"].sha256 or "") == b"%PDF-1.4 body"
    assert len(rows) == 3


def test_blob_store_is_content_addressed_and_atomic(tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "b")
    a = store.put_bytes(b"same")
    b = store.put_chunks([b"sa", b"me"])
    assert a == b and store.exists(a.sha256)
    with pytest.raises(StoreError):
        store.put_chunks([b"other"], expected_sha256=a.sha256)
    # the failed write left no temporary file behind
    assert list((tmp_path / "b" / ".tmp").iterdir()) == []
    with pytest.raises(StoreError):
        store.path("../../etc/passwd")


def test_dicom_instances_are_kept_by_sop_uid_and_adopted_by_content(tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "b")
    uid = "1.2.826.0.1.3680043.8.498.1"
    assert store.put_instance(7, uid, [b"DICM", memoryview(b" first")]) == 10
    path = store.instance_path(7, uid)
    assert path == tmp_path / "b" / "dicom" / "7" / uid and path.read_bytes() == b"DICM first"
    # the same SOP instance again from the same source replaces the file; others are separate
    store.put_instance(7, uid, [b"DICM second"])
    store.put_instance(8, uid, [b"DICM other source"])
    assert path.read_bytes() == b"DICM second"
    assert store.instance_path(8, uid).read_bytes() == b"DICM other source"
    assert list((tmp_path / "b" / ".tmp").iterdir()) == []
    # a key that is not a UID never names a path
    hostile = store.instance_path(7, "../../../etc/passwd")
    assert hostile.parent == tmp_path / "b" / "dicom" / "7" and hostile.name.startswith("x")
    # adoption: hashed, hard-linked into the content-addressed store, idempotent
    ref = store.adopt_instance(7, uid)
    assert ref == BlobRef(hashlib.sha256(b"DICM second").hexdigest(), 11)
    assert store.read_bytes(ref.sha256) == b"DICM second"
    assert os.path.samefile(store.path(ref.sha256), path)
    assert store.adopt_instance(7, uid) == ref
    # replacing the instance later leaves the adopted blob's content untouched
    store.put_instance(7, uid, [b"DICM third"])
    assert store.read_bytes(ref.sha256) == b"DICM second"
    with pytest.raises(StoreError):
        store.adopt_instance(9, uid)


def test_head_revision_constant_matches_alembic() -> None:
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    from aggregator.store.db import HEAD_REVISION, MIGRATIONS

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    assert ScriptDirectory.from_config(cfg).get_current_head() == HEAD_REVISION


def test_instances_are_written_whole_through_gathered_writes(tmp_path: Path) -> None:
    import aggregator.blobs as blobs_mod

    store = BlobStore(tmp_path / "b")
    # more chunks than one writev batch, empty ones, memoryviews of a larger buffer, and one
    # chunk larger than a batch's byte budget
    big = bytearray(range(256)) * 40_000
    chunks: list[bytes | memoryview] = [b"DICM", b"", memoryview(big)[5:70_005]]
    chunks += [bytes([i % 251]) * (i + 1) for i in range(blobs_mod.GATHER_CHUNKS * 2 + 3)]
    chunks.append(memoryview(bytes(blobs_mod.GATHER_BYTES + 17)))
    expected = b"".join(bytes(c) for c in chunks)
    assert store.put_instance(1, "1.2.3", iter(chunks)) == len(expected)
    assert store.instance_path(1, "1.2.3").read_bytes() == expected
