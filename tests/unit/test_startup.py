"""Start-up (issue 19): quick commands import only what they use, and the quick path changes nothing.

``--version``, ``--help`` and ``case list`` on a SQLite home must not import SQLAlchemy, Alembic,
the DICOM and FHIR libraries, requests, jsonschema or YAML; ``python -X importtime`` in a child
process names every module the command imported. These are behavioural assertions: the times
themselves are measured by ``bench/bench_startup.py``, not asserted here.

``case list`` on the quick path (``store.lite``, stdlib ``sqlite3``) must print byte for byte what
the ORM path prints, and the audit entries it appends must be links of the same chain.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from aggregator import audit
from aggregator.app import App, LiteApp
from aggregator.cases import add_source, create_case, list_cases
from aggregator.store import lite
from aggregator.store.db import Database
from tests.support import run_in_threads

ROOT = Path(__file__).resolve().parents[2]

#: top-level packages no quick command may import
HEAVY = ("sqlalchemy", "alembic", "pydicom", "pynetdicom", "requests", "fhir", "jsonschema", "yaml")

_RUN_MAIN = "import sys; from aggregator.cli import main; sys.exit(main(sys.argv[1:]))"


def _imported(home: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], set[str]]:
    """Run the CLI in a child with ``-X importtime``; its result and every module it imported."""
    env = {**os.environ, "AGGREGATOR_HOME": str(home), "PYTHONPATH": str(ROOT)}
    env.pop("AGGREGATOR_DATABASE_URL", None)
    r = subprocess.run([sys.executable, "-X", "importtime", "-c", _RUN_MAIN, *args], capture_output=True,
                       text=True, env=env, cwd=ROOT, timeout=120)
    modules = {line.rsplit("|", 1)[1].strip() for line in r.stderr.splitlines()
               if line.startswith("import time:") and "|" in line}
    modules.discard("imported package")
    return r, modules


def _heavy(modules: set[str]) -> list[str]:
    return sorted(m for m in modules if m.split(".")[0] in HEAVY)


def _home_with_cases(home: Path) -> App:
    app = App.open(home)
    # ids chosen so that ordering (upper case before lower, '.' and '-') would show a difference
    for case_id, n_sources in (("b-case", 2), ("A.1", 0), ("a-case", 1), ("Z_9", 3)):
        create_case(app, case_id, "oncology", case_date="2024-05-01")
        for i in range(n_sources):
            folder = home.parent / f"media-{case_id}-{i}"
            folder.mkdir()
            add_source(app, case_id, media=str(folder))
    with app.db.engine.begin() as c:  # a case date left empty (a database from before it was set)
        c.exec_driver_sql("UPDATE cases SET case_date = NULL WHERE id = 'Z_9'")
    return app


def test_version_and_help_import_no_heavy_module(tmp_path: Path) -> None:
    for args in (("--version",), ("--help",), ("case", "--help")):
        r, modules = _imported(tmp_path / "home", *args)
        assert r.returncode == 0, (args, r.stderr[-2000:])
        assert "aggregator.cli" in modules  # the child did run our CLI
        assert _heavy(modules) == [], args
        assert "importlib.metadata" not in modules, args
    assert not (tmp_path / "home").exists()  # neither opened nor created the home


def test_case_list_on_sqlite_imports_no_heavy_module_and_is_audited(tmp_path: Path) -> None:
    home = tmp_path / "home"
    _home_with_cases(home).close()
    r, modules = _imported(home, "case", "list", "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    assert [row["case"] for row in json.loads(r.stdout)] == ["A.1", "Z_9", "a-case", "b-case"]
    assert _heavy(modules) == []
    assert "sqlite3" in modules
    # the same measurement sees SQLAlchemy where a command does need it
    shown, show_modules = _imported(home, "case", "show", "a-case")
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert "sqlalchemy" in show_modules

    db = Database(f"sqlite:///{home / 'aggregator.db'}")
    rows = list(audit.events(db))
    assert [(e["event"]["action"], e["event"]["subtype"][0]["code"]) for e in rows][-2:] == [
        ("R", "case-list"), ("R", "case")]
    assert rows[-2]["event"]["agent"][0]["who"]["identifier"]["system"] == "urn:aggregator:os-user"
    result = audit.verify(db)
    assert result.ok and result.count == len(rows)
    db.dispose()


def test_case_list_json_is_byte_identical_on_both_paths(tmp_path: Path) -> None:
    home = tmp_path / "home"
    app = _home_with_cases(home)
    quick = LiteApp.open(home)
    assert quick is not None
    # the CLI's serialization of --json (aggregator.cli._emit)
    orm_json = json.dumps(list_cases(app), indent=2, sort_keys=True, default=str)
    lite_json = json.dumps(lite.list_cases(quick.db), indent=2, sort_keys=True, default=str)
    assert lite_json == orm_json
    assert '"sources": 3' in lite_json and '"case_date": null' in lite_json
    quick.close()
    app.close()
    env = {**os.environ, "AGGREGATOR_HOME": str(home), "PYTHONPATH": str(ROOT)}
    env.pop("AGGREGATOR_DATABASE_URL", None)
    r = subprocess.run([sys.executable, "-c", _RUN_MAIN, "case", "list", "--json"], capture_output=True,
                       text=True, env=env, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout == orm_json + "\n"


def test_homes_the_quick_path_cannot_serve_take_the_full_path(tmp_path: Path) -> None:
    assert LiteApp.open(tmp_path / "new-home") is None  # not created yet: App.open creates it
    assert not (tmp_path / "new-home").exists()
    home = tmp_path / "home"
    App.open(home).close()
    assert LiteApp.open(home, "postgresql://postgres@127.0.0.1:5432/x") is None
    assert LiteApp.open(home, f"sqlite:///{tmp_path / 'other.db'}") is None  # no such file
    old = Database(f"sqlite:///{home / 'aggregator.db'}")
    with old.engine.begin() as c:
        c.exec_driver_sql("UPDATE alembic_version SET version_num = '0001'")
    old.dispose()
    assert LiteApp.open(home) is None  # a migration is due: only the full path runs it
    assert lite.sqlite_path("sqlite:///:memory:") is None
    assert lite.sqlite_path("sqlite:////a/b.db") == Path("/a/b.db")


def test_quick_path_keeps_the_home_owner_only(tmp_path: Path) -> None:
    home = tmp_path / "home"
    App.open(home).close()
    os.chmod(home, 0o755)
    os.chmod(home / "aggregator.db", 0o644)
    quick = LiteApp.open(home)
    assert quick is not None
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    assert stat.S_IMODE((home / "aggregator.db").stat().st_mode) == 0o600
    quick.close()


def test_audit_rows_are_the_same_columns_on_both_paths() -> None:
    from aggregator.store.models import AuditEventRow

    assert set(audit.COLUMNS) == {c.name for c in AuditEventRow.__table__.columns} - {"id"}


def test_entries_from_both_writers_form_one_chain(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'store.db'}"
    db = Database(url)

    def write(k: int, quick: bool) -> None:
        target = lite.LiteDatabase.open(url) if quick else db
        assert target is not None
        try:
            for i in range(12):
                audit.record(target, audit.Actor(f"w{k}"), audit.READ, "case-list" if quick else "case",
                             case_id=None if quick else f"c{i}")
        finally:
            if quick:
                target.dispose()

    assert not run_in_threads(write, [(k, k % 2 == 0) for k in range(4)])
    result = audit.verify(db)
    assert result.ok and result.count == 48
    rows = list(audit.events(db))
    assert {r["event"]["subtype"][0]["code"] for r in rows} == {"case-list", "case"}
    # an entry edited after a quick write is caught like any other
    with db.engine.begin() as c:
        c.exec_driver_sql("UPDATE audit_events SET body = replace(body, 'w0', 'w9') WHERE actor = 'user:w0' "
                          "AND id = (SELECT min(id) FROM audit_events WHERE actor = 'user:w0')")
    assert not audit.verify(db).ok
    db.dispose()


@pytest.mark.parametrize("outcome", [audit.SUCCESS, audit.MINOR_FAILURE])
def test_a_quick_entry_is_the_entry_the_orm_path_would_write(tmp_path: Path, outcome: str) -> None:
    """Same event, canonical body and hash from either writer, given the same head and time."""
    a, b = Database(f"sqlite:///{tmp_path / 'a.db'}"), Database(f"sqlite:///{tmp_path / 'b.db'}")
    quick = lite.LiteDatabase.open(f"sqlite:///{tmp_path / 'b.db'}")
    assert quick is not None
    actor = audit.Actor("nav", kind="os-user", address="host-1")
    audit.record(a, actor, audit.READ, "case-list", outcome=outcome, detail="" if outcome == "0" else "NotFound")
    audit.record(quick, actor, audit.READ, "case-list", outcome=outcome, detail="" if outcome == "0" else "NotFound")
    cols = "recorded, actor, action, what, case_id, outcome, body, prev_hash, hash"
    with a.engine.connect() as c:
        ra = c.exec_driver_sql(f"SELECT {cols} FROM audit_events").one()
    rb = quick.conn.execute(f"SELECT {cols} FROM audit_events").fetchone()
    ea, eb = json.loads(ra[6]), json.loads(rb[6])
    assert ea.pop("recorded") and eb.pop("recorded")
    assert ea == eb
    assert ra[1:6] == rb[1:6] and ra[7] == rb[7] == audit.GENESIS
    assert rb[8] == audit.chain_hash(audit.GENESIS, rb[6].encode())
    quick.dispose()
    a.dispose()
    b.dispose()
