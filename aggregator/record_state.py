"""The last checked record of a case, kept with the state it was computed from.

Why: normalizing is by far the largest cost of ``check`` and ``package`` (most of a minute at
100k documents), and ``package`` used to normalize the whole record again right after ``check``
had done it. Normalization and the checklist are pure functions of the case's settings, its
sources, its ledger, its records requests and the code's version (see
:mod:`aggregator.pipeline`). :func:`state_key` hashes those; ``check`` keeps its record (the
bundle file and the side lists) and its gap report under that key in the case's folder, and
``package`` or the API reuse them while the key still holds. Any change (a pull, a new source,
quarantine rows, a request marked sent, a new checklist file, another version) changes the key,
and the record is computed again.

The kept files hold PHI: they live in the case's own folder, owner-only, and go with the case.
"""

from __future__ import annotations

import hashlib
import os
from array import array
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy import func, select

from aggregator import __version__
from aggregator.app import App
from aggregator.model import DocumentFile, ImageRef, NormalizedRecord, Quarantined, TextProfile, new_bundle_path
from aggregator.privacy import make_private, make_private_dir
from aggregator.store.models import Case, LedgerItem, Pull, RecordsRequest, RecordsRequestItem, Source

FOLDER = "record"
STATE, BUNDLE = "state.json", "bundle.json"
#: the report as computed, in its own key order (``gap-report.json`` in the case folder, which the
#: API serves, is sorted for people and diffs)
REPORT = "report.json"
#: bump when the layout of ``state.json`` changes: an older file is then ignored, not misread
FORMAT = 1


def state_key(app: App, case_id: str) -> str:
    """A digest of everything a case's record and gap report are computed from.

    The ledger and the pulls are summed up by count, highest id and latest update rather than
    read whole: at 200k rows this is one indexed aggregate, cheap enough to ask on every request.
    """
    h = hashlib.sha256(f"v{__version__}/f{FORMAT}".encode())
    with app.db.session() as s:
        case = s.get(Case, case_id)
        if case is not None:
            h.update(repr([getattr(case, c.key) for c in Case.__table__.columns]).encode())
            if case.checklist.endswith((".yaml", ".yml")):
                try:
                    h.update(str(os.stat(case.checklist).st_mtime_ns).encode())
                except OSError:
                    h.update(b"checklist-missing")
        for row in s.execute(select(Source.id, Source.kind, Source.endpoint_id, Source.patient_id, Source.config)
                             .where(Source.case_id == case_id).order_by(Source.id)):
            h.update(repr(tuple(row)).encode())
        ids = select(Source.id).where(Source.case_id == case_id).scalar_subquery()
        # Ledger rows are written only by pulls (which beat their heartbeat with every batch and
        # end with a finish time) and by check itself (its quarantine rows, written before the
        # key is taken), so the pulls stand for the rows: max(updated_at) read every ledger row
        # and count(*) every index entry (87 and 14 ms at 200k rows); max(id) is one index seek.
        ledger = s.execute(select(func.max(LedgerItem.id)).where(LedgerItem.source_id.in_(ids))).one()
        pulls = s.execute(select(func.count(), func.max(Pull.id), func.max(Pull.finished_at),
                                 func.max(Pull.heartbeat_at), func.count(Pull.finished_at))
                          .where(Pull.source_id.in_(ids))).one()
        h.update(repr((tuple(ledger), tuple(pulls))).encode())
        # requests change what the report says of a gap (requested on, due on)
        for req in s.scalars(select(RecordsRequest).where(RecordsRequest.case_id == case_id)
                             .order_by(RecordsRequest.id)):
            h.update(repr([getattr(req, c.key) for c in RecordsRequest.__table__.columns]).encode())
            for item in req.items:
                h.update(repr([getattr(item, c.key) for c in RecordsRequestItem.__table__.columns]).encode())
    return h.hexdigest()


def folder(app: App, case_id: str) -> Path:
    return app.case_dir(case_id) / FOLDER


def forget(app: App, case_id: str) -> None:
    """Drop the kept state (before a new computation: a crash midway must not leave a stale key)."""
    (folder(app, case_id) / STATE).unlink(missing_ok=True)


