"""Records requests through the HTTP API, the whole loop (issue 18).

A navigator uploads a download without its images, pulls it, drafts the letter, downloads it
(text and a text-extractable PDF), marks it sent; the gap report says for each gap when it was
asked for and when it is due, also as the consultant reads it. Then the hospital's CD arrives as
a second upload and is pulled: the pull job checks the case and marks the lines received with the
records that filled them, and the request completes itself, no navigator touching it. Letters are
never a consultant's, and every read of one is audited. SQLite and PostgreSQL.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from pypdf import PdfReader

from aggregator import audit
from fixtures.generate import generate_zip
from tests.api.conftest import Api

SEND_TO = "Records desk, 1 Test Way, Springfield"


def _upload_and_pull(api: Api, case: str, body: bytes) -> dict[str, Any]:
    nav = api.h("navigator")
    r = api.client.post(f"/cases/{case}/sources/media", headers={**nav, "Content-Type": "application/zip"},
                        content=body)
    assert r.status_code == 201, r.text
    r = api.client.post(f"/cases/{case}/pulls", headers=nav, json={"sources": [r.json()["id"]]})
    job = api.wait(r.json()["id"])
    assert job["state"] in ("done", "partial"), job
    return job


def _open_gaps(report: dict[str, Any]) -> list[dict[str, Any]]:
    return [g for i in report["items"] if i["status"] in ("missing", "partial") for g in i["gaps"]]


def test_draft_send_and_the_records_arriving_close_the_request(api: Api, tmp_path: Path) -> None:
    c, nav, con, adm = api.client, api.h("navigator"), api.h("consultant"), api.h("admin")
    info = generate_zip(tmp_path / "no-images.zip", variant="no-images")
    assert c.post("/cases", headers=nav, json={"case": "c-7", "checklist": "oncology",
                                                "patient_name": info.patient_name, "birth_date": info.birth_date,
                                                "case_date": info.case_date.isoformat()}).status_code == 201
    assert c.post("/cases/c-7/assignments", headers=nav, json={"user": "consultant"}).status_code == 201
    _upload_and_pull(api, "c-7", (tmp_path / "no-images.zip").read_bytes())

    report = c.get("/cases/c-7/gap-report", headers=con).json()
    assert [g["request"] for g in _open_gaps(report)] == [None, None]  # never asked for

    # no send-to address anywhere: a clear 400, audited as a failed attempt
    r = c.post("/cases/c-7/requests", headers=nav, json={})
    assert r.status_code == 400 and "send" in r.json()["detail"]
    r = c.post("/cases/c-7/requests", headers=nav, json={"send_to": SEND_TO})
    assert r.status_code == 200, r.text
    (letter,) = r.json()["drafted"]
    rid = letter["id"]
    assert "pdf_file" not in letter and letter["links"]["pdf"] == f"/cases/c-7/requests/{rid}/letter.pdf"
    assert [it["status"] for it in letter["items"]] == ["requested", "requested"]
    assert c.post("/cases/c-7/requests", headers=nav, json={"send_to": SEND_TO}).json()["already_requested"] == 2

    # the letter, as text and as PDF with the same words
    txt = c.get(f"/cases/c-7/requests/{rid}/letter.txt", headers=nav)
    assert txt.status_code == 200 and txt.headers["content-type"].startswith("text/plain")
    assert "45 CFR 164.524" in txt.text and info.patient_name in txt.text and SEND_TO in txt.text
    pdf = c.get(f"/cases/c-7/requests/{rid}/letter.pdf", headers=adm)
    assert pdf.status_code == 200 and pdf.headers["content-type"] == "application/pdf"
    pdf_text = " ".join(" ".join(p.extract_text() for p in PdfReader(io.BytesIO(pdf.content)).pages).split())
    assert "45 CFR 164.524" in pdf_text and " ".join(letter["items"][0]["text"].split()) in pdf_text

    # never a consultant's, assigned or not; another case's id is a 404
    for path in ("/cases/c-7/requests", f"/cases/c-7/requests/{rid}", f"/cases/c-7/requests/{rid}/letter.pdf"):
        assert c.get(path, headers=con).status_code == 403
    assert c.post(f"/cases/c-7/requests/{rid}/sent", headers=con, json={}).status_code == 403
    assert c.post("/cases", headers=nav, json={"case": "c-8", "checklist": "oncology"}).status_code == 201
    assert c.get(f"/cases/c-8/requests/{rid}", headers=nav).status_code == 404
    assert c.get(f"/cases/c-8/requests/{rid}/letter.txt", headers=nav).status_code == 404

    # sent: the gap report names the request and its due date (requests are part of its key)
    r = c.post(f"/cases/c-7/requests/{rid}/sent", headers=nav, json={"on": "2026-10-02", "channel": "fax"})
    assert r.status_code == 200 and r.json()["due_on"] == "2026-11-01", r.text
    r = c.get("/cases/c-7/gap-report", headers=con)
    assert [(g["request"]["id"], g["request"]["state"], g["request"]["due_on"]) for g in _open_gaps(r.json())] == [
        (rid, "sent", "2026-11-01")] * 2
    r = c.post(f"/cases/c-7/requests/{rid}/acknowledged", headers=nav, json={"on": "2026-10-06", "extended": True})
    assert (r.json()["state"], r.json()["due_on"]) == ("acknowledged", "2026-12-01")
    assert c.post(f"/cases/c-7/requests/{rid}/follow-ups", headers=nav, json={"on": "2026-10-01"}).status_code == 400
    assert c.get("/cases/c-7/gap-report", headers=con).json()["items"][2]["gaps"][0]["request"]["due_on"] \
        == "2026-12-01"

    # the CD arrives as a second upload and is pulled: the pull job itself completes the request
    # (before anyone reads the gap report), no navigator touching it
    generate_zip(tmp_path / "cd.zip", variant="complete")
    _upload_and_pull(api, "c-7", (tmp_path / "cd.zip").read_bytes())
    r = c.get(f"/cases/c-7/requests/{rid}", headers=nav).json()
    assert (r["state"], r["outstanding"], r["closed_at"] is not None) == ("received", 0, True)
    assert c.get("/cases/c-7/gap-report", headers=con).json()["complete"] is True
    assert all(it["received_how"] == "check" and it["filled_by"][0].startswith("ImagingStudy/") for it in r["items"])
    assert c.get("/cases/c-7/requests?due=true", headers=nav).json() == []
    report = c.get("/cases/c-7/gap-report", headers=con)
    assert report.headers["x-report-computed"] == "false" and report.json()["complete"] is True  # kept
    assert c.post(f"/cases/c-7/requests/{rid}/sent", headers=nav, json={}).status_code == 400

    # each read of a letter is in the audit trail with its request id; the refusals too
    events = [e["event"] for e in audit.events(api.core.db, case_id="c-7")]
    letter_reads = [e for e in events if e["subtype"][0]["code"] == "records-request-letter"]
    assert [(e["agent"][0]["who"]["identifier"]["value"], e["outcome"]) for e in letter_reads] == [
        ("navigator", audit.SUCCESS), ("admin", audit.SUCCESS), ("consultant", audit.DENIED)]
    assert all(rid in str(e.get("entity")) for e in letter_reads if e["outcome"] == audit.SUCCESS)
    assert any(e["subtype"][0]["code"] == "records-request" and e["outcome"] == audit.MINOR_FAILURE
               for e in events)  # the draft without an address
