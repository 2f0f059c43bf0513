"""The terminal progress bar: drawn only on a TTY, totals summed over parallel sources."""

from __future__ import annotations

import io
import threading

from aggregator.progress import ProgressBoard


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_bar_sums_parallel_sources_and_shows_notes() -> None:
    out = Tty()
    board = ProgressBoard(out)
    a, b = board.source("portal"), board.source("pacs")
    a.set_total(10)
    b.set_total(30)

    def work(p: object, n: int) -> None:
        for _ in range(n):
            p.advance()  # type: ignore[attr-defined]

    threads = [threading.Thread(target=work, args=(a, 10)), threading.Thread(target=work, args=(b, 30))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    b.message("C-GET study 2 of 3")
    board.close()
    last = out.getvalue().rstrip("\n").split("\r")[-1]
    assert "40/40 items" in last and "100%" in last
    assert "pacs: C-GET study 2 of 3" in last


def test_no_bar_when_not_a_terminal() -> None:
    out = io.StringIO()
    board = ProgressBoard(out)
    p = board.source("portal")
    p.set_total(5)
    p.advance(5)
    board.close()
    assert out.getvalue() == ""
