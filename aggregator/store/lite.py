"""The quick path: the stdlib ``sqlite3`` module straight on the home's SQLite file.

``aggregator case list`` is typed many times a day; through SQLAlchemy it spent most of its
half second importing the ORM (3.5 of 4.9 s on a loaded machine) to run one query. Commands
that only read a little and append an audit entry open the database here instead, when it can
be done without changing a thing they would see:

* the database URL is SQLite and the file exists (PostgreSQL, or a home not created yet,
  take the full path, which creates and migrates);
* its schema is at :data:`~aggregator.store.db.HEAD_REVISION`, so no migration is skipped
  (an older or newer schema also takes the full path);
* the connection gets the same pragmas as the engine's (WAL, foreign keys, busy timeout).

Each query here has its twin on the ORM path (``list_cases`` in :mod:`aggregator.cases`); a
test runs both on the same home and compares their ``--json`` output byte for byte. Audit
entries are appended by :mod:`aggregator.audit`, the one implementation of the hash chain.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

from aggregator.store.db import HEAD_REVISION, _sqlite_pragmas

#: The same timeout as the engine's ``connect_args``: wait for a writer rather than fail.
TIMEOUT = 30.0


def sqlite_path(url: str) -> Path | None:
    """The file a ``sqlite:///PATH`` URL names; None for other databases and in-memory ones."""
    prefix = "sqlite:///"
    if not url.startswith(prefix):
        return None
    path = url[len(prefix):]
    if not path or path == ":memory:" or path.startswith("file:") or "?" in path:
        return None  # URI forms and query options are left to SQLAlchemy, which knows them
    return Path(path)


class LiteDatabase:
    """One ``sqlite3`` connection on an up-to-date SQLite database, in autocommit mode.

    Transactions are explicit (``BEGIN IMMEDIATE`` in the audit append), so that a read never
    holds a lock longer than its statement.
    """

    def __init__(self, url: str, conn: sqlite3.Connection) -> None:
        self.url = url
        self.conn = conn

    @classmethod
    def open(cls, url: str) -> LiteDatabase | None:
        """The quick connection, or None when the full path must be taken (see the module)."""
        path = sqlite_path(url)
        if path is None or not path.is_file():
            return None
        try:
            conn = sqlite3.connect(path, timeout=TIMEOUT, isolation_level=None)
        except sqlite3.Error:
            return None
        try:
            _sqlite_pragmas(conn, None)
            row = conn.execute("SELECT version_num FROM alembic_version").fetchone()
        except sqlite3.Error:  # no alembic_version table yet: not a migrated database
            conn.close()
            return None
        if row is None or row[0] != HEAD_REVISION:
            conn.close()
            return None
        return cls(url, conn)

    def dispose(self) -> None:
        self.conn.close()


#: Cases with their number of sources, by case id: the query of ``cases.list_cases``.
_LIST_CASES = """
SELECT cases.id, cases.checklist, cases.status, cases.case_date, count(sources.id)
FROM cases LEFT OUTER JOIN sources ON sources.case_id = cases.id
GROUP BY cases.id
ORDER BY cases.id
"""


def list_cases(db: LiteDatabase) -> list[dict[str, Any]]:
    """What :func:`aggregator.cases.list_cases` returns, read with ``sqlite3``."""
    return [
        {"case": cid, "checklist": cl, "status": st, "case_date": cd, "sources": int(n)}
        for cid, cl, st, cd, n in db.conn.execute(_LIST_CASES)
    ]
