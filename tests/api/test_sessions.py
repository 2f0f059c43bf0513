"""Browser sessions: argon2 sign-in, an HttpOnly SameSite cookie, CSRF on state-changing requests."""

from __future__ import annotations

from pathlib import Path

from aggregator import accounts, audit
from tests.api.conftest import make_api


def test_session_cookie_and_csrf(tmp_path: Path) -> None:
    api = make_api(tmp_path / "home", None)
    accounts.add_user(api.core.db, "nina", "navigator", "a long enough password")
    with api.client as c:
        r = c.post("/session", json={"user": "nina", "password": "wrong password!!"})
        assert r.status_code == 401 and "set-cookie" not in r.headers
        r = c.post("/session", json={"user": "nina", "password": "a long enough password"})
        assert r.status_code == 200, r.text
        cookie = r.headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=strict" in cookie
        csrf = r.json()["csrf_token"]
        assert c.get("/me").json()["user"] == "nina"  # the cookie alone reads
        body = {"case": "c1", "checklist": "oncology"}
        r = c.post("/cases", json=body)  # but does not change anything without the CSRF token
        assert r.status_code == 403 and r.headers["content-type"] == "application/problem+json"
        assert c.post("/cases", json=body, headers={"X-CSRF-Token": "forged"}).status_code == 403
        assert c.post("/cases", json=body, headers={"X-CSRF-Token": csrf}).status_code == 201
        sid = c.cookies.get("aggregator_session")
        assert sid and sid not in str(list(audit.events(api.core.db)))
        assert c.delete("/session").status_code == 204
        c.cookies.clear()
        c.cookies.set("aggregator_session", sid)  # the old cookie, replayed: the session is over
        assert c.get("/me").status_code == 401
    kinds = [(e["event"]["subtype"][0]["code"], e["event"]["outcome"]) for e in audit.events(api.core.db)]
    assert ("sign-in", audit.DENIED) in kinds and ("sign-in", audit.SUCCESS) in kinds
    assert ("csrf", audit.DENIED) in kinds
    api.core.close()
