"""Run a connector's pull for one source: ledger, heartbeat, cursor, final state.

The cursor is written in the same transaction as the last ledger rows and the pull's final
state, so a crash can cause a re-fetch but never a gap. Connectors that checkpoint (media,
DIMSE; :meth:`connectors.base.Sink.checkpoint`) also leave, with each batch of rows, a partial
cursor that an interrupted pull's successor resumes from; the finished pull's cursor replaces
those. While a pull runs, a heartbeat thread
touches ``pulls.heartbeat_at``; any pull whose heartbeat is older than ``STALE_AFTER`` is
marked failed ("interrupted") by the next command that looks, so no pull stays "running"
forever after its process died.

Pulls of one case are serialized by the case's pull lock (:mod:`aggregator.jobs.lock`), which
the operating system or the database frees when the holder dies. That also makes a dead pull
visible at once: a "running" pull of a case whose lock is free has no process behind it.
"""

from __future__ import annotations

import logging
import shutil
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, select, update

from aggregator.app import App
from aggregator.cases import connector_config, get_case
from aggregator.errors import AggregatorError, NotFound, is_retriable
from aggregator.jobs import lock as case_lock
from aggregator.jobs.hints import study_hints
from aggregator.ledger import FAILED, SKIPPED, LedgerSink, entries_for_case, save_cursor, skipped_rows
from aggregator.store.models import Cursor as CursorRow
from aggregator.store.models import LedgerItem, Pull, Source, utcnow
from connectors.base import (
    CHECKPOINT_PREFIX,
    KIND_DICOM,
    KIND_QUERY,
    Cursor,
    NullProgress,
    PatientRef,
    Progress,
    create_connector,
)

log = logging.getLogger(__name__)

STALE_AFTER = timedelta(minutes=10)
HEARTBEAT_EVERY = 20.0


