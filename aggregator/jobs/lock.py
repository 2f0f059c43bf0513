"""One pull per case at a time, held by the process that pulls and freed when it dies.

Two pulls of one case at once would write the same ledger rows and cursors from two places,
and a pull killed with SIGKILL used to look "running" until a ten-minute heartbeat limit ran
out. A lock that the operating system (or the database server) releases with the process solves
both: a second pull finds it taken and waits or says so, and a "running" pull whose lock is free
is known to be dead at once, without waiting for any timeout.

* SQLite (one machine): ``flock`` on ``<case folder>/.pull.lock``. ``flock`` locks belong to the
  open file, so a second open in the same process (the API looking while its worker pulls)
  conflicts too, and the kernel drops the lock when the holder exits for any reason.
* PostgreSQL (several workers, maybe on several machines): a session advisory lock keyed by
  the case id, on a connection held for the pull. The server frees it when the connection
  drops, which it does when the process dies.

The lock file records the holder's pid and host, only to say who holds it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import time
from pathlib import Path
from typing import Any

from sqlalchemy import text

from aggregator.errors import AggregatorError, Retriable

LOCK_FILE = ".pull.lock"
POLL_EVERY = 0.5


class CaseBusy(AggregatorError, Retriable):
    """Another process is pulling this case."""

    exit_code = 5


class CaseLock:
    """A held lock; :meth:`release` (or leaving the ``with`` block) frees it."""

    def __init__(self, release: Any) -> None:
        self._release = release

    def release(self) -> None:
        if self._release is not None:
            self._release()
            self._release = None

    def __enter__(self) -> CaseLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def advisory_key(case_id: str) -> int:
    """A signed 64-bit key for ``pg_advisory_lock``, stable across processes and machines."""
    digest = hashlib.sha256(b"aggregator-case-pull:" + case_id.encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def try_lock(app: Any, case_id: str) -> CaseLock | None:
    """Take the case's pull lock if it is free, else None (never blocks)."""
    if app.db.engine.dialect.name == "postgresql":
        return _try_advisory(app, case_id)
    return _try_flock(app.case_dir(case_id))


def acquire(app: Any, case_id: str, *, wait: float | None = 0.0) -> CaseLock:
    """Take the case's pull lock; wait up to ``wait`` seconds (None: as long as it takes).

    Raises :class:`CaseBusy`, naming the holder, when the lock stays taken.
    """
    deadline = None if wait is None else time.monotonic() + wait
    while True:
        lock = try_lock(app, case_id)
        if lock is not None:
            return lock
        if deadline is not None and time.monotonic() >= deadline:
            raise CaseBusy(f"case {case_id!r} is being pulled by another process{holder(app, case_id)}; "
                           "wait for it to finish, or run `aggregator pull --wait`")
        time.sleep(POLL_EVERY)


def is_held(app: Any, case_id: str) -> bool:
    """Whether some process holds the case's pull lock right now."""
    lock = try_lock(app, case_id)
    if lock is None:
        return True
    lock.release()
    return False


def holder(app: Any, case_id: str) -> str:
    """`` (pid N on HOST)`` from the lock file, or "" when unknown (PostgreSQL, old file)."""
    try:
        text_ = (app.case_dir(case_id) / LOCK_FILE).read_text(encoding="ascii", errors="replace").strip()
    except OSError:
        return ""
    pid, _, host = text_.partition(" ")
    return f" (pid {pid} on {host})" if pid.isdigit() and host else ""


def _try_flock(case_dir: Path) -> CaseLock | None:
    import fcntl

    case_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(case_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    with contextlib.suppress(OSError):
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode("ascii", "replace"))

    def release() -> None:
        # the file stays (unlinking it would let a waiter lock an orphaned inode)
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
        os.close(fd)  # closing the last descriptor releases the flock

    return CaseLock(release)


def _try_advisory(app: Any, case_id: str) -> CaseLock | None:
    key = advisory_key(case_id)
    conn = app.db.engine.connect()
    try:
        got = bool(conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": key}).scalar())
        conn.commit()
    except BaseException:
        conn.close()
        raise
    if not got:
        conn.close()
        return None

    def release() -> None:
        try:
            conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})
            conn.commit()
        except BaseException:
            # never hand a connection that may still hold the lock back to the pool
            conn.invalidate()
            raise
        finally:
            conn.close()  # a dropped connection frees the lock too

    return CaseLock(release)
