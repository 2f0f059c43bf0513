"""Job engine on PostgreSQL: throughput with 1, 2 and 4 worker processes, pickup latency, resumption.

Why: ``aggregator worker`` is how the service scales out (issue 14). This measures, in one run,
on a database of its own at 127.0.0.1:5432 (created and dropped):

* throughput of ``--pulls`` small media pulls (``--files`` one-resource FHIR files each) with 1,
  2 and 4 worker processes (``--concurrency`` jobs each), and the ratio of 4 workers to 1;
* job pickup latency, from the job row's creation to its start: p50 and p99 over all runs;
* time from a worker's death (SIGKILL in the middle of a ``--big``-file pull) to the job running
  again on the other worker, with the dead-worker bound ``--dead-after`` seconds.

Media pulls parse and store in Python: on a 2-core machine they are CPU-bound, so the 4:1 ratio
says more about the cores than about the queue. The peer is the local disk, not throttled.

    .venv/bin/python bench/bench_jobs.py [--pulls 200] [--files 20] [--big 3000] [--dead-after 6]
"""

from __future__ import annotations

import argparse
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pulls", type=int, default=200)
    ap.add_argument("--files", type=int, default=20)
    ap.add_argument("--big", type=int, default=3000)
    ap.add_argument("--concurrency", type=int, default=1)
    ap.add_argument("--dead-after", type=float, default=6.0)
    args = ap.parse_args()

    from sqlalchemy import create_engine, text

    from aggregator.app import App
    from aggregator.cases import add_source, create_case
    from aggregator.jobs import records
    from aggregator.jobs.dispatch import JobService
    from aggregator.jobs.queue import QueueDispatcher

    name = "agg_bench_" + uuid.uuid4().hex[:8]
    admin = create_engine(ADMIN, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f'CREATE DATABASE "{name}"'))
    url = f"postgresql://postgres@127.0.0.1:5432/{name}"
    work = Path(tempfile.mkdtemp(prefix="bench-jobs-"))
    try:
        small = folder(work / "small", args.files)
        home = work / "home"
        core = App.open(home, database_url=url)
        svc = JobService(core, QueueDispatcher(core))
        pickups: list[float] = []
        rates: dict[int, float] = {}
        for n in (1, 2, 4):
            cases = [f"w{n}-{i:04d}" for i in range(args.pulls)]
            for c in cases:
                create_case(core, c, "oncology", case_date="2024-05-01")
                add_source(core, c, media=str(small))
            procs = start_workers(n, home, url, args.concurrency, args.dead_after)
            wait_registered(url, n)
            t0 = time.perf_counter()
            jobs = [svc.submit("pull", c, owner="bench", params={}) for c in cases]
            ended = [svc.wait(j.id, 3600, poll=0.2) for j in jobs]
            elapsed = time.perf_counter() - t0
            stop(procs)
            bad = [j.state for j in ended if j.state != "done"]
            if bad:
                raise SystemExit(f"{len(bad)} job(s) did not end done: {bad[:5]}")
            rates[n] = len(jobs) / elapsed
            pickups += [(j.started_at - j.created_at).total_seconds() for j in ended
                        if j.started_at and j.created_at]
            print(f"{n} worker(s) x {args.concurrency}: {len(jobs)} pulls of {args.files} files in {elapsed:.1f} s "
                  f"= {rates[n]:.1f} pulls/s")
        print(f"scaling 4 workers : 1 worker = {rates[4] / rates[1]:.2f}x ({os.cpu_count()} cores)")
        print(f"pickup latency (created -> started): p50 {1000 * statistics.median(pickups):.0f} ms, "
              f"p99 {1000 * pct(pickups, 0.99):.0f} ms over {len(pickups)} jobs "
              "(includes queueing behind busy workers)")

        big = folder(work / "big", args.big)
        create_case(core, "big", "oncology", case_date="2024-05-01")
        add_source(core, "big", media=str(big))
        procs = start_workers(2, home, url, 1, args.dead_after)
        wait_registered(url, 2)
        job = svc.submit("pull", "big", owner="bench", params={})
        while sum(int(p.get("done") or 0) for p in records.get(core, job.id).progress.values()) < args.big // 10:
            time.sleep(0.05)
        victim = records.get(core, job.id).worker or ""
        os.kill(int(victim.rsplit(":", 1)[1]), signal.SIGKILL)
        killed = time.perf_counter()
        while not ((j := records.get(core, job.id)).state == "running" and j.attempts == 2):
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
