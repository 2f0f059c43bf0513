"""ORU^R01 -> DiagnosticReport + Observations with the full text, on messages from ``fixtures.hl7v2``.

Covers the variations the issue names: CR / LF / CRLF segment ends, escape sequences, repeated
OBR groups, MSH-18 character sets (and a batch mixing them), a CAP-style synoptic report as OBX
lines, plus the clear refusals (undeclared bytes, unknown sets, character-set switches).
"""

from __future__ import annotations

import base64
from typing import Any

import pytest

from aggregator.errors import UnsupportedInput
from connectors import hl7v2, hl7v2_results
from fixtures import generate as g
from fixtures import hl7v2 as fx

VARIANTS = [fx.Options("\r", "UNICODE UTF-8"), fx.Options("\n", "UNICODE UTF-8"), fx.Options("\r\n", None),
            fx.Options("\n", "8859/1"), fx.Options("\r\n", "8859/1")]


def _resources(data: bytes) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    orders, others = hl7v2_results.read_orders(data)
    assert others == []
    out = [r for _, r in hl7v2_results.resources(orders, "file:path.hl7", {"reference": "Patient/doc-1"})]
    return ([r for r in out if r["resourceType"] == "DiagnosticReport"],
            [r for r in out if r["resourceType"] == "Observation"])


def _text(report: dict[str, Any]) -> str:
    (form, *_) = report["presentedForm"]
    assert form["contentType"] == "text/plain; charset=utf-8"
    return base64.b64decode(form["data"]).decode("utf-8")


@pytest.mark.parametrize("options", VARIANTS, ids=lambda o: f"{o.line_end!r}-{o.charset}")
def test_pathology_report_keeps_its_full_text_in_order(options: fx.Options) -> None:
    data = fx.pathology_oru(options)
    if options.charset == "8859/1":
        assert "Müller".encode("iso8859-1") in data  # really Latin-1 bytes, not UTF-8
    reports, observations = _resources(data)
    path, synoptic = reports
    text = _text(path)
    # every line of the pathologist's report, in the order written (a section heading as the
    # label its OBX lines carry)
    at = 0
    for line in (ln.strip() for ln in g.pathology_report_text().splitlines() if ln.strip()):
        line = f"{fx.SECTION_CODES[line][1]}:" if line in fx.SECTION_CODES else line
        found = text.find(line, at)
        assert found >= 0, line
        at = found + len(line)
    # escapes: every separator given back, a line break, a hex byte in the message's character set
    assert fx.TRICKY in text
    assert "Addendum: none.\nCafé tissue handling verified." in text
    assert f"Reviewed in consultation by {fx.NAME_WITH_ACCENT}." in text
    # the report as the checklist reads it
    assert path["status"] == "final" and path["code"]["coding"][0] == {
        "system": "http://loinc.org", "code": "60568-3", "display": "Pathology Synoptic report"}
    assert path["category"] == [{"coding": [{"system": hl7v2_results.V2_0074, "code": "SP"}]}]
    assert {"type": {"coding": [{"system": hl7v2_results.V2_0203, "code": "ACSN"}]}, "value": g.PATH_ACCESSION} \
        in path["identifier"]
    assert path["effectiveDateTime"] == "2026-08-20T09:00:00-05:00"
    assert path["issued"] == "2026-08-22T16:40:00-05:00"
    assert path["subject"] == {"reference": "Patient/doc-1"}
    receptors = {o["code"]["coding"][0]["code"]: o for o in observations if o["code"]["coding"][0]["system"]
                 == "http://loinc.org" and o["code"]["coding"][0]["code"] in ("16112-5", "16113-3", "48676-1")}
    assert {k: o["valueCodeableConcept"]["coding"][0]["code"] for k, o in receptors.items()} == {
        "16112-5": "10828004", "16113-3": "10828004", "48676-1": "260385009"}
    assert all(f"Observation/{o['id']}" in [r["reference"] for r in path["result"]] for o in receptors.values())
    assert synoptic["code"]["coding"][0]["code"] == "60567-5"
    assert len(synoptic["result"]) == len(fx.SYNOPTIC)


def test_cap_synoptic_report_as_obx_lines() -> None:
    (_, synoptic), observations = _resources(fx.pathology_oru())
    text = _text(synoptic)
    for line in ("Procedure: Core needle biopsy", "Specimen Laterality: Left",
                 "Histologic Type: Invasive carcinoma of no special type (ductal)",
                 "Histologic Grade (Nottingham): Grade 2 (scores of 6 or 7)",
                 "Greatest Linear Extent of Invasive Carcinoma: 9 mm", "Lymphovascular Invasion: Not identified",
                 "Ductal Carcinoma In Situ:\nPresent, intermediate nuclear grade, solid and cribriform",
                 "Ki-67 Proliferation Index: 18 %"):
        assert line in text, line
    assert text.index("Procedure:") < text.index("Histologic Type:") < text.index("Ki-67")
    by_q = {o["code"]["coding"][0]["code"]: o for o in observations
            if o["code"]["coding"][0]["system"].endswith(":CAPECC")}
    assert by_q["90003"]["valueCodeableConcept"]["coding"][0]["display"] == \
        "Invasive carcinoma of no special type (ductal)"
    assert by_q["90005"]["valueQuantity"] == {"value": 9, "unit": "mm", "system": "http://unitsofmeasure.org",
                                              "code": "mm"}
    assert by_q["90008"]["valueQuantity"]["value"] == 18
    assert by_q["90007"]["valueString"].startswith("Present, intermediate")
    assert by_q["90002"]["identifier"] == [{"system": "urn:aggregator:hl7v2-obx-sub-id", "value": "1.2"}]


