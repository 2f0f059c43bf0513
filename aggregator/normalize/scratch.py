"""The scratch database of one normalization: every resource's facts, references and decisions
as rows of an on-disk SQLite database rather than Python objects.

Why: a Python object per resource (its facts, its strings, its slot in lookup dicts, its cached
reference targets) made the normalizing process grow by ~2.4 MiB per thousand resources. Rows in
SQLite cost the heap nothing beyond a bounded page cache, and the global steps become indexed
lookups, joins and ``GROUP BY`` scans in C. Steps that must look at one resource in Python (the
winner of a duplicate group, a Patient, a report's attachments) load an :class:`Item` *view* of
its row, use it and drop it.

The database is SQLite's private temporary database (an empty file name): it lives in the page
cache until :data:`CACHE_KIB` is exceeded and then spills to a file that SQLite unlinks as soon
as it opens it, in the case's scratch folder (``temp_store_directory``), so the PHI it holds never
leaves that folder and disappears with the connection, even if the process dies. No journal and
no syncs: nothing here has to survive a crash.

Items are named by ``lid`` (the row id, in load order) and ordered by ``ord``: for loaded
resources the rank in (source, ledger key) order, which every "first one wins" rule follows; items
made by normalization itself (the merged Patient, DICOM studies, loose documents) come after them.
"""

from __future__ import annotations

import os
import sqlite3
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import orjson

from aggregator.errors import AggregatorError
from aggregator.normalize.facts import Facts

#: page cache of the scratch database (KiB): what it may hold in memory, whatever the record size
CACHE_KIB = 16384

# item.state
LOADED, KEPT, DROPPED, EXCLUDED, PATIENT = 0, 1, 2, 3, 4

#: what a report carries, as bits of ``item.carries``
CARRIES = ("text", "results", "conclusion")

SCHEMA = """
CREATE TABLE item(
  lid INTEGER PRIMARY KEY, ord INTEGER,
  sid INTEGER NOT NULL, key TEXT NOT NULL, rtype TEXT NOT NULL, rid TEXT NOT NULL,
  file TEXT NOT NULL, bundle TEXT NOT NULL, full_url TEXT NOT NULL, base_url TEXT NOT NULL,
  derived INTEGER NOT NULL, off INTEGER NOT NULL, len INTEGER NOT NULL,
  status TEXT NOT NULL, doc_status TEXT NOT NULL, updated REAL NOT NULL, version INTEGER NOT NULL,
  carries INTEGER NOT NULL, obs_key BLOB, study_uid TEXT NOT NULL, cbase BLOB NOT NULL, skey TEXT,
  lookup INTEGER NOT NULL, uid TEXT NOT NULL, new_id TEXT NOT NULL DEFAULT '',
  state INTEGER NOT NULL DEFAULT 0, gid TEXT, chash BLOB, cshared INTEGER NOT NULL DEFAULT 0,
  patch BLOB, plan BLOB);
CREATE TABLE ref(lid INTEGER NOT NULL, pos INTEGER NOT NULL, text TEXT NOT NULL, mode INTEGER NOT NULL,
  url TEXT, ty TEXT, rid TEXT, base TEXT, target INTEGER, PRIMARY KEY(lid, pos)) WITHOUT ROWID;
CREATE TABLE pend(lid INTEGER NOT NULL, pos INTEGER NOT NULL, text TEXT NOT NULL, mode INTEGER NOT NULL,
  url TEXT, ty TEXT, rid TEXT, base TEXT, target INTEGER);
CREATE TABLE ident(lid INTEGER NOT NULL, sid INTEGER NOT NULL, rtype TEXT NOT NULL, k TEXT NOT NULL);
CREATE TABLE ikey(lid INTEGER NOT NULL, k TEXT NOT NULL);
CREATE TABLE xsrc(lid INTEGER NOT NULL, sid INTEGER NOT NULL, PRIMARY KEY(lid, sid)) WITHOUT ROWID;
CREATE TABLE ch(lid INTEGER NOT NULL, chash BLOB NOT NULL);
CREATE TABLE chg(ord INTEGER NOT NULL);
CREATE TABLE mk(k TEXT NOT NULL, lid INTEGER NOT NULL);
CREATE TABLE grp(root INTEGER NOT NULL, ord INTEGER NOT NULL);
CREATE TABLE sub(leader INTEGER NOT NULL, ord INTEGER NOT NULL, rel INTEGER NOT NULL);
CREATE TABLE drop_(lid INTEGER NOT NULL, win INTEGER NOT NULL, reason TEXT NOT NULL);
"""

#: indexes built once every loaded resource is in (building them once is cheaper than keeping
#: them up to date row by row)
INDEXES = """
CREATE UNIQUE INDEX item_ord ON item(ord);
CREATE INDEX item_full ON item(sid, full_url, bundle, ord);
CREATE INDEX item_tid ON item(sid, rtype, rid, bundle, ord);
CREATE INDEX ident_k ON ident(sid, rtype, k);
"""

