"""Issue 11, part 1: a document counts for the case's patient only once its own demographics agree.

Every record goes the whole way: generated download (plus the files of :mod:`fixtures.identity`)
on disk -> media pull -> normalize -> checklist -> package. Nothing here is mocked.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import jsonschema

from aggregator.app import App
from aggregator.cases import add_source, create_case
from aggregator.jobs.pull import pull_case
from aggregator.ledger import entries_for_case
from aggregator.pipeline import check_case, package_case
from fixtures import generate_download
from fixtures import identity as fx
from fixtures.generate import DownloadInfo

SCHEMA = json.loads((Path(__file__).resolve().parents[2] / "schemas/gap-report.schema.json").read_text())


def _case(tmp_path: Path, variant: str = "complete", *, demographics: bool = True,
          extra: Any = None) -> tuple[App, DownloadInfo, Path]:
    root = tmp_path / "dl"
    info = generate_download(root, variant=variant)
    if extra is not None:
        extra(root)
    app = App.open(tmp_path / "home")
    if demographics:
        create_case(app, "c", "oncology", patient_name=info.patient_name, birth_date=info.birth_date,
                    case_date=info.case_date.isoformat())
    else:
        create_case(app, "c", "oncology", case_date=info.case_date.isoformat())
    add_source(app, "c", media=str(root))
    (summary,) = pull_case(app, "c")
    assert summary.state == "done", summary.error
    return app, info, root


def _item(report: dict[str, Any], item_id: str) -> dict[str, Any]:
    return next(i for i in report["items"] if i["id"] == item_id)


def _quarantined(app: App) -> dict[str, str]:
    return {e.key: e.reason or "" for e in entries_for_case(app.db, "c") if e.kind == "quarantine"}


def test_wrong_patient_ccda_is_quarantined_counts_for_nothing_and_is_a_conflict(tmp_path: Path) -> None:
    # no-visit-note: the follow-up visit has no note; the wrong patient's C-CDA is dated that day,
    # so if it were believed it would fill exactly that gap
    app, _info, root = _case(tmp_path, "no-visit-note", extra=fx.add_wrong_patient_ccda)
    wrong_sha = hashlib.sha256((root / fx.WRONG_NOTE_FILE).read_bytes()).hexdigest()
    out, report = package_case(app, "c", tmp_path / "pkg")
    jsonschema.validate(report, SCHEMA)

    quarantined = _quarantined(app)
    key = f"file:{fx.WRONG_NOTE_FILE}"
    assert quarantined[f"resource:{key}#docref"] == "another patient"
    assert quarantined[f"resource:{key}#patient"] == "another patient"
    assert quarantined[f"binary:{key}"].startswith("attachment of excluded")

    notes = _item(report, "clinical-notes")
    assert notes["status"] != "complete" and {g["reason"] for g in notes["gaps"]} == {"not-found"}
    ident = _item(report, "identity")
    assert ident["status"] == "missing"
    (gap,) = ident["gaps"]
    assert gap["reason"] == "identity-conflict" and fx.WRONG_NOTE_FILE in gap["detail"]
    assert fx.OTHER.family in gap["detail"]  # the report names who the document is about (never a log)
    # the right patient's own C-CDA was compared and agrees: it is not a conflict
    assert "consult-note.xml" not in gap["detail"]

    bundle = json.loads((out / "fhir/bundle.json").read_text())
    kinds = [e["resource"]["resourceType"] for e in bundle["entry"]]
    assert kinds.count("Patient") == 1
    described = json.dumps([e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] in
                            ("DocumentReference", "Composition")])
    assert fx.WRONG_NOTE_TITLE not in described and fx.OTHER.family not in described
    assert fx.WRONG_NOTE_TITLE not in (out / "summary.html").read_text()
    manifest = json.loads((out / "manifest.json").read_text())
    assert wrong_sha not in json.dumps(manifest)


def test_right_patient_ccda_and_hl7v2_are_compared_and_count(tmp_path: Path) -> None:
    def extra(root: Path) -> None:
        fx.add_hl7v2_result(root, fx.ME, "portal-c/result-hgb.hl7")

    app, _info, _root = _case(tmp_path, extra=extra)
    report, cr = check_case(app, "c")
    assert sorted(cr.record.identity["compared"]) == ["portal-b/consult-note.xml", "portal-c/result-hgb.hl7"]
    ident = _item(report, "identity")
    assert ident["status"] == "complete" and not ident["gaps"]
    docs = [r for r in cr.record.resources("DocumentReference")
            if r.get("description", "").startswith("HL7 v2")]
    (hl7doc,) = docs
    assert hl7doc["subject"]["reference"] == f"urn:uuid:{cr.record.patient_ref.split('/')[1]}"
    assert hl7doc["content"][0]["attachment"]["contentType"] == "text/plain"


def test_wrong_patient_hl7v2_is_another_patient(tmp_path: Path) -> None:
    def extra(root: Path) -> None:
        fx.add_hl7v2_result(root, fx.OTHER, "portal-c/result-other.hl7")

    app, _info, _root = _case(tmp_path, extra=extra)
    report, _cr = check_case(app, "c")
    assert _quarantined(app)["resource:file:portal-c/result-other.hl7#docref"] == "another patient"
    (gap,) = _item(report, "identity")["gaps"]
    assert gap["reason"] == "identity-conflict" and "result-other.hl7" in gap["detail"]


def test_bare_documents_are_kept_marked_unverified_and_named(tmp_path: Path) -> None:
    app, _info, _root = _case(tmp_path, extra=fx.add_bare_text)
    report, cr = check_case(app, "c")
    files = {u["file"] for u in cr.record.identity["unverified"]}
    assert {"portal-b/letter.txt", "portal-b/pathology-report.pdf"} <= files
    for r in cr.record.resources("DocumentReference"):
        tags = {t.get("code") for t in (r.get("meta") or {}).get("tag") or []}
        title = r["content"][0]["attachment"].get("title")
        assert ("unverified" in tags) == (title in ("letter.txt", "pathology-report.pdf")), title
    ident = _item(report, "identity")
    # kept, not a gap, but the item does not read "confirmed" and names what it could not compare
    assert ident["status"] == "complete"
    assert "confirmed" not in ident["detail"]
    assert "letter.txt" in ident["detail"] and "pathology-report.pdf" in ident["detail"]
    assert any(d.title == "letter.txt" for d in cr.record.documents)


def test_anonymous_patient_with_many_observations_never_confirms_identity(tmp_path: Path) -> None:
    app, _info, _root = _case(tmp_path, demographics=False, extra=fx.add_anonymous_patient_bundle)
    report, cr = check_case(app, "c")
    jsonschema.validate(report, SCHEMA)
    ident = _item(report, "identity")
    assert ident["status"] == "missing"
    (gap,) = ident["gaps"]
    assert gap["reason"] == "several-patients" and gap["detail"].startswith("several patients in the sources: pick one")
    several = cr.record.identity["several"]
    counts = sorted(m["count"] for group in several for m in group if m["kind"] == "fhir")
    assert 300 in counts
    # nothing chosen: neither the anonymous Patient's Observations nor the real patient's labs count
    merged = cr.record.resources("Patient")[0]
    assert "name" not in merged and "birthDate" not in merged
    reasons = _quarantined(app)
    anon = [k for k, v in reasons.items() if fx.ANONYMOUS_FILE in k]
    assert len(anon) == 301 and all(reasons[k].startswith("several patients") for k in anon)


def test_anonymous_patient_beside_a_pinned_case_is_another_patient(tmp_path: Path) -> None:
    app, _info, _root = _case(tmp_path, extra=fx.add_anonymous_patient_bundle)
    report, cr = check_case(app, "c")
    ident = _item(report, "identity")
    assert ident["status"] == "complete"
    assert "Rivera" in json.dumps(cr.record.resources("Patient")[0]["name"])
    reasons = _quarantined(app)
    anon = [k for k in reasons if fx.ANONYMOUS_FILE in k]
    assert len(anon) == 301 and all(reasons[k] == "another patient" for k in anon)


def test_anonymous_patient_alone_is_not_confirmed(tmp_path: Path) -> None:
    root = tmp_path / "dl"
    fx.add_anonymous_patient_bundle(root, observations=12)
    app = App.open(tmp_path / "home")
    create_case(app, "c", "general", case_date="2026-10-01")
    add_source(app, "c", media=str(root))
    pull_case(app, "c")
    report, cr = check_case(app, "c")
    ident = _item(report, "identity")
    assert ident["status"] == "partial"
    assert [g["reason"] for g in ident["gaps"]] == ["identity-unverified"]
    assert cr.record.identity["chosen"] and cr.record.identity["anonymous"]


def test_two_real_patients_without_demographics_choose_neither(tmp_path: Path) -> None:
    app, info, _root = _case(tmp_path, demographics=False, extra=fx.add_second_patient_bundle)
    report, cr = check_case(app, "c")
    jsonschema.validate(report, SCHEMA)
    ident = _item(report, "identity")
    (gap,) = ident["gaps"]
    assert ident["status"] == "missing" and gap["reason"] == "several-patients"
    several = cr.record.identity["several"]
    assert len(several) == 2
    listed = {m["resource"]: m["count"] for group in several for m in group}
    assert listed["Patient/00000000-0000-4000-8000-0000000000b2"] == 5
    assert f"Patient/{info.patient_id}" in listed
    for resource, count in listed.items():
        assert resource in gap["detail"] and f"{count} " in gap["detail"]
    # ids and counts only: neither person's name is in the listing
    assert fx.OTHER.family not in gap["detail"] and fx.ME.family not in gap["detail"]
    merged = cr.record.resources("Patient")[0]
    assert "name" not in merged and "identifier" not in merged
    assert not cr.record.resources("Observation")
    # the same download, pinned by the typed demographics, chooses the right person
    app2, _info2, _ = _case(tmp_path / "pinned", extra=fx.add_second_patient_bundle)
    report2, cr2 = check_case(app2, "c")
    assert _item(report2, "identity")["status"] == "complete"
    assert cr2.record.identity["chosen"] and not cr2.record.identity["several"]
