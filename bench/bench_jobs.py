"""Job engine on PostgreSQL: throughput with 1, 2 and 4 worker processes, pickup latency, resumption.

Why: ``aggregator worker`` is how the service scales out (issue 14). This measures, in one run,
on a database of its own at 127.0.0.1:5432 (created and dropped):

* throughput of ``--pulls`` small pulls with 1, 2 and 4 worker processes (``--concurrency``
  jobs each), and the ratio of 4 workers to 1. The peer (``--peer``) is either
  - ``media``: a folder of ``--files`` one-resource FHIR files on the local disk. Parsing and
    storing is CPU work: on a 2-core machine shared with PostgreSQL, more workers cannot go
    faster than the cores; or
  - ``fhir``: the local FHIR server of the tests (:mod:`tests.fakes.fhir_server`) answering
    each request after ``--latency`` seconds, as a remote hospital server does (4 requests
    per pull, ``--files`` Observations). The pulls wait on the peer, and workers overlap
    their waits: the scaling a 2-core machine can show;
* job pickup latency (job row created -> started): on idle workers, one job at a time (what
  the queue itself costs), and under the throughput runs (queueing behind busy workers);
* time from a worker's death (SIGKILL 200 files into a ``--big``-file media pull) to the job
  running again on the other worker, with the dead-worker bound ``--dead-after`` seconds.

    .venv/bin/python bench/bench_jobs.py [--peer media|fhir] [--pulls 200] [--files 20] [--latency 0.5]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
MAIN = "import sys; from aggregator.cli import main; sys.exit(main(sys.argv[1:]))"
ADMIN = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"


def folder(path: Path, n: int) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (path / f"obs-{i:05d}.json").write_text(json.dumps({
            "resourceType": "Observation", "id": f"o{i}", "status": "final", "code": {"text": "weight"},
            "subject": {"reference": "Patient/p1"}, "valueQuantity": {"value": i, "unit": "kg"}}))
    return path


def start_workers(n: int, home: Path, url: str, concurrency: int, dead_after: float) -> list[subprocess.Popen[bytes]]:
    env = {**os.environ, "AGGREGATOR_HOME": str(home), "AGGREGATOR_DATABASE_URL": url, "PYTHONPATH": str(ROOT),
           "AGGREGATOR_JOB_DEAD_AFTER": str(dead_after), "AGGREGATOR_LOG_LEVEL": "WARNING"}
    return [subprocess.Popen([sys.executable, "-c", MAIN, "worker", "--concurrency", str(concurrency)], env=env,
                             cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for _ in range(n)]


def wait_registered(url: str, n: int) -> None:
    """Until ``n`` workers are registered in Procrastinate (imports done), so the clock measures work."""
    import psycopg

    from aggregator.jobs.queue import conninfo

    with psycopg.connect(conninfo(url), autocommit=True) as conn:
        while (conn.execute("SELECT count(*) FROM procrastinate_workers").fetchone() or (0,))[0] < n:
            time.sleep(0.1)


def stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(20)
        except subprocess.TimeoutExpired:
            p.kill()


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


def pickups(jobs: list[Any]) -> list[float]:
    return [(j.started_at - j.created_at).total_seconds() for j in jobs if j.started_at and j.created_at]


def ms(values: list[float]) -> str:
    p50, p99 = 1000 * statistics.median(values), 1000 * pct(values, 0.99)
    return f"p50 {p50:.0f} ms, p99 {p99:.0f} ms over {len(values)} jobs"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peer", choices=("media", "fhir"), default="media")
    ap.add_argument("--pulls", type=int, default=200)
    ap.add_argument("--files", type=int, default=20)
    ap.add_argument("--latency", type=float, default=0.5, help="seconds per request of the fhir peer")
    ap.add_argument("--big", type=int, default=8000)
    ap.add_argument("--concurrency", type=int, default=1)
    ap.add_argument("--dead-after", type=float, default=6.0)
    ap.add_argument("--workers", default="1,2,4")
    args = ap.parse_args()

    from sqlalchemy import create_engine, text

    from aggregator.app import App
    from aggregator.cases import add_endpoint, add_source, create_case
    from aggregator.jobs import records
    from aggregator.jobs.dispatch import JobService
    from aggregator.jobs.queue import QueueDispatcher
    from tests.fakes.fhir_server import FakeFhirServer

    name = "agg_bench_" + uuid.uuid4().hex[:8]
    admin = create_engine(ADMIN, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f'CREATE DATABASE "{name}"'))
    url = f"postgresql://postgres@127.0.0.1:5432/{name}"
    work = Path(tempfile.mkdtemp(prefix="bench-jobs-"))
    with contextlib.ExitStack() as stack:
        try:
            home = work / "home"
            core = App.open(home, database_url=url)
            svc = JobService(core, QueueDispatcher(core))
            if args.peer == "fhir":
                srv = stack.enter_context(FakeFhirServer(patients=1, n_obs=args.files, delay=args.latency))
                add_endpoint(core, "ehr", "fhir", {"url": srv.url, "auth": "none"})
                peer = f"the local FHIR server, {args.latency:.2f} s per request, {args.files} Observations"
            else:
                small = folder(work / "small", args.files)
                peer = f"a local folder of {args.files} files"

            def new_case(c: str) -> None:
                create_case(core, c, "oncology", case_date="2024-05-01")
                if args.peer == "fhir":
                    add_source(core, c, endpoint="ehr", patient_id="p0")
                else:
                    add_source(core, c, media=str(small))

            loaded: list[float] = []
            rates: dict[int, float] = {}
            print(f"peer: {peer}; {os.cpu_count()} cores")
            for n in [int(x) for x in args.workers.split(",")]:
                cases = [f"w{n}-{i:04d}" for i in range(args.pulls)]
                for c in cases:
                    new_case(c)
                procs = start_workers(n, home, url, args.concurrency, args.dead_after)
                wait_registered(url, n)
                t0 = time.perf_counter()
                jobs = [svc.submit("pull", c, owner="bench", params={}) for c in cases]
                ended = [svc.wait(j.id, 3600, poll=0.2) for j in jobs]
                elapsed = time.perf_counter() - t0
                if n == 1:  # on idle workers: one job at a time, what the queue itself costs
                    idle = []
                    for i in range(20):
                        new_case(f"idle-{i:02d}")
                        idle.append(svc.wait(svc.submit("pull", f"idle-{i:02d}", owner="bench", params={}).id, 600))
                stop(procs)
                bad = [j.state for j in ended if j.state != "done"]
                if bad:
                    raise SystemExit(f"{len(bad)} job(s) did not end done: {bad[:5]}")
                rates[n] = len(jobs) / elapsed
                loaded += pickups(ended)
                print(f"{n} worker(s) x {args.concurrency}: {len(jobs)} pulls in {elapsed:.1f} s "
                      f"= {rates[n]:.2f} pulls/s")
            if 1 in rates and 4 in rates:
                print(f"scaling 4 workers : 1 worker = {rates[4] / rates[1]:.2f}x")
            if 2 in rates and 1 in rates:
                print(f"scaling 2 workers : 1 worker = {rates[2] / rates[1]:.2f}x")
            if 1 in rates:
                print(f"pickup latency on an idle worker (created -> started): {ms(pickups(idle))}")
            print(f"pickup latency under load (includes queueing behind busy workers): {ms(loaded)}")

            big = folder(work / "big", args.big)
            create_case(core, "big", "oncology", case_date="2024-05-01")
            add_source(core, "big", media=str(big))
            procs = start_workers(2, home, url, 1, args.dead_after)
            wait_registered(url, 2)
            job = svc.submit("pull", "big", owner="bench", params={})
            j = records.get(core, job.id)
            while sum(int(p.get("done") or 0) for p in j.progress.values()) < 200 and not j.final:
                time.sleep(0.02)
                j = records.get(core, job.id)
            victim = j.worker or ""
            os.kill(int(victim.rsplit(":", 1)[1]), signal.SIGKILL)
            killed = time.perf_counter()
            if records.get(core, job.id).final:
                stop(procs)
                raise SystemExit("the big pull ended before its worker was killed: raise --big")
            while not ((j := records.get(core, job.id)).state == "running" and j.attempts == 2):
                if j.final:
                    raise SystemExit(f"the killed job ended {j.state} without being resumed")
                time.sleep(0.05)
            resumed = time.perf_counter() - killed
            done = svc.wait(job.id, 600)
            stop(procs)
            print(f"worker death -> job running on the other worker: {resumed:.1f} s "
                  f"(bound {args.dead_after:.0f} s; the job ended {done.state})")
            svc.shutdown()
            core.close()
        finally:
            with admin.connect() as c:
                c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            admin.dispose()


if __name__ == "__main__":
    main()
