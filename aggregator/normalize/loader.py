"""Validated chunks -> rows of the scratch database (in the parent, while workers check later chunks).

Why rows and not objects: what the global steps need of a resource (its facts, its reference
strings, its identifiers and match keys) is written straight to :class:`~.scratch.Scratch`
tables in one ``executemany`` per table and chunk, and its body to the :class:`~.scratch.Spool`,
so loading a record of any size leaves nothing per resource on the heap.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from aggregator.ledger import LedgerEntry
from aggregator.model import Quarantined, SourceInfo
from aggregator.normalize import ids
from aggregator.normalize.dedup import server_key
from aggregator.normalize.parse import KIND_RESOURCE, MISSING, Checked
from aggregator.normalize.references import INSERT_REF, Resolver, _base_of, pending_rows
from aggregator.normalize.scratch import Scratch, Spool, item_row


class Loader:
    """Stores checked chunks: invalid resources to the quarantine, valid ones to the scratch."""

    def __init__(self, quarantine: Callable[[Quarantined], None], spool: Spool, scratch: Scratch,
                 resolver: Resolver, sources: dict[int, SourceInfo]) -> None:
        self.quarantine = quarantine
        self.spool = spool
        self.scratch = scratch
        self.resolver = resolver
        self.sources = sources
        self.next_lid = 1

    def take(self, rows: list[LedgerEntry], results: list[Checked]) -> None:
        items: list[tuple[Any, ...]] = []
        refs: list[tuple[Any, ...]] = []
        idents: list[tuple[int, int, str, str]] = []
        ikeys: list[tuple[int, str]] = []
        lid = self.next_lid
        for e, (err, raw, facts) in zip(rows, results, strict=True):
            if err is not None or raw is None or facts is None:
                self.quarantine(Quarantined(e.source_id, e.kind, e.key, err or MISSING))
                continue
            meta = e.meta if e.meta is not None else {}
            sid, rtype = e.source_id, facts.rtype
            full = str(meta.get("fullUrl") or "")
            base = str(meta.get("base_url") or "")
            derived = bool(meta.get("derived"))
            skey = server_key(rtype, facts.rid, derived, sid, base, full, self.sources)
            items.append((lid, *item_row(sid, e.key, meta, facts, self.spool.append(raw), skey,
                                         ids.item_id(sid, KIND_RESOURCE, e.key))))
            self.resolver.note(sid, full, base)
            refs.extend(pending_rows(lid, facts.refs or (), facts.patient_refs or (), _base_of(full) if full else "",
                                     None))
            for system, value in facts.idents:
                idents.append((lid, sid, rtype, f"{system}|{value}"))
                idents.append((lid, sid, rtype, value))
            ikeys.extend((lid, k) for k in facts.ident_keys)
            lid += 1
        self.next_lid = lid
        db = self.scratch.db
        self.scratch.add_loaded(items)
        db.executemany(INSERT_REF, refs)
        db.executemany("INSERT INTO ident(lid, sid, rtype, k) VALUES (?,?,?,?)", idents)
        db.executemany("INSERT INTO ikey(lid, k) VALUES (?,?)", ikeys)