def test_repeated_obr_groups_in_a_batch_with_mixed_character_sets() -> None:
    data = fx.batch([fx.lab_oru(fx.Options("\n", None)), fx.pathology_oru(fx.Options("\n", "8859/1"))], "\n")
    assert hl7v2.looks_like_hl7(data[:64])
    reports, observations = _resources(data)
    assert [r["code"]["coding"][0]["code"] for r in reports] == ["57021-8", "24323-8", "60568-3", "60567-5"]
    cbc, cmp_, path, _ = reports
    assert len(cbc["result"]) == len(fx.CBC) and len(cmp_["result"]) == len(fx.CMP)
    assert f"Reviewed in consultation by {fx.NAME_WITH_ACCENT}." in _text(path)
    by_code = {o["code"]["coding"][0]["code"]: o for o in observations}
    assert by_code["718-7"]["valueQuantity"] == {"value": 11.8, "unit": "g/dL", "system": "http://unitsofmeasure.org",
                                                 "code": "g/dL"}
    assert by_code["718-7"]["interpretation"][0]["coding"][0]["code"] == "L"
    assert by_code["718-7"]["referenceRange"] == [{"text": "12.0-15.5"}]
    assert by_code["777-3"]["interpretation"][0]["coding"][0]["code"] == "H"
    assert by_code["1920-8"]["valueQuantity"]["comparator"] == "<"
    assert by_code["1920-8"]["valueQuantity"]["value"] == 10
    assert "Hemoglobin [Mass/volume] in Blood: 11.8 g/dL [L]" in _text(cbc)
    assert _text(cbc).rstrip().endswith("Panel 1 drawn fasting.")
    assert by_code["718-7"]["effectiveDateTime"] == "2026-09-15T07:30:00-05:00"
    assert cbc["category"][0]["coding"][0]["code"] == "LAB"


def test_an_mllp_export_is_read_message_by_message() -> None:
    """Each message framed as on the wire: <VT> message <FS><CR>."""
    framed = b"".join(b"\x0b" + m + b"\x1c\r" for m in (fx.lab_oru(), fx.pathology_oru()))
    assert hl7v2.looks_like_hl7(framed[:64])
    reports, _ = _resources(framed)
    assert len(reports) == 4 and len(hl7v2.read_patients(framed)) == 2


def test_an_attached_pdf_and_other_message_types() -> None:
    pdf = b"%PDF-1.4 synthetic"
    segs = [fx._pid(), fx.obr(1, "P1", "F1", "11526-1^Pathology report^LN", "20260820", "", "SP"),
            f"OBX|1|ED|11526-1^Pathology report^LN||^application^pdf^Base64^{base64.b64encode(pdf).decode()}||||||F"]
    (report,), observations = _resources(fx.message(segs, "ED1"))
    assert observations == [] and report["effectiveDateTime"] == "2026-08-20"
    _text_form, doc = report["presentedForm"]
    assert base64.b64decode(doc["data"]) == pdf and doc["contentType"] == "application/pdf"
    assert "[Pathology report: attached document (application/pdf)]" in _text(report)
    adt = b"MSH|^~\\&|ADT|H|||20260101||ADT^A01|A1|P|2.5.1\rPID|1||1^^^H^MR||DOE^JANE\r"
    assert hl7v2_results.read_orders(adt) == ([], ["ADT^A01"])
    bad = [*segs[:2], "OBX|1|ED|1^X^LN||^application^pdf^Base64^***||||||F"]
    with pytest.raises(UnsupportedInput, match="not valid BASE64"):
        hl7v2_results.read_orders(fx.message(bad, "ED2"))


@pytest.mark.parametrize(("raw", "message"), [
    ("MSH|^~\\&|LAB|H|||20260101||ORU^R01|1|P|2.5.1||||||ASCII\rNTE|1||Caf\xe9\r", "holds bytes outside it"),
    ("MSH|^~\\&|LAB|H|||20260101||ORU^R01|1|P|2.5.1||||||KLINGON\r", "is not supported"),
    ("MSH|^~\\&|LAB|H|||20260101||ORU^R01|1|P|2.5.1\rPID|1||1||\\C2842\\DOE^J\r", "switch character sets"),
])
def test_clear_refusals(raw: str, message: str) -> None:
    with pytest.raises(UnsupportedInput, match=message):
        data = raw.encode("latin-1")
        hl7v2.read_patients(data)
        hl7v2_results.read_orders(data)


def test_unescape_table() -> None:
    sep = hl7v2.Separators("|", "^", "~", "\\", "&")
    cases = {"a\\F\\b\\S\\c\\T\\d\\R\\e\\E\\f": "a|b^c&d~e\\f", "x\\.br\\y": "x\ny", "\\H\\bold\\N\\": "bold",
             "s\\.sp2\\t": "s\n\nt", "\\X414243\\": "ABC", "keep \\Q\\ as is": "keep \\Q\\ as is",
             "open \\F": "open \\F", "\\Zlocal\\z": "z", "\\.in+4\\indent": "indent"}
    for raw, want in cases.items():
        assert hl7v2.unescape(raw, sep) == want, raw
