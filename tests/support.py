"""Helpers for tests: a real SQLite-backed ledger sink, ledger entries read back, concurrent writers."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from aggregator.blobs import BlobStore
from aggregator.ledger import LedgerEntry, LedgerSink, entries_for_case, stored_path
from aggregator.store.db import Database
from aggregator.store.models import Case, Source


@dataclass
class SinkHarness:
    db: Database
    blobs: BlobStore
    sink: LedgerSink
    source_id: int
    case_id: str

    def entries(self, state: str | None = None) -> list[LedgerEntry]:
        self.sink.flush()
        return list(entries_for_case(self.db, self.case_id, state=state))

    def path(self, entry: LedgerEntry) -> Path:
        """The file holding a done item's bytes (a blob, or a DICOM instance file)."""
        return stored_path(self.blobs, entry)

    def read(self, entry: LedgerEntry) -> bytes:
        return self.path(entry).read_bytes()

    def new_sink(self) -> LedgerSink:
        """A fresh sink on the same source, as a second pull (resume / re-pull) would get."""
        self.sink.flush()
        self.sink = LedgerSink(self.db, self.blobs, self.source_id, None)
        return self.sink


def make_sink(tmp_path: Path, *, kind: str = "media", case_id: str = "test-case",
              url: str | None = None) -> SinkHarness:
    """A LedgerSink over a real SQLite database and blob store under ``tmp_path``."""
    db = Database(url or f"sqlite:///{tmp_path / 'test.db'}")
    with db.session() as s:
        if s.get(Case, case_id) is None:
            s.add(Case(id=case_id, checklist="general"))
        src = Source(case_id=case_id, kind=kind, config={}, label=kind)
        s.add(src)
        s.flush()
        source_id = src.id
    blobs = BlobStore(tmp_path / "blobs")
    return SinkHarness(db, blobs, LedgerSink(db, blobs, source_id, None), source_id, case_id)


class RecordingProgress:
    """A Progress that remembers what a connector reported (totals, advances, messages)."""

    def __init__(self) -> None:
        self.total: int | None = None
        self.done = 0
        self.texts: list[str] = []

    def set_total(self, total: int | None) -> None:
        self.total = total

    def advance(self, n: int = 1) -> None:
        self.done += n

    def message(self, text: str) -> None:
        self.texts.append(text)


def run_in_threads(work: Callable[..., object], args: Iterable[tuple[object, ...]]) -> list[BaseException]:
    """Run ``work(*a)`` for each ``a`` at once, one thread each; wait for all. Returns what they
    raised: an exception in a thread is otherwise lost, and the test would pass without it."""
    errors: list[BaseException] = []

    def guarded(*a: object) -> None:
        try:
            work(*a)
        except BaseException as exc:  # handed back to the test
            errors.append(exc)

    threads = [threading.Thread(target=guarded, args=a) for a in args]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors
