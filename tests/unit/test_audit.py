"""The hash-chained audit trail, on SQLite and PostgreSQL, and through the CLI (issue 13)."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from fhir.resources.R4B.auditevent import AuditEvent
from sqlalchemy import text

from aggregator import audit
from aggregator.store.db import Database
from tests.support import run_in_threads

ROOT = Path(__file__).resolve().parents[2]
EXE = Path(sys.executable).with_name("aggregator")
ALICE = audit.Actor("alice", token_id="t1", address="127.0.0.1", role="navigator")


def _fill(db: Database, n: int = 5) -> None:
    for i in range(n):
        audit.record(db, ALICE, audit.READ, "gap-report", case_id=f"case-{i % 2}")


def test_entries_are_valid_fhir_r4_audit_events(db_url: str) -> None:
    db = Database(db_url)
    _fill(db, 3)
    audit.record(db, audit.os_actor(), audit.EXECUTE, "dicom-retrieve", case_id="case-0",
                 entity={"study": "1.2.3", "instances": "4"})
    audit.record(db, ALICE, audit.UPDATE, "assignment", case_id="case-1", outcome=audit.DENIED, detail="NotFound",
                 access_change=True)
    rows = list(audit.events(db))
    assert len(rows) == 5
    for r in rows:
        AuditEvent.model_validate(r["event"])
    assert [r["seq"] for r in audit.events(db, case_id="case-1")] == [2, 5]
    assert rows[-1]["event"]["type"]["code"] == "110136" and rows[-1]["event"]["outcome"] == "4"
    db.dispose()


def test_verify_detects_edit_delete_and_reorder(db_url: str) -> None:
    db = Database(db_url)
    _fill(db, 5)
    ok = audit.verify(db)
    assert ok.ok and ok.count == 5
    with db.engine.begin() as c:
        body = c.execute(text("SELECT body FROM audit_events WHERE id = 3")).scalar()
        c.execute(text("UPDATE audit_events SET body = :b WHERE id = 3"), {"b": body.replace("case-0", "case-9")})
    bad = audit.verify(db)
    assert not bad.ok and bad.bad_seq == 3 and "edited" in (bad.problem or "")
    with db.engine.begin() as c:
        c.execute(text("UPDATE audit_events SET body = :b WHERE id = 3"), {"b": body})
        c.execute(text("UPDATE audit_events SET case_id = 'other' WHERE id = 3"))
    assert audit.verify(db).bad_seq == 3  # the index column no longer matches the content
    with db.engine.begin() as c:
        c.execute(text("UPDATE audit_events SET case_id = 'case-0' WHERE id = 3"))
    assert audit.verify(db).ok
    with db.engine.begin() as c:
        c.execute(text("DELETE FROM audit_events WHERE id = 2"))
    gone = audit.verify(db)
    assert not gone.ok and gone.bad_seq == 3 and "deleted" in (gone.problem or "")
    db.dispose()


def test_reordered_entries_are_detected(db_url: str) -> None:
    db = Database(db_url)
    _fill(db, 4)
    with db.engine.begin() as c:
        c.execute(text("UPDATE audit_events SET id = 100 WHERE id = 2"))
        c.execute(text("UPDATE audit_events SET id = 2 WHERE id = 3"))
        c.execute(text("UPDATE audit_events SET id = 3 WHERE id = 100"))
    bad = audit.verify(db)
    assert not bad.ok and bad.bad_seq == 2
    db.dispose()


def test_concurrent_writers_never_fork_the_chain(db_url: str) -> None:
    db = Database(db_url)

    def write(k: int) -> None:
        for i in range(15):
            audit.record(db, audit.Actor(f"w{k}"), audit.READ, "case", case_id=f"c{i}")

    assert not run_in_threads(write, [(k,) for k in range(4)])
    result = audit.verify(db)
    assert result.ok and result.count == 60
    db.dispose()


def _cli(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "AGGREGATOR_HOME": str(home)}
    env.pop("AGGREGATOR_DATABASE_URL", None)
    return subprocess.run([str(EXE), *args], capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)


def test_cli_reads_pulls_and_packages_are_audited_and_tampering_is_found(tmp_path: Path) -> None:
    if not EXE.exists():
        pytest.skip("console script not installed")
    from fixtures.generate import generate_download

    info = generate_download(tmp_path / "dl")
    home = tmp_path / "home"
    for args in (("case", "create", "jd", "--checklist", "oncology", "--patient-name", info.patient_name,
                  "--birth-date", info.birth_date, "--case-date", info.case_date.isoformat()),
                 ("source", "add", "jd", "--media", str(tmp_path / "dl")),
                 ("pull", "jd"), ("check", "jd"), ("case", "show", "jd"),
                 ("package", "jd", "--out", str(tmp_path / "pkg"))):
        r = _cli(home, *args)
        assert r.returncode == 0, (args, r.stderr)
    assert _cli(home, "case", "show", "nope").returncode == 3
    listed = _cli(home, "audit", "--case", "jd", "--json")
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)
    kinds = [(r["event"]["action"], r["event"]["subtype"][0]["code"]) for r in rows]
    for expected in [("C", "case"), ("U", "source"), ("E", "pull"), ("R", "gap-report"), ("R", "case"),
                     ("C", "package")]:
        assert expected in kinds
    studies = {e["what"]["identifier"]["value"] for r in rows if r["event"]["subtype"][0]["code"] == "dicom-retrieve"
               for e in r["event"]["entity"] if e["description"] == "study"}
    assert studies == set(info.study_uids)
    assert all(r["event"]["agent"][0]["who"]["identifier"]["system"] == "urn:aggregator:os-user" for r in rows)
    failed = [r for r in json.loads(_cli(home, "audit", "--case", "nope", "--json").stdout)]
    assert failed and failed[0]["event"]["outcome"] == "4"
    everything = _cli(home, "audit", "--json").stdout
    assert info.patient_name not in everything and info.birth_date not in everything
    assert _cli(home, "audit", "verify").returncode == 0
    con = sqlite3.connect(home / "aggregator.db")
    with con:
        con.execute("UPDATE audit_events SET body = replace(body, '\"R\"', '\"D\"') WHERE id = "
                    "(SELECT min(id) FROM audit_events WHERE action = 'R')")
    con.close()
    broken = _cli(home, "audit", "verify", "--json")
    assert broken.returncode == 6
    assert json.loads(broken.stdout)["ok"] is False
