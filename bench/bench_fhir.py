"""FHIR pull throughput vs a raw ``requests`` page loop, and memory while streaming NDJSON.

Peer: a bare loop that GETs ``Patient/{id}/$everything`` pages from the same local fake server
and follows ``next`` links, parsing JSON but storing nothing. Ours: ``FhirConnector.pull`` into a
real SQLite ledger + blob store (every resource written). The server runs in its own process,
so neither side pays for its CPU; runs alternate, and the median of ``--repeat`` runs is kept.
The time spent inside the sink (blob store + ledger: core code) is measured separately, so
the connector's own overhead can be read off.

Memory: ``FhirBulkConnector`` streams a ``--lines``-line NDJSON export (its own process, fresh
server); current RSS is sampled at 50k, 100k, 250k and 500k lines (``/proc/self/statm``).
Crawl (``--only crawl``): the per-type crawl (``strategy=crawl``) over a patient with data in
several compartment types, against a raw loop that runs the same type searches one after
another and follows their ``next`` links; ours with ``concurrency`` 1 and 4 (the type searches
run concurrently under that cap). The resources ours stored must be the set the server's
``$everything`` returns (plus the Practitioner a hydration read adds). Wall and CPU time of
both sides and of the server process are printed.

Run: ``.venv/bin/python bench/bench_fhir.py [--obs 5000] [--lines 500000] [--repeat 3] [--only crawl]``.
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


#: compartment types given resources for the crawl benchmark, with how many each
CRAWL_TYPES = {"Condition": 300, "Procedure": 300, "Encounter": 300, "MedicationRequest": 300,
               "DiagnosticReport": 300, "Immunization": 300, "CarePlan": 300}


def _serve(kwargs: dict[str, Any], urls: Any, stop: Any, extra: dict[str, int] | None = None) -> None:
    with FakeFhirServer(**kwargs) as srv:
        for rtype, n in (extra or {}).items():
            for i in range(n):
                srv._put({"resourceType": rtype, "id": f"{rtype.lower()}-{i}", "subject": {"reference": "Patient/p0"},
                          "note": [{"text": "x" * 200}]})
        urls.put(srv.url)
        stop.wait()


class ServerProcess:
    """A FakeFhirServer in a child process (its CPU is not ours)."""

    def __init__(self, extra: dict[str, int] | None = None, **kwargs: Any) -> None:
        ctx = mp.get_context("fork")
        self._urls: Any = ctx.Queue()
        self._stop = ctx.Event()
        self._proc = ctx.Process(target=_serve, args=(kwargs, self._urls, self._stop, extra), daemon=True)

    def cpu(self) -> float:
        """User + system CPU seconds the server process has used so far."""
        fields = Path(f"/proc/{self._proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

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


def raw_crawl(url: str, page: int, types: list[str]) -> set[str]:
    """The peer of a crawl: the Patient, then each type search in turn, following next links."""
    keys: set[str] = set()
    with requests.Session() as s:
        keys.add("Patient/" + s.get(f"{url}/Patient/p0", timeout=60).json()["id"])
        for rtype in types:
            next_url: str | None = f"{url}/{rtype}?patient=p0&_count={page}"
            while next_url:
                b = s.get(next_url, timeout=60).json()
                keys |= {f"{e['resource']['resourceType']}/{e['resource']['id']}" for e in b.get("entry", [])}
                next_url = next((link["url"] for link in b.get("link", []) if link["relation"] == "next"), None)
    return keys


def everything_keys(url: str, page: int) -> set[str]:
    keys: set[str] = set()
    next_url: str | None = f"{url}/Patient/p0/$everything?_count={page}"
    with requests.Session() as s:
        while next_url:
            b = s.get(next_url, timeout=60).json()
            keys |= {f"{e['resource']['resourceType']}/{e['resource']['id']}" for e in b.get("entry", [])}
            next_url = next((link["url"] for link in b.get("link", []) if link["relation"] == "next"), None)
    return keys


def our_crawl(url: str, page: int, concurrency: int) -> tuple[float, set[str]]:
    with tempfile.TemporaryDirectory() as tmp:
        h = make_sink(Path(tmp), kind="fhir")
        c = FhirConnector(FhirConfig(url=url, strategy="crawl", page_size=page, concurrency=concurrency))
        t0 = time.perf_counter()
        c.pull(PatientRef(id="p0"), None, h.sink, NullProgress())
        h.sink.flush()
        dt = time.perf_counter() - t0
        c.close()
        return dt, {e.key for e in h.entries("done") if e.kind == "resource"}


def crawl(obs: int, page: int, repeat: int) -> None:
    """Per-type crawl: ours (concurrency 1 and 4) against a sequential raw loop of the same searches."""
    import resource

    def cpu_self() -> float:
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime

    server = ServerProcess(extra=CRAWL_TYPES, n_obs=obs, obs_size=200)
    with server as url:
        cs = requests.get(f"{url}/metadata", timeout=60).json()
        declared = {r["type"] for r in cs["rest"][0]["resource"]}
        from connectors.fhir_rest import COMPARTMENT

        types = [t for t in COMPARTMENT if t in declared]
        expected = everything_keys(url, page)
        raw_crawl(url, page, types)  # warm-up
        runs: dict[str, list[tuple[float, float, float]]] = {}
        for i in range(repeat):
            order = ["raw", "ours-1", "ours-4"]
            for name in order[i % 3:] + order[: i % 3]:
                c0, s0, t0 = cpu_self(), server.cpu(), time.perf_counter()
                if name == "raw":
                    got = raw_crawl(url, page, types)
                    dt = time.perf_counter() - t0
                else:
                    dt, got = our_crawl(url, page, int(name.split("-")[1]))
                    got = {k for k in got if not k.startswith("Practitioner/")}  # hydration adds it
                if got != expected:
                    raise RuntimeError(f"{name} fetched {len(got)} resources, $everything has {len(expected)}")
                runs.setdefault(name, []).append((dt, cpu_self() - c0, server.cpu() - s0))
    n = len(expected)
    print(f"per-type crawl: {n} resources in {len(types)} type searches, {page} per page, median of {repeat} runs"
          " (every run fetched the set $everything returns)")
    print(f"  {'client':30} {'wall s':>7} {'own CPU s':>10} {'server CPU s':>13}")
    med = {k: tuple(statistics.median(r[j] for r in v) for j in range(3)) for k, v in runs.items()}
    labels = {"raw": "raw requests loop (sequential)", "ours-1": "FhirConnector crawl, 1 lane",
              "ours-4": "FhirConnector crawl, 4 lanes"}
    for k, (wall, own, srv) in med.items():
        print(f"  {labels[k]:30} {wall:7.2f} {own:10.2f} {srv:13.2f}")
    print(f"  ratio raw/ours (>= 1.0: ours at least as fast): 1 lane {med['raw'][0] / med['ours-1'][0]:.2f}x,"
          f" 4 lanes {med['raw'][0] / med['ours-4'][0]:.2f}x (ours also stores every resource, reads the"
          " Practitioner and downloads the attachment)")


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
    ap.add_argument("--only", choices=("throughput", "memory", "crawl"))
    args = ap.parse_args()
    if args.only == "crawl":
        crawl(args.obs, args.page, args.repeat)
        return
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
