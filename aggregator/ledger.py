"""The ledger: one row per item a pull attempted (done, failed, skipped) and why.

:class:`LedgerSink` is the core's implementation of :class:`connectors.base.Sink`: bytes go to
the case's blob store, rows go to ``ledger_items``. Rows are written in batches with an upsert
keyed by (source, kind, key), so a re-pull updates a row instead of adding a duplicate, the
attempt count goes up, and resume can skip what is already done. Gap reasons in the checklist
come from here.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy import func, select, true
from sqlalchemy.orm import Session

from aggregator.blobs import BlobRef, BlobStore, iter_blocks
from aggregator.errors import StoreError
from aggregator.store.db import Database
from aggregator.store.models import Cursor as CursorRow
from aggregator.store.models import LedgerItem, Pull, Source, utcnow
from connectors.base import KIND_BINARY, KIND_DICOM, KIND_RESOURCE, Cursor, Data, checkpoint_name

DONE = "done"
FAILED = "failed"
SKIPPED = "skipped"
STATES = (DONE, FAILED, SKIPPED)

FLUSH_ROWS = 500
FLUSH_SECONDS = 2.0
#: With aligned checkpoints rows wait for the next checkpoint, but never more than this many.
ALIGNED_MAX_ROWS = 4 * FLUSH_ROWS


def canonical_json(obj: Any) -> bytes:
    """Deterministic JSON bytes (sorted keys) so the same resource always hashes the same."""
    return orjson.dumps(obj, option=orjson.OPT_SORT_KEYS)


@dataclass
class Row:
    kind: str
    key: str
    state: str
    reason: str | None = None
    status: str | None = None
    sha256: str | None = None
    size: int | None = None
    content_type: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


def _upsert(session: Session, source_id: int, pull_id: int | None, rows: list[Row]) -> None:
    if not rows:
        return
    # The last row per key wins inside one batch (a resource seen twice in one page).
    latest: dict[tuple[str, str], Row] = {}
    for r in rows:
        latest[(r.kind, r.key)] = r
    now = utcnow()
    values = [
        {
            "source_id": source_id,
            "pull_id": pull_id,
            "kind": r.kind,
            "key": r.key,
            "state": r.state,
            "reason": r.reason,
            "status": r.status,
            "attempts": 1,
            "sha256": r.sha256,
            "size": r.size,
            "content_type": r.content_type,
            "meta": r.meta,
            "updated_at": now,
        }
        for r in latest.values()
    ]
    dialect = session.get_bind().dialect.name
    # the dialect's own INSERT ... ON CONFLICT, imported for the one in use (the PostgreSQL
    # dialect alone is ~2.4 MiB resident, which a SQLite home never needs)
    ins: Any
    if dialect == "postgresql":
        from sqlalchemy.dialects import postgresql

        ins = postgresql.insert(LedgerItem)
    else:
        from sqlalchemy.dialects import sqlite

        ins = sqlite.insert(LedgerItem)
    table = LedgerItem.__table__
    stmt = ins.on_conflict_do_update(
        index_elements=["source_id", "kind", "key"],
        set_={
            "pull_id": ins.excluded.pull_id,
            "state": ins.excluded.state,
            "reason": ins.excluded.reason,
            "status": ins.excluded.status,
            "attempts": table.c.attempts + 1,
            "sha256": ins.excluded.sha256,
            "size": ins.excluded.size,
            "content_type": ins.excluded.content_type,
            "meta": ins.excluded.meta,
            "updated_at": ins.excluded.updated_at,
        },
    )
    for start in range(0, len(values), 500):
        session.execute(stmt, values[start : start + 500])


class LedgerSink:
    """Streams connector output into the blob store and the ledger of one source and pull."""

    def __init__(self, db: Database, blobs: BlobStore, source_id: int, pull_id: int | None) -> None:
        self.db = db
        self.blobs = blobs
        self.source_id = source_id
        self.pull_id = pull_id
        self.method = ""
        self.counts: dict[str, int] = {DONE: 0, FAILED: 0, SKIPPED: 0}
        self._pending: list[Row] = []
        self._last_flush = time.monotonic()
        # Keys fetched by earlier pulls, loaded on the first is_done() call. Keys done during
        # this pull are not added: the sink's memory stays flat however long the pull runs.
        self._done: set[tuple[str, str]] | None = None
        self._checkpoint: Cursor = {}
        self._aligned = False

    def _load_done(self) -> set[tuple[str, str]]:
        with self.db.session() as s:
            rows = s.execute(
                select(LedgerItem.kind, LedgerItem.key).where(
                    LedgerItem.source_id == self.source_id,
                    LedgerItem.state == DONE,
                    LedgerItem.pull_id.is_distinct_from(self.pull_id) if self.pull_id is not None else true(),
                )
            )
            return {(k, key) for k, key in rows}

    # -- Sink protocol ----------------------------------------------------------------------

    def is_done(self, kind: str, key: str) -> bool:
        if self._done is None:
            self._done = self._load_done()
        return (kind, key) in self._done

    def set_method(self, method: str) -> None:
        self.method = method

    def retry_candidates(self, kind: str) -> list[tuple[str, dict[str, Any]]]:
        with self.db.session() as s:
            q = select(LedgerItem.key, LedgerItem.meta).where(
                LedgerItem.source_id == self.source_id, LedgerItem.kind == kind, LedgerItem.state == FAILED
            )
            if self.pull_id is not None:
                q = q.where(LedgerItem.pull_id.is_distinct_from(self.pull_id))
            return [(key, dict(meta or {})) for key, meta in s.execute(q.order_by(LedgerItem.key))]

    def resource(
        self, resource: Mapping[str, Any], *, key: str | None = None, meta: Mapping[str, Any] | None = None
    ) -> None:
        rtype = str(resource.get("resourceType") or "Unknown")
        rid = resource.get("id")
        if key is None:
            key = f"{rtype}/{rid}" if rid else "sha256:" + content_hash(resource)
        ref = self.blobs.put_bytes(canonical_json(resource))
        m = {"resourceType": rtype, **({"id": str(rid)} if rid else {}), **dict(meta or {})}
        self._add(Row(KIND_RESOURCE, key, DONE, sha256=ref.sha256, size=ref.size,
                      content_type="application/fhir+json", meta=m))

    def binary(
        self,
        key: str,
        data: Data,
        content_type: str,
        *,
        meta: Mapping[str, Any] | None = None,
        expected_sha256: str | None = None,
    ) -> BlobRef:
        ref = self._put(data, expected_sha256)
        self._add(Row(KIND_BINARY, key, DONE, sha256=ref.sha256, size=ref.size,
                      content_type=content_type, meta=dict(meta or {})))
        return ref

    def dicom(self, sop_instance_uid: str, data: Data, *, meta: Mapping[str, Any] | None = None) -> int:
        # Kept by SOP Instance UID, not hashed here: see aggregator.blobs. The row's sha256 stays
        # empty; stored_path() finds the file.
        size = self.blobs.put_instance(self.source_id, sop_instance_uid, _chunks(data))
        self._add(Row(KIND_DICOM, sop_instance_uid, DONE, size=size,
                      content_type="application/dicom", meta=dict(meta or {})))
        return size

    def failed(
        self,
        kind: str,
        key: str,
        reason: str,
        *,
        status: int | str | None = None,
        meta: Mapping[str, Any] | None = None,
    ) -> None:
        self._add(Row(kind, key, FAILED, reason=reason, status=None if status is None else str(status),
                      meta=dict(meta or {})))

    def skipped(self, kind: str, key: str, reason: str, *, meta: Mapping[str, Any] | None = None) -> None:
        self._add(Row(kind, key, SKIPPED, reason=reason, meta=dict(meta or {})))

    def checkpoint(self, cursor: Cursor, *, aligned: bool = False) -> None:
        """Keep ``cursor`` for the next flush, which writes it with the rows it covers."""
        self._checkpoint.update(cursor)
        self._aligned = self._aligned or aligned
        if len(self._pending) >= FLUSH_ROWS or time.monotonic() - self._last_flush > FLUSH_SECONDS:
            self.flush()

    def drop_checkpoint(self) -> None:
        """Forget a checkpoint not yet written (the pull's own cursor is about to replace it)."""
        self._checkpoint = {}

    # -- internals --------------------------------------------------------------------------

    def _put(self, data: Data, expected: str | None) -> BlobRef:
        if isinstance(data, bytes) and expected is None:
            return self.blobs.put_bytes(data)  # hashed first: a blob already stored is not rewritten
        return self.blobs.put_chunks(_chunks(data), expected_sha256=expected)

    def _add(self, row: Row) -> None:
        self._pending.append(row)
        self.counts[row.state] = self.counts.get(row.state, 0) + 1
        if self._aligned:
            # the connector's next checkpoint flushes; only a huge item flushes in its middle
            if len(self._pending) >= ALIGNED_MAX_ROWS:
                self.flush()
        elif len(self._pending) >= FLUSH_ROWS or time.monotonic() - self._last_flush > FLUSH_SECONDS:
            self.flush()

    def flush(self, session: Session | None = None) -> None:
        """Write pending rows and a heartbeat; pass ``session`` to join a larger transaction.

        When the write fails (the database went away), the rows and the checkpoint are kept
        for the next flush: a checkpoint written later without the rows it covers would be a
        gap (a resumed pull skips what the checkpoint names).
        """
        rows, self._pending = self._pending, []
        checkpoint, self._checkpoint = self._checkpoint, {}
        self._last_flush = time.monotonic()
        try:
            if session is not None:
                self._write(session, rows, checkpoint)
                return
            with self.db.session() as s:
                self._write(s, rows, checkpoint)
        except BaseException:
            self._pending[:0] = rows
            self._checkpoint = {**checkpoint, **self._checkpoint}
            raise

    def _write(self, s: Session, rows: list[Row], checkpoint: Cursor) -> None:
        _upsert(s, self.source_id, self.pull_id, rows)
        if checkpoint:
            save_cursor(s, self.source_id, {checkpoint_name(self.pull_id, k): v for k, v in checkpoint.items()})
        if self.pull_id is not None:
            pull = s.get(Pull, self.pull_id)
            if pull is not None:
                pull.heartbeat_at = utcnow()
                pull.counts = dict(self.counts)


def save_cursor(s: Session, source_id: int, cursor: Cursor) -> None:
    """Upsert the cursor rows of ``source_id`` (one per stream) in the caller's transaction."""
    for stream, value in cursor.items():
        row = s.get(CursorRow, (source_id, stream))
        if row is None:
            s.add(CursorRow(source_id=source_id, stream=stream, value=value))
        else:
            row.value = value
            row.updated_at = utcnow()


def content_hash(obj: Any) -> str:
    """SHA-256 of the canonical JSON of ``obj``."""
    return hashlib.sha256(canonical_json(obj)).hexdigest()


# --- reading the ledger ---------------------------------------------------------------------


@dataclass(frozen=True)
class LedgerEntry:
    source_id: int
    kind: str
    key: str
    state: str
    reason: str | None
    status: str | None
    attempts: int
    sha256: str | None
    size: int | None
    content_type: str | None
    meta: dict[str, Any]
    updated_at: datetime | None = None


def _chunks(data: Data) -> Iterable[bytes | memoryview]:
    """What a connector handed the sink (bytes, a readable stream or chunks), as chunks."""
    if isinstance(data, bytes | bytearray | memoryview):
        return [data]
    if hasattr(data, "read"):
        return iter_blocks(data)  # type: ignore[arg-type]
    return data  # type: ignore[return-value]


def stored_path(blobs: BlobStore, entry: LedgerEntry) -> Path:
    """The file holding a ``done`` item's bytes: its blob, or for DICOM its keyed instance file."""
    if entry.sha256:
        return blobs.path(entry.sha256)
    if entry.kind == KIND_DICOM:
        return blobs.instance_path(entry.source_id, entry.key)
    raise StoreError("ledger item has no stored content", item=entry.key)


#: The columns a LedgerEntry is made of, selected as plain rows: building an ORM object per row
#: was the largest cost of reading a 200k-row ledger (normalization reads all of it).
_ENTRY_COLUMNS = (LedgerItem.source_id, LedgerItem.kind, LedgerItem.key, LedgerItem.state, LedgerItem.reason,
                  LedgerItem.status, LedgerItem.attempts, LedgerItem.sha256, LedgerItem.size,
                  LedgerItem.content_type, LedgerItem.meta, LedgerItem.updated_at)


def entries_for_case(db: Database, case_id: str, *, state: str | None = None) -> Iterator[LedgerEntry]:
    """All ledger rows of a case's sources, in a stable order (source, kind, key)."""
    with db.session() as s:
        q = (
            select(*_ENTRY_COLUMNS)
            .join(Source, Source.id == LedgerItem.source_id)
            .where(Source.case_id == case_id)
            .order_by(LedgerItem.source_id, LedgerItem.kind, LedgerItem.key)
        )
        if state:
            q = q.where(LedgerItem.state == state)
        for sid, kind, key, st, reason, status, attempts, sha256, size, ctype, meta, updated in \
                s.execute(q).yield_per(2000):
            yield LedgerEntry(sid, kind, key, st, reason, status, attempts, sha256, size, ctype, dict(meta or {}),
                              updated)


def counts_for_source(db: Database, source_id: int) -> dict[str, int]:
    with db.session() as s:
        rows = s.execute(
            select(LedgerItem.state, func.count()).where(LedgerItem.source_id == source_id)
            .group_by(LedgerItem.state)
        )
        return {state: int(n) for state, n in rows}


def skipped_rows(db: Database, source_id: int, pull_id: int) -> list[dict[str, str]]:
    """What one pull skipped (kind, key, reason), so the pull can say so and not only the ledger."""
    with db.session() as s:
        q = (
            select(LedgerItem.kind, LedgerItem.key, LedgerItem.reason)
            .where(LedgerItem.source_id == source_id, LedgerItem.pull_id == pull_id, LedgerItem.state == SKIPPED)
            .order_by(LedgerItem.kind, LedgerItem.key)
        )
        return [{"kind": kind, "key": key, "reason": reason or "no reason recorded"}
                for kind, key, reason in s.execute(q)]


def record_rows(db: Database, source_id: int, rows: Iterable[Row], pull_id: int | None = None) -> None:
    """Write rows outside a pull (normalization quarantine, for instance)."""
    with db.session() as s:
        _upsert(s, source_id, pull_id, list(rows))
