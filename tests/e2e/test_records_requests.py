"""Records requests on the project's generated records with known gaps, the whole loop.

Each variant removes one thing; the draft must put each requestable open gap in exactly one
letter, addressed to the institution the gap names, worded with its dates and accession, citing
45 CFR 164.524, with a text-extractable PDF of the same text. Then the loop: mark sent, let the
missing records arrive as a new download, pull, check - the request completes on its own.
"""

from __future__ import annotations

import json
import logging
import stat
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from pypdf import PdfReader

from aggregator import audit
from aggregator.app import App
from aggregator.cases import add_source, create_case
from aggregator.checklist import render_text
from aggregator.cli import main
from aggregator.jobs.pull import pull_case
from aggregator.pipeline import check_case, package_case
from aggregator.records_requests import draft_requests, due_reminders, list_requests, mark_sent
from aggregator.records_requests.draft import gap_key
from fixtures.cardiology import generate_cardiology_download
from fixtures.generate import DownloadInfo, generate_download
from fixtures.surgery import generate_surgery_download

GAP_SCHEMA = json.loads((Path(__file__).resolve().parents[2] / "schemas/gap-report.schema.json").read_text())
SEND_TO = "Casey Navigator, 100 Placeholder Ave, Suite 5, Springfield"
GENERATORS: dict[str, tuple[Callable[..., DownloadInfo], str]] = {
    "oncology": (generate_download, "oncology"),
    "cardiology": (generate_cardiology_download, "cardiology"),
    "surgery": (generate_surgery_download, "surgery"),
}

# (patient, variant) -> phrases the letter must hold (what a records clerk looks for)
EXPECTED: dict[tuple[str, str], list[str]] = {
    ("oncology", "no-pathology-text"): [
        "the full surgical pathology report for the specimen collected on 2026-08-20 "
        "(Breast core needle biopsy tissue), accession SP-26-01234, not only the summary",
        "the estrogen receptor (ER) result", "the progesterone receptor (PR) result", "the HER2 result (IHC/ISH)"],
    ("oncology", "no-images"): [
        "the images (DICOM) of the CT Chest study of 2026-09-05, accession SYNCT260905, not only the radiology report",
        "the images (DICOM) of the MG Breast Screening study of 2026-07-08, accession SYNMG260708",
        "images as DICOM files"],
    ("oncology", "no-recent-labs"): ["all laboratory results since 2026-07-03"],
    ("oncology", "no-visit-note"): ["the visit note for the visit of 2026-09-22 (Encounter for check up)"],
    ("cardiology", "no-echo-images"): [
        "the images (DICOM) of the Transthoracic echocardiogram study of 2026-08-05, accession SYNUS260805, "
        "not only the radiology report"],
    ("cardiology", "no-recent-cardiac-labs"): ["all lipid panel results since 2025-10-01"],
    ("cardiology", "summary-only-echo"): [
        "the full echocardiogram report (accession SYNUS260805), not only the summary"],
    ("surgery", "no-pathology-text"): [
        "the full surgical pathology report for the specimen collected on 2026-09-10 (Gallbladder), "
        "accession SP-26-04410, not only the summary"],
    ("surgery", "no-operative-note"): [
        "the operative note for the operation of 2026-09-10 (Laparoscopic cholecystectomy), not only the summary"],
    ("surgery", "no-preop-images"): [
        "the images (DICOM) of the CT abdomen and pelvis with contrast study of 2026-08-21, accession SYNCT260821"],
}


def _case(tmp_path: Path, patient: str, variant: str) -> tuple[App, DownloadInfo]:
    generate, checklist = GENERATORS[patient]
    info = generate(tmp_path / "dl", variant=variant)
    app = App.open(tmp_path / "home")
    create_case(app, "c", checklist, patient_name=info.patient_name, birth_date=info.birth_date,
                case_date=info.case_date.isoformat())
    add_source(app, "c", media=str(tmp_path / "dl"))
    (summary,) = pull_case(app, "c")
    assert summary.state == "done", summary.error
    return app, info


