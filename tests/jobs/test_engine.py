"""The job engine on its in-process path (issue 14), on SQLite and on PostgreSQL.

Real pulls of media folders through :class:`JobService` and :class:`InProcessDispatcher`: the
job row is the record (state, attempts, heartbeats, per-source progress), a cancel stops a pull
half way and leaves a ledger that the next pull completes without fetching anything twice,
retriable errors are retried with backoff and fatal ones fail at once, and a process killed
with SIGKILL in the middle of a pull leaves a job that the next ``serve`` resumes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from aggregator.app import App
from aggregator.jobs import lock as case_lock
from aggregator.jobs import records
from aggregator.jobs.dispatch import InProcessDispatcher, JobService
from aggregator.jobs.records import Timing
from aggregator.jobs.view import job_detail
from aggregator.store.models import Cursor, Pull
from tests.jobs.conftest import (
    ROOT,
    checkpointed_files,
    ledger_of,
    media_case,
    media_folder,
    progress_done,
    wait_for,
)

FAST = Timing(dead_after=6.0, max_attempts=3, backoff=0.5)


@pytest.fixture()
def core(tmp_path: Path, db_url: str) -> Iterator[App]:
    app = App.open(tmp_path / "home", database_url=db_url)
    yield app
    app.close()


@pytest.fixture()
def service(core: App) -> Iterator[JobService]:
    svc = JobService(core, InProcessDispatcher(core, 2, timing=FAST))
    yield svc
    svc.shutdown(wait=False)


def test_a_pull_job_is_a_row_from_queued_to_done(core: App, service: JobService, tmp_path: Path) -> None:
    media_case(core, "c1", media_folder(tmp_path / "m", 40))
    job = service.submit("pull", "c1", owner="nina", params={})
    assert job.state in ("queued", "running") and job.attempts <= 1
    done = service.wait(job.id, 60)
    assert done.state == "done", done
    assert done.attempts == 1 and done.error is None and done.worker and done.worker.startswith("serve:")
    assert done.created_at and done.started_at and done.heartbeat_at and done.finished_at
    assert done.created_at <= done.started_at <= done.finished_at
    detail = job_detail(core, done)
    assert [(s["state"], s["done"], s["failed"]) for s in detail["sources"]] == [("done", 40, 0)]
    assert detail["result"]["pulls"][0]["items"]["done"] == 40
    # the row outlives the service: a new one (another process) sees the same job
    assert records.get(core, job.id).to_dict() == done.to_dict()
    assert [j.id for j in service.list("c1")] == [job.id]


def test_cancel_mid_pull_stops_within_seconds_and_leaves_a_consistent_ledger(
        core: App, service: JobService, tmp_path: Path) -> None:
    folder = media_folder(tmp_path / "m", 10000)
    media_case(core, "c1", folder)
    job = service.submit("pull", "c1", owner="nina", params={})
    wait_for(lambda: progress_done(core, job.id) > 100, 60, "the pull to be under way")
    t0 = time.monotonic()
    assert service.cancel(job.id).cancel_requested
    ended = service.wait(job.id, 30)
    stopped_in = time.monotonic() - t0
    assert ended.state == "cancelled" and ended.error == "cancelled on request", ended
    assert stopped_in < 10, stopped_in
    assert not case_lock.is_held(core, "c1")
    with core.db.session() as s:
        assert list(s.scalars(select(Pull.state))) == ["failed"]
        streams = list(s.scalars(select(Cursor.stream)))
        assert streams and all(c.startswith("partial:") for c in streams)  # checkpoints only, no final cursor
    rows = ledger_of(core, "c1")
    done = [r for r in rows if r[2] == "done"]
    assert 0 < len(done) < 10000
    blobs = core.blobs("c1")
    assert all(blobs.path(r[6]).is_file() for r in done)  # every done row has its bytes
    # the checkpoint covers exactly the files whose rows are written: none ahead of its data
    assert checkpointed_files(core, "c1") == {r[1].removeprefix("file:").split("#")[0] for r in done}
    # the next pull completes it and reads nothing that was already done
    again = service.wait(service.submit("pull", "c1", owner="nina", params={}).id, 120)
    assert again.state == "done", again
    rows = ledger_of(core, "c1")
    assert len(rows) == len({r[1] for r in rows}) == 10000 and {r[2] for r in rows} == {"done"}
    assert {r[3] for r in rows} == {1}  # no row written twice: no file read twice
    assert again.result["pulls"][0]["items"]["done"] == 10000 - len(done)
    with core.db.session() as s:
        assert [c for c in s.scalars(select(Cursor.stream))] == ["media"]  # the final cursor replaced them


def test_cancel_of_a_queued_job_is_at_once(core: App, tmp_path: Path) -> None:
    media_case(core, "c1", media_folder(tmp_path / "m", 5))
    svc = JobService(core, InProcessDispatcher(core, 1, timing=FAST))
    svc.shutdown(wait=True)  # a dispatcher that takes nothing: the job stays queued
    job = svc.submit("pull", "c1", owner="nina", params={})
    assert job.state == "queued"
    cancelled = svc.cancel(job.id)
    assert cancelled.state == "cancelled" and cancelled.finished_at is not None
    assert records.claim(core, job.id, "someone") is None  # nobody can start it any more


def test_retriable_error_is_retried_with_backoff_and_fatal_fails_at_once(
        core: App, service: JobService, tmp_path: Path) -> None:
    media_case(core, "c1", media_folder(tmp_path / "m", 10))
    held = case_lock.acquire(core, "c1")  # a CLI pull holds the case: CaseBusy, which is retriable
    try:
        job = service.submit("pull", "c1", owner="nina", params={})
        waiting = wait_for(lambda: (j := records.get(core, job.id)).state == "queued" and j.attempts == 1 and j, 30,
                           "the first attempt to be put back")
        assert waiting.run_after is not None and "trying again" in (waiting.error or "")
    finally:
        held.release()
    done = service.wait(job.id, 60)
    assert done.state == "done" and done.attempts >= 2, done
    # fatal: a source that does not exist is not tried again
    bad = service.wait(service.submit("pull", "c1", owner="nina", params={"sources": [9999]}).id, 30)
    assert bad.state == "failed" and bad.attempts == 1 and "9999" in (bad.error or "")


def test_retries_are_bounded(core: App, tmp_path: Path) -> None:
    media_case(core, "c1", media_folder(tmp_path / "m", 3))
    svc = JobService(core, InProcessDispatcher(core, 1, timing=Timing(dead_after=6.0, max_attempts=2, backoff=0.2)))
    held = case_lock.acquire(core, "c1")
    try:
        failed = svc.wait(svc.submit("pull", "c1", owner="nina", params={}).id, 30)
    finally:
        held.release()
        svc.shutdown(wait=False)
    assert failed.state == "failed" and failed.attempts == 2 and "another process" in (failed.error or "")


def test_a_job_whose_runner_stopped_answering_is_resumed_within_the_bound(
        core: App, service: JobService, tmp_path: Path) -> None:
    """A row left running by a runner that is gone (claimed, never beating) goes back to the queue."""
    media_case(core, "c1", media_folder(tmp_path / "m", 20))
    job = records.create(core, "pull", "c1", owner="nina")
    assert records.claim(core, job.id, "worker:elsewhere:1") is not None
    t0 = time.monotonic()
    done = service.wait(job.id, 30)
    assert done.state == "done" and done.attempts == 2, done
    assert time.monotonic() - t0 < FAST.dead_after + 3
    assert done.worker != "worker:elsewhere:1"


KILLED_SERVE = textwrap.dedent("""
    import sys, time
    from aggregator.app import App
    from aggregator.jobs.dispatch import InProcessDispatcher, JobService
    from aggregator.jobs.records import Timing
    app = App.open(sys.argv[1], sys.argv[2])
    svc = JobService(app, InProcessDispatcher(app, 1, timing=Timing(dead_after=6.0)))
    print(svc.submit("pull", "c1", owner="nina", params={}).id, flush=True)
    time.sleep(3600)
