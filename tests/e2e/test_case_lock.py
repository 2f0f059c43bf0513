"""One pull per case, freed when its process dies (issue 12, part 4).

Runs on SQLite (flock) and on PostgreSQL (advisory lock) when it is up. The first pull is a real
``pull_case`` in a child process, held still inside the connector by a progress object that
blocks, then killed with SIGKILL: nothing is simulated on the parent's side.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from aggregator.app import App
from aggregator.jobs import lock as case_lock
from aggregator.jobs.pull import DEAD, pull_case

ROOT = Path(__file__).resolve().parents[2]
EXE = Path(sys.executable).with_name("aggregator")

CHILD = textwrap.dedent("""
    import sys, time
    from aggregator.app import App
    from aggregator.jobs.pull import pull_case

    class Stuck:
        def set_total(self, total): pass
        def message(self, text): pass
        def advance(self, n=1):
            print("pulling", flush=True)
            time.sleep(3600)

    app = App.open(sys.argv[1], sys.argv[2])
    pull_case(app, "jd", progress_for=lambda label: Stuck())
""")


def _cli(home: Path, url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "AGGREGATOR_HOME": str(home), "AGGREGATOR_DATABASE_URL": url}
    return subprocess.run([str(EXE), *args], capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)


@pytest.fixture()
def case_home(tmp_path: Path, db_url: str) -> Iterator[tuple[Path, str]]:
    if not EXE.exists():
        pytest.skip(f"the console script is not installed next to {sys.executable}")
    from fixtures.generate import generate_download

    info = generate_download(tmp_path / "dl")
    home = tmp_path / "home"
    r = _cli(home, db_url, "case", "create", "jd", "--checklist", "oncology", "--case-date", info.case_date.isoformat())
    assert r.returncode == 0, r.stderr
    r = _cli(home, db_url, "source", "add", "jd", "--media", str(tmp_path / "dl"))
    assert r.returncode == 0, r.stderr
    yield home, db_url


def _start_stuck_pull(home: Path, url: str) -> subprocess.Popen[str]:
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(home), url], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, cwd=ROOT)
    assert child.stdout is not None
    line = child.stdout.readline()
    assert line.strip() == "pulling", child.stderr.read() if child.poll() is not None else line
    return child


def _last_pull(home: Path, url: str) -> dict[str, object]:
    r = _cli(home, url, "case", "show", "jd", "--json")
    assert r.returncode == 0, r.stderr
    (src,) = json.loads(r.stdout)["sources"]
    return src["last_pull"]  # type: ignore[no-any-return]


def test_second_pull_is_refused_then_a_killed_pull_is_seen_dead_at_once(case_home: tuple[Path, str]) -> None:
    home, url = case_home
    child = _start_stuck_pull(home, url)
    try:
        second = _cli(home, url, "pull", "jd")
        assert second.returncode == 5
        assert "being pulled by another process" in second.stderr
        if url.startswith("sqlite"):
            assert f"pid {child.pid}" in second.stderr
        assert _last_pull(home, url)["state"] == "running"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    # no heartbeat timeout: the lock is free, so the pull is known dead at the next look
    last = _last_pull(home, url)
    assert last["state"] == "failed" and last["error"] == DEAD
    again = _cli(home, url, "pull", "jd", "--json")
    assert again.returncode == 0, again.stderr
    (summary,) = json.loads(again.stdout)
    assert summary["state"] in ("done", "partial")


def test_pull_wait_waits_for_the_holder(case_home: tuple[Path, str]) -> None:
    home, url = case_home
    app = App.open(home, url)
    try:
        held = case_lock.acquire(app, "jd")
        env = {**os.environ, "AGGREGATOR_HOME": str(home), "AGGREGATOR_DATABASE_URL": url}
        waiting = subprocess.Popen([str(EXE), "pull", "jd", "--wait", "--json"], stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
        try:
            with pytest.raises(subprocess.TimeoutExpired):
                waiting.wait(timeout=2)  # still waiting while the lock is held
        finally:
            held.release()
        out, err = waiting.communicate(timeout=300)
        assert waiting.returncode == 0, err
        assert json.loads(out)[0]["state"] in ("done", "partial")
    finally:
        app.close()


def test_in_process_second_pull_conflicts_too(case_home: tuple[Path, str]) -> None:
    home, url = case_home
    app = App.open(home, url)
    try:
        with case_lock.acquire(app, "jd"):
            assert case_lock.is_held(app, "jd")
            with pytest.raises(case_lock.CaseBusy):
                pull_case(app, "jd")
        assert not case_lock.is_held(app, "jd")
        assert pull_case(app, "jd")[0].state in ("done", "partial")
    finally:
        app.close()


def test_temporary_folders_of_dead_pulls_are_cleaned_at_the_next_pull(case_home: tuple[Path, str]) -> None:
    home, url = case_home
    app = App.open(home, url)
    try:
        case_dir = app.case_dir("jd")
        left = case_dir / "tmp" / "aggregator-media-dead1"
        left.mkdir(parents=True)
        (left / "copy.dcm").write_bytes(b"\0" * 1024)
        partial = case_dir / "raw" / ".tmp" / "in-dead2"
        partial.parent.mkdir(parents=True, exist_ok=True)
        partial.write_bytes(b"partial")
        pull_case(app, "jd")
        assert not left.exists() and not partial.exists()
    finally:
        app.close()


def test_advisory_keys_are_stable_and_distinct() -> None:
    assert case_lock.advisory_key("jd") == case_lock.advisory_key("jd")
    assert case_lock.advisory_key("jd") != case_lock.advisory_key("jd2")
    assert -(2**63) <= case_lock.advisory_key("x") < 2**63
