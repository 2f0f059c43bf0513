"""The audit trail: every read of patient data, every pull and package, every change of access.

Each entry is a FHIR R4 ``AuditEvent`` (who, what, when, outcome; never a name, birth date or
any other PHI: cases, users, tokens and studies are named by their ids and UIDs) kept in an
append-only table, chained by hashes: an entry stores the SHA-256 of the entry before it and
its own hash over that link plus its canonical JSON. Editing an entry breaks its hash,
deleting one breaks the next entry's link, reordering breaks both; ``aggregator audit verify``
walks the chain and names the first entry that does not hold. Removing entries from the *end*
leaves a shorter valid chain, so verify also prints the head hash and count for an operator to
anchor elsewhere (a ticket, a log shipper).

Concurrent writers (the API's threads, workers, a CLI next to them) cannot fork the chain: the
``prev_hash`` column is unique, so of two writers that read the same head only one can append
after it; the other retries on the new head.

An entry is appended through SQLAlchemy, or with ``sqlite3`` by a command on the quick path
(:mod:`aggregator.store.lite`, e.g. ``case list``); both go through :func:`record`, which
makes the event, its canonical JSON and the row's values (the hashes included) once for both.
SQLAlchemy and the table models are imported only by the functions that use them.
"""

from __future__ import annotations

import getpass
import hashlib
import logging
import os
import socket
import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

from aggregator.errors import StoreError
from aggregator.store.lite import LiteDatabase

log = logging.getLogger(__name__)

GENESIS = "0" * 64
APPEND_ATTEMPTS = 500

#: FHIR AuditEvent.action codes
CREATE, READ, UPDATE, DELETE, EXECUTE = "C", "R", "U", "D", "E"
#: FHIR AuditEvent.outcome codes
SUCCESS, MINOR_FAILURE, SERIOUS_FAILURE = "0", "4", "8"
DENIED = MINOR_FAILURE

_DCM = "http://dicom.nema.org/resources/ontology/DCM"
_EVENT_TYPES = {  # DICOM audit event ids (DICOM PS3.15 A.5)
    READ: ("110110", "Patient Record"),
    CREATE: ("110110", "Patient Record"),
    UPDATE: ("110110", "Patient Record"),
    DELETE: ("110110", "Patient Record"),
    EXECUTE: ("110100", "Application Activity"),
}
_ACCESS = ("110136", "Security Roles Changed")


@dataclass(frozen=True)
class Actor:
    """Who acted: a service user (with the token used and the client address) or an OS user."""

    name: str
    kind: str = "user"  # user | os-user | system
    token_id: str | None = None
    address: str | None = None
    role: str | None = None

    @property
    def label(self) -> str:
        return f"{self.kind}:{self.name}"


def os_actor() -> Actor:
    """The operating-system user running a CLI command: CLI reads are audited too."""
    try:
        name = getpass.getuser()
    except (KeyError, OSError):
        name = str(os.getuid())
    return Actor(name=name, kind="os-user", address=socket.gethostname())


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def _canonical(obj: Any) -> bytes:
    return orjson.dumps(obj, option=orjson.OPT_SORT_KEYS)


def chain_hash(prev_hash: str, body: bytes) -> str:
    return hashlib.sha256(prev_hash.encode("ascii") + b"\n" + body).hexdigest()


def audit_event(actor: Actor, action: str, what: str, *, case_id: str | None, outcome: str,
                detail: str = "", entity: dict[str, str] | None = None, access_change: bool = False,
                recorded: str | None = None) -> dict[str, Any]:
    """The FHIR R4 AuditEvent for one act. ``what`` names the kind of data (gap-report, package...)."""
    code, display = _ACCESS if access_change else _EVENT_TYPES.get(action, _EVENT_TYPES[EXECUTE])
    agent: dict[str, Any] = {
        "who": {"identifier": {"system": f"urn:aggregator:{actor.kind}", "value": actor.name}},
        "requestor": True,
    }
    if actor.role:
        agent["role"] = [{"text": actor.role}]
    if actor.token_id:
        agent["altId"] = f"token:{actor.token_id}"
    if actor.address:
        agent["network"] = {"address": actor.address, "type": "2" if _is_ip(actor.address) else "1"}
    entities: list[dict[str, Any]] = []
    if case_id is not None:
        entities.append({"what": {"identifier": {"system": "urn:aggregator:case", "value": case_id}},
                         "type": {"system": "http://terminology.hl7.org/CodeSystem/audit-entity-type", "code": "2",
                                  "display": "System Object"},
                         "description": what})
    for k, v in sorted((entity or {}).items()):
        entities.append({"what": {"identifier": {"system": f"urn:aggregator:{k}", "value": v}}, "description": k})
    event: dict[str, Any] = {
        "resourceType": "AuditEvent",
        "type": {"system": _DCM, "code": code, "display": display},
        "subtype": [{"system": "urn:aggregator:audit", "code": what}],
        "action": action,
        "recorded": recorded or _now(),
        "outcome": outcome,
        "agent": [agent],
        "source": {"observer": {"display": "second-opinion-aggregator"},
                   "type": [{"system": "http://terminology.hl7.org/CodeSystem/security-source-type", "code": "4",
                             "display": "Application Server"}]},
    }
    if detail:
        event["outcomeDesc"] = detail[:500]
    if entities:
        event["entity"] = entities
    return event


def _is_ip(address: str) -> bool:
    try:
        socket.inet_pton(socket.AF_INET6 if ":" in address else socket.AF_INET, address)
        return True
    except OSError:
        return False


