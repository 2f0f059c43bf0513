"""FHIR pull throughput vs a raw ``requests`` page loop, and memory while streaming NDJSON.

Peer: a bare loop that GETs ``Patient/{id}/$everything`` pages from the same local fake server
and follows ``next`` links, parsing JSON but storing nothing. Ours: ``FhirConnector.pull`` into a
real SQLite ledger + blob store. Memory: ``FhirBulkConnector`` streaming an export of N lines;
peak RSS growth (``resource.getrusage``) printed at 50k and at 500k lines.
Run: ``.venv/bin/python bench/bench_fhir.py [--obs 5000] [--lines 500000]``.
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from connectors.base import NullProgress, PatientRef
from connectors.fhir_bulk import FhirBulkConfig, FhirBulkConnector
from connectors.fhir_rest import FhirConfig, FhirConnector
from tests.fakes.fhir_server import FakeFhirServer
from tests.support import make_sink


def raw_loop(url: str, page: int) -> int:
    n = 0
    next_url: str | None = f"{url}/Patient/p0/$everything?_count={page}"
    with requests.Session() as s:
        while next_url:
            b = s.get(next_url, timeout=60).json()
            n += len(b.get("entry", []))
            next_url = next((link["url"] for link in b.get("link", []) if link["relation"] == "next"), None)
    return n


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--obs", type=int, default=5000)
    ap.add_argument("--page", type=int, default=100)
    ap.add_argument("--lines", type=int, default=500_000)
    args = ap.parse_args()
    with FakeFhirServer(n_obs=args.obs, obs_size=200) as srv, tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        n_raw = raw_loop(srv.url, args.page)
        t_raw = time.perf_counter() - t0
        h = make_sink(Path(tmp), kind="fhir")
        c = FhirConnector(FhirConfig(url=srv.url, strategy="everything", page_size=args.page))
        t0 = time.perf_counter()
        c.pull(PatientRef(id="p0"), None, h.sink, NullProgress())
        h.sink.flush()
        t_ours = time.perf_counter() - t0
        print(f"raw requests loop: {n_raw} resources in {t_raw:.2f}s ({n_raw / t_raw:.0f}/s)")
        print(f"FhirConnector.pull: {h.sink.counts['done']} items in {t_ours:.2f}s "
              f"({h.sink.counts['done'] / t_ours:.0f}/s) -> ratio ours/raw time = {t_ours / t_raw:.2f}x")
    import time as _t

    _t.sleep = lambda s: None  # the fake export asks for Retry-After: 1; the bench does not wait
    for lines in (50_000, args.lines):
        with FakeFhirServer(n_obs=1, export_lines=lines) as srv, tempfile.TemporaryDirectory() as tmp:
            before = rss_mb()
            h = make_sink(Path(tmp), kind="fhir-bulk")
            t0 = time.perf_counter()
            FhirBulkConnector(FhirBulkConfig(url=srv.url)).pull(PatientRef(id="p0"), None, h.sink, NullProgress())
            h.sink.flush()
            dt = time.perf_counter() - t0
            print(f"bulk export {lines} lines: {dt:.1f}s ({lines / dt:.0f} lines/s), peak RSS {rss_mb():.0f} MB "
                  f"(grew {rss_mb() - before:.0f} MB)")


if __name__ == "__main__":
    main()
