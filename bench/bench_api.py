"""HTTP API under load: job status and the gap report of a 200k-resource case, while a pull runs.

Why: a navigator's browser polls job status every second and consultants open gap reports; the
API must answer those quickly while the same process pulls. Targets (issue 13): job status p99
under 20 ms, and the gap report of a 200k-resource case served without recomputing the checklist
when nothing changed.

Setup (timed and printed): a home with one case of ``--resources`` FHIR resources (the record
``bench/bench_normalize.py`` builds: Synthea bundles or the project's generated ones, copied
with renamed ids, stored through a real LedgerSink; its builder is imported), and a second case
whose media source is a folder of ``--downloads`` generated patient downloads. ``aggregator
serve`` is started on a free loopback port; the big case's gap report is computed once (the
first request; printed), then:

* a pull of the second case is started through the API (and started again whenever it ends,
  so one is always running);
* 50 concurrent keep-alive clients (asyncio, in a separate process) hit, for ``--seconds`` each:
  ``/health`` (a bare endpoint of the same stack that returns a constant), ``/jobs/{id}`` of
  the running pull, and ``/cases/{big}/gap-report``.

Printed per endpoint: requests/s, p50 and p99 latency, and the ratio of each to the bare
endpoint; and whether the gap report was ever recomputed during the run (the
``X-Report-Computed`` header).

    .venv/bin/python bench/bench_api.py [--resources 200000] [--clients 50] [--seconds 10] [--work DIR]

With ``--work DIR`` of an earlier run, the setup (and the gap report it computed) is reused.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

BIG, BUSY = "bench-big", "bench-busy"


# --- setup ----------------------------------------------------------------------------------


def build_home(home: Path, resources: int, downloads: int) -> dict[str, Any]:
    import bench_normalize as bn

    from aggregator import accounts
    from aggregator.app import App
    from aggregator.cases import add_source, create_case
    from aggregator.ledger import LedgerSink
    from aggregator.store.models import Source
    from fixtures.generate import generate_download

    core = App.open(home)
    create_case(core, BIG, "oncology")
    with core.db.session() as s:
        src = Source(case_id=BIG, kind="media", config={"path": str(home / "none")}, label="bench-record")
        s.add(src)
        s.flush()
        source_id = src.id
    sink = LedgerSink(core.db, core.blobs(BIG), source_id, None)
    t0 = time.perf_counter()
    texts = [(name, json.dumps(b).encode()) for name, b in bn.templates()]
    n = k = 0
    while n < resources:
        for name, text in texts:
            for i, e in enumerate(bn.copy_bundle(text, k).get("entry") or []):
                if isinstance(e.get("resource"), dict):
                    sink.resource(e["resource"], key=f"c{k:02d}/{name}#{i}", meta={"file": f"c{k:02d}/{name}.json"})
                    n += 1
        k += 1
    sink.flush()
    record_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    folder = home.parent / "downloads"
    for i in range(downloads):
        generate_download(folder / f"d{i:03d}", seed=f"bench-{i}")
    create_case(core, BUSY, "oncology")
    add_source(core, BUSY, media=str(folder))
    downloads_s = time.perf_counter() - t0
    accounts.add_user(core.db, "nav", "navigator", None)
    tokens = [accounts.create_token(core.db, "nav")["token"] for _ in range(2)]
    core.close()
    return {"resources": n, "record_s": record_s, "downloads_s": downloads_s, "tokens": tokens}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def call(base: str, token: str, method: str, path: str) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(base + path, method=method, headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req, timeout=3600) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


class KeepPulling(threading.Thread):
    """Keeps one pull of the busy case running; the current job id is in ``job``."""

    def __init__(self, base: str, token: str) -> None:
        super().__init__(daemon=True)
        self.base, self.token = base, token
        self.job = ""
        self.started = 0
        self.stop = threading.Event()
        self.ready = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            status, _, body = call(self.base, self.token, "POST", f"/cases/{BUSY}/pulls")
            if status != 202:
                time.sleep(0.5)
                continue
            self.job = json.loads(body)["id"]
            self.started += 1
            self.ready.set()
            while not self.stop.is_set():
                _, _, b = call(self.base, self.token, "GET", f"/jobs/{self.job}")
                if json.loads(b)["state"] not in ("queued", "running"):
                    break
                time.sleep(1.0)


# --- load (in a child process, so the client does not share the server's interpreter) ---------


async def _client(host: str, port: int, request: bytes, until: float, out: list[float], statuses: dict[int, int],
                  headers_seen: dict[str, int]) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        while time.perf_counter() < until:
            t0 = time.perf_counter()
            writer.write(request)
            await writer.drain()
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            status = int(lines[0].split()[1])
            length = 0
            for line in lines[1:]:
                name, _, value = line.partition(":")
                lname = name.strip().lower()
                if lname == "content-length":
                    length = int(value.strip())
                elif lname == "x-report-computed":
                    headers_seen[value.strip()] = headers_seen.get(value.strip(), 0) + 1
            await reader.readexactly(length)
            out.append(time.perf_counter() - t0)
            statuses[status] = statuses.get(status, 0) + 1
    finally:
        writer.close()


async def _load(port: int, path: str, token: str, clients: int, seconds: float) -> dict[str, Any]:
    request = (f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n"
               "Connection: keep-alive\r\n\r\n").encode()
    lat: list[float] = []
    statuses: dict[int, int] = {}
    seen: dict[str, int] = {}
    start = time.perf_counter()
    until = start + seconds
    await asyncio.gather(*(_client("127.0.0.1", port, request, until, lat, statuses, seen) for _ in range(clients)))
    elapsed = time.perf_counter() - start
    lat.sort()
    q = statistics.quantiles(lat, n=100) if len(lat) >= 100 else [lat[-1]] * 99
    return {"path": path, "requests": len(lat), "rps": len(lat) / elapsed, "p50_ms": q[49] * 1000,
            "p99_ms": q[98] * 1000, "statuses": statuses, "computed": seen}


def child_load(port: int, path: str, token: str, clients: int, seconds: float) -> None:
    print(json.dumps(asyncio.run(_load(port, path, token, clients, seconds))))


def load(port: int, path: str, token: str, clients: int, seconds: float) -> dict[str, Any]:
    out = subprocess.run([sys.executable, __file__, "--child-load", str(port), path, token, str(clients),
                          str(seconds)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)  # type: ignore[no-any-return]


# --- main -----------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--resources", type=int, default=200_000)
    ap.add_argument("--downloads", type=int, default=60, help="generated downloads in the busy case's media")
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--child-load", nargs=5, metavar=("PORT", "PATH", "TOKEN", "CLIENTS", "SECONDS"))
    args = ap.parse_args()
    if args.child_load:
        port, path, token, clients, seconds = args.child_load
        child_load(int(port), path, token, int(clients), float(seconds))
        return
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-api-"))
    home = work / "home"
    saved = work / "setup.json"
    if saved.is_file():  # --work of an earlier run: the record, downloads and computed report are reused
        setup = json.loads(saved.read_text())
    else:
        setup = build_home(home, args.resources, args.downloads)
        saved.write_text(json.dumps(setup))
    print(f"setup: {setup['resources']} resources stored through LedgerSink in {setup['record_s']:.0f}s; "
          f"{args.downloads} downloads generated in {setup['downloads_s']:.0f}s")
    port = free_port()
    env = {**os.environ, "AGGREGATOR_HOME": str(home), "AGGREGATOR_API_RATE": "1000000",
           "AGGREGATOR_API_BURST": "1000000", "AGGREGATOR_LOG_LEVEL": "warning"}
    env.pop("AGGREGATOR_DATABASE_URL", None)
    server = subprocess.Popen([sys.executable, "-m", "aggregator.cli", "serve", "--port", str(port)], env=env,
                              cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    token, pull_token = setup["tokens"]
    try:
        for _ in range(300):
            try:
                if call(base, token, "GET", "/health")[0] == 200:
                    break
            except OSError:
                time.sleep(0.2)
        t0 = time.perf_counter()
        status, headers, _ = call(base, token, "GET", f"/cases/{BIG}/gap-report")
        first_s = time.perf_counter() - t0
        assert status == 200, status
        print(f"gap report of {BIG}: first request computed it in {first_s:.1f}s "
              f"(X-Report-Computed: {headers.get('x-report-computed')})")
        puller = KeepPulling(base, pull_token)
        puller.start()
        puller.ready.wait(60)
        rows = []
        for label, path in (("bare /health", "/health"), ("job status", f"/jobs/{puller.job}"),
                            ("gap report", f"/cases/{BIG}/gap-report")):
            _, _, body = call(base, token, "GET", f"/jobs/{puller.job}")
            running = json.loads(body)["state"] == "running"
            r = load(port, path, token, args.clients, args.seconds)
            r["label"], r["pull_running"] = label, running
            rows.append(r)
        puller.stop.set()
        bare = rows[0]
        print(f"\n{args.clients} concurrent clients, {args.seconds:.0f}s each, a pull running "
              f"({puller.started} pull job(s) started during the run)")
        print(f"{'endpoint':<14} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'rps/bare':>9} {'p99/bare':>9}  statuses")
        for r in rows:
            print(f"{r['label']:<14} {r['rps']:8.0f} {r['p50_ms']:8.1f} {r['p99_ms']:8.1f} "
                  f"{r['rps'] / bare['rps']:9.2f} {r['p99_ms'] / bare['p99_ms']:9.2f}  {r['statuses']}"
                  f"{'' if r['pull_running'] else '  (pull had ended before this phase)'}")
        gap = rows[2]["computed"]
        print(f"\ngap report recomputed during the run: {gap.get('true', 0)} of {rows[2]['requests']} answers")
        print(f"job status p99 {rows[1]['p99_ms']:.1f} ms (target < 20 ms): "
              f"{'met' if rows[1]['p99_ms'] < 20 else 'NOT met'}")
    finally:
        server.terminate()
        server.wait(timeout=60)


if __name__ == "__main__":
    main()
