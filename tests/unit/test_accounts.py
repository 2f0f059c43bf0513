"""Users, tokens, assignments and the access rules (issue 13), on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from aggregator import accounts
from aggregator.errors import AlreadyExists, AuthenticationRequired, NotFound, PermissionDenied, UsageError
from aggregator.store.db import Database
from aggregator.store.models import ApiToken, Case, User

EXE = Path(sys.executable).with_name("aggregator")


def _db(db_url: str) -> Database:
    db = Database(db_url)
    with db.session() as s:
        s.add(Case(id="c1", checklist="oncology"))
        s.add(Case(id="c2", checklist="oncology"))
    return db


def test_password_is_an_argon2_hash_and_checks(db_url: str) -> None:
    db = _db(db_url)
    accounts.add_user(db, "nina", "navigator", "a long enough password")
    with db.session() as s:
        stored = s.scalar(select(User.password_hash).where(User.name == "nina"))
    assert stored and stored.startswith("$argon2id$") and "a long enough password" not in stored
    assert accounts.check_password(db, "nina", "a long enough password") is not None
    assert accounts.check_password(db, "nina", "a wrong password!!") is None
    assert accounts.check_password(db, "nobody", "a long enough password") is None
    with pytest.raises(AlreadyExists):
        accounts.add_user(db, "nina", "navigator", None)
    with pytest.raises(UsageError):
        accounts.add_user(db, "x", "superuser", None)
    with pytest.raises(UsageError):
        accounts.add_user(db, "y", "admin", "short")


def test_token_shown_once_stored_as_hash_revoked_and_expired(db_url: str) -> None:
    db = _db(db_url)
    accounts.add_user(db, "nina", "navigator", None)
    tok = accounts.create_token(db, "nina")
    secret = tok["token"].split(".", 1)[1]
    with db.session() as s:
        row = s.get(ApiToken, tok["id"])
        assert row is not None and secret not in row.secret_hash and len(row.secret_hash) == 64
    p = accounts.authenticate(db, tok["token"])
    assert (p.name, p.role, p.token_id) == ("nina", "navigator", tok["id"])
    for bad in ("", "nope", tok["id"] + ".wrong", tok["token"] + "x", "zz." + secret):
        with pytest.raises(AuthenticationRequired):
            accounts.authenticate(db, bad)
    accounts.revoke_token(db, tok["id"])
    with pytest.raises(AuthenticationRequired):
        accounts.authenticate(db, tok["token"])
    old = accounts.create_token(db, "nina", timedelta(seconds=-1))
    with pytest.raises(AuthenticationRequired):
        accounts.authenticate(db, old["token"])
    forever = accounts.create_token(db, "nina", accounts.parse_duration("never"))
    assert forever["expires_at"] is None and accounts.authenticate(db, forever["token"]).name == "nina"


def test_parse_duration() -> None:
    assert accounts.parse_duration("30d") == timedelta(days=30)
    assert accounts.parse_duration("90m") == timedelta(minutes=90)
    for bad in ("0d", "3", "1y", "-1d", ""):
        with pytest.raises(UsageError):
            accounts.parse_duration(bad)


def test_roles_and_assignment(db_url: str) -> None:
    db = _db(db_url)
    for name, role in (("ada", "admin"), ("nav", "navigator"), ("con", "consultant")):
        accounts.add_user(db, name, role, None)
    ada, nav, con = (accounts.authenticate(db, accounts.create_token(db, n)["token"]) for n in ("ada", "nav", "con"))
    accounts.assign_case(db, "c1", "con")
    accounts.assign_case(db, "c1", "con")  # idempotent
    # navigator: everything on cases
    accounts.case_for(db, nav, "c2", "sources")
    # consultant: the assigned case's gap report, summary and package; nothing else
    accounts.case_for(db, con, "c1", "gap-report")
    accounts.case_for(db, con, "c1", "package:read")
    with pytest.raises(PermissionDenied):
        accounts.case_for(db, con, "c1", "sources")
    with pytest.raises(NotFound) as unassigned:
        accounts.case_for(db, con, "c2", "gap-report")
    with pytest.raises(NotFound) as missing:
        accounts.case_for(db, con, "c9", "gap-report")
    assert str(unassigned.value).replace("c2", "X") == str(missing.value).replace("c9", "X")
    assert accounts.visible_cases(db, con) == {"c1"} and accounts.visible_cases(db, nav) is None
    # admin: users and endpoints, no patient data
    accounts.require(ada, "endpoints:write")
    with pytest.raises(PermissionDenied):
        accounts.case_for(db, ada, "c1", "gap-report")
    with pytest.raises(PermissionDenied):
        accounts.require(nav, "endpoints:write")
    with pytest.raises(NotFound):
        accounts.assign_case(db, "c9", "con")


def test_cli_user_token_assign_audited(tmp_path: Path) -> None:
    home = tmp_path / "home"

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(EXE), "--home", str(home), *args], capture_output=True, text=True, timeout=120)

    pw = tmp_path / "pw"
    pw.write_text("correct horse battery staple\n")
    assert run("user", "add", "con", "--role", "consultant", "--password-file", str(pw)).returncode == 0
    r = run("token", "create", "con", "--expires", "1h", "--json")
    assert r.returncode == 0, r.stderr
    tok = json.loads(r.stdout)
    assert tok["token"].startswith(tok["id"] + ".")
    assert run("case", "create", "c1", "--checklist", "oncology").returncode == 0
    r = run("case", "assign", "c1", "con")
    assert r.returncode == 0 and "assigned to con" in r.stdout
    assert run("case", "assign", "nope", "con").returncode == 3
    assert run("token", "revoke", tok["id"]).returncode == 0
    assert run("token", "revoke", "unknown").returncode == 3
    r = run("user", "add", "x", "--role", "admin")  # no terminal, no file: refused, not hung
    assert r.returncode == 2 and "--password-file" in r.stderr
    events = json.loads(run("audit", "--json").stdout)
    assign = [e["event"] for e in events if e["event"]["subtype"][0]["code"] == "assignment"]
    assert assign and assign[0]["type"]["code"] == "110136"  # Security Roles Changed
    assert tok["token"] not in json.dumps(events) and tok["token"].split(".")[1] not in json.dumps(events)