""")


def test_sigkill_mid_pull_then_the_next_runner_resumes_from_the_ledger(core: App, db_url: str,
                                                                       tmp_path: Path) -> None:
    media_case(core, "c1", media_folder(tmp_path / "m", 8000))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen([sys.executable, "-c", KILLED_SERVE, str(tmp_path / "home"), db_url], env=env,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        job_id = child.stdout.readline().strip()
        wait_for(lambda: progress_done(core, job_id) > 200, 60, "the pull to be under way")
        wait_for(lambda: any(r[2] == "done" for r in ledger_of(core, "c1")), 30, "ledger rows to be committed")
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(10)
    assert records.get(core, job_id).state == "running"  # what the dead process left
    before = {r[1] for r in ledger_of(core, "c1") if r[2] == "done"}
    t0 = time.monotonic()
    svc = JobService(core, InProcessDispatcher(core, 1, timing=FAST))
    try:
        wait_for(lambda: records.get(core, job_id).attempts == 2, FAST.dead_after + 2, "the job to be resumed")
        resumed_in = time.monotonic() - t0
        done = svc.wait(job_id, 120)
    finally:
        svc.shutdown(wait=False)
    assert done.state == "done", done
    assert resumed_in <= FAST.dead_after, resumed_in
    rows = ledger_of(core, "c1")
    assert len(rows) == len({r[1] for r in rows}) == 8000 and {r[2] for r in rows} == {"done"}
    assert before and {r[3] for r in rows} == {1}  # resumed from the checkpoint: no file read twice
    assert done.result["pulls"][0]["items"]["done"] == 8000 - len(before)
    with core.db.session() as s:
        pulls = list(s.execute(select(Pull.state, Pull.error, Pull.job_id).order_by(Pull.id)))
    assert [(p[0], p[2]) for p in pulls] == [("failed", job_id), ("done", job_id)] and "gone" in (pulls[0][1] or "")


def test_blob_root_keeps_case_folders_on_shared_storage_apart_from_the_home(
        tmp_path: Path, db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    shared = tmp_path / "shared" / "blobs"
    monkeypatch.setenv("AGGREGATOR_BLOB_ROOT", str(shared))
    app = App.open(tmp_path / "home2", database_url=db_url)
    svc = JobService(app, InProcessDispatcher(app, 1, timing=FAST))
    try:
        media_case(app, "c1", media_folder(tmp_path / "m", 30))
        assert svc.wait(svc.submit("pull", "c1", owner="nina", params={}).id, 60).state == "done"
        done = [r for r in ledger_of(app, "c1") if r[2] == "done"]
        assert len(done) == 30
        blobs = app.blobs("c1")
        assert blobs.root == shared / "c1" / "raw"
        assert all(blobs.path(r[6]).is_file() for r in done)
        assert not (tmp_path / "home2" / "cases").exists()  # nothing of the case in the home
        assert (shared.stat().st_mode & 0o777) == 0o700  # PHI: owner-only, whatever the umask
    finally:
        svc.shutdown(wait=False)
        app.close()