def save(app: App, case_id: str, record: NormalizedRecord, report: dict[str, Any], key: str) -> None:
    """Keep ``record`` and ``report`` as computed under ``key``.

    The bundle file is linked, not copied, where the filesystem allows: it is the largest part
    (tens of MB at 100k resources) and the record's own copy is removed with the record anyway.
    ``state.json`` is written last, by rename, so a reader sees the old state or the whole new one.
    """
    d = make_private_dir(folder(app, case_id))
    forget(app, case_id)
    bundle = d / BUNDLE
    bundle.unlink(missing_ok=True)
    try:
        os.link(record.bundle_path, bundle)
    except OSError:
        with open(record.bundle_path, "rb") as src, open(bundle, "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
    make_private(bundle)
    (d / REPORT).write_bytes(orjson.dumps(report, default=_plain))
    make_private(d / REPORT)
    state = {
        "format": FORMAT, "key": key, "bundle_size": bundle.stat().st_size,
        "index": {t: [list(o), list(n)] for t, (o, n) in record._index.items()},
        # orjson writes dataclasses itself, in native code: dataclasses.asdict (a deep copy of
        # every field) was 17 s of check at 100k documents
        "documents": record.documents, "images": record.images,
        "quarantine": record.quarantine, "notes": record.notes,
        "unresolved": record.unresolved, "conflicts": record.conflicts,
        "patient_ref": record.patient_ref, "identity": record.identity,
        "source_times": {str(k): v for k, v in record.source_times.items()},
        "kept": [[list(k), v] for k, v in record.kept.items()],
    }
    tmp = d / (STATE + ".tmp")
    tmp.write_bytes(orjson.dumps(state, default=_plain))
    make_private(tmp)
    os.replace(tmp, d / STATE)


def _document(x: dict[str, Any]) -> DocumentFile:
    text = x.get("text")
    profile = TextProfile(**{**text, "sections": frozenset(text["sections"])}) if text else None
    return DocumentFile(**{**x, "text": profile})


def _plain(value: object) -> object:
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    raise TypeError(type(value).__name__)


def _state(app: App, case_id: str, key: str) -> dict[str, Any] | None:
    d = folder(app, case_id)
    try:
        state = orjson.loads((d / STATE).read_bytes())
        if (not isinstance(state, dict) or state.get("format") != FORMAT or state.get("key") != key
                or (d / BUNDLE).stat().st_size != state.get("bundle_size")):
            return None
    except (OSError, orjson.JSONDecodeError):
        return None
    return state


def report_bytes(app: App, case_id: str, key: str | None = None) -> bytes | None:
    """The gap report's JSON as ``check`` wrote it into the case folder, if it still holds
    (None: compute it again)."""
    if _state(app, case_id, key or state_key(app, case_id)) is None:
        return None
    try:
        return (app.case_dir(case_id) / "gap-report.json").read_bytes()
    except OSError:
        return None


def load(app: App, case_id: str, key: str | None = None) -> tuple[NormalizedRecord, dict[str, Any]] | None:
    """The kept record and gap report if they still hold (None: compute them again).

    The record gets its own link (or copy) of the bundle in a fresh scratch folder, which it
    removes when closed, exactly like a record just computed.
    """
    state = _state(app, case_id, key or state_key(app, case_id))
    if state is None:
        return None
    d = folder(app, case_id)
    try:
        report = orjson.loads((d / REPORT).read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return None
    work = app.case_dir(case_id) / "tmp"
    work.mkdir(parents=True, exist_ok=True)
    path = new_bundle_path(str(work))
    try:
        os.link(d / BUNDLE, path)
    except OSError:
        with open(d / BUNDLE, "rb") as src, open(path, "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
    index = {t: (array("q", o), array("q", n)) for t, (o, n) in state["index"].items()}
    record = NormalizedRecord.adopt(
        path, index,
        documents=[_document(x) for x in state["documents"]],
        images=[ImageRef(**x) for x in state["images"]],
        quarantine=[Quarantined(**x) for x in state["quarantine"]],
        unresolved=state["unresolved"], conflicts=state["conflicts"], patient_ref=state["patient_ref"],
        source_times={int(k): v for k, v in state["source_times"].items()},
        kept={(int(k[0]), str(k[1]), str(k[2])): int(v) for k, v in state["kept"]},
    )
    record.notes = [Quarantined(**x) for x in state["notes"]]
    record.identity = state["identity"]
    return record, report
