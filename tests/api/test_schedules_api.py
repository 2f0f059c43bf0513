"""Schedules and syncs over the HTTP API: the same core as the CLI, and the role rules (issue 14)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aggregator import audit
from aggregator.jobs.schedule import run_due
from tests.api.conftest import Api


def test_schedule_crud_and_sync_history(api: Api, media_zip: tuple[Path, Any]) -> None:
    c, nav, adm, con = api.client, api.h("navigator"), api.h("admin"), api.h("consultant")
    assert c.post("/cases", headers=nav, json={"case": "c1", "checklist": "oncology"}).status_code == 201
    assert c.post("/cases/c1/assignments", headers=nav, json={"user": "consultant"}).status_code == 201
    zpath, _ = media_zip
    r = c.post("/cases/c1/sources/media", headers={**nav, "Content-Type": "application/zip"},
               content=zpath.read_bytes())
    assert r.status_code == 201, r.text

    assert c.get("/cases/c1/schedule", headers=nav).status_code == 404  # none yet
    r = c.put("/cases/c1/schedule", headers=adm, json={"cron": "0 6 * * 1-5", "timezone": "America/Chicago"})
    assert r.status_code == 200, r.text
    sched = r.json()
    assert (sched["cron"], sched["timezone"], sched["active"]) == ("0 6 * * 1-5", "America/Chicago", True)
    assert c.get("/cases/c1/schedule", headers=nav).json() == sched
    assert [s["case"] for s in c.get("/schedules", headers=nav).json()] == ["c1"]

    # consultants never see schedules nor syncs, even of their assigned case
    for method, path in (("GET", "/schedules"), ("GET", "/cases/c1/schedule"), ("PUT", "/cases/c1/schedule"),
                         ("DELETE", "/cases/c1/schedule"), ("GET", "/cases/c1/syncs")):
        r = c.request(method, path, headers=con, json={"cron": "0 6 * * *"} if method == "PUT" else None)
        assert r.status_code == 403, (method, path, r.status_code)
    assert c.get("/cases/c1/syncs", headers=adm).status_code == 403  # what changed is about the record

    # bad input is a 400 problem; a secret only by an AGGREGATOR_WEBHOOK_SECRET... variable's name
    for body in ({"cron": "0 6 * * * *"}, {"cron": "0 6 * * *", "timezone": "Nowhere/Atlantis"},
                 {"cron": "0 6 * * *", "webhook_url": "https://example.org/h", "webhook_secret_env": "HOME"},
                 {"cron": "0 6 * * *", "webhook_url": "https://example.org/h"}):
        r = c.put("/cases/c1/schedule", headers=nav, json=body)
        assert r.status_code == 400, (body, r.text)
        assert r.headers["content-type"] == "application/problem+json"
    r = c.put("/cases/c1/schedule", headers=nav, json={"cron": "0 6 * * *", "webhook_url": "https://example.org/h",
                                                       "webhook_secret_env": "AGGREGATOR_WEBHOOK_SECRET_C1"})
    assert r.status_code == 200 and r.json()["webhook"]["secret_env"] == "AGGREGATOR_WEBHOOK_SECRET_C1"
    r = c.put("/cases/c1/schedule", headers=nav, json={"cron": "0 6 * * *"})  # webhook removed again
    assert r.status_code == 200 and r.json()["webhook"] is None

    # the scheduler runs; the API lists the sync and serves it at the webhook's link
    assert c.get("/cases/c1/syncs", headers=nav).json() == []
    (done,) = run_due(api.core, now=datetime(2100, 1, 1, tzinfo=UTC))
    rows = c.get("/cases/c1/syncs", headers=nav).json()
    assert [r["id"] for r in rows] == [done["id"]]
    assert rows[0]["trigger"] == "schedule" and rows[0]["new_resources"] == done["new_resources"]
    assert sum(done["new_resources"].values()) > 0
    one = c.get(f"/cases/c1/syncs/{done['id']}", headers=nav)
    assert one.status_code == 200 and one.json() == rows[0]
    assert c.get("/cases/c1/syncs/999999", headers=nav).status_code == 404
    assert c.get("/cases/c1/syncs?limit=0", headers=nav).status_code == 422

    assert c.delete("/cases/c1/schedule", headers=nav).json() == {"case": "c1", "cleared": True}
    assert c.get("/cases/c1/schedule", headers=nav).status_code == 404
    assert c.get("/schedules", headers=adm).json() == []
    assert c.get("/cases/nope/schedule", headers=adm).status_code == 404

    # setting and clearing are changes audited with the caller; reading the syncs is a read
    trail = [(e["event"]["subtype"][0]["code"], e["event"]["action"]) for e in audit.events(api.core.db, case_id="c1")]
    assert ("schedule", "U") in trail and ("sync-list", "R") in trail and ("sync", "E") in trail
