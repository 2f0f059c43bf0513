"""The installed `aggregator` command: clear errors and non-zero exits, --json everywhere."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

EXE = Path(sys.executable).with_name("aggregator")


def run(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "AGGREGATOR_HOME": str(home)}
    env.pop("AGGREGATOR_DATABASE_URL", None)
    return subprocess.run([str(EXE), *args], capture_output=True, text=True, env=env, timeout=120)


@pytest.fixture(scope="module", autouse=True)
def _installed() -> None:
    if not EXE.exists():
        pytest.skip(f"the console script is not installed next to {sys.executable}")


def test_unknown_case_is_a_clear_error(tmp_path: Path) -> None:
    r = run(tmp_path, "case", "show", "nope")
    assert r.returncode == 3
    assert "no case named 'nope'" in r.stderr
    r = run(tmp_path, "check", "nope", "--json")
    assert r.returncode == 3
    assert json.loads(r.stdout)["error"]["type"] == "NotFound"


def test_bad_media_path_and_bad_option(tmp_path: Path) -> None:
    assert run(tmp_path, "case", "create", "c1", "--checklist", "general").returncode == 0
    r = run(tmp_path, "source", "add", "c1", "--media", str(tmp_path / "missing"))
    assert r.returncode == 2 and "media path does not exist" in r.stderr
    r = run(tmp_path, "pull", "c1", "--no-such-option")
    assert r.returncode == 2 and "No such option" in r.stderr
    r = run(tmp_path, "case", "create", "../escape", "--checklist", "general")
    assert r.returncode == 2 and "invalid case name" in r.stderr
    r = run(tmp_path, "case", "create", "c2", "--checklist", "no-such-checklist")
    assert r.returncode != 0
    r = run(tmp_path, "case", "create", "c3", "--checklist", "general", "--birth-date", "1961-13-40")
    assert r.returncode == 2


def test_json_outputs_for_setup_commands(tmp_path: Path) -> None:
    r = run(tmp_path, "case", "create", "c1", "--checklist", "oncology", "--case-date", "2026-10-01", "--json")
    assert r.returncode == 0, r.stderr
    created = json.loads(r.stdout)
    assert created["case"] == "c1" and created["checklist"] == "oncology" and created["sources"] == []
    media = tmp_path / "dl"
    media.mkdir()
    r = run(tmp_path, "source", "add", "c1", "--media", str(media), "--json")
    assert json.loads(r.stdout)["kind"] == "media"
    r = run(tmp_path, "case", "list", "--json")
    assert json.loads(r.stdout) == [
        {"case": "c1", "checklist": "oncology", "status": "open", "case_date": "2026-10-01", "sources": 1}
    ]
    r = run(tmp_path, "endpoint", "list", "--json")
    assert json.loads(r.stdout) == []
    r = run(tmp_path, "serve", "--port", "not-a-port")
    assert r.returncode == 2 and "not-a-port" in r.stderr  # serve exists; it is tested in tests/api


def test_endpoint_add_refuses_unknown_kind_and_keeps_no_secret(tmp_path: Path) -> None:
    r = run(tmp_path, "endpoint", "add", "x", "--kind", "gopher", "--url", "http://127.0.0.1:1")
    assert r.returncode == 3 and "no connector of kind 'gopher'" in r.stderr
    r = run(tmp_path, "endpoint", "add", "h1", "--kind", "fhir", "--url", "http://127.0.0.1:9/fhir",
            "--auth", "bearer", "--token-env", "H1_TOKEN", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["config"]["token_env"] == "H1_TOKEN"
    r = run(tmp_path, "endpoint", "add", "h1", "--kind", "fhir", "--url", "http://127.0.0.1:9/fhir")
    assert r.returncode == 2 and "already exists" in r.stderr
