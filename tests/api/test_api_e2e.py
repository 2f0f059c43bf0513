"""End to end through the HTTP API (issue 13): a navigator builds a case, a consultant reads it.

Create a case, upload a media zip made by ``fixtures.generate.generate_zip``, pull it as a job
and watch its progress, read the gap report (the same JSON as ``check --json``; served again
without recomputing), build and download the package and ``aggregator verify`` it. Every
patient-data read in the test has its audit entry, and a hand-edited entry breaks the chain.
Runs on SQLite and on PostgreSQL.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
import zipfile
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

import jsonschema
from sqlalchemy import text

from aggregator import audit
from aggregator.cli import main as cli_main
from tests.api.conftest import Api

SCHEMAS = Path(__file__).resolve().parents[2] / "schemas"


def _cli(home: Path, db_url: str, *args: str) -> tuple[int, str]:
    import os

    old = os.environ.get("AGGREGATOR_DATABASE_URL")
    os.environ["AGGREGATOR_DATABASE_URL"] = db_url
    out = io.StringIO()
    try:
        with redirect_stdout(out):
            rc = cli_main(["--home", str(home), *args])
    finally:
        if old is None:
            os.environ.pop("AGGREGATOR_DATABASE_URL", None)
        else:
            os.environ["AGGREGATOR_DATABASE_URL"] = old
    return rc, out.getvalue()


def _reads(api: Api) -> list[tuple[str, str, str | None, str]]:
    out = []
    for e in audit.events(api.core.db):
        ev = e["event"]
        out.append((ev["agent"][0]["who"]["identifier"]["value"], ev["subtype"][0]["code"], audit.case_of(ev),
                    ev["outcome"]))
    return out


def test_navigator_and_consultant_through_the_api(api: Api, media_zip: tuple[Path, Any], db_url: str,
                                                   tmp_path: Path) -> None:
    zpath, info = media_zip
    c, nav = api.client, api.h("navigator")
    r = c.post("/cases", headers=nav, json={"case": "c-101", "checklist": "oncology",
                                             "patient_name": info.patient_name, "birth_date": info.birth_date,
                                             "case_date": info.case_date.isoformat()})
    assert r.status_code == 201, r.text
    assert r.headers["location"] == "/cases/c-101"
    # no PHI in the answer's URLs or headers
    assert info.patient_family not in json.dumps(dict(r.headers))

    # streamed media upload, written inside the case folder, owner-only
    body = zpath.read_bytes()
    r = c.post("/cases/c-101/sources/media", headers={**nav, "Content-Type": "application/zip"}, content=body)
    assert r.status_code == 201, r.text
    assert r.json()["bytes"] == len(body) and r.json()["kind"] == "media"
    (upload,) = (api.core.case_dir("c-101") / "uploads").iterdir()
    assert upload.read_bytes() == body and upload.stat().st_mode & 0o077 == 0
    source_id = r.json()["id"]

    # pull one source as a job: 202 + Location, then progress until the end
    r = c.post("/cases/c-101/pulls", headers=nav, json={"sources": [source_id]})
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    assert r.headers["location"] == f"/jobs/{job_id}"
    seen_states = {r.json()["state"]}
    deadline = time.monotonic() + 120
    while True:
        j = c.get(f"/jobs/{job_id}", headers=nav).json()
        seen_states.add(j["state"])
        if j["state"] not in ("queued", "running") or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert j["state"] in ("done", "partial"), j
    assert j["started_at"] and j["heartbeat_at"] and j["finished_at"] and j["error"] is None
    (src,) = j["sources"]
    assert src["source"] == source_id and src["done"] > 20 and src["failed"] == 0
    assert src["skipped"] >= 1  # the download's unsupported file: in the ledger, not dropped
    assert j["ledger"]["done"] == src["done"]
    # a second pull while nothing runs is fine; pulling an unknown source is 404
    assert c.post("/cases/c-101/pulls", headers=nav, json={"sources": [9999]}).status_code == 404

    # gap report: the JSON of `check --json`, then served as stored while nothing changed
    r = c.get("/cases/c-101/gap-report", headers=nav)
    assert r.status_code == 200 and r.headers["x-report-computed"] == "true"
    report = r.json()
    jsonschema.validate(report, json.loads((SCHEMAS / "gap-report.schema.json").read_text()))
    r2 = c.get("/cases/c-101/gap-report", headers=nav)
    assert r2.headers["x-report-computed"] == "false" and r2.content == r.content
    rc, out = _cli(api.core.settings.home, db_url, "check", "c-101", "--json")
    assert rc == 0 and json.loads(out) == report

    # package: a job; list; download with Content-Length and ETag; verify it with the CLI
    r = c.post("/cases/c-101/packages", headers=nav)
    assert r.status_code == 202, r.text
    pj = api.wait(r.json()["id"])
    assert pj["state"] == "done", pj
    pkg = pj["result"]["package"]
    listed = c.get("/cases/c-101/packages", headers=nav).json()
    assert [p["id"] for p in listed] == [pkg["id"]]
    r = c.get(f"/cases/c-101/packages/{pkg['id']}", headers=nav)
    assert r.status_code == 200 and r.headers["content-type"] == "application/zip"
    assert int(r.headers["content-length"]) == len(r.content) == pkg["size"]
    assert r.headers["etag"] == f'"{hashlib.sha256(r.content).hexdigest()}"'
    assert c.get(f"/cases/c-101/packages/{pkg['id']}", headers={**nav, "If-None-Match": r.headers["etag"]}
                 ).status_code == 304
    downloaded = tmp_path / "package.zip"
    downloaded.write_bytes(r.content)
    rc, out = _cli(api.core.settings.home, db_url, "verify", str(downloaded), "--json")
    assert rc == 0 and json.loads(out)["ok"] is True
    assert c.post(f"/cases/c-101/packages/{pkg['id']}/verify", headers=nav).json()["ok"] is True

    # the consultant: assigned -> gap report, summary, package; nothing else
    assert c.post("/cases/c-101/assignments", headers=nav, json={"user": "consultant"}).status_code == 201
    con = api.h("consultant")
    assert c.get("/cases", headers=con).json() == [r for r in c.get("/cases", headers=nav).json()
                                                   if r["case"] == "c-101"]
    assert c.get("/cases/c-101/gap-report", headers=con).json() == report
    page = c.get(f"/cases/c-101/packages/{pkg['id']}/summary", headers=con)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
    with zipfile.ZipFile(downloaded) as zf:
        assert page.content == zf.read("summary.html")
    assert c.get(f"/cases/c-101/packages/{pkg['id']}", headers=con).status_code == 200
    assert c.get("/cases/c-101", headers=con).status_code == 403
    assert c.get("/cases/c-101/sources", headers=con).status_code == 403
    out_ = api.h("outsider")
    unassigned = c.get("/cases/c-101/gap-report", headers=out_)
    missing = c.get("/cases/no-such-case/gap-report", headers=out_)
    assert unassigned.status_code == missing.status_code == 404
    assert unassigned.json()["detail"].replace("c-101", "X") == missing.json()["detail"].replace("no-such-case", "X")
    assert c.get("/cases", headers=out_).json() == []

    # the audit trail: every patient-data read above, with user, token and address; denials too
    entries = _reads(api)
    for who, what, n in (("navigator", "gap-report", 2), ("consultant", "gap-report", 1), ("navigator", "package", 2),
                         ("consultant", "package", 1), ("consultant", "summary", 1), ("navigator", "pull", 1),
                         ("navigator", "package-verify", 1), ("navigator", "package-list", 1)):
        got = [e for e in entries if e[0] == who and e[1] == what and e[2] == "c-101" and e[3] == audit.SUCCESS]
        assert len(got) >= n, (who, what, got)
    assert ("navigator", "assignment", "c-101", audit.SUCCESS) in entries
    assert ("consultant", "case", "c-101", audit.DENIED) in entries
    assert ("outsider", "gap-report", "c-101", audit.DENIED) in entries
    ev = next(e["event"] for e in audit.events(api.core.db) if e["event"]["subtype"][0]["code"] == "summary")
    agent = ev["agent"][0]
    assert agent["altId"].startswith("token:") and agent["network"]["address"] == "127.0.0.9"
    assert info.patient_family not in json.dumps([e["event"] for e in audit.events(api.core.db)])
    assert audit.verify(api.core.db).ok
    with api.core.db.engine.begin() as conn:  # an edit by hand is found
        conn.execute(text("UPDATE audit_events SET body = replace(body, 'consultant', 'navigator') "
                          "WHERE what = 'summary'"))
    assert not audit.verify(api.core.db).ok

    # deleting the case removes its folder (uploads and packages included)
    assert c.delete("/cases/c-101", headers=nav).status_code == 200
    assert not api.core.case_dir("c-101").exists()
    assert c.get("/cases/c-101", headers=nav).status_code == 404
