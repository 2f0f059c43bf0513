"""Progress reporting: a bar on a terminal, a line every few seconds everywhere else.

Connectors call :class:`connectors.base.Progress`. Pulls of several sources run in parallel,
so :class:`ProgressBoard` keeps one :class:`SourceProgress` per source (thread-safe). On a TTY a
renderer redraws them as one line on stderr, at most a few times per second. When stderr is not
a terminal (a cron job, ``nohup``, a CI log) a redrawn bar would be one endless line of carriage
returns, and nothing at all looks like a hang: a timer writes one plain line every
``interval`` seconds instead (``AGGREGATOR_PROGRESS_INTERVAL``, default 5), whether or not the
counts moved, with the time elapsed. Messages carry no PHI (connectors report counts, ids and
server progress strings).
"""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import TextIO

INTERVAL_ENV = "AGGREGATOR_PROGRESS_INTERVAL"
DEFAULT_INTERVAL = 5.0


def interval_from_env() -> float:
    """Seconds between progress lines when not on a terminal (a bad value means the default)."""
    try:
        value = float(os.environ.get(INTERVAL_ENV, DEFAULT_INTERVAL))
    except ValueError:
        return DEFAULT_INTERVAL
    return value if value > 0 else DEFAULT_INTERVAL


class SourceProgress:
    def __init__(self, board: ProgressBoard, label: str) -> None:
        self.board = board
        self.label = label
        self.total: int | None = None
        self.done = 0
        self.note = ""

    def set_total(self, total: int | None) -> None:
        with self.board.lock:
            self.total = total
        self.board.changed()

    def advance(self, n: int = 1) -> None:
        with self.board.lock:
            self.done += n
        self.board.changed()

    def message(self, text: str) -> None:
        with self.board.lock:
            self.note = text[:80]
        self.board.changed()


class ProgressBoard:
    """All sources of one pull command; a bar when ``stream`` is a terminal, else periodic lines.

    ``enabled=False`` turns both off (``--json``); ``interval`` is the seconds between lines off
    a terminal (default: :func:`interval_from_env`).
    """

    def __init__(self, stream: TextIO | None = None, *, enabled: bool | None = None,
                 interval: float | None = None) -> None:
        self.stream = stream or sys.stderr
        tty = _isatty(self.stream)
        self.enabled = tty if enabled is None else enabled
        self.lock = threading.Lock()
        self.sources: list[SourceProgress] = []
        self._last = 0.0
        self._width = 0
        self._started = time.monotonic()
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None
        if enabled is None and not tty:
            self._interval = interval if interval is not None else interval_from_env()
            self._ticker = threading.Thread(target=self._tick, name="progress-lines", daemon=True)
            self._ticker.start()

    def _tick(self) -> None:
        while not self._stop.wait(self._interval):
            self.write_line()

    def write_line(self) -> None:
        """One plain progress line (for logs): items so far, per source, and the time elapsed."""
        with self.lock:
            done = sum(p.done for p in self.sources)
            known = [p.total for p in self.sources if p.total is not None]
            total = sum(known) if known and len(known) == len(self.sources) else None
            parts = [f"{p.label} {p.done}{'/' + str(p.total) if p.total is not None else ''}"
                     + (f" ({p.note})" if p.note else "") for p in self.sources]
        elapsed = int(time.monotonic() - self._started)
        count = f"{done}/{total} items ({min(1.0, done / total):.0%})" if total else f"{done} items"
        line = f"pull: {count} after {elapsed}s" + (f"; {'; '.join(parts)}" if parts else "")
        try:
            self.stream.write(line + "\n")
            self.stream.flush()
        except (OSError, ValueError):  # a closed pipe must not break the pull
            self._stop.set()

    def source(self, label: str) -> SourceProgress:
        p = SourceProgress(self, label)
        with self.lock:
            self.sources.append(p)
        return p

    def changed(self, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self._last < 0.2:
            return
        self._last = now
        with self.lock:
            done = sum(p.done for p in self.sources)
            known = [p.total for p in self.sources if p.total is not None]
            total = sum(known) if known and len(known) == len(self.sources) else None
            note = next((f"{p.label}: {p.note}" for p in reversed(self.sources) if p.note), "")
        if total:
            frac = min(1.0, done / total)
            bar = "#" * int(frac * 30)
            line = f"[{bar:<30}] {done}/{total} items {frac:4.0%}"
        else:
            line = f"[{'.' * (done // 10 % 30):<30}] {done} items"
        if note:
            line += f"  {note}"
        pad = max(0, self._width - len(line))
        self._width = len(line)
        self.stream.write("\r" + line + " " * pad)
        self.stream.flush()

    def close(self) -> None:
        if self._ticker is not None:
            self._stop.set()
            self._ticker.join()
            self._ticker = None
        if self.enabled:
            self.changed(force=True)
            self.stream.write("\n")
            self.stream.flush()


def _isatty(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False
