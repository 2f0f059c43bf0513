"""Stub and summary detection (schemas/tables/stubs.yaml, aggregator/normalize/stubs.py).

Positive examples are the stand-ins records really hold in place of a report or note; negative
examples are full documents, including ones that mention another document in passing ("see
comment", "HER2 FISH to follow") - a false ``summary-only`` is a false gap. The last tests run
the rules over every real note and report in the public sample data: none may be flagged.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest

from aggregator.checklist import evaluate, load_checklist
from aggregator.checklist.index import _document_facts
from aggregator.model import CaseInfo, DocumentFile, NormalizedRecord, SourceInfo, TextProfile
from aggregator.normalize import stubs
from aggregator.normalize.classify import classify
from fixtures import pdf
from fixtures.generate import CT_REPORT, MG_REPORT, NOTES, pathology_report_text

PATH = frozenset({"report", "pathology-report"})
RAD = frozenset({"report", "radiology-report"})
NOTE = frozenset({"document", "note", "note:progress"})


def verdict_of(text: str, classes: frozenset[str] = PATH) -> stubs.Verdict | None:
    return stubs.verdict(stubs.kind_of(classes), stubs.profile_text(text))


# --- positive: stand-ins for the document ------------------------------------------------------

POINTERS = [
    (PATH, "See outside report.", "See outside report"),
    (PATH, "SURGICAL PATHOLOGY\nAccession S26-4411\n\nReport to follow.", "Report to follow"),
    (PATH, "Specimen received in formalin. Final report pending.", "Final report pending"),
    (PATH, "Please refer to the scanned document in the Media tab for the complete pathology report.",
     "refer to the scanned"),
    (PATH, "Outside slides reviewed at Mercy. Refer to the outside pathology report from Mercy Hospital dated "
           "03/02/2026.", "Refer to the outside"),
    (PATH, "<html><body><h2>Pathology</h2><p>See attached PDF.</p></body></html>", "See attached PDF"),
    (PATH, "FINAL DIAGNOSIS: See separate report.", "See separate report"),
    (RAD, "Preliminary wet read: no pneumothorax. Formal report to follow.", "Formal report to follow"),
    (RAD, "CT abdomen performed at an outside facility. See scanned document.", "See scanned document"),
    (RAD, "Images read by outside radiologist; report scanned into the chart.", "scanned into the chart"),
    (NOTE, "See scanned document.", "See scanned document"),
    (NOTE, "Note to follow.", "Note to follow"),
    (NOTE, "Office visit 2026-09-22. Dictation pending.", "Dictation pending"),
]


@pytest.mark.parametrize(("classes", "text", "trigger"), POINTERS)
def test_pointer_phrases_are_stubs_and_name_their_trigger(classes: frozenset[str], text: str, trigger: str) -> None:
    raw = text.encode()
    prof = stubs.profile_bytes(raw, "text/html" if text.startswith("<html") else "text/plain")
    assert prof is not None
    v = stubs.verdict(stubs.kind_of(classes), prof)
    assert v is not None and v.code == "pointer"
    assert v.trigger.lower() == trigger.lower()
    assert trigger.lower() in stubs.judge(classes, [prof]).lower()


@pytest.mark.parametrize(("classes", "text"), [
    (PATH, "Benign."),
    (PATH, "Carcinoma, see comment."),
    (RAD, "Normal."),
    (RAD, "Unremarkable study."),
    (NOTE, "Pt seen. Stable. RTC 3 mo."),
])
def test_very_short_texts_are_stubs(classes: frozenset[str], text: str) -> None:
    v = verdict_of(text, classes)
    assert v is not None and v.code == "short"
    assert v.trigger == text  # the whole (short) text is quoted


def test_pathology_text_without_a_diagnosis_is_not_the_report() -> None:
    requisition = """SURGICAL PATHOLOGY REQUISITION
