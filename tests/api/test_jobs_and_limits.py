"""Jobs (cancel, heartbeats, no job left running) and the API's limits (issue 13)."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from aggregator import audit
from aggregator.api.app import ApiConfig
from aggregator.api.jobs import CANCELLED, DONE, FAILED, RUNNING, Job, JobCancelled, ThreadJobRunner
from aggregator.api.routes.jobs import _pull_job
from aggregator.errors import UsageError
from aggregator.jobs import lock as case_lock
from aggregator.store.models import Pull
from tests.api.conftest import Api, make_api


def test_runner_final_states_and_cancel() -> None:
    runner = ThreadJobRunner(workers=1)
    try:
        started = threading.Event()

        def slow(job: Job) -> tuple[str, dict[str, Any]]:
            p = job.progress_for("src")
            p.set_total(1000)
            started.set()
            for _ in range(1000):
                time.sleep(0.01)
                p.advance()
            return DONE, {}

        a = runner.submit("pull", "c", slow, owner="u", params={})
        b = runner.submit("pull", "c", lambda job: (DONE, {"x": 1}), owner="u", params={})
        assert started.wait(10)
        assert runner.status(a.id).state == RUNNING and runner.status(b.id).state == "queued"
        runner.cancel(b.id)  # never started
        runner.cancel(a.id)  # stops at its next step
        assert runner.wait(a.id, 10).state == CANCELLED and runner.status(a.id).progress[0].done < 1000
        assert runner.wait(b.id, 10).state == CANCELLED
        c = runner.submit("pull", "c", lambda job: (_ for _ in ()).throw(UsageError("bad input")),
                          owner="u", params={})
        assert runner.wait(c.id, 10).state == FAILED and runner.status(c.id).error == "bad input"
        d = runner.submit("pull", "c", lambda job: (_ for _ in ()).throw(KeyError("Rivera")), owner="u", params={})
        done = runner.wait(d.id, 10)
        assert done.state == FAILED and done.error == "unexpected KeyError"  # no exception text: it may be PHI
    finally:
        runner.shutdown()


def test_watchdog_beats_live_jobs_and_fails_those_whose_thread_is_gone() -> None:
    runner = ThreadJobRunner(workers=1)
    try:
        gate = threading.Event()
        live = runner.submit("pull", "c", lambda job: (gate.wait(10), (DONE, {}))[1], owner="u", params={})
        while runner.status(live.id).state != RUNNING:
            time.sleep(0.01)
        before = runner.status(live.id).heartbeat_at
        time.sleep(0.01)
        runner.sweep()
        assert runner.status(live.id).heartbeat_at > before  # type: ignore[operator]
        # a job marked running whose thread has ended (the process's thread died under it)
        dead_thread = threading.Thread(target=lambda: None)
        dead_thread.start()
        dead_thread.join()
        orphan = Job(id="orphan", kind="pull", case_id="c", owner="u", state=RUNNING, thread=dead_thread)
        runner._jobs[orphan.id] = orphan
        runner.sweep()
        assert runner.status("orphan").state == FAILED and "thread ended" in (runner.status("orphan").error or "")
        gate.set()
        assert runner.wait(live.id, 10).state == DONE
    finally:
        runner.shutdown()


def test_cancelled_pull_marks_its_pull_failed_and_frees_the_case(api: Api, media_zip: tuple[Path, Any]) -> None:
    c, nav = api.client, api.h("navigator")
    assert c.post("/cases", headers=nav, json={"case": "c1", "checklist": "oncology"}).status_code == 201
    r = c.post("/cases/c1/sources/media", headers={**nav, "Content-Type": "application/zip"},
               content=media_zip[0].read_bytes())
    assert r.status_code == 201
    job = Job(id="j1", kind="pull", case_id="c1", owner="navigator")
    job.cancel_requested.set()
    with pytest.raises(JobCancelled):
        _pull_job(api.core, "c1", [], audit.Actor("navigator"))(job)
    with api.core.db.session() as s:
        states = list(s.scalars(select(Pull.state)))
    assert states == ["failed"]
    assert not case_lock.is_held(api.core, "c1")
    # and the case can be pulled again at once
    r = c.post("/cases/c1/pulls", headers=nav)
    assert r.status_code == 202 and api.wait(r.json()["id"])["state"] in ("done", "partial")


def test_rate_limit_answers_429_with_retry_after(tmp_path: Path) -> None:
    api = make_api(tmp_path / "home", None, ApiConfig(rate_per_second=0.5, burst=3))
    with api.client as c:
        codes = [c.get("/me", headers=api.h("navigator")).status_code for _ in range(4)]
        assert codes == [200, 200, 200, 429]
        r = c.get("/me", headers=api.h("navigator"))
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        assert r.headers["content-type"] == "application/problem+json"
        assert c.get("/me", headers=api.h("admin")).status_code == 200  # per token
    api.core.close()


def test_body_limits(tmp_path: Path) -> None:
    api = make_api(tmp_path / "home", None, ApiConfig(max_body=1000, max_upload=5000, rate_per_second=1000,
                                                      burst=1000))
    with api.client as c:
        nav = api.h("navigator")
        big = {"case": "c1", "checklist": "oncology", "patient_name": "x" * 2000}
        assert c.post("/cases", headers=nav, json=big).status_code == 413
        assert c.post("/cases", headers=nav, json={"case": "c1", "checklist": "oncology"}).status_code == 201
        up = {**nav, "Content-Type": "application/zip"}
        assert c.post("/cases/c1/sources/media", headers=up, content=b"P" * 6000).status_code == 413

        def chunks() -> Any:  # no Content-Length: counted as it arrives
            for _ in range(12):
                yield b"K" * 500

        r = c.post("/cases/c1/sources/media", headers=up, content=chunks())
        assert r.status_code == 413, r.text
        assert list((api.core.case_dir("c1") / "uploads").iterdir()) == []  # partial upload removed
        assert c.get("/cases/c1/sources", headers=nav).json() == []
    api.core.close()


def test_no_cors_unless_configured(tmp_path: Path) -> None:
    origin = {"Origin": "https://pages.example"}
    api = make_api(tmp_path / "a", None)
    with api.client as c:
        r = c.get("/health", headers=origin)
        assert "access-control-allow-origin" not in r.headers
        assert c.options("/cases", headers={**origin, "Access-Control-Request-Method": "GET"}).status_code == 405
    api.core.close()
    api = make_api(tmp_path / "b", None, ApiConfig(cors_origins=["https://pages.example"], rate_per_second=1000,
                                                   burst=1000))
    with api.client as c:
        assert c.get("/health", headers=origin).headers["access-control-allow-origin"] == "https://pages.example"
    api.core.close()


def test_gap_report_is_recomputed_only_when_its_inputs_change(api: Api, media_zip: tuple[Path, Any]) -> None:
    from fixtures.generate import generate_zip

    c, nav = api.client, api.h("navigator")
    assert c.post("/cases", headers=nav, json={"case": "c1", "checklist": "oncology"}).status_code == 201
    up = {**nav, "Content-Type": "application/zip"}
    assert c.post("/cases/c1/sources/media", headers=up, content=media_zip[0].read_bytes()).status_code == 201
    assert api.wait(c.post("/cases/c1/pulls", headers=nav).json()["id"])["state"] in ("done", "partial")
    computed = [c.get("/cases/c1/gap-report", headers=nav).headers["x-report-computed"] for _ in range(3)]
    assert computed == ["true", "false", "false"]
    # a new source and its pull change the ledger: the next read computes again, once
    other = generate_zip(media_zip[0].with_name("other.zip"), variant="no-recent-labs", seed="other")
    assert c.post("/cases/c1/sources/media", headers=up, content=other.root.read_bytes()).status_code == 201
    assert [c.get("/cases/c1/gap-report", headers=nav).headers["x-report-computed"] for _ in range(2)] == [
        "true", "false"]
    assert api.wait(c.post("/cases/c1/pulls", headers=nav).json()["id"])["state"] in ("done", "partial")
    assert [c.get("/cases/c1/gap-report", headers=nav).headers["x-report-computed"] for _ in range(2)] == [
        "true", "false"]