_COLS = ("lid", "ord", "sid", "key", "rtype", "rid", "file", "bundle", "full_url", "base_url", "derived", "off",
         "len", "status", "doc_status", "updated", "version", "carries", "study_uid", "skey", "new_id", "chash",
         "patch", "plan")
#: the columns an :class:`Item` view is made of, and the same for a table aliased ``i``
ITEM_COLS = ", ".join(_COLS)
ITEM_COLS_I = ", ".join(f"i.{c}" for c in _COLS)
_ROW = f"SELECT {ITEM_COLS} FROM item WHERE lid = ?"  # noqa: S608 - column names only


def carries_mask(carries: Iterable[str]) -> int:
    return sum(1 << i for i, c in enumerate(CARRIES) if c in carries)


def carries_set(mask: int) -> frozenset[str]:
    return frozenset(c for i, c in enumerate(CARRIES) if mask >> i & 1)


class Scratch:
    """One normalization's scratch database (see the module docstring)."""

    def __init__(self, directory: str | None = None) -> None:
        self.db = sqlite3.connect("", isolation_level=None, check_same_thread=False)
        where = (directory or tempfile.gettempdir()).replace("'", "''")  # an SQL string literal
        for pragma in (f"temp_store_directory = '{where}'", "temp_store = FILE", f"cache_size = -{CACHE_KIB}",
                       "journal_mode = OFF", "synchronous = OFF", "locking_mode = EXCLUSIVE"):
            self.db.execute(f"PRAGMA {pragma}")
        self.db.executescript(SCHEMA)
        self.db.execute("BEGIN")
        self._next_ord = 0

    def close(self) -> None:
        self.db.close()

    # -- loading -------------------------------------------------------------------------------

    def add_loaded(self, rows: Sequence[tuple[Any, ...]]) -> None:
        """Insert loaded resources: ``(lid, *item_row(...))`` each (see :func:`item_row`)."""
        self.db.executemany(
            "INSERT INTO item(lid, sid, key, rtype, rid, file, bundle, full_url, base_url, derived, off, len, status, "
            "doc_status, updated, version, carries, obs_key, study_uid, cbase, skey, uid, lookup) "
            "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,1)", rows)

    def finish_load(self) -> None:
        """Rank loaded resources in (source, key) order and build the lookup indexes."""
        self.db.execute("UPDATE item SET ord = o.r FROM (SELECT lid, row_number() OVER (ORDER BY sid, key) - 1 AS r "
                        "FROM item) AS o WHERE o.lid = item.lid")
        for statement in INDEXES.split(";"):  # not executescript: it would commit the transaction
            if statement.strip():
                self.db.execute(statement)
        self._next_ord = self.count()

    def next_ord(self) -> int:
        """One more than the highest ``ord`` given so far (the size of an array over ranks)."""
        return self._next_ord

    def count(self) -> int:
        return int(self.db.execute("SELECT count(*) FROM item").fetchone()[0])

    def add_made(self, sid: int, key: str, meta: dict[str, Any], facts: Facts, span: tuple[int, int],
                 new_id: str, state: int) -> int:
        """Insert an item made by normalization (after the loaded ones); returns its lid."""
        row = item_row(sid, key, meta, facts, span, None, new_id)
        cur = self.db.execute(
            "INSERT INTO item(sid, key, rtype, rid, file, bundle, full_url, base_url, derived, off, len, status, "
            "doc_status, updated, version, carries, obs_key, study_uid, cbase, skey, uid, lookup, ord, new_id, state) "
            "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,0,?,?,?)", (*row, self._next_ord, new_id, state))
        self._next_ord += 1
        assert cur.lastrowid is not None
        return int(cur.lastrowid)

    # -- reading -------------------------------------------------------------------------------

    def rows(self, where: str, params: Sequence[Any] = (), order: str = "ord") -> Iterator[tuple[Any, ...]]:
        """Item rows (:data:`ITEM_COLS`) matching ``where``, in ``order``."""
        sql = f"SELECT {ITEM_COLS} FROM item WHERE {where} ORDER BY {order}"  # noqa: S608 - callers' constants
        return iter(self.db.execute(sql, params))

    def row(self, lid: int) -> tuple[Any, ...]:
        row = self.db.execute(_ROW, (lid,)).fetchone()
        if row is None:
            raise AggregatorError(f"normalization scratch row {lid} is missing")
        return tuple(row)

    def lids(self, sql: str, params: Sequence[Any] = ()) -> list[int]:
        """The first column of a query as ints (for small result sets, or before updating rows)."""
        return [int(r[0]) for r in self.db.execute(sql, params)]

    def put(self, lid: int, **values: Any) -> None:
        if not set(values) <= set(_COLS):
            raise AggregatorError("unknown scratch column")
        cols = ", ".join(f"{k} = ?" for k in values)
        self.db.execute(f"UPDATE item SET {cols} WHERE lid = ?", (*values.values(), lid))  # noqa: S608 - checked names

    def add_sources(self, lid: int, sids: Iterable[int]) -> None:
        """Record that the item also came from ``sids`` (Provenance targets it from each)."""
        self.db.executemany("INSERT OR IGNORE INTO xsrc(lid, sid) VALUES (?, ?)", ((lid, s) for s in sids))