#: the columns of ``audit_events`` an entry writes (``id`` is the database's)
COLUMNS = ("recorded", "actor", "action", "what", "case_id", "outcome", "body", "prev_hash", "hash")
_INSERT = ("INSERT INTO audit_events (recorded, actor, action, what, case_id, outcome, body, prev_hash, hash) "
           "VALUES (:recorded, :actor, :action, :what, :case_id, :outcome, :body, :prev_hash, :hash)")
_HEAD = "SELECT hash FROM audit_events ORDER BY id DESC LIMIT 1"


class _Conflict(Exception):
    """Another writer appended after the head this one read."""


def record(db: Any, actor: Actor, action: str, what: str, *, case_id: str | None = None,
           outcome: str = SUCCESS, detail: str = "", entity: dict[str, str] | None = None,
           access_change: bool = False) -> str:
    """Append one entry to the chain; returns its hash. ``detail`` must be PHI-free.

    ``db`` is a :class:`~aggregator.store.db.Database` or a quick-path
    :class:`~aggregator.store.lite.LiteDatabase`; the entry is the same on either.
    """
    event = audit_event(actor, action, what, case_id=case_id, outcome=outcome, detail=detail, entity=entity,
                        access_change=access_change)
    body = _canonical(event)

    def row_after(head: str) -> dict[str, Any]:
        return {"recorded": event["recorded"], "actor": actor.label[:200], "action": action, "what": what[:100],
                "case_id": case_id, "outcome": outcome, "body": body.decode(), "prev_hash": head,
                "hash": chain_hash(head, body)}

    append = _append_sqlite if isinstance(db, LiteDatabase) else _append_orm
    for _ in range(APPEND_ATTEMPTS):
        try:
            return append(db, row_after)
        except _Conflict:
            continue  # another writer appended after the same head: link to the new one
    raise StoreError("the audit log is too busy to append to; the action was not recorded")


def _append_orm(db: Any, row_after: Callable[[str], dict[str, Any]]) -> str:
    from sqlalchemy import select
    from sqlalchemy.exc import IntegrityError

    from aggregator.store.models import AuditEventRow

    try:
        with db.session() as s:
            head = s.scalar(select(AuditEventRow.hash).order_by(AuditEventRow.id.desc()).limit(1)) or GENESIS
            row = row_after(head)
            s.add(AuditEventRow(**row))
    except IntegrityError:
        raise _Conflict() from None
    return str(row["hash"])


def _append_sqlite(db: LiteDatabase, row_after: Callable[[str], dict[str, Any]]) -> str:
    # BEGIN IMMEDIATE takes the write lock before the head is read, so on SQLite no other
    # writer can append in between; UNIQUE(prev_hash) still guards against one that does.
    conn = db.conn
    conn.execute("BEGIN IMMEDIATE")
    try:
        found = conn.execute(_HEAD).fetchone()
        row = row_after(found[0] if found else GENESIS)
        conn.execute(_INSERT, row)
        conn.execute("COMMIT")
    except sqlite3.IntegrityError:
        conn.execute("ROLLBACK")
        raise _Conflict() from None
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return str(row["hash"])


def events(db: Any, *, case_id: str | None = None) -> Iterator[dict[str, Any]]:
    """The entries in order, as ``{"seq", "hash", "event"}``; optionally for one case."""
    from sqlalchemy import select

    from aggregator.store.models import AuditEventRow

    with db.session() as s:
        q = select(AuditEventRow.id, AuditEventRow.hash, AuditEventRow.body).order_by(AuditEventRow.id)
        if case_id is not None:
            q = q.where(AuditEventRow.case_id == case_id)
        rows = list(s.execute(q))
    for rid, digest, body in rows:
        yield {"seq": int(rid), "hash": digest, "event": orjson.loads(body)}


@dataclass(frozen=True)
class Verification:
    ok: bool
    count: int
    head: str
    problem: str | None = None
    bad_seq: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "count": self.count, "head": self.head, "problem": self.problem,
                "bad_entry": self.bad_seq}


def verify(db: Any) -> Verification:
    """Walk the whole chain; the first entry whose link or hash does not hold is named."""
    from sqlalchemy import select

    from aggregator.store.models import AuditEventRow

    prev = GENESIS
    n = 0
    with db.session() as s:
        rows = s.execute(select(AuditEventRow.id, AuditEventRow.prev_hash, AuditEventRow.hash, AuditEventRow.body,
                                AuditEventRow.action, AuditEventRow.outcome, AuditEventRow.case_id)
                         .order_by(AuditEventRow.id))
        for rid, prev_hash, digest, body, action, outcome, case_id in rows:
            n += 1
            if prev_hash != prev:
                return Verification(False, n, prev, "entry does not follow the one before it "
                                    "(an entry was deleted, inserted or moved)", int(rid))
            if chain_hash(prev_hash, body.encode()) != digest:
                return Verification(False, n, prev, "entry content does not match its hash (edited)", int(rid))
            try:
                event = orjson.loads(body)
            except orjson.JSONDecodeError:
                return Verification(False, n, prev, "entry is not valid JSON", int(rid))
            if event.get("action") != action or event.get("outcome") != outcome or case_of(event) != case_id:
                return Verification(False, n, prev, "entry's index columns differ from its content (edited)",
                                    int(rid))
            prev = digest
    return Verification(True, n, prev)


def case_of(event: dict[str, Any]) -> str | None:
    for e in event.get("entity") or []:
        ident = (e.get("what") or {}).get("identifier") or {}
        if ident.get("system") == "urn:aggregator:case":
            return str(ident.get("value"))
    return None
