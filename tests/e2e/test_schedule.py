"""Scheduled sync (issue 14): due exactly when the cron says, run once, closed cases left alone,
and what changed counted right. On SQLite and on PostgreSQL when it is up.

The clock is passed in (``now=``) for the schedule tests; the pulls, checks and ledger are real,
on the project's synthetic downloads.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from aggregator.app import App
from aggregator.cases import add_source, create_case, set_case_status
from aggregator.errors import NotFound, UsageError
from aggregator.jobs.pull import pull_case
from aggregator.jobs.schedule import claim_due, get_schedule, list_schedules, run_due, set_schedule
from aggregator.jobs.sync import list_syncs, sync_cases
from aggregator.pipeline import check_case
from aggregator.store.models import SyncRun
from tests.support import run_in_threads

ROOT = Path(__file__).resolve().parents[2]
EXE = Path(sys.executable).with_name("aggregator")


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


@pytest.fixture()
def core(tmp_path: Path, db_url: str) -> Iterator[App]:
    app = App.open(tmp_path / "home", database_url=db_url)
    yield app
    app.close()


def _empty_case(app: App, case_id: str) -> None:
    create_case(app, case_id, "oncology", case_date="2026-01-15")


def _syncs(app: App, case_id: str) -> list[dict[str, Any]]:
    return list_syncs(app, case_id)


def test_due_exactly_when_the_cron_says_across_a_month_end_and_zones(core: App) -> None:
    for cid in ("paris", "kolkata"):
        _empty_case(core, cid)
    # 09:00 on the last day of each month in Paris; 00:00 on the 1st in Kolkata (+05:30)
    set_schedule(core, "paris", "0 9 L * *", timezone="Europe/Paris", now=utc(2026, 2, 1))
    set_schedule(core, "kolkata", "0 0 1 * *", timezone="Asia/Kolkata", now=utc(2026, 2, 1))
    assert get_schedule(core, "paris")["next_due_at"] == "2026-02-28T08:00:00+00:00"  # CET, UTC+1
    assert get_schedule(core, "kolkata")["next_due_at"] == "2026-02-28T18:30:00+00:00"  # 1 March 00:00 IST

    assert claim_due(core, now=utc(2026, 2, 28, 7, 59, 59)) == []
    (first,) = claim_due(core, now=utc(2026, 2, 28, 8, 0))
    assert (first.case_id, first.slot) == ("paris", utc(2026, 2, 28, 8, 0))
    assert claim_due(core, now=utc(2026, 2, 28, 8, 0, 30)) == []  # claimed: not twice
    assert claim_due(core, now=utc(2026, 2, 28, 18, 29)) == []
    (second,) = claim_due(core, now=utc(2026, 2, 28, 18, 30, 5))
    assert (second.case_id, second.slot) == ("kolkata", utc(2026, 2, 28, 18, 30))
    # Paris moves to summer time on 29 March: the end of March is 09:00 CEST, 07:00 UTC
    assert get_schedule(core, "paris")["next_due_at"] == "2026-03-31T07:00:00+00:00"
    assert get_schedule(core, "paris")["last_slot_at"] == "2026-02-28T08:00:00+00:00"
    assert claim_due(core, now=utc(2026, 3, 31, 6, 59)) == []
    assert [c.case_id for c in claim_due(core, now=utc(2026, 3, 31, 7, 0))] == ["paris"]


def test_missed_times_run_once_for_the_latest(core: App) -> None:
    _empty_case(core, "c")
    set_schedule(core, "c", "*/15 * * * *", now=utc(2026, 3, 1, 0, 0))
    # nothing ran for a day and a bit: one run, standing for the latest time, then the next quarter
    (claim,) = claim_due(core, now=utc(2026, 3, 2, 1, 7))
    assert claim.slot == utc(2026, 3, 2, 1, 0)
    assert claim_due(core, now=utc(2026, 3, 2, 1, 14)) == []
    assert get_schedule(core, "c")["next_due_at"] == "2026-03-02T01:15:00+00:00"


def test_two_runners_at_once_claim_each_due_case_once(core: App) -> None:
    for i in range(6):
        _empty_case(core, f"c{i}")
        set_schedule(core, f"c{i}", "0 6 * * *", now=utc(2026, 5, 1))
    now = utc(2026, 5, 1, 6, 0)
    barrier = threading.Barrier(3)
    claimed: list[str] = []
    lock = threading.Lock()

    def runner() -> None:
        barrier.wait()
        got = claim_due(core, now=now)
        with lock:
            claimed.extend(c.case_id for c in got)

    assert run_in_threads(runner, [(), (), ()]) == []
    assert sorted(claimed) == [f"c{i}" for i in range(6)]  # every case once, whoever got it


def test_sync_due_runs_only_due_open_cases_once(core: App) -> None:
    for cid in ("due", "later", "closed", "unscheduled"):
        _empty_case(core, cid)
    set_schedule(core, "due", "0 6 * * *", now=utc(2026, 5, 1))
    set_schedule(core, "later", "0 18 * * *", now=utc(2026, 5, 1))
    set_schedule(core, "closed", "0 6 * * *", now=utc(2026, 5, 1))
    set_case_status(core, "closed", "closed")

    results = run_due(core, now=utc(2026, 5, 1, 6, 1))
    assert [(r["case"], r["state"], r["trigger"]) for r in results] == [("due", "done", "schedule")]
    assert results[0]["scheduled_for"] == "2026-05-01T06:00:00+00:00"
    assert run_due(core, now=utc(2026, 5, 1, 6, 2)) == []  # once per time
    assert [r["case"] for r in run_due(core, now=utc(2026, 5, 1, 18, 0))] == ["later"]
    with core.db.session() as s:
        stored = Counter(s.query(SyncRun.case_id).all())
    assert {k[0]: v for k, v in stored.items()} == {"due": 1, "later": 1}

    # closed: listed as not active, never synced; reopened, it catches up once (not once per missed time)
    closed = next(r for r in list_schedules(core) if r["case"] == "closed")
    assert closed["active"] is False and closed["case_status"] == "closed"
    assert [r["case"] for r in run_due(core, now=utc(2026, 5, 3, 6, 0))] == ["due", "later"]
    set_case_status(core, "closed", "open")
    assert [r["case"] for r in run_due(core, now=utc(2026, 5, 3, 7, 0))] == ["closed"]
    assert len(_syncs(core, "closed")) == 1

    # a plain `sync` takes every open case; a closed one named is said to be closed, not dropped
    set_case_status(core, "unscheduled", "closed")
    assert sorted(r["case"] for r in sync_cases(core)) == ["closed", "due", "later"]
    (named,) = sync_cases(core, ["unscheduled"])
    assert named["state"] == "closed" and "closed" in named["note"]
    with pytest.raises(NotFound):
        sync_cases(core, ["nope"])
    with pytest.raises(UsageError):
        set_schedule(core, "unscheduled", "0 6 * * *")


def test_a_busy_case_is_handed_back_and_runs_next_time(core: App) -> None:
    from aggregator.jobs import lock as case_lock

    _empty_case(core, "c")
    set_schedule(core, "c", "0 6 * * *", now=utc(2026, 5, 1))
    held = case_lock.acquire(core, "c")
    try:
        (busy,) = run_due(core, now=utc(2026, 5, 1, 6, 0))
        assert busy["state"] == "busy"
    finally:
        held.release()
    assert _syncs(core, "c") == []
    (ran,) = run_due(core, now=utc(2026, 5, 1, 6, 1))  # due again at once, not tomorrow
    assert ran["state"] == "done" and ran["scheduled_for"] == "2026-05-01T06:00:00+00:00"
    assert get_schedule(core, "c")["next_due_at"] == "2026-05-02T06:00:00+00:00"


def _pathology_folder(folder: Path) -> list[dict[str, Any]]:
    """What a second portal sends later: the full pathology report (resources and its PDF)."""
    from fixtures import pdf
    from fixtures.generate import BUNDLE_TIMESTAMP, PATH_ACCESSION, _Ids, _pathology, pathology_report_text

    resources = _pathology(_Ids("demo"), full=True)
    for r in resources:
        r["meta"] = {"lastUpdated": BUNDLE_TIMESTAMP}
    folder.mkdir(parents=True)
    (folder / "pathology.ndjson").write_text("\n".join(json.dumps(r) for r in resources) + "\n")
    (folder / "pathology-report.pdf").write_bytes(
        pdf.text_pdf(pathology_report_text(), title=f"Surgical pathology report {PATH_ACCESSION}"))
    return resources


def test_what_changed_after_a_second_source_fills_a_gap(core: App, tmp_path: Path) -> None:
    from fixtures import generate_download

    info = generate_download(tmp_path / "portal-a", variant="no-pathology-text")
    create_case(core, "jd", "oncology", patient_name=info.patient_name, birth_date=info.birth_date,
                case_date=info.case_date.isoformat())
    add_source(core, "jd", media=str(tmp_path / "portal-a"))
    pull_case(core, "jd")
    report, _ = check_case(core, "jd")
    gaps_before = {i["id"] for i in report["items"] if i["status"] in ("missing", "partial")}
    assert {"pathology-report", "breast-receptors"} <= gaps_before
    set_schedule(core, "jd", "0 6 * * *", timezone="America/New_York", now=utc(2026, 10, 1))

    # first scheduled sync: nothing new anywhere
    (first,) = run_due(core, now=utc(2026, 10, 1, 10, 0))  # 06:00 EDT
    assert first["state"] == "done"
    assert (first["new_resources"], first["new_documents"], first["new_instances"]) == ({}, 0, 0)
    assert first["filled"] == [] and first["new_gaps"] == []
    assert set(first["open_gaps"]) == gaps_before
    assert first["updated"] == 0 and first["failed_sources"] == []

    # the second portal sends the pathology report; a third source has gone away
    sent = _pathology_folder(tmp_path / "portal-b")
    add_source(core, "jd", media=str(tmp_path / "portal-b"))
    (tmp_path / "gone").mkdir()
    gone = add_source(core, "jd", media=str(tmp_path / "gone"))["id"]
    (tmp_path / "gone").rmdir()

    (second,) = run_due(core, now=utc(2026, 10, 2, 10, 0, 30))
    assert second["state"] == "partial"  # one source failed
    # the resources sent, and the PDF as a DocumentReference with its bytes (the one new document)
    want = Counter(r["resourceType"] for r in sent) + Counter({"DocumentReference": 1})
    assert second["new_resources"] == dict(sorted(want.items()))
    assert second["new_documents"] == 1 and second["new_instances"] == 0
    assert {"pathology-report", "breast-receptors"} <= set(second["filled"])
    assert set(second["filled"]) == gaps_before - set(second["open_gaps"])
    assert second["new_gaps"] == []
    assert [f["source"] for f in second["failed_sources"]] == [gone]
    assert second["failed_sources"][0]["error"]
    assert second["score"] > first["score"]

    # kept per sync, newest first, exactly as run_due returned them
    assert [s["id"] for s in _syncs(core, "jd")] == [second["id"], first["id"]]
    assert _syncs(core, "jd")[0] == second

    # a third sync with nothing new: no movement, and the missing folder still reported
    (third,) = run_due(core, now=utc(2026, 10, 3, 10, 0))
    assert third["new_resources"] == {} and third["filled"] == [] and third["new_gaps"] == []
    assert [f["source"] for f in third["failed_sources"]] == [gone]


def _cli(home: Path, url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "AGGREGATOR_HOME": str(home), "AGGREGATOR_DATABASE_URL": url}
    env.pop("AGGREGATOR_WEBHOOK_URL", None)
    r = subprocess.run([str(EXE), *args], capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    print("$ aggregator", *args, "->", r.returncode, "\n", r.stdout[-2000:], r.stderr[-2000:])  # shown on failure
    return r


def test_cli_schedule_and_sync_due(tmp_path: Path, db_url: str) -> None:
    if not EXE.exists():
        pytest.skip(f"the console script is not installed next to {sys.executable}")
    from fixtures import generate_download

    home = tmp_path / "home"
    generate_download(tmp_path / "dl", variant="no-recent-labs")
    assert _cli(home, db_url, "case", "create", "a", "--checklist", "oncology").returncode == 0
    assert _cli(home, db_url, "case", "create", "b", "--checklist", "oncology").returncode == 0
    assert _cli(home, db_url, "source", "add", "a", "--media", str(tmp_path / "dl")).returncode == 0

    r = _cli(home, db_url, "schedule", "set", "a", "0 6 * * *", "--tz", "Europe/Paris", "--json")
    assert r.returncode == 0, r.stderr
    shown = json.loads(r.stdout)
    assert (shown["cron"], shown["timezone"], shown["webhook"]) == ("0 6 * * *", "Europe/Paris", None)
    assert json.loads(_cli(home, db_url, "schedule", "show", "a", "--json").stdout) == shown
    assert [s["case"] for s in json.loads(_cli(home, db_url, "schedule", "list", "--json").stdout)] == ["a"]

    bad = _cli(home, db_url, "schedule", "set", "b", "0 6 * * * *")
    assert bad.returncode == 2 and "five fields" in bad.stderr
    bad = _cli(home, db_url, "schedule", "set", "b", "0 6 * * *", "--tz", "Nowhere/Atlantis")
    assert bad.returncode == 2 and "unknown time zone" in bad.stderr
    bad = _cli(home, db_url, "schedule", "set", "b", "0 6 * * *", "--webhook", "https://example.org/hook")
    assert bad.returncode == 2 and "secret" in bad.stderr
    assert _cli(home, db_url, "schedule", "show", "b").returncode == 3

    # not due yet (next 06:00 Paris is in the future): nothing runs
    r = _cli(home, db_url, "sync", "--due", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == []
    # make it due: the stored next time moved into the past, as after a night with the machine off
    app = App.open(home, database_url=db_url)
    try:
        from sqlalchemy import update

        from aggregator.store.models import SyncSchedule

        with app.db.session() as s:
            s.execute(update(SyncSchedule).where(SyncSchedule.case_id == "a")
                      .values(next_due_at=datetime.now(UTC) - timedelta(hours=1)))
    finally:
        app.close()
    r = _cli(home, db_url, "sync", "--due", "--json")
    assert r.returncode == 0, r.stderr
    (ran,) = json.loads(r.stdout)
    assert ran["case"] == "a" and ran["trigger"] == "schedule" and ran["state"] == "done"
    assert sum(ran["new_resources"].values()) > 0 and "lab-results" in ran["new_gaps"]
    assert json.loads(_cli(home, db_url, "sync", "--due", "--json").stdout) == []  # once

    hist = _cli(home, db_url, "sync", "--history", "--case", "a", "--json")
    assert [h["id"] for h in json.loads(hist.stdout)] == [ran["id"]]
    text = _cli(home, db_url, "sync", "--history", "--case", "a").stdout
    assert f"sync {ran['id']} done" in text and "new gaps:" in text

    assert _cli(home, db_url, "case", "close", "a").returncode == 0
    assert json.loads(_cli(home, db_url, "case", "show", "a", "--json").stdout)["status"] == "closed"
    listed = json.loads(_cli(home, db_url, "schedule", "list", "--json").stdout)
    assert listed[0]["active"] is False
    r = _cli(home, db_url, "sync", "--json")
    assert json.loads(r.stdout) == [] or all(x["case"] != "a" for x in json.loads(r.stdout))

    assert _cli(home, db_url, "schedule", "clear", "a").returncode == 0
    assert json.loads(_cli(home, db_url, "schedule", "list", "--json").stdout) == []
    assert _cli(home, db_url, "sync", "--due", "--case", "a").returncode == 2
    shutil.rmtree(home, ignore_errors=True)


def test_deleting_a_case_removes_its_schedule_and_syncs(core: App) -> None:
    from sqlalchemy import func, select

    from aggregator.cases import delete_case
    from aggregator.store.models import SyncSchedule

    _empty_case(core, "c")
    set_schedule(core, "c", "0 6 * * *", now=utc(2026, 5, 1))
    assert len(run_due(core, now=utc(2026, 5, 1, 6, 0))) == 1
    delete_case(core, "c")
    with core.db.session() as s:
        assert s.scalar(select(func.count()).select_from(SyncSchedule)) == 0
        assert s.scalar(select(func.count()).select_from(SyncRun)) == 0


def test_the_job_engines_periodic_task_runs_the_due_syncs(core: App) -> None:
    from aggregator.jobs.tasks import run_scheduled

    _empty_case(core, "c")
    set_schedule(core, "c", "0 0 1 1 *", now=datetime.now(UTC) - timedelta(days=800))  # due since last January
    (ran,) = run_scheduled(core)  # what the workers' periodic task and `serve` call
    assert ran["case"] == "c" and ran["trigger"] == "schedule" and ran["state"] == "done"
    assert run_scheduled(core) == []
    assert [s["id"] for s in _syncs(core, "c")] == [ran["id"]]
