"""Normalize -> check -> package for one case, from the raw store and the ledger.

Normalization is a pure function of the raw store, so these functions can be re-run at any time;
the same raw inputs give the same bundle and package. Items that normalization leaves out of the
bundle (invalid, another patient, duplicate, unsupported) are written back to the ledger as
``quarantine`` rows with their reason, so nothing is dropped silently; items kept with a warning
(a DICOM instance without pixel data, which is not an image) become ``note`` rows.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import delete, select

from aggregator.app import App
from aggregator.cases import case_info, source_infos
from aggregator.ledger import DONE, SKIPPED, LedgerEntry, Row, entries_for_case, record_rows
from aggregator.model import CaseInfo, NormalizedRecord, SourceInfo
from aggregator.store.db import Database
from aggregator.store.models import LedgerItem, Source

if TYPE_CHECKING:
    from aggregator.package.sealing import Sealing

KIND_QUARANTINE = "quarantine"
#: normalization's warnings about items it kept (``skipped`` like quarantine rows, so that the
#: ``done`` rows stay the raw items alone)
KIND_NOTE = "note"


@dataclass
class CaseRecord:
    case: CaseInfo
    sources: list[SourceInfo]
    record: NormalizedRecord
    db: Database

    def ledger(self) -> Iterator[LedgerEntry]:
        """The case's ledger rows (quarantine included), streamed anew from the database on each call.

        Not a list: at 200k resources the rows were ~1.3 MiB per 1k resources of ``check``'s
        memory, and the checklist keeps only the failed ones.
        """
        return entries_for_case(self.db, self.case.id)


def build_record(app: App, case_id: str) -> CaseRecord:
    case = case_info(app, case_id)  # first: an unknown case is a clear error

    from aggregator.normalize import normalize

    sources = source_infos(app, case_id)
    # streamed, not listed (one LedgerEntry per resource); WAL lets pulls write meanwhile.
    # Quarantine rows are ``skipped``, so the ``done`` rows are the raw items alone.
    done = entries_for_case(app.db, case_id, state=DONE)
    # scratch files (the spooled resources, the bundle) hold PHI: they live in the case's own
    # folder, never in a shared TMPDIR, and are removed with the record
    work = app.case_dir(case_id) / "tmp"
    work.mkdir(parents=True, exist_ok=True)
    record = normalize(case, sources, done, app.blobs(case_id), workdir=str(work))
    _write_quarantine(app, case_id, record)
    # the gap report and the package say when each source's data is from, not when the pull's
    # clock ran: two homes pulling the same data must write the same bytes (``case show`` and
    # the ledger keep the real pull times)
    return CaseRecord(case, _data_times(sources, record), record, app.db)


def _data_times(sources: list[SourceInfo], record: NormalizedRecord) -> list[SourceInfo]:
    """The sources with ``pulled_at`` as the time their data speaks for (see build_record)."""
    return [replace(s, pulled_at=record.source_times.get(s.id, s.pulled_at)) if s.pulled_at else s
            for s in sources]


def _write_quarantine(app: App, case_id: str, record: NormalizedRecord) -> None:
    with app.db.session() as s:
        source_ids = list(s.scalars(select(Source.id).where(Source.case_id == case_id)))
        s.execute(
            delete(LedgerItem).where(LedgerItem.source_id.in_(source_ids),
                                     LedgerItem.kind.in_((KIND_QUARANTINE, KIND_NOTE)))
        )
    by_source: dict[int, list[Row]] = {}
    for q in record.quarantine:
        by_source.setdefault(q.source_id, []).append(
            Row(KIND_QUARANTINE, f"{q.kind}:{q.key}", SKIPPED, reason=q.reason,
                meta={"item_kind": q.kind, **({"merged_into": q.survivor} if q.survivor else {})})
        )
    for n in record.notes:  # kept in the record, with a warning (e.g. DICOM without pixel data)
        by_source.setdefault(n.source_id, []).append(
            Row(KIND_NOTE, f"{n.kind}:{n.key}", SKIPPED, reason=n.reason, meta={"item_kind": n.kind, "kept": True})
        )
    for sid, rows in by_source.items():
        record_rows(app.db, sid, rows)


def check_case(app: App, case_id: str) -> tuple[dict[str, Any], CaseRecord]:
    """Normalize the case's record and run its checklist; keep both for reuse (see
    :mod:`aggregator.record_state`)."""
    from aggregator import record_state
    from aggregator.checklist import evaluate, load_checklist

    record_state.forget(app, case_id)
    cr = build_record(app, case_id)
    checklist = load_checklist(cr.case.checklist)
    report = evaluate(checklist, cr.record, cr.ledger(), cr.case, cr.sources)
    from aggregator.records_requests import track
    from aggregator.records_requests.annotate import annotate_report

    track(app, case_id, report)  # lines of records requests whose gaps are now filled are received
    annotate_report(app, case_id, report)  # each gap: asked for or not, when, due when
    folder = app.case_dir(case_id)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "gap-report.json").write_text(json.dumps(report, indent=2, sort_keys=True), encoding="utf-8")
    # the key is taken after the quarantine rows and the requests' updates, which it covers
    record_state.save(app, case_id, cr.record, report, record_state.state_key(app, case_id))
    return report, cr


def checked_case(app: App, case_id: str) -> tuple[dict[str, Any], CaseRecord]:
    """The case's record and gap report: as ``check`` kept them if nothing changed since, else
    computed now. What ``package`` and the API read."""
    from aggregator import record_state

    kept = record_state.load(app, case_id)
    if kept is None:
        return check_case(app, case_id)
    record, report = kept
    return report, CaseRecord(case_info(app, case_id), _data_times(source_infos(app, case_id), record),
                              record, app.db)


def package_case(app: App, case_id: str, out: Path, *, as_zip: bool = False,
                 sealing: Sealing | None = None) -> tuple[Path, dict[str, Any]]:
    """Check the case (or take what ``check`` kept) and write its package; a zip is staged in the
    case's own scratch folder, so its plaintext (before ``sealing`` encrypts it) never lands
    outside the case folder."""
    from aggregator.package import write_package

    report, cr = checked_case(app, case_id)
    path = write_package(out, cr.case, cr.record, report, app.blobs(case_id), cr.sources, as_zip=as_zip,
                         sealing=sealing, scratch=app.case_dir(case_id) / "tmp")
    return path, report
