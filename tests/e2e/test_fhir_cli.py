"""A FHIR endpoint through the CLI against a local FHIR server: pull, gap reasons from the ledger."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.test_cli_errors import run
from tests.fakes.fhir_server import FakeFhirServer


@pytest.fixture()
def server() -> Iterator[FakeFhirServer]:
    with FakeFhirServer(n_obs=30) as srv:
        yield srv


def test_fhir_source_pull_check_package(server: FakeFhirServer, tmp_path: Path) -> None:
    home = tmp_path / "home"
    server.inject(r"/Binary/", "status", 403)  # the hospital refuses the note's attachment
    assert run(home, "endpoint", "add", "h1", "--kind", "fhir", "--url", server.url).returncode == 0
    r = run(home, "endpoint", "check", "h1", "--json")
    assert r.returncode == 0, r.stderr
    details = json.loads(r.stdout)["details"]
    assert details["fhirVersion"] == "4.0.1" and details["everything"] is True
    assert run(home, "case", "create", "c", "--checklist", "general", "--case-date", "2026-10-01").returncode == 0
    assert run(home, "source", "add", "c", "--endpoint", "h1", "--patient-id", "p0").returncode == 0

    r = run(home, "pull", "c", "--json")
    assert r.returncode == 0, r.stderr
    (pulled,) = json.loads(r.stdout)
    assert pulled["state"] == "partial" and pulled["method"] == "$everything"
    assert pulled["items"]["failed"] == 1 and pulled["items"]["done"] >= 31

    report = json.loads(run(home, "check", "c", "--json").stdout)
    reasons = {g["reason"] for i in report["items"] for g in i.get("gaps", [])}
    assert "access-denied" in reasons
    denied = next(g for i in report["items"] for g in i.get("gaps", []) if g["reason"] == "access-denied")
    assert "h1" in denied["next_action"]

    # the refusal was passing: the next pull fetches the attachment, and nothing else again
    r = run(home, "pull", "c", "--json")
    (again,) = json.loads(r.stdout)
    assert again["state"] == "done" and again["items"]["failed"] == 0
    report = json.loads(run(home, "check", "c", "--json").stdout)
    assert "access-denied" not in {g["reason"] for i in report["items"] for g in i.get("gaps", [])}
    r = run(home, "package", "c", "--out", str(tmp_path / "pkg"), "--json")
    assert r.returncode == 0, r.stderr
    assert run(home, "verify", str(tmp_path / "pkg")).returncode == 0