Specimen: left breast, 2 o'clock, ultrasound-guided core needle biopsy, four cores in formalin.
Clinical history: 55-year-old woman, 11 mm irregular mass, BI-RADS 4C on screening mammography.
Collected 2026-08-20 at 09:10 by the breast imaging service; received in the laboratory at 10:14.
Gross description: four tan-white cylindrical cores, 1.2 to 1.8 cm, entirely submitted in cassette A1.
"""
    v = verdict_of(requisition)
    assert v == stubs.Verdict("missing-section", "diagnosis")
    assert "no diagnosis section" in stubs.describe("pathology-report", v)


# --- negative: full documents --------------------------------------------------------------------

CYTOLOGY = """GYNECOLOGIC CYTOLOGY REPORT
Specimen: cervical/endocervical, ThinPrep liquid-based preparation.
Specimen adequacy: satisfactory for evaluation; endocervical/transformation zone component present.
Interpretation/Result:
NEGATIVE FOR INTRAEPITHELIAL LESION OR MALIGNANCY.
Organisms: none identified. Screened by J. Ortiz, CT(ASCP). Reviewed by pathologist.
"""

PATH_WITH_ADDENDUM = """SURGICAL PATHOLOGY REPORT
DIAGNOSIS:
Right breast, lumpectomy:
- Invasive ductal carcinoma, Nottingham grade 3 (3+3+2), 2.1 cm.
- Margins negative; closest margin (posterior) 3 mm.
- Lymphovascular invasion present. Sentinel lymph nodes: 0 of 3 positive.
COMMENT: ER and PR are positive; HER2 IHC is equivocal (2+). HER2 FISH results to follow in an addendum.
See also the synoptic report below. Refer to the prior biopsy (S26-1003) for comparison.
SYNOPTIC REPORT: Procedure: excision. Laterality: right. Histologic type: invasive carcinoma of no special type.
"""

SHORT_REAL_RADIOLOGY = "EXAM: XR chest 2 views. FINDINGS: Lungs are clear. No effusion. IMPRESSION: No acute disease."

FRAGMENT_HTML = """<div xmlns="http://www.w3.org/1999/xhtml"><h3>Final diagnosis</h3><p>Skin, left forearm, shave
biopsy: basal cell carcinoma, nodular type, extending to the deep margin. Peripheral margins free.</p>
<h3>Microscopic</h3><p>Nests of basaloid cells with peripheral palisading and retraction artifact.</p></div>"""


@pytest.mark.parametrize(("classes", "text"), [
    (PATH, pathology_report_text()),
    (PATH, CYTOLOGY),
    (PATH, PATH_WITH_ADDENDUM),
    (RAD, MG_REPORT),
    (RAD, CT_REPORT),
    (RAD, SHORT_REAL_RADIOLOGY),
    (NOTE, "Follow-up of left breast cancer on letrozole since September. Tolerating well, mild arthralgia. "
           "Exam unremarkable, no palpable axillary nodes. Labs drawn today; results to follow. Plan: continue "
           "letrozole, DEXA scan before the next visit, return in three months."),
    *((NOTE, n[4]) for n in NOTES),
])
def test_full_documents_are_not_stubs(classes: frozenset[str], text: str) -> None:
    prof = stubs.profile_text(text)
    assert stubs.verdict(stubs.kind_of(classes), prof) is None, prof
    assert stubs.judge(classes, [prof]) == ""


def test_html_pathology_report_keeps_its_headings() -> None:
    prof = stubs.profile_bytes(FRAGMENT_HTML.encode(), "application/xhtml+xml")
    assert prof is not None and "diagnosis" in prof.sections
    assert stubs.verdict("pathology-report", prof) is None


def test_pdf_and_forms_are_not_judged_by_their_bytes() -> None:
    """No text is extracted from a PDF here: a one-line PDF is not called a stub (nor full)."""
    one_line = pdf.text_pdf("See outside report.", title="Pathology")
    assert stubs.profile_bytes(one_line, "application/pdf") is None
    assert stubs.profile_bytes(one_line, "") is None  # sniffed
    sdc = b'<SDCSubmissionPackage xmlns="urn:ihe:qrph:sdc:2016"><Body title="Diagnosis"/></SDCSubmissionPackage>'
    assert stubs.profile_bytes(sdc, "application/xml") is None
    # a document with one stub text and one unjudged PDF still counts as the document
    assert stubs.judge(PATH, [stubs.profile_text("See outside report."), None]) == ""


def test_ccda_narrative_is_read() -> None:
    cda = b"""<ClinicalDocument xmlns="urn:hl7-org:v3"><code code="11506-3" codeSystem="2.16.840.1.113883.6.1"/>