@dataclass
class PullSummary:
    source_id: int
    label: str
    pull_id: int
    state: str
    method: str
    counts: dict[str, int] = field(default_factory=dict)
    error: str | None = None
    skipped: list[dict[str, str]] = field(default_factory=list)
    """What this pull skipped (kind, key, reason): unsupported files are not in the record."""
    retriable: bool = False
    """The pull failed with an error that trying again may cure (a job retries it with backoff)."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source_id,
            "label": self.label,
            "pull": self.pull_id,
            "state": self.state,
            "method": self.method,
            "items": self.counts,
            "error": self.error,
            "skipped": self.skipped,
            "retriable": self.retriable,
        }


def reap_stale_pulls(app: App, *, now: datetime | None = None) -> int:
    """Mark pulls that stopped sending heartbeats as failed; returns how many."""
    now = now or utcnow()
    cutoff = now - STALE_AFTER
    with app.db.session() as s:
        # SQLite returns naive datetimes; compare in UTC without tzinfo there.
        if app.db.engine.dialect.name == "sqlite":
            cutoff = cutoff.replace(tzinfo=None)
        result = s.execute(
            update(Pull)
            .where(Pull.state == "running", Pull.heartbeat_at < cutoff)
            .values(state="failed", finished_at=now, error="interrupted: the pull stopped sending heartbeats")
        )
        return int(getattr(result, "rowcount", 0) or 0)


DEAD = "interrupted: the process running the pull is gone"


def reap_dead_pulls(app: App, case_id: str | None = None) -> int:
    """Mark "running" pulls whose case lock is free as failed, at once; returns how many.

    With ``case_id`` the caller holds that case's lock, so its running pulls are dead by
    definition; without, every case with a running pull has its lock probed.
    """
    with app.db.session() as s:
        q = select(Pull.id, Source.case_id).join(Source, Source.id == Pull.source_id).where(Pull.state == "running")
        if case_id is not None:
            q = q.where(Source.case_id == case_id)
        running = [(int(pid), str(cid)) for pid, cid in s.execute(q)]
    if not running:
        return 0
    dead_cases = {cid for _, cid in running if cid == case_id or not case_lock.is_held(app, cid)}
    dead = [pid for pid, cid in running if cid in dead_cases]
    if not dead:
        return 0
    with app.db.session() as s:
        s.execute(update(Pull).where(Pull.id.in_(dead), Pull.state == "running")
                  .values(state="failed", finished_at=utcnow(), error=DEAD))
    log.info("marked %d pull(s) of dead processes as failed", len(dead))
    return len(dead)


def clean_dead_temp(app: App, case_id: str) -> None:
    """Remove what killed pulls left behind: archive extraction folders and partial blobs.

    Only called with the case's lock held, so no live pull of this case is using them.
    """
    case_dir = app.case_dir(case_id)
    for d in (case_dir / "tmp").glob("aggregator-media-*"):
        shutil.rmtree(d, ignore_errors=True)
    raw_tmp = app.blobs(case_id).root / ".tmp"
    if raw_tmp.is_dir():
        for f in raw_tmp.glob("in-*"):
            f.unlink(missing_ok=True)


def load_cursor(app: App, source_id: int) -> Cursor:
    with app.db.session() as s:
        rows = s.scalars(select(CursorRow).where(CursorRow.source_id == source_id))
        return {r.stream: dict(r.value) for r in rows}


def _patient_ref(app: App, src: Source) -> PatientRef:
    case = get_case(app, src.case_id)
    return PatientRef(
        id=src.patient_id,
        identifier=src.config.get("patient_identifier"),
        issuer=src.config.get("issuer"),
        name=case.patient_name,
        birth_date=case.birth_date,
    )


class _Heartbeat(threading.Thread):
    def __init__(self, app: App, pull_id: int) -> None:
        super().__init__(daemon=True, name=f"heartbeat-{pull_id}")
        self.app = app
        self.pull_id = pull_id
        self.stop_event = threading.Event()

    def run(self) -> None:
        while not self.stop_event.wait(HEARTBEAT_EVERY):
            try:
                with self.app.db.session() as s:
                    s.execute(update(Pull).where(Pull.id == self.pull_id).values(heartbeat_at=utcnow()))
            except Exception:  # a missed heartbeat is not fatal; the next one may succeed
                log.warning("heartbeat for pull %s failed", self.pull_id)

    def stop(self) -> None:
        self.stop_event.set()


def audit_retrievals(app: App, pull_id: int, case_id: str, actor: Any) -> int:
    """One audit entry per DICOM study this pull retrieved (study UID and instance count)."""
    from aggregator import audit

    per_study: dict[str, int] = {}
    with app.db.session() as s:
        q = select(LedgerItem.meta).where(LedgerItem.pull_id == pull_id, LedgerItem.kind == KIND_DICOM,
                                          LedgerItem.state == "done")
        for (meta,) in s.execute(q):
            uid = meta.get("study_uid") if isinstance(meta, dict) else None
            per_study[str(uid or "unknown")] = per_study.get(str(uid or "unknown"), 0) + 1
    for uid, n in sorted(per_study.items()):
        audit.record(app.db, actor, audit.EXECUTE, "dicom-retrieve", case_id=case_id,
                     entity={"study": uid, "instances": str(n), "pull": str(pull_id)})
    return len(per_study)


def run_pull(app: App, source_id: int, progress: Progress | None = None, *, lock_held: bool = False,
             wait: float | None = 0.0, actor: Any = None, job_id: str | None = None,
             worker: str | None = None) -> PullSummary:
    """Pull one source now, in this thread, under the case's pull lock.

    ``lock_held`` says the caller (:func:`pull_case`) already holds it; otherwise it is taken
    here, waiting up to ``wait`` seconds (None: as long as it takes).
    """
    if not lock_held:
        with app.db.session() as s:
            row = s.get(Source, source_id)
            if row is None:
                raise NotFound(f"no source with id {source_id}")
            owner = row.case_id
        with case_lock.acquire(app, owner, wait=wait):
            reap_dead_pulls(app, owner)
            clean_dead_temp(app, owner)
            return run_pull(app, source_id, progress, lock_held=True, actor=actor, job_id=job_id, worker=worker)
    progress = progress or NullProgress()
    reap_stale_pulls(app)
    kind, config, src = connector_config(app, source_id)
    if kind in ("dimse", "dicomweb"):
        # report to study: the case's FHIR reports and ImagingStudies name studies to retrieve
        config = {**config, "study_hints": study_hints(entries_for_case(app.db, src.case_id), app.blobs(src.case_id))}
    case_id = src.case_id
    with app.db.session() as s:
        pull = Pull(source_id=source_id, state="running", method="", counts={}, job_id=job_id,
                    worker=(worker or _this_process())[:200])
        s.add(pull)
        s.flush()
        pull_id = pull.id
    since = load_cursor(app, source_id)
    sink = LedgerSink(app.db, app.blobs(case_id), source_id, pull_id)
    beat = _Heartbeat(app, pull_id)
    beat.start()
    state, error, retriable = "done", None, False
    try:
        connector = create_connector(kind, config)
        # a job's progress can stop a connector that has its own way (DIMSE sends C-CANCEL-RQ)
        on_cancel = getattr(progress, "on_cancel", None)
        connector_cancel = getattr(connector, "cancel", None)
        if callable(on_cancel) and callable(connector_cancel):
            on_cancel(connector_cancel, stops_itself=bool(getattr(connector, "stops_itself_on_cancel", False)))
        try:
            new_cursor = connector.pull(_patient_ref(app, src), since or None, sink, progress)
        finally:
            connector.close()
        state = "partial" if sink.counts.get("failed") else "done"
        with app.db.session() as s:
            sink.drop_checkpoint()
            sink.flush(s)
            save_cursor(s, source_id, new_cursor)
            # the finished pull's cursor covers what interrupted pulls had checkpointed
            s.execute(delete(CursorRow).where(CursorRow.source_id == source_id,
                                              CursorRow.stream.startswith(CHECKPOINT_PREFIX)))
            # Queries run again on every pull: an earlier query failure this pull did not
            # repeat has been resolved, so it must stop showing up as a gap.
            s.execute(
                delete(LedgerItem).where(
                    LedgerItem.source_id == source_id,
                    LedgerItem.kind == KIND_QUERY,
                    LedgerItem.state == FAILED,
                    LedgerItem.pull_id.is_distinct_from(pull_id),
                )
            )
            s.execute(
                update(Pull).where(Pull.id == pull_id).values(
                    state=state, finished_at=utcnow(), method=sink.method, counts=dict(sink.counts)
                )
            )
    except BaseException as exc:
        state = "failed"
        retriable = is_retriable(exc)
        # Our own errors are written PHI-free; anything else is reported by type only.
        error = str(exc) if isinstance(exc, AggregatorError) else f"unexpected {type(exc).__name__}"
        log.error("pull %s of source %s failed: %s", pull_id, source_id, error)
        try:
            sink.flush()
        finally:
            with app.db.session() as s:
                s.execute(
                    update(Pull).where(Pull.id == pull_id).values(
                        state="failed", finished_at=utcnow(), method=sink.method, counts=dict(sink.counts),
                        error=error,
                    )
                )
        if not isinstance(exc, Exception):
            raise
    finally:
        beat.stop()
    if sink.counts.get("done"):
        from aggregator.audit import os_actor

        audit_retrievals(app, pull_id, case_id, actor or os_actor())
    skipped = skipped_rows(app.db, source_id, pull_id) if sink.counts.get(SKIPPED) else []
    return PullSummary(source_id, src.label, pull_id, state, sink.method, dict(sink.counts), error, skipped,
                       retriable)


def pull_case(
    app: App,
    case_id: str,
    *,
    source_ids: Sequence[int] | None = None,
    progress_for: Any = None,
    max_parallel: int = 4,
    wait: float | None = 0.0,
    actor: Any = None,
    job_id: str | None = None,
    worker: str | None = None,
) -> list[PullSummary]:
    """Pull the case's sources in parallel (one thread each, up to ``max_parallel``).

    The case's pull lock is held throughout; a second pull of the same case waits up to
    ``wait`` seconds (None: until the first ends) and then raises :class:`~aggregator.jobs.lock.CaseBusy`.
    """
    get_case(app, case_id)
    with case_lock.acquire(app, case_id, wait=wait):
        reap_dead_pulls(app, case_id)
        clean_dead_temp(app, case_id)
        return _pull_sources(app, case_id, source_ids, progress_for, max_parallel, actor, job_id, worker)


def _this_process() -> str:
    import os
    import socket

    return f"cli:{socket.gethostname()}:{os.getpid()}"


def _pull_sources(app: App, case_id: str, source_ids: Sequence[int] | None, progress_for: Any,
                  max_parallel: int, actor: Any, job_id: str | None = None,
                  worker: str | None = None) -> list[PullSummary]:
    with app.db.session() as s:
        q = select(Source.id, Source.label).where(Source.case_id == case_id).order_by(Source.id)
        rows = [(int(sid), str(label)) for sid, label in s.execute(q)]
    if source_ids:
        wanted = set(source_ids)
        missing = wanted - {sid for sid, _ in rows}
        if missing:
            raise NotFound(f"case {case_id!r} has no source with id {sorted(missing)[0]}")
        rows = [(sid, label) for sid, label in rows if sid in wanted]
    if not rows:
        return []

    def one(row: tuple[int, str]) -> PullSummary:
        sid, label = row
        progress = progress_for(label) if progress_for else None
        return run_pull(app, sid, progress, lock_held=True, actor=actor, job_id=job_id, worker=worker)

    with ThreadPoolExecutor(max_workers=max(1, min(max_parallel, len(rows)))) as pool:
        return list(pool.map(one, rows))
