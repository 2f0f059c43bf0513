"""The authorization matrix, generated from the OpenAPI document (issue 13).

Every route of ``/openapi.json`` x {anonymous, admin, navigator, consultant assigned, consultant
not assigned, revoked token, expired token} gets the status it must. A route without a row in
:data:`ROWS` (or a row without a route) fails the test, so a new route cannot ship unchecked.

Rows name the roles allowed and the status of success; the rest follows from the rules:
no valid token -> 401; a role without the permission -> 403 (whatever the case); a consultant
on a case not assigned to them -> 404, exactly as for a case that does not exist.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.api.conftest import Api

IDENTITIES = ("anonymous", "admin", "navigator", "consultant", "outsider", "revoked", "expired")
ALL_ROLES = frozenset({"admin", "navigator", "consultant"})
_n = itertools.count()


@dataclass
class World:
    api: Api
    zip_bytes: bytes
    source: int = 0
    job: str = ""
    package: str = ""
    sync: int = 0
    base_request: str = ""

    def throwaway_case(self) -> str:
        case = f"tmp-{next(_n)}"
        nav = self.api.h("navigator")
        assert self.api.client.post("/cases", headers=nav, json={"case": case, "checklist": "oncology"}
                                    ).status_code == 201
        assert self.api.client.post(f"/cases/{case}/assignments", headers=nav, json={"user": "consultant"}
                                    ).status_code == 201
        return case

    def spare_token(self) -> str:
        from aggregator import accounts

        return str(accounts.create_token(self.api.core.db, "consultant")["id"])

    def scheduled(self) -> dict[str, Any]:
        """c1 with a schedule, for the calls that read or remove one."""
        from aggregator.jobs.schedule import set_schedule

        set_schedule(self.api.core, "c1", "0 6 * * *")
        return {"case": "c1"}
    def request(self, state: str = "draft") -> str:
        """A records request of case ``rq`` in ``state``: a copy of the one drafted through the API
        (its rows and its letter files), so that each call may send, receive or close its own."""
        import shutil
        import uuid

        from aggregator.store.models import RecordsRequest, RecordsRequestItem

        core = self.api.core
        rid = "rq-" + uuid.uuid4().hex[:10]
        with core.db.session() as s:
            base = s.get(RecordsRequest, self.base_request)
            assert base is not None
            row = RecordsRequest(id=rid, case_id=base.case_id, institution=base.institution, state=state,
                                 sent_on="2026-10-02" if state == "sent" else None,
                                 channel="fax" if state == "sent" else None, jurisdiction=base.jurisdiction,
                                 due_days=base.due_days, extension_days=base.extension_days,
                                 reminder_days=base.reminder_days)
            row.items = [RecordsRequestItem(gap_keys=it.gap_keys, item_id=it.item_id, reason=it.reason, text=it.text,
                                            status="requested") for it in base.items]
            s.add(row)
        folder = core.case_dir("rq") / "requests"
        for ext in ("txt", "pdf"):
            shutil.copyfile(folder / f"{self.base_request}.{ext}", folder / f"{rid}.{ext}")
        return rid

    def throwaway_source(self) -> int:
        r = self.api.client.post("/cases/c1/sources", headers=self.api.h("navigator"),
                                 json={"endpoint": "ep1", "patient_id": "p1"})
        assert r.status_code == 201, r.text
        return int(r.json()["id"])


@dataclass(frozen=True)
class Row:
    allowed: frozenset[str]
    ok: int
    #: path parameters (and a body) for one call; may create what the call will consume
    params: Callable[[World], dict[str, Any]] = field(default=lambda w: {})
    body: Callable[[World], dict[str, Any]] | None = None
    raw: bool = False  # the body is the media zip
    case_scoped: bool = True
    public: bool = False


def _case(w: World) -> dict[str, Any]:
    return {"case": "c1"}


def _pkg(w: World) -> dict[str, Any]:
    return {"case": "c1", "package_id": w.package}


def _rq(state: str = "draft") -> Callable[[World], dict[str, Any]]:
    return lambda w: {"case": "rq", "request_id": w.request(state)}


NAV, CON = frozenset({"navigator"}), frozenset({"navigator", "consultant"})
ADM_NAV = frozenset({"admin", "navigator"})
#: records requests: navigators and admins; a consultant never sees a letter, assigned or not
REQ = frozenset({"navigator", "admin"})
ROWS: dict[str, Row] = {
    "GET /health": Row(ALL_ROLES, 200, case_scoped=False, public=True),
    "GET /me": Row(ALL_ROLES, 200, case_scoped=False),
    # signing in needs no token: wrong credentials are 401 for everybody; signing out is idempotent
    "POST /session": Row(ALL_ROLES, 401, case_scoped=False, public=True,
                         body=lambda w: {"user": "navigator", "password": "not the password"}),
    "DELETE /session": Row(ALL_ROLES, 204, case_scoped=False, public=True),
    "GET /users": Row(frozenset({"admin"}), 200, case_scoped=False),
    "POST /users": Row(frozenset({"admin"}), 201, case_scoped=False,
                       body=lambda w: {"name": f"user-{next(_n)}", "role": "consultant"}),
    "POST /users/{name}/tokens": Row(frozenset({"admin"}), 201, lambda w: {"name": "consultant"},
                                     case_scoped=False, body=lambda w: {"expires": "1h"}),
    "POST /tokens/{token_id}/revoke": Row(frozenset({"admin"}), 200, lambda w: {"token_id": w.spare_token()},
                                          case_scoped=False),
    "GET /endpoint-kinds": Row(frozenset({"admin", "navigator"}), 200, case_scoped=False),
    "GET /endpoints": Row(frozenset({"admin", "navigator"}), 200, case_scoped=False),
    "POST /endpoints": Row(frozenset({"admin"}), 201, case_scoped=False, body=lambda w: {
        "name": f"ep-{next(_n)}", "kind": "fhir", "config": {"url": "http://127.0.0.1:9/fhir"}}),
    "POST /endpoints/{name}/check": Row(frozenset({"admin", "navigator"}), 200, lambda w: {"name": "ep1"},
                                        case_scoped=False),
    "GET /cases": Row(frozenset({"navigator", "consultant"}), 200, case_scoped=False),
    "POST /cases": Row(NAV, 201, case_scoped=False,
                       body=lambda w: {"case": f"new-{next(_n)}", "checklist": "oncology"}),
    "GET /cases/{case}": Row(NAV, 200, _case),
    "DELETE /cases/{case}": Row(NAV, 200, lambda w: {"case": w.throwaway_case()}),
    "POST /cases/{case}/assignments": Row(frozenset({"admin", "navigator"}), 201, _case,
                                          body=lambda w: {"user": "consultant"}),
    "GET /cases/{case}/sources": Row(NAV, 200, _case),
    "POST /cases/{case}/sources": Row(NAV, 201, _case, body=lambda w: {"endpoint": "ep1", "patient_id": "p1"}),
    "POST /cases/{case}/sources/media": Row(NAV, 201, _case, raw=True),
    "DELETE /cases/{case}/sources/{source_id}": Row(NAV, 200, lambda w: {"case": "c1",
                                                                         "source_id": w.throwaway_source()}),
    "POST /cases/{case}/pulls": Row(NAV, 202, _case, body=lambda w: {"sources": [w.source]}),
    "GET /cases/{case}/jobs": Row(NAV, 200, _case),
    "GET /jobs/{job_id}": Row(NAV, 200, lambda w: {"job_id": w.job}),
    "POST /jobs/{job_id}/cancel": Row(NAV, 202, lambda w: {"job_id": w.job}),
    "GET /cases/{case}/gap-report": Row(CON, 200, _case),
    "GET /cases/{case}/packages": Row(CON, 200, _case),
    "POST /cases/{case}/packages": Row(NAV, 202, _case),
    "GET /cases/{case}/packages/{package_id}": Row(CON, 200, _pkg),
    "POST /cases/{case}/packages/{package_id}/verify": Row(CON, 200, _pkg),
    "GET /cases/{case}/packages/{package_id}/summary": Row(CON, 200, _pkg),
    # schedules: admins and navigators; consultants never see them. Syncs' changes: navigators.
    "GET /schedules": Row(ADM_NAV, 200, case_scoped=False),
    "GET /cases/{case}/schedule": Row(ADM_NAV, 200, lambda w: w.scheduled()),
    "PUT /cases/{case}/schedule": Row(ADM_NAV, 200, _case, body=lambda w: {"cron": "0 6 * * *",
                                                                          "timezone": "Europe/Paris"}),
    "DELETE /cases/{case}/schedule": Row(ADM_NAV, 200, lambda w: w.scheduled()),
    "GET /cases/{case}/syncs": Row(NAV, 200, _case),
    "GET /cases/{case}/syncs/{sync_id}": Row(NAV, 200, lambda w: {"case": "c1", "sync_id": w.sync}),
    "GET /cases/{case}/requests": Row(REQ, 200, lambda w: {"case": "rq"}),
    "POST /cases/{case}/requests": Row(REQ, 200, lambda w: {"case": "rq"},
                                       body=lambda w: {"send_to": "Records desk, 1 Test Way"}),
    "GET /cases/{case}/requests/{request_id}": Row(REQ, 200, _rq()),
    "GET /cases/{case}/requests/{request_id}/letter.pdf": Row(REQ, 200, _rq()),
    "GET /cases/{case}/requests/{request_id}/letter.txt": Row(REQ, 200, _rq()),
    "POST /cases/{case}/requests/{request_id}/sent": Row(REQ, 200, _rq(),
                                                         body=lambda w: {"on": "2026-10-02", "channel": "fax"}),
    "POST /cases/{case}/requests/{request_id}/acknowledged": Row(REQ, 200, _rq("sent"),
                                                                 body=lambda w: {"on": "2026-10-05"}),
    "POST /cases/{case}/requests/{request_id}/follow-ups": Row(REQ, 200, _rq("sent"),
                                                               body=lambda w: {"on": "2026-10-12"}),
    "POST /cases/{case}/requests/{request_id}/received": Row(REQ, 200, _rq("sent")),
    "POST /cases/{case}/requests/{request_id}/closed": Row(REQ, 200, _rq()),
}


def expected(row: Row, who: str) -> int:
    if row.public:
        return row.ok
    if who in ("anonymous", "revoked", "expired"):
        return 401
    role = "consultant" if who == "outsider" else who
    if role not in row.allowed:
        return 403
    if who == "outsider" and row.case_scoped:
        return 404
    return row.ok


def _routes(api: Api) -> set[str]:
    doc = api.client.get("/openapi.json").json()
    return {f"{m.upper()} {p}" for p, ops in doc["paths"].items() for m in ops if m in ("get", "post", "put",
                                                                                          "patch", "delete")}


def _world(api: Api, media_zip: tuple[Path, Any]) -> World:
    zpath, _ = media_zip
    w = World(api, zpath.read_bytes())
    c, nav, adm = api.client, api.h("navigator"), api.h("admin")
    assert c.post("/endpoints", headers=adm, json={"name": "ep1", "kind": "fhir",
                                                   "config": {"url": "http://127.0.0.1:9/fhir"}}).status_code == 201
    assert c.post("/cases", headers=nav, json={"case": "c1", "checklist": "oncology"}).status_code == 201
    assert c.post("/cases/c1/assignments", headers=nav, json={"user": "consultant"}).status_code == 201
    r = c.post("/cases/c1/sources/media", headers={**nav, "Content-Type": "application/zip"}, content=w.zip_bytes)
    w.source = r.json()["id"]
    r = c.post("/cases/c1/pulls", headers=nav, json={"sources": [w.source]})
    w.job = r.json()["id"]
    assert api.wait(w.job)["state"] in ("done", "partial")
    r = c.post("/cases/c1/packages", headers=nav)
    pj = api.wait(r.json()["id"])
    assert pj["state"] == "done", pj
    w.package = pj["result"]["package"]["id"]
    from aggregator.jobs.sync import sync_case

    w.sync = sync_case(api.core, "c1")["id"]
    # a case with gaps, for records requests: the download without its images, one letter drafted
    from fixtures.generate import generate_zip

    gapped = zpath.with_name("no-images.zip")
    if not gapped.is_file():
        generate_zip(gapped, variant="no-images")
    assert c.post("/cases", headers=nav, json={"case": "rq", "checklist": "oncology"}).status_code == 201
    assert c.post("/cases/rq/assignments", headers=nav, json={"user": "consultant"}).status_code == 201
    r = c.post("/cases/rq/sources/media", headers={**nav, "Content-Type": "application/zip"},
               content=gapped.read_bytes())
    assert api.wait(c.post("/cases/rq/pulls", headers=nav, json={"sources": [r.json()["id"]]}).json()["id"]
                    )["state"] in ("done", "partial")
    r = c.post("/cases/rq/requests", headers=nav, json={"send_to": "Records desk, 1 Test Way"})
    assert r.status_code == 200 and len(r.json()["drafted"]) == 1, r.text
    w.base_request = r.json()["drafted"][0]["id"]
    return w


def _settle(api: Api) -> None:
    runner = api.client.app.state.runner  # type: ignore[attr-defined]
    for job in runner.list():
        runner.wait(job.id, 120)


def test_every_route_has_a_row(api: Api) -> None:
    routes = _routes(api)
    assert routes - set(ROWS) == set(), "routes without a row in the authorization matrix"
    assert set(ROWS) - routes == set(), "rows for routes that no longer exist"


def test_authorization_matrix(api: Api, media_zip: tuple[Path, Any]) -> None:
    routes = _routes(api)
    assert routes == set(ROWS)
    w = _world(api, media_zip)
    wrong = []
    for key in sorted(routes):
        method, template = key.split(" ", 1)
        row = ROWS[key]
        # denied identities first, then the allowed ones (whose calls may change the world)
        for who in sorted(IDENTITIES, key=lambda i: expected(row, i) == row.ok):
            params = row.params(w)
            path = template.format(**params)
            kwargs: dict[str, Any] = {"headers": api.h(who)}
            if row.raw:
                kwargs["headers"] = {**kwargs["headers"], "Content-Type": "application/zip"}
                kwargs["content"] = w.zip_bytes
            elif row.body is not None:
                kwargs["json"] = row.body(w)
            r = api.client.request(method, path, **kwargs)
            want = expected(row, who)
            if r.status_code != want:
                wrong.append(f"{key} as {who}: got {r.status_code}, want {want}: {r.text[:200]}")
            if r.status_code >= 400:
                assert r.headers["content-type"] == "application/problem+json", key
            _settle(api)
    assert not wrong, "\n".join(wrong)
