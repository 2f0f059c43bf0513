"""The terminal progress bar (TTY only, totals summed over parallel sources), and plain lines elsewhere."""

from __future__ import annotations

import io
import threading
import time

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
    board = ProgressBoard(out, interval=60)
    p = board.source("portal")
    p.set_total(5)
    p.advance(5)
    board.close()
    assert out.getvalue() == ""  # no carriage-return bar, and no line before the interval


def test_lines_every_interval_when_not_a_terminal_even_while_a_source_is_slow() -> None:
    out = io.StringIO()
    board = ProgressBoard(out, interval=0.02)
    p = board.source("pacs")
    p.set_total(3)
    p.advance()
    p.message("C-MOVE study 1 of 1")
    time.sleep(0.3)  # a slow source: no counts move, lines must still come
    board.close()
    lines = out.getvalue().splitlines()
    assert lines, "no progress line while the pull ran"
    assert "\r" not in out.getvalue()
    assert all(line.startswith("pull: 1/3 items") for line in lines)
    assert "pacs 1/3 (C-MOVE study 1 of 1)" in lines[-1]
    n = len(lines)
    time.sleep(0.1)
    assert len(out.getvalue().splitlines()) == n, "lines stop when the board is closed"


def test_json_output_turns_the_lines_off() -> None:
    out = io.StringIO()
    board = ProgressBoard(out, enabled=False, interval=0.01)
    board.source("portal").advance()
    time.sleep(0.1)
    board.close()
    assert out.getvalue() == ""