class Spool:
    """Append-only scratch file of resource bodies (orjson bytes): rows name a body by its
    ``(offset, length)`` here.

    The file is unlinked as soon as it is created: it disappears when closed, and even when the
    process dies, so no PHI is left behind. ``pread``/``pwrite`` keep no file position, and
    recently written bodies are served from the page cache.
    """

    def __init__(self, directory: str | None = None) -> None:
        fd, path = tempfile.mkstemp(prefix="aggregator-spool-", dir=directory)
        os.unlink(path)
        self._fd = fd
        self._end = 0

    def append(self, data: bytes) -> tuple[int, int]:
        """Write ``data`` at the end; returns ``(offset, length)``."""
        off = self._end
        view = memoryview(data)
        while view:
            n = os.pwrite(self._fd, view, off + (len(data) - len(view)))
            view = view[n:]
        self._end += len(data)
        return off, len(data)

    def read(self, offset: int, length: int) -> bytes:
        data = os.pread(self._fd, length, offset)
        if len(data) != length:
            raise AggregatorError("normalization scratch file is truncated")
        return data

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class Item:
    """A view of one ``item`` row, loaded for a step that must look at the resource in Python.

    Changing an attribute changes nothing in the database: steps write their decisions with
    :meth:`Scratch.set` (or :meth:`store` for the body). The body is read with :meth:`body`
    (a fresh dict each time).
    """

    __slots__ = ("_len", "_off", "_scratch", "_spool", "base_url", "bundle", "carries", "chash", "derived",
                 "doc_status", "file", "full_url", "key", "lid", "new_id", "ord", "patch", "plan", "rid",
                 "rtype", "skey", "source_id", "status", "study_uid", "updated", "version")

    def __init__(self, row: Sequence[Any], scratch: Scratch, spool: Spool) -> None:
        (self.lid, self.ord, self.source_id, self.key, self.rtype, self.rid, self.file, self.bundle,
         self.full_url, self.base_url, derived, self._off, self._len, self.status, self.doc_status,
         self.updated, self.version, carries, self.study_uid, self.skey, self.new_id, self.chash,
         patch, plan) = row
        self.derived = bool(derived)
        self.carries = carries_set(int(carries))
        self.patch: dict[str, Any] | None = orjson.loads(patch) if patch else None
        self.plan: list[Any] | None = orjson.loads(plan) if plan else None
        self._scratch = scratch
        self._spool = spool

    @property
    def ref(self) -> str:
        """``Type/id`` as the source wrote it (for messages and reference lookup)."""
        return f"{self.rtype}/{self.rid}" if self.rid else str(self.key)

    @property
    def meta(self) -> dict[str, Any]:
        """The ledger meta fields normalization uses (a new dict: changing it changes nothing)."""
        out: dict[str, Any] = {}
        for k, v in (("file", self.file), ("bundle", self.bundle), ("fullUrl", self.full_url),
                     ("base_url", self.base_url), ("derived", self.derived)):
            if v:
                out[k] = v
        return out

    def body(self) -> dict[str, Any]:
        """The resource as stored last (a fresh dict: call :meth:`store` to keep a change)."""
        return dict(orjson.loads(self._spool.read(self._off, self._len)))

    def store(self, body: dict[str, Any]) -> None:
        """Replace the stored body (appended; the old bytes stay unused in the spool)."""
        self._off, self._len = self._spool.append(orjson.dumps(body))
        self._scratch.put(self.lid, off=self._off, len=self._len)


def item_row(sid: int, key: str, meta: dict[str, Any], facts: Facts, span: tuple[int, int], skey: str | None,
             uid: str) -> tuple[Any, ...]:
    """The ``item`` columns sid .. uid of one resource (``skey``: its server-id match key)."""
    bundle = meta.get("bundle") or meta.get("file")
    return (sid, key, facts.rtype, facts.rid, str(meta.get("file") or ""), str(bundle or ""),
            str(meta.get("fullUrl") or ""), str(meta.get("base_url") or ""), int(bool(meta.get("derived"))),
            span[0], span[1], facts.status, facts.doc_status, facts.updated, facts.version,
            carries_mask(facts.carries), facts.obs_key, facts.study_uid, facts.cbase, skey, uid)

