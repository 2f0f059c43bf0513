"""Progress reporting: a bar on a terminal, numbers everywhere else.

Connectors call :class:`connectors.base.Progress`. Pulls of several sources run in parallel,
so :class:`ProgressBoard` keeps one :class:`SourceProgress` per source (thread-safe) and a
renderer draws them as one line on stderr, at most a few times per second, only on a TTY.
Messages carry no PHI (connectors report counts, ids and server progress strings).
"""

from __future__ import annotations

import sys
import threading
import time
from typing import TextIO


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
    """All sources of one pull command; draws a bar when ``stream`` is a terminal."""

    def __init__(self, stream: TextIO | None = None, *, enabled: bool | None = None) -> None:
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.lock = threading.Lock()
        self.sources: list[SourceProgress] = []
        self._last = 0.0
        self._width = 0

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
        if self.enabled:
            self.changed(force=True)
            self.stream.write("\n")
            self.stream.flush()
