"""Bounded parallel retrieval: run a list of units (series, type searches) in a few lanes.

Why a module of its own: the DIMSE and DICOMweb connectors both retrieve a study's series at
once over a bounded number of associations or requests per endpoint, and both need the same
rules, which a bare ``ThreadPoolExecutor`` does not give:

* **A failure stays with its unit.** Each unit's ``Exception`` is returned in its slot, so the
  caller records that unit's items as failed and keeps the others' (one series' broken
  association does not fail the study).
* **A stop stops everything.** A ``BaseException`` that is not an ``Exception`` (a job being
  cancelled, ``KeyboardInterrupt``) or the connector's cancel event ends every lane before its
  next unit, and the first such exception is re-raised in the calling thread.
* **Never more than the endpoint allows.** A lane whose unit was turned away for now (a
  DIMSE A-ASSOCIATE-RJ "transient", e.g. "local limit exceeded") gives the unit back and
  retires, so the lanes shrink to what the endpoint accepts; the last lane reports the refusal.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

from connectors.base import Progress

log = logging.getLogger(__name__)

U = TypeVar("U")


class TurnedAway(Exception):
    """Raised by a unit's work when the endpoint refused it *for now* (too many at once).

    ``error`` is what to report if no other lane is left to take the unit.
    """

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


class _Lanes(Generic[U]):
    def __init__(self, units: Sequence[U], work: Callable[[U], None], lanes: int,
                 stop: threading.Event | None) -> None:
        self.work = work
        self.todo: deque[int] = deque(range(len(units)))
        self.units = units
        self.errors: list[Exception | None] = [None] * len(units)
        self.fatal: BaseException | None = None
        self.lock = threading.Lock()
        self.stop = stop if stop is not None else threading.Event()
        self.halt = threading.Event()
        self.alive = lanes

    def take(self) -> int | None:
        with self.lock:
            if self.halt.is_set() or self.stop.is_set() or not self.todo:
                return None
            return self.todo.popleft()

    def lane(self) -> None:
        while (i := self.take()) is not None:
            retire = False
            try:
                self.work(self.units[i])
            except TurnedAway as exc:
                with self.lock:
                    if self.alive > 1:
                        self.alive -= 1
                        self.todo.appendleft(i)  # another lane takes it once one is free
                        retire = True
                        log.info("the endpoint turned a unit away: %d lane(s) left", self.alive)
                    else:
                        self.errors[i] = exc.error
            except Exception as exc:
                self.errors[i] = exc
            except BaseException as exc:  # a cancel or an interrupt: every lane stops
                with self.lock:
                    if self.fatal is None:
                        self.fatal = exc
                self.halt.set()
            if retire:
                return


def run_units(units: Sequence[U], work: Callable[[U], None], *, lanes: int,
              stop: threading.Event | None = None, name: str = "unit") -> list[Exception | None]:
    """Run ``work(unit)`` for every unit in at most ``lanes`` threads; one result per unit.

    A result is None when the unit's work returned, else the ``Exception`` it raised. Units
    not started because ``stop`` was set are reported as None too: the caller checks its own
    cancel flag afterwards. With one lane (or one unit) everything runs in the calling thread,
    exactly as a plain loop would.
    """
    lanes = max(1, min(lanes, len(units)))
    pool = _Lanes(units, work, lanes, stop)
    if lanes == 1:
        pool.lane()
    else:
        threads = [threading.Thread(target=pool.lane, name=f"{name}-{n}", daemon=True) for n in range(lanes)]
        for t in threads:
            t.start()
        try:
            for t in threads:
                t.join()
        except BaseException:  # interrupted while waiting: let the lanes wind down, then go
            pool.halt.set()
            pool.stop.set()
            raise
    if pool.fatal is not None:
        raise pool.fatal
    return pool.errors


class LockedProgress:
    """A :class:`connectors.base.Progress` that lanes may call at once (one lock around each call).

    The progress a connector is given counts with plain ``+=`` (the job's, the CLI's board
    has its own lock); several lanes advancing it would lose counts. Whatever the wrapped
    call raises (a job's cancel at its next step) reaches the lane that called it.
    """

    def __init__(self, inner: Progress) -> None:
        self.inner = inner
        self._lock = threading.Lock()

    def set_total(self, total: int | None) -> None:
        with self._lock:
            self.inner.set_total(total)

    def advance(self, n: int = 1) -> None:
        with self._lock:
            self.inner.advance(n)

    def message(self, text: str) -> None:
        with self._lock:
            self.inner.message(text)
