"""Procrastinate workers on PostgreSQL (issue 14): ``aggregator worker`` processes share the queue.

Every test starts real worker processes (``python -m aggregator worker``) on a database of its
own and a shared home, with the dead-worker bound set to 6 s. Pulls are media folders read at
about 1000 items a second, long enough to kill or cancel one half way.
"""

from __future__ import annotations

import importlib.util
import itertools
import os
import signal
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from aggregator.app import App
from aggregator.jobs import records
from aggregator.jobs.dispatch import JobService
from aggregator.jobs.lock import CaseBusy
from aggregator.jobs.queue import QueueDispatcher
from tests.jobs.conftest import (
    MAIN,
    ROOT,
    BigStudy,
    Workers,
    dimse_case,
    ledger_of,
    media_case,
    media_folder,
    progress_done,
    wait_for,
)

pytestmark = pytest.mark.postgres


def _service(home: Path, url: str) -> tuple[App, JobService]:
    core = App.open(home, database_url=url)
    return core, JobService(core, QueueDispatcher(core))


def test_worker_needs_postgresql(tmp_path: Path) -> None:
    env = {**os.environ, "AGGREGATOR_HOME": str(tmp_path / "home"), "PYTHONPATH": str(ROOT)}
    env.pop("AGGREGATOR_DATABASE_URL", None)
    r = subprocess.run([sys.executable, "-c", MAIN, "worker"], env=env, cwd=ROOT, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and "workers need PostgreSQL" in r.stderr


def test_queueing_lock_keeps_one_waiting_pull_per_case(tmp_path: Path, pg_url: str) -> None:
    core, svc = _service(tmp_path / "home", pg_url)
    try:
        media_case(core, "c1", media_folder(tmp_path / "m", 3))
        first = svc.submit("pull", "c1", owner="nina", params={})  # no worker: it waits in the queue
        with pytest.raises(CaseBusy):
            svc.submit("pull", "c1", owner="nina", params={})
        assert [j.state for j in svc.list("c1")] == ["queued", "cancelled"]
        assert svc.cancel(first.id).state == "cancelled"
        with core.db.engine.connect() as c:
            status = c.execute(text("SELECT status FROM procrastinate_jobs WHERE id = :i"),
                               {"i": records.get(core, first.id).queue_job_id}).scalar()
        assert status == "cancelled"
    finally:
        svc.shutdown()
        core.close()


def _intervals(rows: list[tuple[Any, ...]]) -> dict[str, tuple[Any, Any]]:
    """Per worker, the first and last time it wrote a ledger row of the case."""
    spans: dict[str, list[Any]] = defaultdict(list)
    for r in rows:
        spans[str(r[5])].append(r[4])
    return {w: (min(ts), max(ts)) for w, ts in spans.items()}


def test_two_workers_share_twenty_cases(tmp_path: Path, pg_url: str, workers: Callable[..., Workers]) -> None:
    home = tmp_path / "home"
    core, svc = _service(home, pg_url)
    folder = media_folder(tmp_path / "m", 150)
    cases = [f"c{i:02d}" for i in range(20)]
    try:
        for c in cases:
            media_case(core, c, folder)
        w = workers(home)
        w.start(2, concurrency=2)
        jobs = [svc.submit("pull", c, owner="nina", params={}) for c in cases]
        ended = [svc.wait(j.id, 300) for j in jobs]
        assert [j.state for j in ended] == ["done"] * 20, w.output()
        assert len({j.worker for j in ended}) == 2  # both took work
        for c in cases:
            rows = ledger_of(core, c)
            assert len(rows) == 150 and {r[2] for r in rows} == {"done"}
            assert {r[3] for r in rows} == {1}  # no item fetched twice
            spans = sorted(_intervals(rows).values())
            # never two workers on one case at once: their ledger writes do not interleave
            assert all(a[1] <= b[0] for a, b in itertools.pairwise(spans)), (c, spans)
    finally:
        svc.shutdown()
        core.close()


def _package_bytes(app: App, case_id: str, out: Path) -> bytes:
    from aggregator.pipeline import package_case

    path, _ = package_case(app, case_id, out, as_zip=True)
    return path.read_bytes()


def test_sigkill_mid_pull_resumes_on_the_other_worker_within_the_bound(
        tmp_path: Path, pg_url: str, workers: Callable[..., Workers], monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "home"
    shared = tmp_path / "shared-blobs"  # the workers' blob root on "shared storage", apart from the home
    monkeypatch.setenv("AGGREGATOR_BLOB_ROOT", str(shared))
    core, svc = _service(home, pg_url)
    folder = media_folder(tmp_path / "m", 3000)
    try:
        media_case(core, "big", folder)
        media_case(core, "ref", folder)
        w = workers(home, AGGREGATOR_BLOB_ROOT=str(shared))
        w.start(2, concurrency=1)
        job = svc.submit("pull", "big", owner="nina", params={})
        wait_for(lambda: progress_done(core, job.id) > 300, 120, "the pull to be under way")
        victim = records.get(core, job.id).worker or ""
        pid = int(victim.rsplit(":", 1)[1])
        os.kill(pid, signal.SIGKILL)
        killed_at = time.monotonic()
        resumed = wait_for(lambda: (j := records.get(core, job.id)).state == "running" and j.attempts == 2 and j,
                           30, "another worker to resume the job")
        resumed_after = time.monotonic() - killed_at
        assert resumed.worker != victim
        done = svc.wait(job.id, 180)
        assert done.state == "done", (done, w.output())
        assert resumed_after <= 6 + 2, resumed_after  # the bound, plus Procrastinate's pickup
        # an uninterrupted pull of the same folder: the same items with the same bytes
        ref = svc.wait(svc.submit("pull", "ref", owner="nina", params={}).id, 180)
        assert ref.state == "done"
        got = sorted((r[0], r[1], r[6]) for r in ledger_of(core, "big"))
        want = sorted((r[0], r[1], r[6]) for r in ledger_of(core, "ref"))
        assert got == want and len(got) == 3000
        assert {r[3] for r in ledger_of(core, "big")} == {1}  # resumed from the checkpoint: no file read twice
        spans = sorted(_intervals(ledger_of(core, "big")).values())
        assert all(a[1] <= b[0] for a, b in itertools.pairwise(spans)), spans
        # the blobs are on the blob root, not in the home
        assert (shared / "big" / "raw").is_dir() and not (home / "cases").exists()
        # the package of the resumed case is byte for byte that of an uninterrupted pull of the same
        # case (same id, so a home of its own: the package names its case)
        monkeypatch.delenv("AGGREGATOR_BLOB_ROOT")
        plain = App.open(tmp_path / "plain")
        try:
            media_case(plain, "big", folder)
            from aggregator.jobs.pull import pull_case

            assert [p.state for p in pull_case(plain, "big")] == ["done"]
            resumed = _package_bytes(core, "big", tmp_path / "resumed.zip")
            assert resumed == _package_bytes(plain, "big", tmp_path / "plain.zip")
        finally:
            plain.close()
    finally:
        svc.shutdown()
        core.close()


def test_cancel_mid_pull_on_a_worker(tmp_path: Path, pg_url: str, workers: Callable[..., Workers]) -> None:
    home = tmp_path / "home"
    core, svc = _service(home, pg_url)
    try:
        media_case(core, "c1", media_folder(tmp_path / "m", 10000))
        workers(home).start(1)
        job = svc.submit("pull", "c1", owner="nina", params={})
        wait_for(lambda: progress_done(core, job.id) > 100, 120, "the pull to be under way")
        t0 = time.monotonic()
        svc.cancel(job.id)
        ended = svc.wait(job.id, 30)
        assert ended.state == "cancelled" and time.monotonic() - t0 < 10
        rows = ledger_of(core, "c1")
        assert 0 < len(rows) < 10000 and {r[2] for r in rows} == {"done"}
        # the case is free again for the next pull, which completes it
        again = svc.wait(svc.submit("pull", "c1", owner="nina", params={}).id, 120)
        assert again.state == "done" and len(ledger_of(core, "c1")) == 10000
    finally:
        svc.shutdown()
        core.close()


def test_periodic_sync_fires_once_per_period_across_three_workers(
        tmp_path: Path, pg_url: str, workers: Callable[..., Workers]) -> None:
    home = tmp_path / "home"
    App.open(home, database_url=pg_url).close()
    w = workers(home, AGGREGATOR_SYNC_CRON="* * * * * */2")  # every 2 s (Procrastinate's seconds column)
    w.start(3)
    time.sleep(9)
    w.stop()
    core = App.open(home, database_url=pg_url)
    try:
        with core.db.engine.connect() as c:
            rows = list(c.execute(text("SELECT args->>'timestamp' FROM procrastinate_jobs "
                                       "WHERE task_name = 'aggregator.sync_due'")))
    finally:
        core.close()
    stamps = [int(r[0]) for r in rows]
    assert len(stamps) >= 2, w.output()
    assert len(stamps) == len(set(stamps))  # one job per period, whatever the number of workers
    assert all(s % 2 == 0 for s in stamps)


@pytest.mark.skipif(importlib.util.find_spec("aggregator.jobs.schedule") is None,
                    reason="aggregator.jobs.schedule (scheduled sync, built on the `sync` branch) is not here yet")
def test_periodic_task_runs_the_due_syncs(tmp_path: Path, pg_url: str) -> None:
    from aggregator.jobs.tasks import run_scheduled

    core = App.open(tmp_path / "home", database_url=pg_url)
    try:
        run_scheduled(core)  # nothing scheduled: runs, returns, raises nothing
    finally:
        core.close()


def test_database_connections_dropped_mid_pull_leave_no_job_running(
        tmp_path: Path, pg_url: str, workers: Callable[..., Workers]) -> None:
    """Every backend of the worker is terminated in the middle of a pull (a database restart or
    failover, as the worker sees it): the job ends, resumes from the ledger, and completes."""
    home = tmp_path / "home"
    core, svc = _service(home, pg_url)
    try:
        media_case(core, "c1", media_folder(tmp_path / "m", 8000))
        w = workers(home)
        w.start(1)
        job = svc.submit("pull", "c1", owner="nina", params={})
        wait_for(lambda: progress_done(core, job.id) > 300, 120, "the pull to be under way")
        with core.db.engine.connect() as c:
            killed = c.execute(text("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                                    "WHERE datname = current_database() AND pid <> pg_backend_pid()")).scalar()
        assert killed and killed >= 2
        done = svc.wait(job.id, 180)
        assert done.state == "done", (done, w.output())
        rows = ledger_of(core, "c1")
        assert len(rows) == len({r[1] for r in rows}) == 8000 and {r[2] for r in rows} == {"done"}
        assert done.attempts >= 2
    finally:
        svc.shutdown()
        core.close()


@pytest.mark.orthanc
def test_two_workers_share_cases_with_media_and_orthanc_sources(
        tmp_path: Path, pg_url: str, workers: Callable[..., Workers], big_study: BigStudy) -> None:
    """Each case has a media folder and a DIMSE (C-GET) source on the real Orthanc; no case is pulled
    by two workers at once and no item is fetched twice."""
    home = tmp_path / "home"
    core, svc = _service(home, pg_url)
    folder = media_folder(tmp_path / "m", 50)
    cases = [f"c{i}" for i in range(4)]
    try:
        for c in cases:
            media_case(core, c, folder)
            dimse_case(core, c, "127.0.0.1", big_study.server.dicom_port, big_study.server.aet)
        w = workers(home)
        w.start(2, concurrency=1)
        jobs = [svc.submit("pull", c, owner="nina", params={}) for c in cases]
        ended = [svc.wait(j.id, 300) for j in jobs]
        assert [j.state for j in ended] == ["done"] * len(cases), w.output()
        assert len({j.worker for j in ended}) == 2
        for c in cases:
            rows = ledger_of(core, c)
            assert {r[1] for r in rows if r[0] == "dicom"} == set(big_study.sizes)
            assert len(rows) == 50 + len(big_study.sizes) and {r[2] for r in rows} == {"done"}
            assert {r[3] for r in rows} == {1}
            spans = sorted(_intervals(rows).values())
            assert all(a[1] <= b[0] for a, b in itertools.pairwise(spans)), (c, spans)
    finally:
        svc.shutdown()
        core.close()
