"""FHIR pull throughput vs a raw ``requests`` page loop, and memory while streaming NDJSON.

Peer: a bare loop that GETs ``Patient/{id}/$everything`` pages from the same local fake server
and follows ``next`` links, parsing JSON but storing nothing. Ours: ``FhirConnector.pull`` into a
real SQLite ledger + blob store (every resource written). The server runs in its own process,
so neither side pays for its CPU; runs alternate, and the median of ``--repeat`` runs is kept.
The time spent inside the sink (blob store + ledger: core code) is measured separately, so
the connector's own overhead can be read off.

Memory: ``FhirBulkConnector`` streams a ``--lines``-line NDJSON export (its own process, fresh
server); current RSS is sampled at 50k, 100k, 250k and 500k lines (``/proc/self/statm``).
Run: ``.venv/bin/python bench/bench_fhir.py [--obs 5000] [--lines 500000] [--repeat 3]``.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import requests

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from connectors.base import NullProgress, PatientRef
from connectors.fhir_bulk import FhirBulkConfig, FhirBulkConnector
from connectors.fhir_rest import FhirConfig, FhirConnector
from tests.fakes.fhir_server import FakeFhirServer
from tests.support import make_sink

CHECKPOINTS = (50_000, 100_000, 250_000, 500_000)


def _serve(kwargs: dict[str, Any], urls: Any, stop: Any) -> None:
    with FakeFhirServer(**kwargs) as srv:
        urls.put(srv.url)
        stop.wait()


class ServerProcess:
    """A FakeFhirServer in a child process (its CPU is not ours)."""

    def __init__(self, **kwargs: Any) -> None:
        ctx = mp.get_context("fork")
        self._urls: Any = ctx.Queue()
        self._stop = ctx.Event()
        self._proc = ctx.Process(target=_serve, args=(kwargs, self._urls, self._stop), daemon=True)

    def __enter__(self) -> str:
        self._proc.start()
        return str(self._urls.get(timeout=60))

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._proc.join(10)


def raw_loop(url: str, page: int) -> int:
    n = 0
    next_url: str | None = f"{url}/Patient/p0/$everything?_count={page}"
    with requests.Session() as s:
        while next_url:
            b = s.get(next_url, timeout=60).json()
            n += len(b.get("entry", []))
            next_url = next((link["url"] for link in b.get("link", []) if link["relation"] == "next"), None)
    return n


def timed(fn: Callable[..., Any], box: list[float]) -> Callable[..., Any]:
    def wrapper(*a: Any, **kw: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return fn(*a, **kw)
        finally:
            box[0] += time.perf_counter() - t0

    return wrapper


def ours(url: str, page: int) -> tuple[int, float, float, float]:
    """One pull: (items done, seconds, seconds inside the sink, seconds inside the blob store)."""
    with tempfile.TemporaryDirectory() as tmp:
        h = make_sink(Path(tmp), kind="fhir")
        sink_time, blob_time = [0.0], [0.0]
        # instruments only: the same calls, timed
        h.blobs.put_bytes = timed(h.blobs.put_bytes, blob_time)  # type: ignore[method-assign]
        for name in ("resource", "binary", "flush"):
            setattr(h.sink, name, timed(getattr(h.sink, name), sink_time))
        c = FhirConnector(FhirConfig(url=url, strategy="everything", page_size=page))
        t0 = time.perf_counter()
        c.pull(PatientRef(id="p0"), None, h.sink, NullProgress())
        h.sink.flush()
        dt = time.perf_counter() - t0
        c.close()
        return h.sink.counts["done"], dt, sink_time[0], blob_time[0]


def throughput(obs: int, page: int, repeat: int) -> None:
    with ServerProcess(n_obs=obs, obs_size=200) as url:
        raw_loop(url, page)  # warm-up (server caches, connection)
        raws, runs = [], []
        for _ in range(repeat):
            t0 = time.perf_counter()
            n_raw = raw_loop(url, page)
            raws.append(time.perf_counter() - t0)
            runs.append(ours(url, page))
    t_raw = statistics.median(raws)
    done, t_ours, t_sink, t_blob = sorted(runs, key=lambda r: r[1])[len(runs) // 2]
    print(f"throughput, {obs} Observations + extras, {page} per page, median of {repeat} runs")
    print(f"  raw requests loop   : {n_raw} resources in {t_raw:.2f}s ({n_raw / t_raw:.0f}/s)")
    print(f"  FhirConnector.pull  : {done} items in {t_ours:.2f}s ({done / t_ours:.0f}/s)")
    print(f"  ratio ours/raw time = {t_ours / t_raw:.2f}x ; raw/ours throughput = {t_raw / t_ours:.2f}")
    print(f"  inside the sink (core: ledger rows + blobs): {t_sink:.2f}s = {100 * t_sink / t_ours:.0f}% "
          f"(of which BlobStore.put_bytes {t_blob:.2f}s = {100 * t_blob / t_ours:.0f}%)")
    rest = t_ours - t_sink
    print(f"  connector without the sink: {rest:.2f}s -> ratio to raw loop {rest / t_raw:.2f}x")


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class RssProgress(NullProgress):
    def __init__(self, marks: tuple[int, ...]) -> None:
        self.n = 0
        self.marks = list(marks)
        self.samples: list[tuple[int, float, float]] = []
        self.t0 = time.perf_counter()

    def advance(self, n: int = 1) -> None:
        self.n += n
        while self.marks and self.n >= self.marks[0]:
            self.samples.append((self.marks.pop(0), rss_mb(), time.perf_counter() - self.t0))


def memory(lines: int) -> None:
    time.sleep = lambda s: None  # type: ignore[assignment]  # the fake asks for Retry-After: 1
    marks = tuple(m for m in CHECKPOINTS if m <= lines) or (lines,)
    with ServerProcess(n_obs=1, export_lines=lines) as url, tempfile.TemporaryDirectory() as tmp:
        h = make_sink(Path(tmp), kind="fhir-bulk")
        progress = RssProgress(marks)
        c = FhirBulkConnector(FhirBulkConfig(url=url))
        before = rss_mb()
        t0 = time.perf_counter()
        c.pull(PatientRef(id="p0"), None, h.sink, progress)
        h.sink.flush()
        dt = time.perf_counter() - t0
        done = h.sink.counts["done"]
    print(f"bulk export of {lines} NDJSON lines: {done} items in {dt:.1f}s ({lines / dt:.0f} lines/s)")
    print(f"  RSS before the pull: {before:.1f} MB")
    for mark, mb, at in progress.samples:
        print(f"  RSS at {mark:>7} lines: {mb:6.1f} MB  (t={at:5.1f}s)")
    if len(progress.samples) > 1:
        first, last = progress.samples[0], progress.samples[-1]
        print(f"  growth {first[0]} -> {last[0]} lines: {last[1] - first[1]:+.1f} MB")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--obs", type=int, default=5000)
    ap.add_argument("--page", type=int, default=100)
    ap.add_argument("--lines", type=int, default=500_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--only", choices=("throughput", "memory"))
    args = ap.parse_args()
    if args.only != "memory":
        throughput(args.obs, args.page, args.repeat)
    if args.only != "throughput":
        # its own process: the throughput runs leave nothing behind in the RSS figures
        ctx = mp.get_context("fork")
        p = ctx.Process(target=memory, args=(args.lines,))
        p.start()
        p.join()


if __name__ == "__main__":
    main()