<component><structuredBody><component><section><title>Assessment</title><text>See scanned document.</text>
</section></component></structuredBody></component></ClinicalDocument>"""
    prof = stubs.profile_bytes(cda, "application/xml")
    assert prof is not None and prof.pointer == "See scanned document"


def test_long_texts_are_not_read() -> None:
    big = ("See outside report. " + "word " * 70000).encode()
    assert stubs.profile_bytes(big, "text/plain") is None


# --- summaries of care ----------------------------------------------------------------------------


def _doc(code: str, display: str, rtype: str = "DocumentReference", **extra: Any) -> dict[str, Any]:
    return {"resourceType": rtype, "type": {"coding": [{"system": "http://loinc.org", "code": code,
                                                         "display": display}]}, **extra}


@pytest.mark.parametrize(("res", "label"), [
    (_doc("18842-5", "Discharge summary"), "discharge summary (LOINC 18842-5)"),
    (_doc("57133-1", "Referral note"), "referral note (LOINC 57133-1)"),
    (_doc("60591-5", "Patient summary Document", "Composition"), "patient summary (LOINC 60591-5)"),
    (_doc("34133-9", "Summary of episode note"), "summary of episode note (continuity of care document) "
                                                  "(LOINC 34133-9)"),
    ({"resourceType": "DocumentReference", "type": {"text": "After Visit Summary"}}, "after-visit summary"),
    ({"resourceType": "Composition", "type": {"text": "Document"}, "title": "International Patient Summary"},
     "patient summary"),
    ({"resourceType": "DocumentReference", "type": {"text": "Referral letter to oncology"}}, "referral letter"),
])
def test_summary_documents_by_type(res: dict[str, Any], label: str) -> None:
    assert stubs.summary_type(res) == label


@pytest.mark.parametrize("res", [
    _doc("11506-3", "Progress note"),
    _doc("11488-4", "Consult note"),
    _doc("11526-1", "Pathology study", "DiagnosticReport"),
    _doc("34117-2", "History and physical note"),
    # the narrative may mention a discharge summary: only the type counts
    {"resourceType": "DocumentReference", "type": {"text": "Progress note"},
     "description": "Discharge summary reviewed"},
])
def test_notes_and_reports_are_not_summaries(res: dict[str, Any]) -> None:
    assert stubs.summary_type(res) == ""


def test_wants_summary() -> None:
    assert stubs.wants_summary({"note:discharge"})
    assert not stubs.wants_summary({"note"})


def test_custom_rules_are_validated() -> None:
    from aggregator.errors import ConfigError

    with pytest.raises(ConfigError, match="required section"):
        stubs.parse_rules({"required_sections": {"pathology-report": ["diagnosis"]}})
    with pytest.raises(ConfigError, match="bad pattern"):
        stubs.parse_rules({"pointers": ["(unclosed"]})


# --- in the checklist -----------------------------------------------------------------------------

CASE = CaseInfo("case-1", "oncology", case_date="2026-03-10")
SOURCE = SourceInfo(1, "fhir", "hospital-fhir", organization="Good Hospital", pulled_at="2026-03-09T10:00:00Z")


def _record(resources: list[dict[str, Any]], docs: list[DocumentFile]) -> NormalizedRecord:
    entries = [{"fullUrl": f"urn:uuid:{r['id']}", "resource": r} for r in resources]
    return NormalizedRecord(bundle={"resourceType": "Bundle", "type": "collection", "entry": entries},
                            documents=docs, patient_ref="Patient/p1")


def _path_record(text: str) -> NormalizedRecord:
    subj = {"reference": "urn:uuid:p1"}
    doc = DocumentFile("documents/D0000001.TXT", "b" * 64, len(text), "text/plain",
                       resource_ref="DiagnosticReport/path1", text=stubs.profile_text(text))
    return _record([
        {"resourceType": "Patient", "id": "p1"},
        {"resourceType": "Procedure", "id": "bx1", "status": "completed", "subject": subj,
         "code": {"coding": [{"system": "http://snomed.info/sct", "code": "122548005"}]},
         "performedDateTime": "2026-03-02", "report": [{"reference": "urn:uuid:path1"}]},
        {"resourceType": "DiagnosticReport", "id": "path1", "status": "final", "subject": subj,
         "code": {"coding": [{"system": "http://loinc.org", "code": "11526-1"}]}, "effectiveDateTime": "2026-03-02",
         "presentedForm": [{"contentType": "text/plain", "url": doc.path, "size": doc.size}]},
    ], [doc])


def _pathology_item(rec: NormalizedRecord) -> dict[str, Any]:
    report = evaluate(load_checklist("oncology"), rec, [], CASE, [SOURCE])
    return next(i for i in report["items"] if i["id"] == "pathology-report")


def test_stub_pathology_report_is_summary_only_in_the_checklist() -> None:
    item = _pathology_item(_path_record("See outside report."))
    assert item["status"] == "missing"
    (gap,) = item["gaps"]
    assert gap["reason"] == "summary-only" and gap["resource"] == "DiagnosticReport/path1"
    assert '"See outside report"' in gap["detail"]


def test_conclusion_that_points_elsewhere_is_named() -> None:
    resources = [e["resource"] for e in _path_record("unused").entries()]
    for res in resources:
        if res["resourceType"] == "DiagnosticReport":
            res.pop("presentedForm")
            res["conclusion"] = "Outside consult. See outside pathology report."
    rec = _record(resources, [])
    (gap,) = _pathology_item(rec)["gaps"]
    assert gap["reason"] == "summary-only"
    assert 'conclusion line that points elsewhere ("See outside pathology report")' in gap["detail"]


def test_full_pathology_report_passes_in_the_checklist() -> None:
    assert _pathology_item(_path_record(pathology_report_text()))["status"] == "complete"


def test_ips_composition_does_not_satisfy_notes_but_a_note_does() -> None:
    ips = {"resourceType": "Composition", "id": "ips1", "status": "final", "subject": {"reference": "urn:uuid:p1"},
           "type": {"coding": [{"system": "http://loinc.org", "code": "60591-5"}]}, "date": "2026-03-02",
           "title": "Patient Summary", "encounter": {"reference": "urn:uuid:enc1"},
           "section": [{"title": "Problems", "text": {"status": "generated", "div":
                        "<div xmlns=\"http://www.w3.org/1999/xhtml\">Malignant neoplasm of breast, "
                        "diagnosed 2026-03-02; essential hypertension since 2015.</div>"}}]}
    enc = {"resourceType": "Encounter", "id": "enc1", "status": "finished", "subject": {"reference": "urn:uuid:p1"},
           "class": {"code": "AMB"}, "period": {"start": "2026-03-02T09:00:00Z"}}
    rec = _record([{"resourceType": "Patient", "id": "p1"}, enc, ips], [])
    report = evaluate(load_checklist("general"), rec, [], CASE, [SOURCE])
    notes = next(i for i in report["items"] if i["id"] == "clinical-notes")
    assert [g["reason"] for g in notes["gaps"]] == ["summary-only"]
    assert "patient summary" in notes["gaps"][0]["detail"]

    text = NOTES[0][4]
    note = {"resourceType": "DocumentReference", "id": "n1", "status": "current",
            "subject": {"reference": "urn:uuid:p1"},
            "type": {"coding": [{"system": "http://loinc.org", "code": "11506-3"}]}, "date": "2026-03-02T12:00:00Z",
            "context": {"encounter": [{"reference": "urn:uuid:enc1"}]},
            "content": [{"attachment": {"contentType": "text/plain", "url": "documents/D0000002.TXT", "size": 9}}]}
    doc = DocumentFile("documents/D0000002.TXT", "c" * 64, 9, "text/plain", text=stubs.profile_text(text))
    report = evaluate(load_checklist("general"), _record([{"resourceType": "Patient", "id": "p1"}, enc, ips, note],
                                                          [doc]), [], CASE, [SOURCE])
    notes = next(i for i in report["items"] if i["id"] == "clinical-notes")
    assert notes["status"] == "complete" and "DocumentReference/n1" in notes["evidence"]


def test_normalization_profiles_text_documents(tmp_path: Path) -> None:
    """The profile is made where the bytes are: normalize -> DocumentFile.text."""
    from aggregator.normalize import normalize
    from tests.support import make_sink

    def inline(ctype: str, raw: bytes) -> dict[str, Any]:
        return {"contentType": ctype, "data": base64.b64encode(raw).decode()}

    h = make_sink(tmp_path, kind="fhir")
    h.sink.resource({"resourceType": "Patient", "id": "p1"})
    for rid, att in (("d1", inline("text/plain", b"See outside report.")),
                     ("d2", inline("application/pdf", pdf.text_pdf("See outside report.", title="x")))):
        h.sink.resource({"resourceType": "DiagnosticReport", "id": rid, "status": "final",
                         "subject": {"reference": "Patient/p1"}, "code": {"text": "Surgical pathology"},
                         "presentedForm": [att]})
    src = SourceInfo(h.source_id, "fhir", "ehr", method="$everything", pulled_at="2026-03-09T10:00:00Z")
    rec = normalize(CaseInfo(h.case_id, "oncology"), [src], h.entries("done"), h.blobs)
    texts = {d.content_type: d.text for d in rec.documents}
    assert texts["text/plain"] == TextProfile(3, "See outside report", frozenset(), "See outside report.")
    assert texts["application/pdf"] is None


# --- the real documents of the public sample data ----------------------------------------------


def _attachments(res: dict[str, Any]) -> list[dict[str, Any]]:
    if res.get("resourceType") == "DocumentReference":
        return [c["attachment"] for c in res.get("content") or [] if isinstance(c.get("attachment"), dict)]
    if res.get("resourceType") == "DiagnosticReport":
        return [a for a in res.get("presentedForm") or [] if isinstance(a, dict)]
    return []


def _shared_resources(root: Path) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for f in sorted((root / "fhir").rglob("*.json")):
        data = json.loads(f.read_bytes())
        if data.get("resourceType") == "Bundle":
            out += [e["resource"] for e in data.get("entry") or [] if isinstance(e.get("resource"), dict)]
        else:
            out.append(data)
    for f in sorted((root / "fhir").rglob("*.ndjson")):
        out += [json.loads(line) for line in f.read_text(encoding="utf-8").splitlines() if line.strip()]
    return out


def test_no_real_note_or_report_in_the_sample_data_is_a_stub(shared_data: Path) -> None:
    judged = 0
    flagged = []
    for res in _shared_resources(shared_data):
        atts = [a for a in _attachments(res) if a.get("data")]
        if not atts and res.get("resourceType") != "Composition":
            continue
        texts: dict[str, TextProfile] = {}
        shown = dict(res)
        for i, a in enumerate(atts):
            prof = stubs.profile_bytes(base64.b64decode(a["data"]), str(a.get("contentType") or ""))
            if prof is not None:
                texts[f"documents/{i}"] = prof
                judged += 1
        if res.get("resourceType") == "DocumentReference":
            shown["content"] = [{"attachment": {**a, "url": f"documents/{i}"}} for i, a in enumerate(atts)]
        elif res.get("resourceType") == "DiagnosticReport":
            shown["presentedForm"] = [{**a, "url": f"documents/{i}"} for i, a in enumerate(atts)]
        facts = _document_facts(res["resourceType"], shown, classify(res), texts)
        if facts.stub:
            flagged.append((res["resourceType"], res.get("id"), facts.stub))
    assert judged > 1000  # the Synthea notes (1,215 bulk + 220 in bundles) and the US Core examples
    assert flagged == []


def test_no_real_ccda_narrative_is_a_stub(shared_data: Path) -> None:
    files = sorted((shared_data / "ccda").rglob("*.xml"))
    assert files
    for f in files:
        prof = stubs.profile_bytes(f.read_bytes(), "application/xml")
        assert prof is not None and prof.words > 100, f.name
        assert stubs.verdict("note", prof) is None, f.name