def _open_gaps(report: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [(i["id"], g) for i in report["items"] if i["status"] in ("missing", "partial") for g in i["gaps"]]


@pytest.mark.parametrize(("patient", "variant"), sorted(EXPECTED))
def test_draft_names_each_gap_once_for_its_holder(tmp_path: Path, patient: str, variant: str) -> None:
    app, info = _case(tmp_path, patient, variant)
    report, cr = check_case(app, "c")
    out = draft_requests(app, "c", report, cr, send_to=SEND_TO, today=date(2026, 10, 2))
    letters = out["drafted"]
    assert letters and out["not_requestable"] == []
    # each open gap is in exactly one letter, the one to the institution the gap names
    with app.db.session() as s:
        from aggregator.store.models import RecordsRequestItem

        rows = [(r.request_id, r.gap_keys.split("\n")) for r in s.query(RecordsRequestItem).all()]
    by_request = {r["id"]: r["institution"] for r in letters}
    for item_id, gap in _open_gaps(report):
        holders = [rid for rid, keys in rows if gap_key(item_id, gap) in keys]
        assert len(holders) == 1, (item_id, gap)
        assert by_request[holders[0]] == gap["holder"]
    assert len({r["institution"] for r in letters}) == len(letters)  # one letter per institution
    for r in letters:
        text = Path(r["text_file"]).read_text(encoding="utf-8")
        assert "45 CFR 164.524" in text and SEND_TO in text and "Signature:" in text
        assert "Personal representative" in text and r["institution"] in text
        assert info.patient_name in text
        # owner-only, inside the case folder
        for f in (Path(r["text_file"]), Path(r["pdf_file"])):
            assert f.is_relative_to(app.case_dir("c"))
            assert stat.S_IMODE(f.stat().st_mode) == 0o600
        assert stat.S_IMODE(Path(r["text_file"]).parent.stat().st_mode) == 0o700
    joined = "\n".join(Path(r["text_file"]).read_text(encoding="utf-8") for r in letters)
    flat = " ".join(joined.split())
    for phrase in EXPECTED[(patient, variant)]:
        assert phrase in flat, phrase
    # the PDF is a valid PDF whose text is the letter's
    pdf_text = " ".join(" ".join(page.extract_text() for page in PdfReader(letters[0]["pdf_file"]).pages).split())
    assert "45 CFR 164.524" in pdf_text
    assert " ".join(letters[0]["items"][0]["text"].split()) in pdf_text


def test_complete_record_needs_no_letter(tmp_path: Path) -> None:
    app, _ = _case(tmp_path, "oncology", "complete")
    report, cr = check_case(app, "c")
    out = draft_requests(app, "c", report, cr, send_to=SEND_TO)
    assert out["drafted"] == [] and out["already_requested"] == 0


def test_identity_gap_is_listed_not_requested(tmp_path: Path) -> None:
    app, _ = _case(tmp_path, "oncology", "identity-conflict")
    report, cr = check_case(app, "c")
    out = draft_requests(app, "c", report, cr, send_to=SEND_TO)
    assert [n["reason"] for n in out["not_requestable"]] == ["identity-conflict"]
    assert not any(it["item"] == "identity" for r in out["drafted"] for it in r["items"])


def test_loop_sent_overdue_then_received_when_the_records_arrive(tmp_path: Path) -> None:
    app, _ = _case(tmp_path, "oncology", "no-images")
    report, cr = check_case(app, "c")
    # before any letter: every open gap says it was never asked for, in the JSON and the text
    assert [g["request"] for _, g in _open_gaps(report)] == [None, None]
    assert render_text(report).count("records request: never asked for") == 2
    (letter,) = draft_requests(app, "c", report, cr, send_to=SEND_TO)["drafted"]
    # drafting again asks for nothing twice
    again = draft_requests(app, "c", report, cr, send_to=SEND_TO)
    assert again["drafted"] == [] and again["already_requested"] == 2

    sent_on = date(2026, 10, 2)
    mark_sent(app, letter["id"], sent_on, "fax")
    # the gap report (and the copy the API serves, re-annotated in place) says asked when, due when
    stored = json.loads((app.case_dir("c") / "gap-report.json").read_text(encoding="utf-8"))
    report, _ = check_case(app, "c")
    for r in (stored, report):
        jsonschema.validate(r, GAP_SCHEMA)
        infos = [g["request"] for _, g in _open_gaps(r)]
        assert [(i["id"], i["state"], i["sent_on"], i["due_on"]) for i in infos] == [
            (letter["id"], "sent", "2026-10-02", "2026-11-01")] * 2
    said = f"requested from {letter['institution']} ({letter['id']}) on 2 Oct 2026: not yet arrived, due on 1 Nov 2026"
    assert " ".join(render_text(report).split()).count(said) == 2
    # ... and so does the package's summary page, for the consultant
    pkg, _ = package_case(app, "c", tmp_path / "pkg")
    page = " ".join((pkg / "summary.html").read_text(encoding="utf-8").split())
    assert page.count("not yet arrived, due on 1 Nov 2026") == 2 and "never asked for" not in page
    (row,) = list_requests(app, "c", today=sent_on + timedelta(days=10))
    assert (row["state"], row["outstanding"], row["days_since_sent"], row["overdue"]) == ("sent", 2, 10, False)
    (row,) = list_requests(app, "c", today=sent_on + timedelta(days=31))
    assert row["overdue"] and row["due_on"] == "2026-11-01"
    (row,) = list_requests(app, "c", overdue_after=45, today=sent_on + timedelta(days=31))
    assert not row["overdue"]

    # the hospital sends the CD: a new download with the images, pulled as a source
    generate_download(tmp_path / "cd", variant="complete")
    add_source(app, "c", media=str(tmp_path / "cd"))
    assert all(s.state == "done" for s in pull_case(app, "c"))
    check_case(app, "c")  # the check alone marks the lines received
    (row,) = list_requests(app, "c", today=sent_on + timedelta(days=31))
    assert row["state"] == "received" and row["outstanding"] == 0 and not row["overdue"]
    assert all(it["status"] == "received" and it["received_at"] for it in row["items"])
    # each line names what filled it: the ImagingStudy now linked to its radiology report
    report, cr = check_case(app, "c")
    linked = {s["ref"]: s["linked"] for i in report["items"] if i["id"] == "radiology-images" for s in i["subjects"]}
    assert sorted(ref for it in row["items"] for ref in it["filled_by"]) == sorted(
        ref for refs in linked.values() for ref in refs)
    assert all(it["filled_by"] and it["filled_by"][0].startswith("ImagingStudy/") and it["received_how"] == "check"
               for it in row["items"])
    assert row["closed_at"] and due_reminders(app, now=datetime(2026, 12, 1, tzinfo=UTC)) == []


def test_a_still_missing_line_stays_outstanding(tmp_path: Path) -> None:
    app, _ = _case(tmp_path, "oncology", "no-pathology-text")
    report, cr = check_case(app, "c")
    (letter,) = draft_requests(app, "c", report, cr, send_to=SEND_TO)["drafted"]
    check_case(app, "c")  # nothing arrived
    (row,) = list_requests(app, "c")
    assert row["state"] == "draft" and row["outstanding"] == len(letter["items"]) == 4


def test_cli_draft_list_show_pdf_audited_no_phi_in_logs(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                         caplog: pytest.LogCaptureFixture,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    app, info = _case(tmp_path, "oncology", "no-images")
    home = str(tmp_path / "home")
    monkeypatch.setenv("AGGREGATOR_REQUEST_SEND_TO", SEND_TO)
    caplog.set_level(logging.DEBUG)
    capsys.readouterr()
    assert main(["--home", home, "request", "draft", "c", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    rid = out["drafted"][0]["id"]
    assert main(["--home", home, "request", "sent", rid, "--on", "2026-10-02", "--channel", "mail"]) == 0
    assert main(["--home", home, "request", "list", "c", "--json"]) == 0
    capsys.readouterr()
    assert main(["--home", home, "request", "list", "c"]) == 0
    listing = capsys.readouterr().out
    assert rid in listing and "2 of 2 outstanding" in listing and "OVERDUE" in listing  # sent 2026-10-02
    pdf = tmp_path / "letter.pdf"
    assert main(["--home", home, "request", "show", rid, "--pdf", str(pdf)]) == 0
    shown = capsys.readouterr().out
    assert "45 CFR 164.524" in shown and "SYNCT260905" in shown
    assert pdf.read_bytes().startswith(b"%PDF-") and stat.S_IMODE(pdf.stat().st_mode) == 0o600
    assert "SYNCT260905" in PdfReader(str(pdf)).pages[0].extract_text()
    assert main(["--home", home, "request", "show", "rq-nope"]) == 3
    assert main(["--home", home, "request", "draft", "c", "--institution", "Nowhere Clinic"]) == 3
    # drafting, listing and viewing are reads of the case's data, in the audit trail
    whats = [(e["event"]["action"], e["event"]["subtype"][0]["code"]) for e in audit.events(app.db, case_id="c")
             if e["event"]["subtype"][0]["code"] == "records-request"]
    assert ("R", "records-request") in whats and ("U", "records-request") in whats
    assert len([w for w in whats if w[0] == "R"]) >= 4
    logs = "\n".join(r.getMessage() for r in caplog.records)
    for phi in (info.patient_name, info.birth_date, "SYNCT260905", "CT Chest", SEND_TO):
        assert phi not in logs


def test_an_hl7_pathology_message_fills_the_letter_on_its_own(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    """The pathology department answers with an ORU^R01 file (Latin-1, LF line ends): once pulled,
    it is a report with its full text, and every line of the letter is received with it."""
    from fixtures import hl7v2 as fx

    app, _ = _case(tmp_path, "oncology", "no-pathology-text")
    report, cr = check_case(app, "c")
    (letter,) = draft_requests(app, "c", report, cr, send_to=SEND_TO)["drafted"]
    assert len(letter["items"]) == 4  # the report and its three receptors
    mark_sent(app, letter["id"], date(2026, 10, 2), "portal")
    (tmp_path / "reply").mkdir()
    (tmp_path / "reply" / "SP-26-01234.hl7").write_bytes(fx.pathology_oru(fx.Options("\n", "8859/1")))
    add_source(app, "c", media=str(tmp_path / "reply"))
    monkeypatch.delenv("AGGREGATOR_DATABASE_URL", raising=False)
    capsys.readouterr()
    assert main(["--home", str(tmp_path / "home"), "pull", "c"]) == 0  # the pull alone, no check by hand
    assert "records requests: 4 line(s) received" in capsys.readouterr().out
    (row,) = list_requests(app, "c")
    assert row["state"] == "received" and row["outstanding"] == 0
    filled = {ref for it in row["items"] for ref in it["filled_by"]}
    report, cr = check_case(app, "c")
    (path_item,) = [i for i in report["items"] if i["id"] == "pathology-report"]
    assert path_item["status"] == "complete"
    reports = {f"DiagnosticReport/{e['resource']['id']}": e["resource"]
               for e in cr.record.entries(types={"DiagnosticReport"})}
    # what filled the pathology line: the FHIR summary's full copy from the message, with its text
    import base64

    texts = [base64.b64decode(reports[ref]["presentedForm"][0]["data"]).decode("utf-8")
             for ref in sorted(filled) if ref in reports and reports[ref].get("presentedForm")]
    assert any("Nottingham histologic grade 2 of 3" in t and fx.NAME_WITH_ACCENT in t for t in texts), filled
